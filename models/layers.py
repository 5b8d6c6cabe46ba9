"""Model building blocks: tensor-parallel-ready linears, embeddings, RMSNorm and rotary.

The linears follow vLLM's split: a column-parallel layer shards its output features over
the tensor-parallel group, a row-parallel layer shards its input features and all-reduces.
At world size 1 (the only size the engine runs today) they are plain linears. Every
parameter carries a `weight_loader(param, loaded_weight, shard_id=None)` that takes the
*full* Hugging Face tensor and copies this rank's slice of it into place, so fused
parameters (q|k|v, gate|up) load from the unfused checkpoint names.

Norm and rotary call `ops` (the platform's fused kernels, `pageport.platforms.Ops` otherwise).
"""
from __future__ import annotations

import contextlib
import os
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from pageport.platforms.ops import Ops

# Tensor parallelism ---------------------------------------------------------------------------
_TP_RANK, _TP_SIZE = 0, 1
_ALL_REDUCE = None  # the platform's sum over the group (in place), when it has its own
_TP_GROUP = None  # the tensor-parallel process group, when it is not the whole world (pipeline stages too)


def set_tensor_parallel(rank: int, size: int, all_reduce=None, group=None) -> None:
    """Set this process's place in the tensor-parallel group before building a model.

    The executor (core/executor/) calls it in every rank's process once torch.distributed is up;
    `all_reduce(tensor)` sums in place over the group (default: torch.distributed.all_reduce); `group`: the
    torch.distributed group of this stage's ranks (None: every rank).
    """
    global _TP_RANK, _TP_SIZE, _ALL_REDUCE, _TP_GROUP
    if not 0 <= rank < size:
        raise ValueError(f"tensor-parallel rank {rank} is outside a group of {size}")
    _TP_RANK, _TP_SIZE, _ALL_REDUCE, _TP_GROUP = rank, size, all_reduce, group


def get_tensor_parallel() -> tuple[int, int]:
    """(rank, size) of the tensor-parallel group."""
    return _TP_RANK, _TP_SIZE


# Pipeline parallelism ------------------------------------------------------------------------
_PP_STAGE, _PP_SIZE = 0, 1


def set_pipeline_parallel(stage: int, size: int) -> None:
    """Set this process's pipeline stage before building a model (the executor, as for tensor parallelism)."""
    global _PP_STAGE, _PP_SIZE
    if not 0 <= stage < size:
        raise ValueError(f"pipeline stage {stage} is outside a pipeline of {size}")
    _PP_STAGE, _PP_SIZE = stage, size


def get_pipeline_parallel() -> tuple[int, int]:
    """(stage, size) of the pipeline."""
    return _PP_STAGE, _PP_SIZE


PP_PARTITION_ENV = "PAGEPORT_PP_LAYER_PARTITION"  # e.g. "11,19": layers per stage, as vLLM's VLLM_PP_LAYER_PARTITION


def stage_layers(num_layers: int, stage: int, size: int, first_stage_extra: float = 0.0) -> range:
    """The contiguous layers of `stage`. Stage 0 also runs the LM head and the sampler, worth about
    `first_stage_extra` layers of work, so it takes that many fewer; the rest are split evenly, the remainder on
    the last stages. `$PAGEPORT_PP_LAYER_PARTITION` (comma-separated counts) overrides the split."""
    if num_layers < size:
        raise ValueError(f"{num_layers} layers cannot be split over {size} pipeline stages")
    given = os.environ.get(PP_PARTITION_ENV)
    if given:
        counts = [int(c) for c in given.split(",")]
        if len(counts) != size or sum(counts) != num_layers or min(counts) < 1:
            raise ValueError(f"{PP_PARTITION_ENV}={given!r} must give {size} positive layer counts that sum to "
                             f"{num_layers}")
    else:
        first = max(1, min(num_layers - (size - 1), round((num_layers + first_stage_extra) / size
                                                          - first_stage_extra)))
        base, extra = divmod(num_layers - first, size - 1) if size > 1 else (0, 0)
        counts = [first] + [base + (1 if s >= size - 1 - extra else 0) for s in range(size - 1)]
    start = sum(counts[:stage])
    return range(start, start + counts[stage])


def _all_reduce(x: torch.Tensor) -> torch.Tensor:
    if _TP_SIZE > 1:
        if _ALL_REDUCE is not None:
            _ALL_REDUCE(x)
        else:
            torch.distributed.all_reduce(x, group=_TP_GROUP)
    return x


def _all_gather_last_dim(x: torch.Tensor) -> torch.Tensor:
    if _TP_SIZE == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(_TP_SIZE)]
    torch.distributed.all_gather(parts, x.contiguous(), group=_TP_GROUP)
    return torch.cat(parts, dim=-1)


