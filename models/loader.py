"""load_model: config + tokenizer + weights from an HF safetensors folder, a GGUF file, or dummy."""
from __future__ import annotations

import contextlib
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional

import torch
from torch import nn
from tqdm.auto import tqdm

from pageport.models.default import default_model_path
from pageport.models.layers import quantized_linears
from pageport.models.quantization import (RUNTIME, create_weights, get_quantization_config, gguf_config,
                                          process_weights)
from pageport.models.registry import get_model_class

logger = logging.getLogger(__name__)

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "spiece.model")
FORMATS = ("auto", "safetensors", "gguf", "dummy")


@dataclass
class LoadedModel:
    model: nn.Module
    hf_config: Any  # transformers PretrainedConfig (or gguf_loader.PlainConfig)
    _tokenizer: Any  # transformers tokenizer, or None when the model folder has none
    source: str  # the file or folder the model came from
    load_format: str = ""  # safetensors | gguf | dummy (what `auto` resolved to)
    load_time_s: float = 0.0
    # a GGUF cache entry holding the tokenizer, loaded from there on first use: the engine core rarely needs it
    # (its front end loads its own), and loading it costs the core ~1 s of transformers imports
    tokenizer_dir: Optional[str] = None

    @property
    def tokenizer(self):
        if self._tokenizer is None and self.tokenizer_dir is not None:
            from pageport.models.gguf_loader import load_cached_tokenizer

            self._tokenizer = load_cached_tokenizer(Path(self.tokenizer_dir))
            self.tokenizer_dir = None
        return self._tokenizer

    @tokenizer.setter
    def tokenizer(self, value) -> None:
        self._tokenizer, self.tokenizer_dir = value, None

    def for_front_end(self) -> tuple[Any, Optional[str]]:
        """(tokenizer, None) when it is loaded, else (None, the folder the front end loads it from)."""
        return self._tokenizer, self.tokenizer_dir


def load_model(config, platform, adapt=None) -> LoadedModel:
    """Build the model for `config` (an EngineConfig whose dtype is already a torch.dtype) on
    `platform.device`. Fills config.max_model_len from the model when it is None. `adapt(model_cls, hf_config)`
    may swap the architecture's class (the pooling runner turns a decoder into an embedder or classifier)."""
    t0 = time.perf_counter()
    path, fmt = _resolve_format(resolve_model_path(config.model), config.load_format)
    trust = bool(getattr(config, "trust_remote_code", False))
    want_tokenizer = getattr(config, "tokenizer", None) is None

    weights: Optional[Iterator[tuple[str, torch.Tensor]]] = None
    n_weights = 0
    tokenizer_dir = None
    if path.suffix == ".gguf":
        from pageport.models.gguf_loader import open_gguf

        gg = open_gguf(path, tokenizer=want_tokenizer, trust_remote_code=trust, lazy_tokenizer=True)
        hf_config, tokenizer, tokenizer_dir = gg.hf_config, gg.tokenizer, gg.tokenizer_dir
        if fmt == "gguf":
            weights, n_weights = gg.weights(), len(gg.tensors)
    else:
        folder = path if path.is_dir() else path.parent
        hf_config = _load_config(path, trust)
        _lift_text_config(hf_config)
        tokenizer = _load_tokenizer(folder, trust) if want_tokenizer else None
        if fmt == "safetensors":
            weights, n_weights = _safetensors_weights(path)
    if not want_tokenizer:
        tokenizer = _load_tokenizer(Path(config.tokenizer), trust, required=True)

    _set_architecture(hf_config)
    _check_max_model_len(config, hf_config)
    model_cls = get_model_class(hf_config.architectures)
    if adapt is not None:
        model_cls = adapt(model_cls, hf_config)
    quantization = getattr(config, "quantization", None)
    if quantization == "gguf" and path.suffix == ".gguf":
        quant_config = gguf_config(gg.tensors)
    else:
        quant_config = get_quantization_config(hf_config, quantization)
    with quantized_linears() if quant_config else contextlib.nullcontext():
        model = model_cls(hf_config, platform, config.dtype)
    if quant_config:
        n_quant = create_weights(model, quant_config, platform, config.dtype)
        logger.info("quantization %s: %d linear layers", quant_config.name, n_quant)
    if weights is None:
        init_dummy_weights(model, config.seed)
    else:
        model.load_weights(tqdm(weights, total=n_weights, desc=f"Loading {fmt} weights", unit="tensor",
                                leave=False))
    if quant_config:
        process_weights(model)
        platform.empty_cache()  # dense weights quantized in the run leave freed blocks the KV-cache sizing must see
    model.eval()
    if quantization in RUNTIME:
        _quantize(model, platform, quantization)
    dt = time.perf_counter() - t0
    logger.info("loaded %s (%s, %s) in %.1f s", path, fmt, str(config.dtype).removeprefix("torch."), dt)
    return LoadedModel(model, hf_config, tokenizer, str(path), fmt, dt,
                       str(tokenizer_dir) if tokenizer_dir is not None else None)


