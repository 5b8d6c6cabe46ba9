"""Pooling models, the parts every side shares: `PoolingParams`, the outputs (vLLM's names), the pooler
configuration (read from sentence-transformers' files) and the pooling itself.

A pooling request is a prefill-only request: the scheduler runs its whole prompt in one step and, instead of a
sampled token, the step gives one vector (`embed`, `classify`, `score`) or one per token (`token_embed`,
`token_classify`). The engine core runs them with `core.pooling_core`; the front end fills these outputs.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch
import torch.nn.functional as F

TASKS = ("embed", "classify", "score", "token_embed", "token_classify")
POOLING_TYPES = ("MEAN", "CLS", "LAST", "ALL")
# --convert (and the older --task spellings) -> what the model becomes
CONVERTS = ("auto", "none", "embed", "classify", "reward")
TASK_ALIASES = {"embed": "embed", "embedding": "embed", "classify": "classify", "classification": "classify",
                "score": "classify", "reward": "reward", "generate": "none"}


@dataclass
class PoolingParams:
    """What one pooling request asks for (vLLM's fields).

    task: embed | classify | score | token_embed | token_classify (None: the model's own, set by the front end).
    dimensions: Matryoshka truncation of an embedding (only where the model was trained for it).
    normalize: L2-normalise embeddings (None: the model's pooler configuration).
    use_activation: softmax / sigmoid on classification logits (None: yes).
    truncate_prompt_tokens: keep only the last k prompt tokens (-1: max_model_len).
    """
    task: Optional[str] = None
    dimensions: Optional[int] = None
    normalize: Optional[bool] = None
    use_activation: Optional[bool] = None
    truncate_prompt_tokens: Optional[int] = None
    # a text pair's segment ids (cross-encoders), filled by the front end when it tokenizes the pair
    token_type_ids: Optional[list[int]] = None
    output_kind: str = "final"  # one output per request, always

    def __post_init__(self):
        if self.task is not None and self.task not in TASKS:
            raise ValueError(f"task must be one of {', '.join(TASKS)}, got {self.task!r}")
        if self.dimensions is not None and (isinstance(self.dimensions, bool) or not isinstance(self.dimensions, int)
                                            or self.dimensions < 1):
            raise ValueError(f"dimensions must be a positive integer, got {self.dimensions!r}")
        k = self.truncate_prompt_tokens
        if k is not None and (isinstance(k, bool) or not isinstance(k, int) or (k < 1 and k != -1)):
            raise ValueError(f"truncate_prompt_tokens must be -1 or >= 1, got {k!r}")

    def clone(self, **changes) -> "PoolingParams":
        return dataclasses.replace(self, **changes)


# outputs, as vLLM names them ---------------------------------------------------------------------------------
@dataclass
class PoolingOutput:
    data: torch.Tensor  # float32, [dim] for a pooled vector, [num_tokens, dim] for token tasks


@dataclass
class PoolingRequestOutput:
    request_id: str
    outputs: PoolingOutput
    prompt_token_ids: list[int]
    finished: bool = True
    prompt: Optional[str] = None
    error: Optional[str] = None
    metrics: dict = field(default_factory=dict)
    engine_request_id: Optional[str] = None
    num_cached_tokens: int = 0


@dataclass
class EmbeddingOutput:
    embedding: list[float]

    @property
    def hidden_size(self) -> int:
        return len(self.embedding)


@dataclass
class ClassificationOutput:
    probs: list[float]

    @property
    def num_classes(self) -> int:
        return len(self.probs)


@dataclass
class ScoringOutput:
    score: float


@dataclass
class _TypedRequestOutput:
    request_id: str
    outputs: Any
    prompt_token_ids: list[int]
    finished: bool = True


class EmbeddingRequestOutput(_TypedRequestOutput):
    @classmethod
    def from_base(cls, out: PoolingRequestOutput) -> "EmbeddingRequestOutput":
        data = out.outputs.data
        if data.dim() != 1:
            raise ValueError("embeddings are one vector per prompt (use encode for per-token outputs)")
        return cls(out.request_id, EmbeddingOutput(data.tolist()), out.prompt_token_ids, out.finished)


class ClassificationRequestOutput(_TypedRequestOutput):
    @classmethod
    def from_base(cls, out: PoolingRequestOutput) -> "ClassificationRequestOutput":
        return cls(out.request_id, ClassificationOutput(out.outputs.data.tolist()), out.prompt_token_ids,
                   out.finished)


class ScoringRequestOutput(_TypedRequestOutput):
    @classmethod
    def from_base(cls, out: PoolingRequestOutput) -> "ScoringRequestOutput":
        data = out.outputs.data
        if data.numel() != 1:
            raise ValueError(f"a score is one number; this model gives {data.numel()} per input")
        return cls(out.request_id, ScoringOutput(float(data.reshape(-1)[0])), out.prompt_token_ids, out.finished)


# the pooler configuration -------------------------------------------------------------------------------------
@dataclass
class PoolerConfig:
    """How hidden states become the output: `pooling_type` MEAN | CLS | LAST | ALL, `normalize` embeddings,
    Matryoshka support. Read from sentence-transformers' modules.json / 1_Pooling/config.json where the model
    folder has them, else the architecture's default; `--pooler-config` JSON overrides any field."""
    pooling_type: str = "LAST"
    normalize: bool = True
    is_matryoshka: bool = False
    matryoshka_dimensions: Optional[list[int]] = None
    dense: list[str] = field(default_factory=list)  # sentence-transformers Dense module folders, in order
    source: str = "default"

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


_ST_MODES = {"mean": "MEAN", "cls": "CLS", "lasttoken": "LAST", "max": "MAX", "mean_sqrt_len_tokens": "MEAN_SQRT",
             "weightedmean": "WEIGHTED_MEAN"}
_ST_MODE_FLAGS = (("CLS", "pooling_mode_cls_token"), ("MEAN", "pooling_mode_mean_tokens"),
                  ("LAST", "pooling_mode_lasttoken"), ("MAX", "pooling_mode_max_tokens"),
                  ("MEAN_SQRT", "pooling_mode_mean_sqrt_len_tokens"), ("WEIGHTED_MEAN", "pooling_mode_weightedmean_tokens"))


def read_sentence_transformers_pooling(folder: Path) -> Optional[dict]:
    """{"pooling_type", "normalize", "dense"} from sentence-transformers' modules.json, or None when there is
    none. The pipeline must read Transformer, Pooling, then any Dense projections, then Normalize; modules
    pageport does not run are refused rather than skipped."""
    modules_file = folder / "modules.json"
    if not modules_file.is_file():
        return None
    modules = json.loads(modules_file.read_text())
    found: dict = {"normalize": False, "dense": []}
    for m in modules:
        kind = m.get("type", "").rsplit(".", 1)[-1]
        if kind == "Transformer":
            continue
        misplaced = (kind in ("Dense", "Pooling") and found["normalize"]) or (kind == "Dense"
                                                                              and "pooling_type" not in found)
        if misplaced:
            raise ValueError(f"{modules_file}: a {kind} module at that place in the pipeline is not supported "
                             "(Transformer, Pooling, Dense..., Normalize are)")
        if kind == "Normalize":
            found["normalize"] = True
        elif kind == "Dense":
            found["dense"].append(str(folder / m.get("path", "")))
        elif kind == "Pooling":
            cfg_file = folder / m.get("path", "") / "config.json"
            cfg = json.loads(cfg_file.read_text()) if cfg_file.is_file() else {}
            mode = cfg.get("pooling_mode")  # sentence-transformers >= 6 names it (or them); earlier, one flag each
            modes = ([_ST_MODES.get(n, n.upper()) for n in ([mode] if isinstance(mode, str) else mode)]
                     if mode is not None else [name for name, key in _ST_MODE_FLAGS if cfg.get(key)])
            if len(modes) != 1 or modes[0] not in POOLING_TYPES:
                raise ValueError(f"{cfg_file}: pooling modes {modes or 'none'} are not supported "
                                 f"(one of cls, mean, lasttoken)")
            found["pooling_type"] = modes[0]
        else:
            raise ValueError(f"{modules_file}: sentence-transformers module {m.get('type')!r} is not supported "
                             f"(Transformer, Pooling, Dense and Normalize are)")
    return found


_DENSE_ACTIVATIONS = ("Identity", "Tanh", "ReLU", "GELU", "Sigmoid", "SiLU")


def load_dense(folder: str, device: torch.device) -> torch.nn.Module:
    """One sentence-transformers Dense module (config.json + model.safetensors or pytorch_model.bin): a linear
    projection of the pooled embedding and its activation, in float32."""
    path = Path(folder)
    cfg = json.loads((path / "config.json").read_text())
    act = str(cfg.get("activation_function", "torch.nn.modules.linear.Identity")).rsplit(".", 1)[-1]
    if act not in _DENSE_ACTIVATIONS:
        raise ValueError(f"{path}: Dense activation {cfg.get('activation_function')!r} is not supported "
                         f"({', '.join(_DENSE_ACTIVATIONS)} are)")
    linear = torch.nn.Linear(cfg["in_features"], cfg["out_features"], bias=cfg.get("bias", True))
    if (path / "model.safetensors").is_file():
        from safetensors.torch import load_file
        state = load_file(str(path / "model.safetensors"))
    else:
        state = torch.load(path / "pytorch_model.bin", map_location="cpu", weights_only=True)
    linear.load_state_dict({k.removeprefix("linear."): v for k, v in state.items()})
    return torch.nn.Sequential(linear, getattr(torch.nn, act)()).to(device, torch.float32).eval()


def sentence_transformers_max_seq_length(folder: Path) -> Optional[int]:
    f = folder / "sentence_bert_config.json"
    if f.is_file():
        value = json.loads(f.read_text()).get("max_seq_length")
        return int(value) if value else None
    return None


def resolve_pooler_config(hf_config, folder: Optional[Path], default_type: str,
                          override: Optional[str] = None) -> PoolerConfig:
    cfg = PoolerConfig(pooling_type=default_type)
    st = read_sentence_transformers_pooling(folder) if folder is not None else None
    if st:
        cfg.pooling_type = st.get("pooling_type", cfg.pooling_type)
        cfg.normalize = st["normalize"]
        cfg.dense = st["dense"]
        cfg.source = "sentence-transformers"
    dims = getattr(hf_config, "matryoshka_dimensions", None)
    cfg.matryoshka_dimensions = list(dims) if dims else None
    cfg.is_matryoshka = bool(getattr(hf_config, "is_matryoshka", False) or dims)
    if override:
        values = json.loads(override) if isinstance(override, str) else dict(override)
        unknown = set(values) - {f.name for f in dataclasses.fields(PoolerConfig)} - {"source"}
        if unknown:
            raise ValueError(f"pooler_config: unknown field(s) {', '.join(sorted(unknown))}; known: pooling_type, "
                             "normalize, is_matryoshka, matryoshka_dimensions, dense")
        for k, v in values.items():
            setattr(cfg, k, v)
        cfg.pooling_type = str(cfg.pooling_type).upper()
        cfg.is_matryoshka = bool(cfg.is_matryoshka or cfg.matryoshka_dimensions)
        cfg.source += " + --pooler-config"
    if cfg.pooling_type not in POOLING_TYPES:
        raise ValueError(f"pooling_type must be one of {', '.join(POOLING_TYPES)}, got {cfg.pooling_type!r}")
    return cfg


def check_dimensions(dimensions: Optional[int], pooler: PoolerConfig, hidden_size: int) -> None:
    """vLLM's rule: `dimensions` only for Matryoshka models (other models' truncated vectors are poor)."""
    if dimensions is None:
        return
    if not pooler.is_matryoshka:
        raise ValueError("this model does not support Matryoshka representations, so `dimensions` cannot change "
                         "its embedding size (a model declares it with is_matryoshka / matryoshka_dimensions in its "
                         "config, or --pooler-config '{\"is_matryoshka\": true}')")
    if pooler.matryoshka_dimensions and dimensions not in pooler.matryoshka_dimensions:
        raise ValueError(f"dimensions={dimensions} is not one this model was trained for: "
                         f"{pooler.matryoshka_dimensions}")
    if dimensions > hidden_size:
        raise ValueError(f"dimensions={dimensions} is larger than the embedding size {hidden_size}")


# pooling --------------------------------------------------------------------------------------------------------
def pool(hidden: torch.Tensor, pooling_type: str) -> torch.Tensor:
    """One sequence's hidden states [n, H] -> [H] (ALL keeps [n, H])."""
    if pooling_type == "MEAN":
        return hidden.float().mean(0)
    if pooling_type == "CLS":
        return hidden[0].float()
    if pooling_type == "LAST":
        return hidden[-1].float()
    return hidden.float()


def finish_embedding(vec: torch.Tensor, params: PoolingParams, pooler: PoolerConfig) -> torch.Tensor:
    """Matryoshka truncation first, then normalisation (of the truncated vector, as vLLM and OpenAI do)."""
    if params.dimensions is not None:
        vec = vec[..., :params.dimensions]
    normalize = pooler.normalize if params.normalize is None else params.normalize
    return F.normalize(vec, p=2, dim=-1) if normalize else vec


def classification_activation(logits: torch.Tensor, params: PoolingParams) -> torch.Tensor:
    """Probabilities: softmax over several labels, sigmoid for a single one (a cross-encoder's relevance)."""
    if params.use_activation is False:
        return logits
    return torch.sigmoid(logits) if logits.shape[-1] == 1 else torch.softmax(logits, dim=-1)


def tensor_to_bytes(t: torch.Tensor) -> tuple[bytes, list[int]]:
    t = t.detach().to("cpu", torch.float32).contiguous()
    return t.numpy().tobytes(), list(t.shape)


def tensor_from_bytes(data: bytes, shape: list[int]) -> torch.Tensor:
    return torch.frombuffer(bytearray(data), dtype=torch.float32).reshape(shape)
