"""Quantized matmuls in plain torch: the reference a platform's kernels must match (and the fallback).

Two families, named by what the weights hold:
- `scaled_linear`: int8 or float8_e4m3fn weights with activations quantized on the fly to the same type
  (W8A8), dynamically per token, per token and 128-column group (block-scaled weights), or with a static
  per-tensor scale. Scales are float32; the product is accumulated exactly (int8) or in float32 (fp8).
- `wna16_linear`: 4- or 8-bit weight codes in groups along the input features with a scale per group and an
  optional zero point (the middle code when absent, i.e. symmetric), activations left in their dtype (W4A16,
  W8A16).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

FP8_MAX = float(torch.finfo(torch.float8_e4m3fn).max)  # 448
INT8_MAX = 127.0


def qmax(dtype: torch.dtype) -> float:
    """The largest code: int8 127 (symmetric), fp8 the format's largest finite value (e4m3fn 448, e4m3fnuz 240)."""
    return INT8_MAX if dtype == torch.int8 else float(torch.finfo(dtype).max)


def fp8_e4m3fn_to_fnuz(weight: torch.Tensor, scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The same values in MI300's float8_e4m3fnuz: its exponent bias is one more, so the same bits mean half the
    value and the scale doubles; the bits of -0 are NaN there and become +0."""
    bits = weight.view(torch.int8).clone()
    bits[bits == -128] = 0
    return bits.view(torch.float8_e4m3fnuz), scale * 2


def quantize_activations(x: torch.Tensor, dtype: torch.dtype, input_scale: Optional[torch.Tensor] = None,
                         group_size: Optional[int] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] -> (codes of `dtype`, float32 scales): [1] for a static scale, [M, 1] per token, or
    [M, K / group_size] per token and group. x ~ codes * scale; scale = max|x| / qmax(dtype) (int8: 127, round to
    nearest; fp8: the format's largest value, torch's cast)."""
    top = qmax(dtype)
    xf = x.float()
    if input_scale is not None:
        scale = input_scale.float().reshape(1)
        q = xf / scale
    elif group_size is not None:
        g = xf.unflatten(-1, (-1, group_size))
        scale = (g.abs().amax(-1, keepdim=True) / top).clamp_min(1e-10)
        q = (g / scale).flatten(-2)
        scale = scale.squeeze(-1)
    else:
        scale = (xf.abs().amax(-1, keepdim=True) / top).clamp_min(1e-10)
        q = xf / scale
    q = q.clamp(-top, top)
    return (q.round().to(torch.int8) if dtype == torch.int8 else q.to(dtype)), scale


def dequantize_block(weight: torch.Tensor, scale: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """weight [N, K] times its [ceil(N / bn), ceil(K / bk)] block scales, float32."""
    n, k = weight.shape
    s = scale.float().repeat_interleave(block[0], 0)[:n].repeat_interleave(block[1], 1)[:, :k]
    return weight.float() * s


def unpack_codes(packed: torch.Tensor, bits: int = 4) -> torch.Tensor:
    """[N, K * bits / 32] int32, code j of a word in bits j*bits.. -> unsigned codes [N, K] int32 (4 bits: 0..15,
    8 bits: 0..255)."""
    shifts = torch.arange(0, 32, bits, device=packed.device, dtype=torch.int32)
    return ((packed.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)).flatten(-2)


def pack_codes(codes: torch.Tensor, bits: int = 4) -> torch.Tensor:
    """Unsigned codes [N, K] -> [N, K * bits / 32] int32 (the inverse of `unpack_codes`)."""
    per_word = 32 // bits
    c = codes.to(torch.int32).unflatten(-1, (-1, per_word))
    out = torch.zeros(c.shape[:-1], dtype=torch.int32, device=codes.device)
    for j in range(per_word):  # OR, not sum: a top code past 7 (4 bits) or 127 (8 bits) sets the sign bit
        out |= c[..., j] << (bits * j)
    return out


def dequantize_wn(qweight: torch.Tensor, scales: torch.Tensor, zeros: Optional[torch.Tensor], group_size: int,
                  bits: int = 4) -> torch.Tensor:
    """W [N, K] float32 = (code - zero) * scale of each weight's group; no zeros: the middle code 2^(bits-1)."""
    codes = unpack_codes(qweight, bits).float()
    z = float(1 << (bits - 1)) if zeros is None else zeros.float().repeat_interleave(group_size, 1)
    return (codes - z) * scales.float().repeat_interleave(group_size, 1)


class QuantOps:
    """Torch definitions of the quantized matmuls (mixed into `pageport.platforms.Ops`)."""

    def scaled_linear(self, x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
                      input_scale: Optional[torch.Tensor] = None, block: Optional[tuple[int, int]] = None,
                      bias: Optional[torch.Tensor] = None) -> torch.Tensor:
        """y = Q(x) deq(W)^T (+ b) in x's dtype. weight [N, K] int8 / float8_e4m3fn; weight_scale float32 [N]
        (per output channel) or [N / bn, K / bk] (`block` = (bn, bk); activations then per token and bk group);
        input_scale: a static per-tensor activation scale, else dynamic per token."""
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        xq, xs = quantize_activations(x2, weight.dtype, input_scale, block[1] if block else None)
        if block is not None:
            xd = (xq.float().unflatten(-1, (-1, block[1])) * xs.unsqueeze(-1)).flatten(-2)
            y = xd @ dequantize_block(weight, weight_scale, block).t()
        else:
            y = (xq.float() @ weight.float().t()) * xs * weight_scale.float()
        if bias is not None:
            y = y + bias.float()
        return y.to(x.dtype).reshape(*shape[:-1], -1)

    def scaled_prepare(self, weight: torch.Tensor, weight_scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """A W8A8 weight and its float32 scales in the form this platform's `scaled_linear` takes (as they are)."""
        return weight, weight_scale

    def wna16_prepare(self, qweight: torch.Tensor, scales: torch.Tensor, zeros: Optional[torch.Tensor],
                      group_size: int, bits: int = 4) -> dict:
        """The platform's layout of a 4- or 8-bit weight-only (W4A16 / W8A16) weight. qweight [N, K * bits / 32]
        int32 (`unpack_codes`'s packing), scales [N, K / G] in the model's dtype, zeros [N, K / G]: codes (uint8),
        zero points in the scales' dtype (fractional ones: GGUF Q4_1), or None for the middle code. Returns a dict
        of tensors and ints that `wna16_linear` takes back."""
        return {"qweight": qweight, "scales": scales, "zeros": zeros, "group_size": group_size, "bits": bits}

    def wna16_linear(self, x: torch.Tensor, w: dict, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
        weight = dequantize_wn(w["qweight"], w["scales"], w["zeros"], w["group_size"], w["bits"]).to(x.dtype)
        return F.linear(x, weight, bias)
