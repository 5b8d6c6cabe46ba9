"""Platform ops backed by the Triton kernels; the torch reference where Triton can't run."""
from __future__ import annotations

import os
from typing import Optional

import torch

from pageport.platforms.ops import Ops


def _triton_runs(x: torch.Tensor) -> bool:
    """CUDA tensors, or CPU tensors under the Triton interpreter (CI)."""
    return x.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"


class TritonOps(Ops):
    """rms_norm (fused residual), neox rotary (in place on q and k), silu_and_mul.

    Kernel modules import triton, so they are imported on first use only. Subclasses for other
    Triton targets (ROCm tensors are "cuda" tensors already; XPU) override `runs_triton`."""

    def runs_triton(self, x: torch.Tensor) -> bool:
        return _triton_runs(x)

    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float,
                 residual: Optional[torch.Tensor] = None):
        if not self.runs_triton(x):
            return super().rms_norm(x, weight, eps, residual)
        from pageport.kernels_cuda.norm import rms_norm
        return rms_norm(x, weight, eps, residual)

    def rotary(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
               cos_sin_cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Rotates q and k in place (no copies) and returns them."""
        if not self.runs_triton(q) or q.stride(-1) != 1 or k.stride(-1) != 1:
            return super().rotary(positions, q, k, cos_sin_cache)
        from pageport.kernels_cuda.rotary import rotary_embedding
        return rotary_embedding(positions, q, k, cos_sin_cache)

    def silu_and_mul(self, x: torch.Tensor) -> torch.Tensor:
        if not self.runs_triton(x):
            return super().silu_and_mul(x)
        from pageport.kernels_cuda.activation import silu_and_mul
        return silu_and_mul(x)

    def lora_apply(self, y, x, lora_a, lora_b, index, slots):
        if not self.runs_triton(x) or x.stride(-1) != 1 or y.stride(-1) != 1 or lora_a.stride(-1) != 1:
            return super().lora_apply(y, x, lora_a, lora_b, index, slots)
        from pageport.kernels_cuda.lora import lora_apply, lora_prepare
        cached = getattr(self, "_lora_prepared", None)
        if cached is None or cached[0] is not index:  # once per step (and per captured graph), for every layer
            cached = self._lora_prepared = (index, lora_prepare(index, lora_a.shape[0]))
        return lora_apply(y, x, lora_a, lora_b, cached[1])

    def fused_moe(self, x, w13, w2, topk_weights, topk_ids):
        # PAGEPORT_FUSED_MOE=torch: the per-expert loop (the baseline the MoE benchmark compares against)
        if not self.runs_triton(x) or os.environ.get("PAGEPORT_FUSED_MOE") == "torch":
            return super().fused_moe(x, w13, w2, topk_weights, topk_ids)
        from pageport.kernels_cuda.fused_moe import fused_moe
        return fused_moe(x, w13, w2, topk_weights, topk_ids)

    def scaled_linear(self, x, weight, weight_scale, input_scale=None, block=None, bias=None):
        if not self.runs_triton(x):
            return super().scaled_linear(x, weight, weight_scale, input_scale, block, bias)
        from pageport.kernels_cuda.quant_gemm import scaled_linear
        return scaled_linear(x, weight, weight_scale, input_scale, block, bias)

    def scaled_prepare(self, weight, weight_scale):
        if not weight.is_cuda:
            return super().scaled_prepare(weight, weight_scale)
        from pageport.kernels_cuda.quant_gemm import scaled_prepare
        return scaled_prepare(weight, weight_scale)

    def wna16_prepare(self, qweight, scales, zeros, group_size, bits=4):
        if not self.runs_triton(qweight):
            return super().wna16_prepare(qweight, scales, zeros, group_size, bits)
        from pageport.kernels_cuda.quant_gemm import wna16_prepare
        return wna16_prepare(qweight, scales, zeros, group_size, bits)

    def wna16_linear(self, x, w, bias=None):
        if not self.runs_triton(x):
            return super().wna16_linear(x, w, bias)
        from pageport.kernels_cuda.quant_gemm import wna16_linear
        return wna16_linear(x, w, bias)
