"""Fused Mixture-of-Experts: the (token, expert) pairs sorted by expert, then one grouped GEMM per weight.

1. `moe_align_block_size`: the T * k pairs sorted by expert, each expert's run padded to a multiple of BLOCK_M
   (padding rows hold the sentinel T * k), plus the expert of every BLOCK_M block. Plain torch ops, no host sync
   (the padded length is bounded from the shapes alone), so a CUDA graph can hold it.
2. `_moe_gemm_kernel` twice: [T*k, 2I] = x[pair // k] @ W13[e]^T, then SiLU-and-mul, then
   [T*k, H] = act[pair] @ W2[e]^T scaled by the pair's routing weight (in the float32 accumulator).
   Each program computes one BLOCK_M x BLOCK_N tile of one expert's rows; programs past the padded length exit.
3. The k results of each token summed in float32.

Tunings: BLOCK_M follows the average pairs per expert (decode: 16, prefill: up to 64); see `moe_config`.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
import triton
import triton.language as tl


def moe_config(num_pairs: int, num_experts: int, n: int, k: int) -> dict:
    """Launch parameters for a GEMM of `num_pairs` rows spread over `num_experts`, output width n, depth k."""
    per_expert = num_pairs / max(1, num_experts)
    if per_expert <= 16:  # decode: few rows per expert, the weights dominate: wide N tiles, deep K
        cfg = dict(BLOCK_M=16, BLOCK_N=64, BLOCK_K=128, GROUP_M=1, num_warps=4, num_stages=4)
    elif per_expert <= 64:
        cfg = dict(BLOCK_M=32, BLOCK_N=64, BLOCK_K=64, GROUP_M=8, num_warps=4, num_stages=4)
    else:  # prefill
        cfg = dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=3)
    cfg["BLOCK_N"] = min(cfg["BLOCK_N"], max(16, triton.next_power_of_2(n)))
    cfg["BLOCK_K"] = min(cfg["BLOCK_K"], max(16, triton.next_power_of_2(k)))
    return cfg


def moe_align_block_size(topk_ids: torch.Tensor, block_m: int, num_experts: int):
    """-> (sorted_ids [L] int32, expert_ids [L / block_m] int32, num_padded [1] int32).

    sorted_ids lists pair indices (t * k + j) grouped by expert, each group padded with the sentinel T * k to a
    multiple of block_m; expert_ids[b] is the expert of block b (blocks past num_padded: 0, never computed)."""
    flat = topk_ids.reshape(-1).to(torch.int64)
    n = flat.numel()
    device = flat.device
    max_len = min(n + num_experts * (block_m - 1), n * block_m)
    max_len = triton.cdiv(max_len, block_m) * block_m
    order = flat.argsort(stable=True)
    sorted_experts = flat[order]
    # not bincount: on CUDA it reads the largest id back to the host, which a CUDA graph cannot capture
    counts = torch.zeros(num_experts, dtype=torch.int64, device=device).scatter_add_(0, flat, torch.ones_like(flat))
    padded = (counts + block_m - 1) // block_m * block_m
    pad_end = padded.cumsum(0)
    pad_start = pad_end - padded
    start = counts.cumsum(0) - counts
    rank = torch.arange(n, device=device) - start[sorted_experts]
    pos = pad_start[sorted_experts] + rank
    sorted_ids = torch.full((max_len,), n, dtype=torch.int32, device=device)
    sorted_ids[pos] = order.to(torch.int32)
    block_starts = torch.arange(0, max_len, block_m, device=device)
    expert_ids = torch.searchsorted(pad_end, block_starts, right=True).clamp_(max=num_experts - 1).to(torch.int32)
    return sorted_ids, expert_ids, pad_end[-1:].to(torch.int32)


@triton.jit
def _moe_gemm_kernel(a_ptr, b_ptr, c_ptr, w_ptr, sorted_ids_ptr, expert_ids_ptr, num_padded_ptr,
                     N, K, EM, num_valid,
                     stride_am, stride_ak, stride_be, stride_bn, stride_bk, stride_cm, stride_cn,
                     TOP_K: tl.constexpr, MUL_WEIGHT: tl.constexpr, IEEE: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    """C[pair] = A[pair // TOP_K] @ B[expert]^T (* weight[pair]) for the pairs of one BLOCK_M block."""
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(EM, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    group = GROUP_M * num_pid_n
    first_m = (pid // group) * GROUP_M
    size_m = tl.minimum(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % group) % size_m
    pid_n = (pid % group) // size_m
    if pid_m * BLOCK_M >= tl.load(num_padded_ptr):
        return
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    pair = tl.load(sorted_ids_ptr + offs_m)
    valid = pair < num_valid
    expert = tl.load(expert_ids_ptr + pid_m).to(tl.int64)
    rows = (pair // TOP_K).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < N
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + rows[:, None] * stride_am + offs_k[None, :] * stride_ak
    b_ptrs = b_ptr + expert * stride_be + offs_n[None, :] * stride_bn + offs_k[:, None] * stride_bk
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for kb in range(0, tl.cdiv(K, BLOCK_K)):
        k_ok = offs_k < K - kb * BLOCK_K
        a = tl.load(a_ptrs, mask=valid[:, None] & k_ok[None, :], other=0.0)
        b = tl.load(b_ptrs, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        if IEEE:
            acc = tl.dot(a, b, acc, input_precision="ieee")
        else:
            acc = tl.dot(a, b, acc)
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk
    if MUL_WEIGHT:
        w = tl.load(w_ptr + pair, mask=valid, other=0.0).to(tl.float32)
        acc = acc * w[:, None]
    c_ptrs = c_ptr + pair.to(tl.int64)[:, None] * stride_cm + offs_n[None, :] * stride_cn
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=valid[:, None] & n_ok[None, :])


def _gemm(a, b, c, sorted_ids, expert_ids, num_padded, top_k, weights, cfg):
    n, k = b.shape[1], b.shape[2]
    em = sorted_ids.numel()
    grid = (triton.cdiv(em, cfg["BLOCK_M"]) * triton.cdiv(n, cfg["BLOCK_N"]),)
    _moe_gemm_kernel[grid](
        a, b, c, weights if weights is not None else c, sorted_ids, expert_ids, num_padded,
        n, k, em, c.shape[0],
        a.stride(0), a.stride(1), b.stride(0), b.stride(1), b.stride(2), c.stride(0), c.stride(1),
        TOP_K=top_k, MUL_WEIGHT=weights is not None, IEEE=a.dtype == torch.float32,
        BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_K=cfg["BLOCK_K"], GROUP_M=cfg["GROUP_M"],
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])


def fused_moe(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor,
              topk_ids: torch.Tensor, config: Optional[dict] = None) -> torch.Tensor:
    """x [T, H]; w13 [E, 2I, H]; w2 [E, H, I]; topk_weights [T, k]; topk_ids [T, k] -> [T, H] in x's dtype.

    `config` (BLOCK_M/N/K, GROUP_M, num_warps, num_stages) overrides `moe_config` for both GEMMs."""
    t, h = x.shape
    e, two_i, _ = w13.shape
    top_k = topk_ids.shape[1]
    pairs = t * top_k
    if pairs == 0:
        return torch.zeros_like(x)
    cfg1 = config or moe_config(pairs, e, two_i, h)
    cfg2 = config or moe_config(pairs, e, h, two_i // 2)
    if cfg1["BLOCK_M"] != cfg2["BLOCK_M"]:
        raise ValueError("both GEMMs must use one BLOCK_M (they share the sorted pairs)")
    sorted_ids, expert_ids, num_padded = moe_align_block_size(topk_ids, cfg1["BLOCK_M"], e)
    x = x.contiguous()
    inter = torch.empty(pairs, two_i, dtype=x.dtype, device=x.device)
    _gemm(x, w13, inter, sorted_ids, expert_ids, num_padded, top_k, None, cfg1)
    gate, up = inter.chunk(2, dim=-1)
    act = (F.silu(gate.float()) * up.float()).to(x.dtype)
    out = torch.empty(pairs, h, dtype=torch.float32, device=x.device)
    weights = topk_weights.reshape(-1).to(torch.float32).contiguous()
    _gemm(act, w2, out, sorted_ids, expert_ids, num_padded, 1, weights, cfg2)
    return out.view(t, top_k, h).sum(dim=1).to(x.dtype)
