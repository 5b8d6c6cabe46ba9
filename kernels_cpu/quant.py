"""Weight-only quantized matmuls on the CPU (opt-in: `EngineConfig.quantization`).

Batch-1 decode reads every weight once per token and is bound by how fast the weights come in, not by
arithmetic; torch's CPU kernels for weight-only int4 / int8 matmuls with bf16 activations
(`aten._weight_int4pack_mm_for_cpu`, `aten._weight_int8pack_mm`) read 4 or 8 bits per weight.
Measured on the 2-core AVX-512-BF16 machine (1 thread, one Llama layer's four linears of SmolLM2-135M,
weights streamed from DRAM): dense bf16 ~0.9 ms, int4 ~0.22 ms; the 49152 x 576 LM head: bf16 ~9 ms, int8
~5.5 ms, int4 ~1.6 ms. At 64 rows the int4 kernel is ~2x slower than oneDNN's dense bf16 GEMM, so
the dense weight is kept and used above `max_rows` rows (prefill chunks, big decode batches): this is a
speed mode, not a memory saving (+~25 % weight memory with int4).

int4: asymmetric, group size 32 along the input features: w = q * scale + min, q in 0..15 — the layout of
llama.cpp's Q4_1. Quantizing the dequantized weights of a Q4_1 GGUF (the default model) recovers its
4-bit codes exactly (each group's min and max are codes 0 and 15), so the int4 path computes with the
file's own quantized weights; only the per-group scale and min are rounded to bf16 (the dense bf16 path
rounds every weight to bf16 instead). Layers whose shapes the kernel does not take stay dense.
int8: symmetric per output channel (scale = max|w| / 127). torch's int8 kernel is only used where the input size
is a multiple of 16: on this AVX-512 machine (torch 2.13) other input sizes read out of bounds, segfaulting from 2
rows on and returning garbage at 1 row (probed in subprocesses for inputs 1..72, rows 1..64), so those layers stay
dense.
"""
from __future__ import annotations

import logging
from typing import Optional

import torch
import torch.nn.functional as F

logger = logging.getLogger(__name__)

QUANTIZATIONS = ("int4", "int8")


def quantize_int4(w: torch.Tensor, group_size: int = 32) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric round-to-nearest: (codes int32 [N, K] in 0..15, scale [N, K/G], min [N, K/G]) in float32."""
    n, k = w.shape
    g = w.float().reshape(n, k // group_size, group_size)
    lo, hi = g.amin(-1), g.amax(-1)
    scale = (hi - lo) / 15
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.round((g - lo[..., None]) / scale[..., None]).clamp_(0, 15).to(torch.int32)
    return q.reshape(n, k), scale, lo


def dequantize_int4(q: torch.Tensor, scale: torch.Tensor, lo: torch.Tensor, group_size: int = 32) -> torch.Tensor:
    n, k = q.shape
    return (q.reshape(n, k // group_size, group_size).float() * scale[..., None] + lo[..., None]).reshape(n, k)


def int8pack_supported(in_features: int) -> bool:
    """Whether `aten._weight_int8pack_mm` computes correctly for this input size (see the module docstring)."""
    return in_features % 16 == 0


def quantize_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per output channel: (codes int8 [N, K], scale float32 [N])."""
    wf = w.float()
    scale = wf.abs().amax(1) / 127
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    return torch.round(wf / scale[:, None]).clamp_(-127, 127).to(torch.int8), scale


def int4pack_from_codes(codes: torch.Tensor, scales: torch.Tensor, zeros: Optional[torch.Tensor],
                        group_size: int) -> dict:
    """4-bit codes [N, K] (0..15), scales [N, K/G], zero codes or None (8) -> torch's CPU int4 kernel layout
    ({"int4pack", "int4pack_sz"}); {} where the kernel does not take it (group size, bf16 scales only).
    The kernel computes (q - 8) * scale + zero, so zero = (8 - z) * scale."""
    if scales.dtype != torch.bfloat16 or group_size not in (32, 64, 128, 256):
        return {}
    s = scales.float()
    z = torch.zeros_like(s) if zeros is None else (8 - zeros.float()) * s
    try:
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.to(torch.int32).contiguous(), 2)
        sz = torch.stack([s.t(), z.t()], dim=-1).to(torch.bfloat16).contiguous()
        torch.ops.aten._weight_int4pack_mm_for_cpu(torch.zeros(1, codes.shape[1], dtype=torch.bfloat16), packed,
                                                   group_size, sz)
    except RuntimeError:
        return {}
    return {"int4pack": packed, "int4pack_sz": sz}