def _divide(n: int, d: int, what: str) -> int:
    if n % d:
        raise ValueError(f"{what} ({n}) is not divisible by the tensor-parallel size ({d})")
    return n // d


@contextlib.contextmanager
def default_dtype(dtype: torch.dtype):
    """Create parameters in `dtype` (torch.set_default_dtype, restored on exit)."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def default_weight_loader(param: nn.Parameter, loaded_weight: torch.Tensor, shard_id=None) -> None:
    if tuple(param.shape) != tuple(loaded_weight.shape):
        raise ValueError(f"weight shape {tuple(loaded_weight.shape)} does not fit parameter "
                         f"shape {tuple(param.shape)}")
    if param.dtype.is_floating_point and is_quantized_tensor(loaded_weight):
        raise ValueError(f"a quantized {str(loaded_weight.dtype).removeprefix('torch.')} checkpoint tensor for a "
                         f"dense parameter: this layer's quantization is not supported")
    param.data.copy_(loaded_weight)


def is_quantized_tensor(t: torch.Tensor) -> bool:
    """Integer codes or fp8: what a dense parameter must never take by a silent cast."""
    return not t.dtype.is_floating_point or t.element_size() == 1


def _param(*shape: int, loader=None, fill: Optional[float] = None) -> nn.Parameter:
    data = torch.empty(*shape) if fill is None else torch.full(shape, fill)
    p = nn.Parameter(data, requires_grad=False)
    p.weight_loader = loader or default_weight_loader
    return p


# Linear layers -------------------------------------------------------------------------------------
_QUANTIZED = False  # inside `quantized_linears()`: linears leave their weight on "meta" for a quant method


@contextlib.contextmanager
def quantized_linears():
    """Build a model whose linears get their weights from a quantization method afterwards
    (`pageport.models.quantization.create_weights`): each `weight` is a placeholder on "meta" (no memory)."""
    global _QUANTIZED
    old, _QUANTIZED = _QUANTIZED, True
    try:
        yield
    finally:
        _QUANTIZED = old


def apply_linear(layer: nn.Module, x: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """x W^T (+ b), through the layer's `quant_method` when the platform gave it one (see `set_linear_method`)."""
    method = layer.quant_method
    if method is None:
        return F.linear(x, layer.weight, bias)
    return method.apply(layer, x, bias)


def set_linear_method(model: nn.Module, method) -> int:
    """After loading: hand every linear layer and the LM head to `method` (a platform's quantized matmul:
    `process(layer, role) -> bool` prepares its weights, role "linear" or "lm_head"; `apply(layer, x, bias)`
    runs it). Returns how many layers took it."""
    n = 0
    for module in model.modules():
        role = "lm_head" if isinstance(module, ParallelLMHead) else "linear" if isinstance(module, LinearBase) else None
        if role and method.process(module, role):
            module.quant_method = method
            n += 1
    return n


class LinearBase(nn.Module):
    """y = x W^T (+ b); `tp_dim` is the weight dimension sharded over the tensor-parallel group
    (0: output features / column-parallel, 1: input features / row-parallel, None: replicated)."""

    tp_dim: Optional[int] = None
    quant_method = None  # set after loading by `set_linear_method`

    def __init__(self, input_size: int, output_size: int, bias: bool = False):
        super().__init__()
        self.tp_rank, self.tp_size = get_tensor_parallel()
        self.input_size, self.output_size = input_size, output_size
        with torch.device("meta") if _QUANTIZED else contextlib.nullcontext():
            self.weight = _param(output_size, input_size, loader=self.weight_loader)
        self.bias = _param(output_size, loader=self.weight_loader) if bias else None

    def output_shards(self) -> dict:
        """shard id -> (offset, size, rank): checkpoint shard `id` fills this rank's output rows offset:offset+size
        with the rank-th block of `size` rows of the full shard. One unfused shard, id None, by default."""
        return {None: (0, self.output_size, self.tp_rank)}

    def _shard(self, param: nn.Parameter, w: torch.Tensor) -> torch.Tensor:
        """This rank's slice of a full checkpoint tensor."""
        if self.tp_dim is None or self.tp_size == 1 or (param.dim() == 1 and self.tp_dim == 1):
            return w
        size = param.shape[self.tp_dim]
        return w.narrow(self.tp_dim, self.tp_rank * size, size)

    def weight_loader(self, param: nn.Parameter, loaded_weight: torch.Tensor, shard_id=None) -> None:
        default_weight_loader(param, self._shard(param, loaded_weight))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return apply_linear(self, x, self.bias)


class ReplicatedLinear(LinearBase):
    tp_dim = None