def _quantize(model: nn.Module, platform, quantization: str) -> None:
    """Give the linear layers the platform's quantized matmul (`platform.linear_method(name)`)."""
    from pageport.models.layers import set_linear_method
    make = getattr(platform, "linear_method", None)
    if make is None:
        raise ValueError(f"platform {platform.name} has no quantized matmuls (quantization={quantization!r})")
    n = set_linear_method(model, make(quantization))
    logger.info("quantization %s: %d linear layers quantized", quantization, n)


# paths and formats ---------------------------------------------------------------------------------
def resolve_model_path(model: Optional[str]) -> Path:
    """The model's path; None means the default model. Raises FileNotFoundError (one line)."""
    if model is None:
        return default_model_path()
    path = Path(model).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"model path not found: {model} (pageport loads local files only: "
                                f"an HF folder, a .gguf file or a config.json)") from None
    return path.resolve()


def _resolve_format(path: Path, load_format: str) -> tuple[Path, str]:
    """(path to load from, format): a folder holding a single .gguf (and no safetensors) means that file."""
    if load_format not in FORMATS:
        raise ValueError(f"unknown load_format {load_format!r}; choose one of {', '.join(FORMATS)}")
    if path.is_dir():
        ggufs = sorted(path.glob("*.gguf"))
        has_st = any(path.glob("*.safetensors"))
        if load_format == "dummy":
            if not (path / "config.json").is_file():
                raise FileNotFoundError(f"no config.json in {path} (needed for --load-format dummy)")
            return path, "dummy"
        if load_format in ("auto", "safetensors") and has_st:
            return path, "safetensors"
        if load_format in ("auto", "gguf") and ggufs and not has_st:
            if len(ggufs) > 1:
                raise ValueError(f"{path} holds {len(ggufs)} GGUF files: pass one of them")
            return ggufs[0], "gguf"
        if any(path.glob("*.bin")) or any(path.glob("*.pt")):
            raise ValueError(f"{path} holds PyTorch .bin/.pt weights; only safetensors is supported "
                             f"(convert with save_pretrained(safe_serialization=True))")
        raise FileNotFoundError(f"no *.safetensors weights in {path} (use --load-format dummy for random weights)")
    if path.suffix == ".gguf":
        if load_format == "safetensors":
            raise ValueError(f"{path} is a GGUF file, not safetensors")
        return path, "dummy" if load_format == "dummy" else "gguf"
    if path.suffix == ".json":
        if load_format in ("safetensors", "gguf"):
            raise ValueError(f"{path} is a config file; it has no {load_format} weights")
        if load_format == "auto":
            logger.warning("%s is a config without weights: using random (dummy) weights", path)
        return path, "dummy"
    if path.suffix == ".safetensors":
        raise ValueError(f"pass the folder that holds {path.name} and its config.json, not the file")
    raise ValueError(f"cannot tell the format of {path}: expected a folder, a .gguf file or a config.json")


def _load_config(path: Path, trust: bool):
    from transformers import AutoConfig

    if path.is_dir():
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"no config.json in {path}")
        return AutoConfig.from_pretrained(path, trust_remote_code=trust)
    if path.name == "config.json":
        return AutoConfig.from_pretrained(path.parent, trust_remote_code=trust)
    data = json.loads(path.read_text())  # a config under another name
    if "model_type" not in data:
        raise ValueError(f"{path} has no model_type; is it a transformers config.json?")
    return AutoConfig.for_model(data.pop("model_type"), **data)