class WeightOnlyLinearMethod:
    """Replaces `F.linear(x, layer.weight, bias)` of a linear layer or the LM head once the weights are loaded.

    `process(layer, role)` quantizes `layer.weight` into buffers (role "linear" or "lm_head"); `apply(layer, x,
    bias)` runs the matmul: the quantized kernel for at most `max_rows` rows of bf16 activations (measured
    crossover with oneDNN's dense bf16 GEMM: ~16 rows for these shapes), the dense weight otherwise.

    The LM head of int4 gets a second int4 pass over the residual (w ~ deq(q1) + deq(q2), ~8 bits): one
    4-bit pass over the head costs the default model's logits KL 0.04 against float32 (0.002 for the dense
    bf16 model) and top-1 agreement falls to 88 %; with the residual pass it is back at bf16's level, at two
    int4 passes (~3.3 ms at batch 1, 1 thread) instead of dense bf16's ~9 ms.
    """

    def __init__(self, kind: str, group_size: int = 32, max_rows: int = 16):
        if kind not in QUANTIZATIONS:
            raise ValueError(f"unknown quantization {kind!r}; choose one of {', '.join(QUANTIZATIONS)}")
        self.kind, self.group_size, self.max_rows = kind, group_size, max_rows

    def __repr__(self) -> str:
        return f"WeightOnlyLinearMethod({self.kind}, group_size={self.group_size}, max_rows={self.max_rows})"

    def _pack_int4(self, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(packed codes, scales_and_zeros bf16 [K/G, N, 2], dequantized float32 weight)."""
        q, scale, lo = quantize_int4(w, self.group_size)
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 2)
        # the kernel computes (q - 8) * scale + zero
        sz = torch.stack([scale.t(), (lo + 8 * scale).t()], dim=-1).to(torch.bfloat16).contiguous()
        return packed, sz, dequantize_int4(q, scale, lo, self.group_size)

    def process(self, layer: torch.nn.Module, role: str = "linear") -> bool:
        """Quantize layer.weight; False (layer left dense) where the kernel does not take its shape."""
        w = layer.weight.data
        if w.dtype != torch.bfloat16 or w.dim() != 2:
            return False
        bufs = {}
        try:
            if self.kind == "int4":
                if w.shape[1] % self.group_size:
                    return False
                bufs["qweight"], bufs["qscale"], deq = self._pack_int4(w)
                if role == "lm_head":
                    bufs["qweight2"], bufs["qscale2"], _ = self._pack_int4(w.float() - deq)
                torch.ops.aten._weight_int4pack_mm_for_cpu(w[:1], bufs["qweight"], self.group_size,
                                                           bufs["qscale"])  # the kernel takes this shape
            else:
                if not int8pack_supported(w.shape[1]):  # the kernel would crash or be wrong: stay dense
                    return False
                bufs["qweight"], scale = quantize_int8(w)
                bufs["qscale"] = scale.to(torch.bfloat16)
                torch.ops.aten._weight_int8pack_mm(w[:1], bufs["qweight"], bufs["qscale"])
        except RuntimeError as e:  # a shape the kernel rejects: stay dense
            logger.debug("quantization %s skipped for a %s weight: %s", self.kind, tuple(w.shape), e)
            return False
        for name, t in bufs.items():
            layer.register_buffer(name, t, persistent=False)
        return True

    def apply(self, layer: torch.nn.Module, x: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
        if x.dim() != 2 or x.shape[0] > self.max_rows or x.dtype != torch.bfloat16:
            return F.linear(x, layer.weight, bias)
        if self.kind == "int4":
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(x, layer.qweight, self.group_size, layer.qscale)
            if "qweight2" in layer._buffers:
                y += torch.ops.aten._weight_int4pack_mm_for_cpu(x, layer.qweight2, self.group_size, layer.qscale2)
        else:
            y = torch.ops.aten._weight_int8pack_mm(x, layer.qweight, layer.qscale)
        return y if bias is None else y + bias
