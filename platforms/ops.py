"""Fusable model ops with plain-torch definitions; platforms override them with kernels."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from pageport.platforms.quant_ops import QuantOps


class Ops(QuantOps):
    """The reference implementations. A platform's `ops` subclasses this and replaces
    what it has faster kernels for; results must match these within dtype tolerance."""

    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float,
                 residual: Optional[torch.Tensor] = None):
        """RMSNorm(x [+ residual]). With a residual, returns (normed, new_residual)."""
        if residual is not None:
            x = x + residual
            residual = x
        dtype = x.dtype
        xf = x.float()
        out = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(dtype) * weight
        return out if residual is None else (out, residual)

    def rotary(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
               cos_sin_cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Neox-style rotary embedding. q [T, Hq, D], k [T, Hk, D]; cache [max_pos, D] = cos | sin."""
        cos, sin = cos_sin_cache[positions].chunk(2, dim=-1)
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)

        def rot(x):
            x1, x2 = x.float().chunk(2, dim=-1)
            return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).to(x.dtype)

        return rot(q), rot(k)

    def silu_and_mul(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = x.chunk(2, dim=-1)
        return F.silu(gate) * up

    def gelu_tanh_and_mul(self, x: torch.Tensor) -> torch.Tensor:
        """GELU (tanh approximation) of the gate times up, for gate | up in one tensor (Gemma's MLP)."""
        gate, up = x.chunk(2, dim=-1)
        return F.gelu(gate, approximate="tanh") * up

    def lora_apply(self, y: torch.Tensor, x: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor,
                   index: torch.Tensor, slots: list[int]) -> torch.Tensor:
        """y + (x A_s^T) B_s^T for the rows whose index is s, for each slot s in `slots` (slot 0: none).

        y [T, N], x [T, K]; lora_a [S, R, K]; lora_b [S, N, R] (scale folded in, computed in their dtype);
        index [T]. Returns y, updated in place."""
        order, segments = self._lora_segments(index, lora_a.shape[0])
        if not segments:
            return y
        xs = x.index_select(0, order).to(lora_a.dtype)  # the adapters' tokens, grouped by slot
        parts = [F.linear(F.linear(xs[lo:hi], lora_a[s]), lora_b[s]) for s, lo, hi in segments]
        return y.index_add_(0, order, torch.cat(parts).to(y.dtype))

    def _lora_segments(self, index: torch.Tensor, num_slots: int):
        """(token positions of slots 1.. grouped by slot, [(slot, start, end)]): sorted once per step's index
        and reused by every layer."""
        cached = getattr(self, "_lora_cached", None)
        if cached is not None and cached[0] is index:
            return cached[1]
        idx = index.to(torch.int64)
        order = idx.argsort(stable=True)
        counts = torch.bincount(idx, minlength=num_slots).tolist()
        segments, lo = [], 0
        for s, c in enumerate(counts[1:], 1):
            if c:
                segments.append((s, lo, lo + c))
            lo += c
        out = (order[counts[0]:], segments)
        self._lora_cached = (index, out)
        return out

    def fused_moe(self, x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor,
                  topk_ids: torch.Tensor) -> torch.Tensor:
        """Routed experts: sum_j topk_weights[t, j] * W2[e] (silu(gate) * up)(W13[e] x[t]), e = topk_ids[t, j].

        x [T, H]; w13 [E, 2I, H] (gate | up); w2 [E, H, I]; topk_weights [T, k] (float32), topk_ids [T, k].
        Returns [T, H] in x's dtype. This default sorts the (token, expert) pairs by expert and runs one pair
        of matmuls per expert that has tokens."""
        t, h = x.shape
        k = topk_ids.shape[1]
        flat = topk_ids.reshape(-1)
        order = flat.argsort(stable=True)
        counts = torch.bincount(flat, minlength=w13.shape[0]).tolist()
        rows = order // k  # token of each sorted pair
        xs = x.index_select(0, rows)
        ys = torch.empty_like(xs)
        start = 0
        for e, n in enumerate(counts):
            if n:
                seg = xs[start:start + n]
                ys[start:start + n] = F.linear(self.silu_and_mul(F.linear(seg, w13[e])), w2[e])
                start += n
        acc = torch.promote_types(x.dtype, torch.float32)  # weighting and the sum over k: float32 at least
        ys = ys.to(acc) * topk_weights.reshape(-1)[order].to(acc).unsqueeze(1)
        out = torch.zeros(t, h, dtype=acc, device=x.device).index_add_(0, rows, ys)
        return out.to(x.dtype)
