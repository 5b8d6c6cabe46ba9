"""What every quantization format shares: the config interface and quantized parameters that load by shard.

A format's `QuantizationConfig` names the linear method of each layer from its prefix; the method creates
the layer's checkpoint-shaped parameters (`create_weights`), turns them into the kernel's layout once loaded
(`process_weights`) and runs the matmul through the platform's ops (`apply`).
"""
from __future__ import annotations

import math
import re
from typing import Iterable, Optional

import torch
from torch import nn


class QuantizationConfig:
    """One checkpoint's (or one run's) quantization: which linear method each layer gets."""

    name: str = "base"

    def linear_method(self, prefix: str, layer: nn.Module) -> Optional["LinearMethod"]:
        """The method for the linear at `prefix` (HF module name, e.g. model.layers.0.self_attn.qkv_proj),
        or None to keep it dense."""
        raise NotImplementedError

    def check_unquantized(self, prefix: str) -> None:
        """Raise if the checkpoint quantizes a module pageport builds dense (MoE experts)."""


class LinearMethod:
    ops = None  # the platform's ops, set when the method is given to a layer

    def create_weights(self, layer: nn.Module, dtype: torch.dtype, device: torch.device) -> None:
        raise NotImplementedError

    def process_weights(self, layer: nn.Module) -> None:
        """After loading: checkpoint layout -> the layout `apply` reads."""

    def process(self, layer: nn.Module, role: str = "linear") -> bool:
        """`set_linear_method`'s hook (a dense model quantized after loading); unused by checkpoint formats."""
        return False

    def apply(self, layer: nn.Module, x: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
        raise NotImplementedError


def matches(prefix: str, patterns: Iterable[str], class_name: str = "Linear") -> bool:
    """compressed-tensors / HF target matching: 're:REGEX' (matched from the prefix's start), a class name, or a
    module name (whole prefix or its last components)."""
    for p in patterns:
        if p.startswith("re:"):
            if re.match(p[3:], prefix):
                return True
        elif p == class_name or prefix == p or prefix.endswith("." + p):
            return True
    return False


# Quantized parameters --------------------------------------------------------------------------------
def shard_index(layer: nn.Module, shard_id) -> int:
    """Position of a checkpoint shard among the layer's fused outputs (0 for an unfused layer)."""
    return list(layer.output_shards()).index(shard_id)


def quant_param(layer: nn.Module, name: str, shape: tuple, dtype: torch.dtype, device, *,
                out_dim: Optional[int] = 0, rows_per_elem: int = 1, per_shard: bool = False,
                fill: Optional[float] = None) -> nn.Parameter:
    """Register a checkpoint tensor of a (possibly fused) linear as `layer.<name>` and give it a shard loader.

    out_dim: the tensor's dimension that runs over output features (None: one tensor the shards all carry,
    e.g. GPTQ's g_idx, copied whole). rows_per_elem: output features per element along out_dim (8 for
    int4 codes packed along it, 128 for 128x128 block scales). per_shard: one row per fused shard (a per-tensor
    scale of q, k and v each), shape[0] == number of shards."""
    data = torch.empty(shape, dtype=dtype, device=device) if fill is None else torch.full(shape, fill, dtype=dtype,
                                                                                          device=device)
    p = nn.Parameter(data, requires_grad=False)
    shards = layer.output_shards()
    if out_dim is not None and not per_shard:
        for sid, (offset, size, _) in shards.items():
            if offset % rows_per_elem or (size % rows_per_elem and len(shards) > 1):
                raise ValueError(f"{name}: output shard {sid!r} ({size} rows at {offset}) is not aligned to "
                                 f"the format's {rows_per_elem}-row blocks")

    def loader(param: nn.Parameter, w: torch.Tensor, shard_id=None) -> None:
        if per_shard:  # one value (or row) per fused shard; a fused checkpoint tensor (shard None) sets them all
            rows = param.data if shard_id is None else param.data[shard_index(layer, shard_id)].unsqueeze(0)
            if w.numel() != rows[0].numel():
                raise ValueError(f"{name}: expected {rows[0].numel()} value(s) per shard, got shape {tuple(w.shape)}")
            rows.copy_(w.reshape(rows.shape[1:]).expand_as(rows))
            return
        if out_dim is None:
            if w.shape != param.shape:
                raise ValueError(f"{name}: checkpoint shape {tuple(w.shape)} does not fit {tuple(param.shape)}")
            param.data.copy_(w)
            return
        offset, size, rank = shards[shard_id] if shard_id is not None else (0, layer.output_size, layer.tp_rank)
        offset, size = offset // rows_per_elem, math.ceil(size / rows_per_elem)
        if layer.tp_size > 1 and getattr(layer, "tp_dim", None) == 0:
            w = w.narrow(out_dim, rank * size, size)
        dst = param.data.narrow(out_dim, offset, size)
        if w.shape != dst.shape:
            raise ValueError(f"{name}: checkpoint shape {tuple(w.shape)} does not fit {tuple(dst.shape)}")
        dst.copy_(w)

    p.weight_loader = loader
    layer.register_parameter(name, p)
    return p


def dense_weight(layer: nn.Module, dtype: torch.dtype, device) -> None:
    """Replace the "meta" placeholder with the layer's real dense weight (loaded by the layer's own loader)."""
    drop_param(layer, "weight")
    p = nn.Parameter(torch.empty(layer.output_size, layer.input_size, dtype=dtype, device=device),
                     requires_grad=False)
    p.weight_loader = layer.weight_loader
    layer.register_parameter("weight", p)


def set_tensor(layer: nn.Module, name: str, t: torch.Tensor) -> None:
    """A processed weight tensor, held as a parameter (no grad) so model-size counts see it."""
    drop_param(layer, name)
    layer.register_parameter(name, nn.Parameter(t, requires_grad=False))


def drop_param(layer: nn.Module, name: str) -> None:
    if name in layer._parameters:
        del layer._parameters[name]


def num_shards(layer: nn.Module) -> int:
    return len(layer.output_shards())


def per_channel(layer: nn.Module, per_shard_values: torch.Tensor) -> torch.Tensor:
    """Per-shard scalars [shards] -> one value per output row [N] (float32)."""
    out = torch.empty(layer.output_size, dtype=torch.float32, device=per_shard_values.device)
    for i, (offset, size, _) in enumerate(layer.output_shards().values()):
        out[offset:offset + size] = per_shard_values.reshape(-1)[i].float()
    return out