_TEXT_FIELDS = ("vocab_size", "max_position_embeddings", "hidden_size", "num_hidden_layers",
                "num_attention_heads", "num_key_value_heads", "eos_token_id", "bos_token_id")


def _lift_text_config(hf_config) -> None:
    """A vision-language config (LLaVA) keeps its decoder's sizes under text_config: the engine reads them at the
    top level, so missing ones are copied up."""
    text = getattr(hf_config, "text_config", None)
    if text is None or not hasattr(hf_config, "vision_config"):
        return
    for name in _TEXT_FIELDS:
        if getattr(hf_config, name, None) is None and getattr(text, name, None) is not None:
            setattr(hf_config, name, getattr(text, name))


def _load_tokenizer(path: Path, trust: bool, required: bool = False):
    from transformers import AutoTokenizer

    if path.suffix == ".gguf":
        from pageport.models.gguf_loader import open_gguf

        return open_gguf(path, tokenizer=True, trust_remote_code=trust).tokenizer
    if not any((path / f).is_file() for f in _TOKENIZER_FILES):
        if required:
            raise FileNotFoundError(f"no tokenizer files in {path}")
        return None
    return AutoTokenizer.from_pretrained(path, trust_remote_code=trust)


def _set_architecture(hf_config) -> None:
    """Configs converted from GGUF name no architecture; take the causal-LM class of the model type."""
    if getattr(hf_config, "architectures", None):
        return
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    name = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(hf_config.model_type)
    hf_config.architectures = [name] if name else []


def _check_max_model_len(config, hf_config) -> None:
    max_pos = getattr(hf_config, "max_position_embeddings", None)
    if config.max_model_len is None:
        if max_pos is None:
            raise ValueError("the model config has no max_position_embeddings: set max_model_len")
        config.max_model_len = int(max_pos)
    elif max_pos is not None and config.max_model_len > max_pos:
        raise ValueError(f"max_model_len {config.max_model_len} is larger than the model's "
                         f"max_position_embeddings {max_pos}")


# weights ---------------------------------------------------------------------------------------------
def _safetensors_weights(folder: Path) -> tuple[Iterator[tuple[str, torch.Tensor]], int]:
    from safetensors import safe_open

    index = folder / "model.safetensors.index.json"
    if index.is_file():
        files = sorted({folder / f for f in json.loads(index.read_text())["weight_map"].values()})
    else:
        files = sorted(folder.glob("*.safetensors"))
    count = 0
    for f in files:
        with safe_open(f, framework="pt") as st:
            count += len(st.keys())

    def gen():
        for f in files:
            with safe_open(f, framework="pt") as st:
                for name in st.keys():
                    yield name, st.get_tensor(name)

    return gen(), count


@torch.no_grad()
def init_dummy_weights(model: nn.Module, seed: int, std: float = 0.02) -> None:
    """Random weights, the same for a given seed (on a given device): normal(0, std), norms at 1."""
    device = next(model.parameters()).device
    try:
        gen = torch.Generator(device=device)
    except RuntimeError:  # a device without its own generator: draw on the CPU
        gen = torch.Generator()
    gen.manual_seed(seed)
    for name, p in model.named_parameters():
        if name.endswith("norm.weight"):
            p.fill_(1.0)
        elif name.endswith(("g_idx", "weight_shape")):  # quantization metadata: keep the layer's own
            continue
        elif not p.dtype.is_floating_point or p.element_size() == 1:  # quantized codes: random in their range
            info = torch.iinfo(p.dtype) if not p.dtype.is_floating_point else None
            if info is None:
                p.copy_(torch.empty(p.shape, device=gen.device).normal_(0.0, 64.0, generator=gen).clamp(-448, 448))
            else:
                p.copy_(torch.randint(max(info.min, -2 ** 31), min(info.max, 2 ** 31 - 1), p.shape,
                                      generator=gen, device=gen.device))
        elif "scale" in name:
            p.fill_(std / 64)
        else:
            p.copy_(torch.empty(p.shape, dtype=torch.float32, device=gen.device).normal_(0.0, std, generator=gen))
