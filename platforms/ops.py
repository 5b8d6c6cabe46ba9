"""Fusable model ops with plain-torch definitions; platforms override them with kernels."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F


class Ops:
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
