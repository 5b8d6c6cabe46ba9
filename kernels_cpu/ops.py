"""CPU versions of the fusable model ops: the same math as `pageport.platforms.Ops` in fewer torch calls.

At batch 1 a SmolLM2 layer is a dozen small ops around four small matmuls, and each eager op costs
microseconds of dispatch, so the op count is the cost. Measured (1 thread, bf16, one token): rotary
43 -> 20 us (q and k rotated in one pass; cos/sin looked up once per step instead of once per layer),
RMSNorm 19 -> 15 us (torch's fused rms_norm).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from pageport.platforms.ops import Ops


class CpuOps(Ops):
    def __init__(self):
        # (positions, cos_sin_cache, (cos, sin)) of the last call: every layer of a step passes the same
        # positions tensor; held as one tuple so a lookup never mixes two steps
        self._memo: tuple = (None, None, None)

    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float,
                 residual: Optional[torch.Tensor] = None):
        if residual is not None:
            x = x + residual
            residual = x
        out = F.rms_norm(x, weight.shape, weight, eps)
        return out if residual is None else (out, residual)

    def _cos_sin(self, positions: torch.Tensor, cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        pos, cached, cs = self._memo
        if pos is positions and cached is cache:
            return cs
        cos, sin = cache[positions].chunk(2, dim=-1)
        cs = (torch.cat((cos, cos), -1).unsqueeze(1), torch.cat((-sin, sin), -1).unsqueeze(1))  # [T, 1, D]
        self._memo = (positions, cache, cs)
        return cs

    def rotary(self, positions, q, k, cos_sin_cache):
        cos, sin = self._cos_sin(positions, cos_sin_cache)
        hq = q.shape[1]
        x = torch.cat((q, k), dim=1).float()  # [T, Hq + Hk, D]
        half = x.shape[-1] // 2
        rotated = torch.cat((x[..., half:], x[..., :half]), dim=-1)
        out = (x * cos + rotated * sin).to(q.dtype)
        return out[:, :hq], out[:, hq:]

    # quantized matmuls: torch's CPU kernels where they take the shapes, the reference otherwise
    def scaled_linear(self, x, weight, weight_scale, input_scale=None, block=None, bias=None):
        if block is not None or input_scale is not None:
            return super().scaled_linear(x, weight, weight_scale, input_scale, block, bias)
        from pageport.platforms.quant_ops import quantize_activations
        shape = x.shape
        xq, xs = quantize_activations(x.reshape(-1, shape[-1]), weight.dtype)
        if weight.dtype == torch.int8:  # int8 x int8 -> int32 (oneDNN)
            y = torch._int_mm(xq, weight.t()).float() * xs * weight_scale
            y = (y if bias is None else y + bias).to(x.dtype)
        else:  # fp8 e4m3 with row-wise scales
            y = torch._scaled_mm(xq, weight.t(), scale_a=xs, scale_b=weight_scale.reshape(1, -1),
                                 out_dtype=x.dtype, bias=bias)
        return y.reshape(*shape[:-1], -1)

    def wna16_prepare(self, qweight, scales, zeros, group_size, bits=4):
        from pageport.kernels_cpu.quant import int4pack_from_codes, int8pack_supported
        from pageport.platforms.quant_ops import unpack_codes
        w = super().wna16_prepare(qweight, scales, zeros, group_size, bits)
        codes = unpack_codes(qweight, bits)
        if bits == 4:
            return {**w, **int4pack_from_codes(codes, scales, zeros, group_size)}
        if (zeros is None and group_size == codes.shape[1] and scales.dtype == torch.bfloat16
                and int8pack_supported(codes.shape[1])):
            # symmetric per-channel 8-bit: torch's weight-only int8 kernel (bf16 activations)
            return {**w, "int8pack": (codes - 128).to(torch.int8), "int8pack_scale": scales.reshape(-1).contiguous()}
        return w

    def wna16_linear(self, x, w, bias=None):
        if x.dtype != torch.bfloat16 or x.dim() != 2 or not ("int4pack" in w or "int8pack" in w):
            return super().wna16_linear(x, w, bias)
        if "int4pack" in w:
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(x, w["int4pack"], w["group_size"], w["int4pack_sz"])
        else:
            y = torch.ops.aten._weight_int8pack_mm(x, w["int8pack"], w["int8pack_scale"])
        return y if bias is None else y + bias
