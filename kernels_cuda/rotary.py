"""Neox-style rotary embedding, in place on q and k, one program per token."""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rotate_heads(ptr, stride_t, stride_h, t, cos, sin, i, i_ok,
                  NUM_HEADS: tl.constexpr, HEADS_PAD: tl.constexpr, HALF: tl.constexpr):
    h = tl.arange(0, HEADS_PAD)[:, None]
    mask = (h < NUM_HEADS) & i_ok[None, :]
    p1 = ptr + t * stride_t + h * stride_h + i[None, :]
    x1 = tl.load(p1, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(p1 + HALF, mask=mask, other=0.0).to(tl.float32)
    tl.store(p1, (x1 * cos - x2 * sin).to(ptr.dtype.element_ty), mask=mask)
    tl.store(p1 + HALF, (x2 * cos + x1 * sin).to(ptr.dtype.element_ty), mask=mask)


@triton.jit
def _rotary_kernel(pos_ptr, q_ptr, k_ptr, cache_ptr, stride_qt, stride_qh, stride_kt, stride_kh, stride_c,
                   NUM_Q_HEADS: tl.constexpr, NUM_K_HEADS: tl.constexpr, Q_HEADS_PAD: tl.constexpr,
                   K_HEADS_PAD: tl.constexpr, HALF: tl.constexpr, HALF_PAD: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    pos = tl.load(pos_ptr + t).to(tl.int64)
    i = tl.arange(0, HALF_PAD)
    i_ok = i < HALF
    cos = tl.load(cache_ptr + pos * stride_c + i, mask=i_ok, other=0.0).to(tl.float32)[None, :]
    sin = tl.load(cache_ptr + pos * stride_c + HALF + i, mask=i_ok, other=0.0).to(tl.float32)[None, :]
    _rotate_heads(q_ptr, stride_qt, stride_qh, t, cos, sin, i, i_ok, NUM_Q_HEADS, Q_HEADS_PAD, HALF)
    _rotate_heads(k_ptr, stride_kt, stride_kh, t, cos, sin, i, i_ok, NUM_K_HEADS, K_HEADS_PAD, HALF)


def rotary_embedding(positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
                     cos_sin_cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """q [T, Hq, D], k [T, Hk, D] (last dim contiguous; views of a fused qkv are fine) rotated in
    place by cos_sin_cache [max_pos, D] = cos | sin at positions [T]. Returns (q, k)."""
    num_tokens, num_q_heads, head_size = q.shape
    num_k_heads = k.shape[1]
    assert cos_sin_cache.shape[-1] == head_size, "rotary over the whole head (rotary_dim == head_size)"
    assert q.stride(-1) == 1 and k.stride(-1) == 1 and cos_sin_cache.stride(-1) == 1
    half = head_size // 2
    if num_tokens:
        _rotary_kernel[(num_tokens,)](
            positions, q, k, cos_sin_cache, q.stride(0), q.stride(1), k.stride(0), k.stride(1),
            cos_sin_cache.stride(0), NUM_Q_HEADS=num_q_heads, NUM_K_HEADS=num_k_heads,
            Q_HEADS_PAD=triton.next_power_of_2(num_q_heads), K_HEADS_PAD=triton.next_power_of_2(num_k_heads),
            HALF=half, HALF_PAD=triton.next_power_of_2(half), num_warps=4)
    return q, k
