"""Multi-LoRA for a batch that mixes adapters: y += (x A_s^T) B_s^T for each token's slot s (0 = none).

The tokens are sorted by slot on the device (`lora_prepare`: argsort and scatter-add counts, no host sync, so a
CUDA graph can hold it); then two grouped GEMMs, one program per BLOCK_M tokens of one slot:

- shrink: h [T, R] (float32) = x[tokens of s] @ A_s^T, A_s [R, K] (R = the layer's slices x max rank);
- expand: y[tokens of s] += h @ B_s^T, B_s [N, R] (scale folded in; the fused q|k|v and gate|up projections'
  B is block-diagonal over the slices).

Programs of slot 0 are never launched and shrink programs past a slot's tokens exit at once, so rows without an
adapter cost nothing but the launch. An expand program owns BLOCK_N columns of one slot and walks all its tokens,
so each B tile is read once per step; A is read once per BLOCK_M of the slot's tokens.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


def lora_prepare(index: torch.Tensor, num_slots: int):
    """-> (order [T] int32: token positions grouped by slot, starts [S] int32, counts [S] int32)."""
    idx = index.to(torch.int64)
    order = idx.argsort(stable=True).to(torch.int32)
    # not bincount: on CUDA it reads the largest id back to the host, which a CUDA graph cannot capture
    counts = torch.zeros(num_slots, dtype=torch.int64, device=idx.device).scatter_add_(0, idx, torch.ones_like(idx))
    starts = counts.cumsum(0) - counts
    return order, starts.to(torch.int32), counts.to(torch.int32)


@triton.jit
def _tokens(order, starts, counts, s, pid_m, BLOCK_M: tl.constexpr):
    count = tl.load(counts + s)
    offs = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    mask = offs < count
    tok = tl.load(order + tl.load(starts + s) + offs, mask=mask, other=0)
    return tok.to(tl.int64), mask, pid_m * BLOCK_M < count


@triton.jit
def _shrink_kernel(x, a, h, order, starts, counts, K, R, sx, sa_s, sa_r, sh,
                   BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, IEEE: tl.constexpr):
    s = tl.program_id(2) + 1
    tok, mask_m, live = _tokens(order, starts, counts, s, tl.program_id(0), BLOCK_M)
    if live:
        offs_r = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
        mask_r = offs_r < R
        acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            mask_k = offs_k < K
            xb = tl.load(x + tok[:, None] * sx + offs_k[None, :], mask=mask_m[:, None] & mask_k[None, :], other=0.0)
            ab = tl.load(a + s * sa_s + offs_r[None, :] * sa_r + offs_k[:, None],
                         mask=mask_r[None, :] & mask_k[:, None], other=0.0)
            if IEEE:
                acc += tl.dot(xb, ab, input_precision="ieee")
            else:
                acc += tl.dot(xb, ab)
        tl.store(h + tok[:, None] * sh + offs_r[None, :], acc, mask=mask_m[:, None] & mask_r[None, :])


@triton.jit
def _expand_kernel(h, b, y, order, starts, counts, N, R, sh, sb_s, sb_n, sy,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr, IEEE: tl.constexpr):
    """One program per (BLOCK_N columns, slot): its B tile is loaded once and used for all the slot's tokens."""
    s = tl.program_id(1) + 1
    count = tl.load(counts + s)
    start = tl.load(starts + s)
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    offs_r = tl.arange(0, BLOCK_R)  # BLOCK_R >= R: the whole rank at once
    mask_r = offs_r < R
    bb = tl.load(b + s * sb_s + offs_n[None, :] * sb_n + offs_r[:, None], mask=mask_n[None, :] & mask_r[:, None],
                 other=0.0)
    if IEEE:
        bb = bb.to(tl.float32)
    for m0 in range(0, count, BLOCK_M):
        offs = m0 + tl.arange(0, BLOCK_M)
        mask_m = offs < count
        tok = tl.load(order + start + offs, mask=mask_m, other=0).to(tl.int64)
        hb = tl.load(h + tok[:, None] * sh + offs_r[None, :], mask=mask_m[:, None] & mask_r[None, :], other=0.0)
        if IEEE:
            acc = tl.dot(hb, bb, input_precision="ieee")
        else:
            acc = tl.dot(hb.to(bb.dtype), bb)
        yp = y + tok[:, None] * sy + offs_n[None, :]
        mask = mask_m[:, None] & mask_n[None, :]
        old = tl.load(yp, mask=mask, other=0.0)
        tl.store(yp, (old.to(tl.float32) + acc).to(y.dtype.element_ty), mask=mask)


def _pow2(n: int, lo: int, hi: int) -> int:
    return max(lo, min(hi, triton.next_power_of_2(n)))


def lora_apply(y: torch.Tensor, x: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor,
               prepared: tuple) -> torch.Tensor:
    """y [T, N] += per token (x A_s^T) B_s^T, in place; x [T, K]; lora_a [S, R, K]; lora_b [S, N, R];
    `prepared`: lora_prepare(index, S). Rows of x and y contiguous."""
    order, starts, counts = prepared
    t, k = x.shape
    num_slots, r, _ = lora_a.shape
    n = y.shape[1]
    if t == 0 or num_slots < 2:
        return y
    block_m = 16 if t <= 512 else 64
    ieee = x.dtype == torch.float32
    h = torch.empty(t, r, dtype=torch.float32, device=x.device)
    br = _pow2(r, 16, 64)
    _shrink_kernel[(triton.cdiv(t, block_m), triton.cdiv(r, br), num_slots - 1)](
        x, lora_a, h, order, starts, counts, k, r, x.stride(0), lora_a.stride(0), lora_a.stride(1), h.stride(0),
        BLOCK_M=block_m, BLOCK_R=br, BLOCK_K=_pow2(k, 16, 128), IEEE=ieee, num_warps=4)
    bn = _pow2(n, 16, 64)
    _expand_kernel[(triton.cdiv(n, bn), num_slots - 1)](
        h, lora_b, y, order, starts, counts, n, r, h.stride(0), lora_b.stride(0), lora_b.stride(1), y.stride(0),
        BLOCK_M=block_m, BLOCK_N=bn, BLOCK_R=_pow2(r, 16, 1 << 30), IEEE=ieee, num_warps=4)
    return y
