"""The linear methods every format maps to: W8A8 (int8 / fp8 weights, quantized activations) and W4A16.

Formats differ in names and packing only; each converts its checkpoint tensors, once loaded, into one
layout per method, and the matmul runs through the platform's ops (`scaled_linear`, `wna16_linear`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from pageport.models.quantization.base import (LinearMethod, dense_weight, drop_param, num_shards, per_channel,
                                                quant_param, set_tensor)
from pageport.platforms.quant_ops import pack_codes, qmax


@dataclass(frozen=True)
class W8A8Scheme:
    weight_dtype: torch.dtype  # torch.int8 or torch.float8_e4m3fn
    weight_strategy: str  # "tensor" | "channel" | "block"
    block: Optional[tuple[int, int]] = None  # (rows, cols) of a weight-scale block
    static_input: bool = False  # a per-tensor input scale from the checkpoint, else dynamic per token (group)
    scale_name: str = "weight_scale"  # HF fp8 calls it weight_scale_inv (it multiplies all the same)
    # int8, dynamic per token only: each token's range [min, max] quantized around its midpoint (compressed-tensors
    # `symmetric: false` activations, vLLM's zero-point kernels); a skewed token keeps all 255 codes for its range
    asymmetric_input: bool = False


def _row_sums(weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """sum_k deq(W)[n, k], float32 [N]: what a per-token offset m adds to every output (x W^T = (x - m) W^T + m W 1)."""
    return weight.float().sum(1) * scale.float().reshape(-1)


def asymmetric_linear(ops, x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
                      row_sums: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """W8A8 with asymmetric dynamic per-token activations through the platform's symmetric `scaled_linear`: each
    token is shifted by its midpoint m = (max + min) / 2, quantized symmetrically (scale (max - min) / 254), and
    m * row_sums added back. The midpoint stays a float (vLLM's kernels round their zero point to an integer)."""
    shape = x.shape
    xf = x.reshape(-1, shape[-1]).float()
    mid = (xf.amax(-1, keepdim=True) + xf.amin(-1, keepdim=True)) / 2
    y = ops.scaled_linear((xf - mid).to(x.dtype), weight, weight_scale).float() + mid * row_sums
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype).reshape(*shape[:-1], -1)