class ColumnParallelLinear(LinearBase):
    """Output features sharded; each rank returns its slice (no gather: the next layer is row-parallel)."""

    tp_dim = 0

    def __init__(self, input_size: int, output_size: int, bias: bool = False):
        _, tp = get_tensor_parallel()
        super().__init__(input_size, _divide(output_size, tp, "output size"), bias)


class RowParallelLinear(LinearBase):
    """Input features sharded; partial products are all-reduced, the bias added once."""

    tp_dim = 1

    def __init__(self, input_size: int, output_size: int, bias: bool = False):
        _, tp = get_tensor_parallel()
        super().__init__(_divide(input_size, tp, "input size"), output_size, bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = apply_linear(self, x, self.bias if self.tp_rank == 0 else None)
        return _all_reduce(y)


class MergedColumnParallelLinear(ColumnParallelLinear):
    """Several column-parallel outputs in one matmul (gate|up). shard_id = index into output_sizes."""

    def __init__(self, input_size: int, output_sizes: Sequence[int], bias: bool = False):
        self.output_sizes = list(output_sizes)
        super().__init__(input_size, sum(output_sizes), bias)

    def output_shards(self) -> dict:
        return {i: (sum(self.output_sizes[:i]) // self.tp_size, n // self.tp_size, self.tp_rank)
                for i, n in enumerate(self.output_sizes)}

    def weight_loader(self, param, loaded_weight, shard_id=None) -> None:
        if shard_id is None:  # an already fused checkpoint tensor
            return super().weight_loader(param, loaded_weight)
        _load_output_shard(param, loaded_weight, *self.output_shards()[shard_id], self.tp_size)


class QKVParallelLinear(ColumnParallelLinear):
    """Fused q|k|v projection. shard_id in "q", "k", "v". KV heads are replicated when there are
    fewer of them than tensor-parallel ranks."""

    def __init__(self, hidden_size: int, head_size: int, total_num_heads: int,
                 total_num_kv_heads: Optional[int] = None, bias: bool = False):
        _, tp = get_tensor_parallel()
        total_num_kv_heads = total_num_kv_heads or total_num_heads
        self.head_size = head_size
        self.num_heads = _divide(total_num_heads, tp, "number of attention heads")
        if total_num_kv_heads >= tp:
            self.num_kv_heads = _divide(total_num_kv_heads, tp, "number of KV heads")
            self.kv_replicas = 1
        else:
            self.num_kv_heads = 1
            self.kv_replicas = _divide(tp, total_num_kv_heads, "tensor-parallel size over KV heads")
        out = (self.num_heads + 2 * self.num_kv_heads) * head_size * tp
        super().__init__(hidden_size, out, bias)

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_size

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_size

    def output_shards(self) -> dict:
        kv_rank = self.tp_rank // self.kv_replicas
        return {"q": (0, self.q_size, self.tp_rank), "k": (self.q_size, self.kv_size, kv_rank),
                "v": (self.q_size + self.kv_size, self.kv_size, kv_rank)}

    def weight_loader(self, param, loaded_weight, shard_id=None) -> None:
        if shard_id is None:
            return super().weight_loader(param, loaded_weight)
        shards = self.output_shards()
        if shard_id not in shards:
            raise ValueError(f"unknown qkv shard {shard_id!r}")
        _load_output_shard(param, loaded_weight, *shards[shard_id], self.tp_size)


def _load_output_shard(param, loaded_weight, offset: int, size: int, rank: int, tp_size: int) -> None:
    w = loaded_weight.narrow(0, rank * size, size) if tp_size > 1 else loaded_weight
    default_weight_loader(param.data.narrow(0, offset, size), w)


# Embedding and LM head -----------------------------------------------------------------------------
class VocabParallelEmbedding(nn.Module):
    """Embedding with the vocabulary sharded over ranks; out-of-shard ids give zeros, summed by all-reduce."""

    def __init__(self, num_embeddings: int, embedding_dim: int):
        super().__init__()
        self.tp_rank, self.tp_size = get_tensor_parallel()
        self.num_embeddings = num_embeddings
        self.shard_size = _divide(num_embeddings, self.tp_size, "vocabulary size")
        self.vocab_start = self.tp_rank * self.shard_size
        self.weight = _param(self.shard_size, embedding_dim, loader=self.weight_loader)

    def weight_loader(self, param, loaded_weight, shard_id=None) -> None:
        if self.tp_size > 1:
            loaded_weight = loaded_weight.narrow(0, self.vocab_start, self.shard_size)
        default_weight_loader(param, loaded_weight)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.tp_size == 1:
            return F.embedding(input_ids, self.weight)
        ids = input_ids - self.vocab_start
        mask = (ids >= 0) & (ids < self.shard_size)
        y = F.embedding(ids.clamp(0, self.shard_size - 1), self.weight) * mask.unsqueeze(-1).to(self.weight.dtype)
        return _all_reduce(y)


class ParallelLMHead(VocabParallelEmbedding):
    """hidden -> logits over the (gathered) vocabulary. `tie(embedding)` shares the embedding's weight."""

    quant_method = None  # set after loading by `set_linear_method`

    def __init__(self, num_embeddings: int, embedding_dim: int, bias: bool = False):
        super().__init__(num_embeddings, embedding_dim)
        self.bias = _param(self.shard_size, loader=self.weight_loader) if bias else None

    def tie(self, embedding: VocabParallelEmbedding) -> None:
        self.weight = embedding.weight

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return _all_gather_last_dim(apply_linear(self, hidden, self.bias))


# Norm and rotary ------------------------------------------------------------------------------------------
class RMSNorm(nn.Module):
    """RMSNorm through `ops.rms_norm`; with a residual, adds it first and returns (normed, new_residual)."""

    def __init__(self, hidden_size: int, eps: float = 1e-6, ops: Optional[Ops] = None):
        super().__init__()
        self.eps = eps
        self.ops = ops or Ops()
        self.weight = _param(hidden_size, fill=1.0)

    def forward(self, x: torch.Tensor, residual: Optional[torch.Tensor] = None):
        return self.ops.rms_norm(x, self.weight, self.eps, residual)


_STATIC_ROPE_TYPES = ("default", "linear", "llama3", "yarn", "proportional")


def rope_parameters(hf_config, layer_type: Optional[str] = None) -> dict:
    """The config's RoPE parameters as one dict (rope_type, rope_theta, scaling keys).

    Transformers 5 standardizes `rope_scaling` + `rope_theta` of older configs into
    `config.rope_parameters`; older transformers keep them apart. Models whose layer types have their own
    RoPE (Gemma 3: local and global layers) keep one such dict per layer type.
    """
    params = getattr(hf_config, "rope_parameters", None)
    if layer_type is not None and isinstance((params or {}).get(layer_type), dict):
        params = params[layer_type]
    if params is None:
        params = dict(getattr(hf_config, "rope_scaling", None) or {})
        params.setdefault("rope_theta", getattr(hf_config, "rope_theta", 10000.0))
    params = dict(params)
    if "rope_type" not in params:
        params["rope_type"] = params.pop("type", "default")
    return params


def compute_cos_sin_cache(hf_config, head_size: int, max_position: int,
                          layer_type: Optional[str] = None) -> torch.Tensor:
    """[max_position, head_size] float32, cos | sin, from transformers' own RoPE init functions."""
    params = rope_parameters(hf_config, layer_type)
    rope_type = params["rope_type"]
    if rope_type not in _STATIC_ROPE_TYPES:
        raise NotImplementedError(f"rope_type {rope_type!r} needs position-dependent frequencies; "
                                  f"supported: {', '.join(_STATIC_ROPE_TYPES)}")
    if params.get("partial_rotary_factor", 1.0) != 1.0:
        raise NotImplementedError("partial rotary embeddings are not supported")
    if rope_type == "default":
        # transformers' own formula (5 keeps it inside each model, 4 in ROPE_INIT_FUNCTIONS), computed here so that
        # plain RoPE needs no transformers import
        base = params["rope_theta"]
        inv_freq = 1.0 / (base ** (torch.arange(0, head_size, 2, dtype=torch.int64, device="cpu").float() / head_size))
        attention_scaling = 1.0
    else:
        from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

        kw = {"layer_type": layer_type} if layer_type is not None else {}
        inv_freq, attention_scaling = ROPE_INIT_FUNCTIONS[rope_type](hf_config, torch.device("cpu"), **kw)
    inv_freq = inv_freq.float().cpu()
    if inv_freq.numel() * 2 != head_size:
        raise ValueError(f"rotary frequencies ({inv_freq.numel()}) do not fit head size {head_size}")
    freqs = torch.arange(max_position, dtype=torch.float32, device="cpu")[:, None] * inv_freq[None, :]
    return torch.cat((freqs.cos() * attention_scaling, freqs.sin() * attention_scaling), dim=-1)


class RotaryEmbedding(nn.Module):
    """Neox-style rotary embedding through `ops.rotary`; the cos|sin cache stays float32."""

    def __init__(self, hf_config, head_size: int, max_position: int, ops: Optional[Ops] = None,
                 layer_type: Optional[str] = None):
        super().__init__()
        self.head_size = head_size
        self.ops = ops or Ops()
        cache = compute_cos_sin_cache(hf_config, head_size, max_position, layer_type)
        self.register_buffer("cos_sin_cache", cache.to(torch.get_default_device()), persistent=False)

    def forward(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor):
        return self.ops.rotary(positions, q, k, self.cos_sin_cache)