class W8A8LinearMethod(LinearMethod):
    """Checkpoint: `weight` [N, K] int8 / fp8, `<scale_name>` [N, 1] (channel), [1] per shard (tensor) or
    [ceil(N/bn), ceil(K/bk)] (block); `input_scale` [1] per shard when static. Kept as: weight, weight_scale
    float32 [N] or the block grid, input_scale float32 [1] (the largest of the fused shards')."""

    def __init__(self, scheme: W8A8Scheme):
        self.scheme = scheme

    def create_weights(self, layer, dtype, device) -> None:
        s = self.scheme
        n, k = layer.output_size, layer.input_size
        drop_param(layer, "weight")
        quant_param(layer, "weight", (n, k), s.weight_dtype, device)
        if s.weight_strategy == "channel":
            quant_param(layer, s.scale_name, (n, 1), torch.float32, device)
        elif s.weight_strategy == "tensor":
            quant_param(layer, s.scale_name, (num_shards(layer),), torch.float32, device, per_shard=True)
        elif s.weight_strategy == "block":
            bn, bk = s.block
            quant_param(layer, s.scale_name, (-(-n // bn), -(-k // bk)), torch.float32, device, rows_per_elem=bn)
        else:
            raise ValueError(f"W8A8 weight strategy {s.weight_strategy!r} is not supported")
        if s.static_input:
            quant_param(layer, "input_scale", (num_shards(layer),), torch.float32, device, per_shard=True)

    def process_weights(self, layer) -> None:
        s = self.scheme
        scale = getattr(layer, s.scale_name).data
        if s.weight_strategy == "channel":
            scale = scale.reshape(-1).float()
        elif s.weight_strategy == "tensor":
            scale = per_channel(layer, scale)
        drop_param(layer, s.scale_name)
        if s.asymmetric_input:
            set_tensor(layer, "w8a8_row_sums", _row_sums(layer.weight.data, scale))
        weight, scale = self.ops.scaled_prepare(layer.weight.data, scale.float().contiguous())
        if s.static_input:
            input_scale = layer.input_scale.data.float().amax().reshape(1)
            if weight.dtype != layer.weight.dtype:  # e4m3fnuz (MI300): codes mean half, scales double
                input_scale = input_scale * 2
            set_tensor(layer, "w8a8_input_scale", input_scale)
            drop_param(layer, "input_scale")
        set_tensor(layer, "weight", weight)
        set_tensor(layer, "weight_scale", scale)

    def apply(self, layer, x, bias):
        if self.scheme.asymmetric_input:
            return asymmetric_linear(self.ops, x, layer.weight, layer.weight_scale, layer.w8a8_row_sums, bias)
        return self.ops.scaled_linear(x, layer.weight, layer.weight_scale,
                                       getattr(layer, "w8a8_input_scale", None), self.scheme.block, bias)


def quantize_weight_w8a8(w: torch.Tensor, dtype: torch.dtype,
                         block: Optional[tuple[int, int]] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Round-to-nearest symmetric quantization of a dense weight [N, K]: (codes, float32 scales [N] or the
    block grid). Used to quantize a dense checkpoint in the run (`--quantization fp8 | w8a8`)."""
    top = qmax(dtype)
    wf = w.float()
    if block is None:
        scale = (wf.abs().amax(1) / top).clamp_min(1e-12)
        q = wf / scale[:, None]
    else:
        bn, bk = block
        n, k = wf.shape
        pad = torch.nn.functional.pad(wf, (0, -k % bk, 0, -n % bn))
        g = pad.unflatten(0, (-1, bn)).unflatten(2, (-1, bk))  # [Nb, bn, Kb, bk]
        scale = (g.abs().amax((1, 3)) / top).clamp_min(1e-12)
        q = (g / scale[:, None, :, None]).flatten(2).flatten(0, 1)[:n, :k]
    q = q.clamp(-top, top)
    return (q.round().to(torch.int8) if dtype == torch.int8 else q.to(dtype)), scale


class OnlineW8A8LinearMethod(W8A8LinearMethod):
    """A dense checkpoint's linears quantized at load: per-channel weights, dynamic per-token activations."""

    def create_weights(self, layer, dtype, device) -> None:
        dense_weight(layer, dtype, device)

    def process_weights(self, layer) -> None:
        q, scale = quantize_weight_w8a8(layer.weight.data, self.scheme.weight_dtype, self.scheme.block)
        if self.scheme.asymmetric_input:
            set_tensor(layer, "w8a8_row_sums", _row_sums(q, scale))
        q, scale = self.ops.scaled_prepare(q, scale)
        set_tensor(layer, "weight", q)
        set_tensor(layer, "weight_scale", scale)


# W4A16 / W8A16 ------------------------------------------------------------------------------------------
class WnA16LinearMethod(LinearMethod):
    """4- or 8-bit weights in groups of `group_size` input features (None: one group per row); a format subclass
    declares its checkpoint tensors (`create_weights`) and turns them into (unsigned codes [N, K], scales
    [N, K/G], zero points [N, K/G] or None for the middle code, input permutation or None) in `unpack`."""

    def __init__(self, group_size: Optional[int], symmetric: bool, bits: int = 4):
        self.group_size, self.symmetric, self.bits = group_size, symmetric, bits

    def groups(self, k: int) -> int:
        g = self.group_size or k
        if k % g:
            raise ValueError(f"input size {k} is not a multiple of the group size {g}")
        return k // g

    def unpack(self, layer) -> tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor]]:
        raise NotImplementedError

    def process_weights(self, layer) -> None:
        codes, scales, zeros, perm = self.unpack(layer)
        for name in list(layer._parameters):
            if name != "bias":
                drop_param(layer, name)
        k = codes.shape[1]
        prepared = self.ops.wna16_prepare(pack_codes(codes, self.bits), scales.contiguous(),
                                          None if zeros is None else _zero_points(zeros, scales.dtype),
                                          self.group_size or k, self.bits)
        layer.wna16 = prepared
        for name, t in prepared.items():
            if isinstance(t, torch.Tensor):
                set_tensor(layer, f"wna16_{name}", t)
        if perm is not None:
            set_tensor(layer, "wna16_perm", perm)

    def apply(self, layer, x, bias):
        perm = getattr(layer, "wna16_perm", None)
        if perm is not None:
            x = x.index_select(-1, perm)
        return self.ops.wna16_linear(x, layer.wna16, bias)


def _zero_points(zeros: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Integer zero codes as uint8; fractional ones (GGUF Q4_1: -min / scale) in the scales' dtype."""
    return (zeros.to(dtype) if zeros.is_floating_point() else zeros.to(torch.uint8)).contiguous()


def quantize_weight_w4(w: torch.Tensor, group_size: int, symmetric: bool = True):
    """Round-to-nearest 4-bit: (codes [N, K] 0..15, scales [N, K/G] float32, zero codes or None); w ~
    (code - zero) * scale with zero = 8 when symmetric."""
    g = w.float().unflatten(1, (-1, group_size))
    if symmetric:
        scale = (g.abs().amax(-1) / 7.5).clamp_min(1e-12)  # codes -8..7 around 8: the symmetric range of int4
        codes = (torch.round(g / scale[..., None]) + 8).clamp(0, 15)
        return codes.flatten(1).to(torch.int32), scale, None
    lo, hi = g.amin(-1).clamp(max=0), g.amax(-1).clamp(min=0)
    scale = ((hi - lo) / 15).clamp_min(1e-12)
    zero = torch.round(-lo / scale).clamp(0, 15)
    codes = (torch.round(g / scale[..., None]) + zero[..., None]).clamp(0, 15)
    return codes.flatten(1).to(torch.int32), scale, zero.to(torch.int32)


class OnlineW4A16LinearMethod(WnA16LinearMethod):
    """A dense checkpoint's linears quantized to symmetric int4 at load (`--quantization w4a16`)."""

    def create_weights(self, layer, dtype, device) -> None:
        dense_weight(layer, dtype, device)

    def unpack(self, layer):
        w = layer.weight.data
        codes, scale, zero = quantize_weight_w4(w, self.group_size or w.shape[1], self.symmetric)
        return codes, scale.to(w.dtype), zero, None
