"""Ragged paged attention in Triton: one kernel for prefill chunks and decodes, plus split-KV.

Cache layout (one layer): k_cache / v_cache [num_blocks, block_size, num_kv_heads, head_size]
(the two halves of the default [2, ...] cache). One token of one head is head_size contiguous
elements, so a (tokens x head) tile is read in 128-512-byte rows: fully coalesced.

Work split. A program owns BLOCK_M "rows" = BLOCK_Q query tokens x the GQA group (the GROUP
query heads that share one KV head), so K/V tiles are loaded once per group and tl.dot sees
M >= 16. Row r is query token r // GROUP and query head kv_head * GROUP + r % GROUP; rows past
BLOCK_Q * GROUP are padding (e.g. GROUP 3: 15 of 16 rows used).

Grid, unified mode: (num_kv_heads, num_tokens // BLOCK_Q + num_seqs[, num_splits]). Sequence i
gets the program ids from query_start_loc[i] // BLOCK_Q + i on, which is at least
ceil(q_len / BLOCK_Q) programs; a program finds its sequence by binary search over
query_start_loc and exits if it has no rows. All sizes come from host ints: no device sync.
Decode mode (every sequence has <= BLOCK_Q query tokens): grid (num_kv_heads, num_seqs,
num_splits), program id = sequence, no search.

Split-KV: with NUM_SPLITS > 1, each program walks 1/NUM_SPLITS of its key tiles and writes its
partial result (normalised output and log2-sum-exp) in fp32; a second kernel merges the splits.
The backend uses it for decode batches whose num_seqs * num_kv_heads programs would leave the
GPU under-filled (see choose_num_splits).
"""
from __future__ import annotations

import functools
from typing import Optional

import torch
import triton
import triton.language as tl

from pageport.kernels_cuda.launch import CUDA_TUNING, LaunchConfig, LaunchTuning  # noqa: F401

LOG2E = tl.constexpr(1.4426950408889634)


@triton.jit
def _find_seq(query_start_loc_ptr, num_seqs, pid, BLOCK_Q: tl.constexpr):
    """Largest i with query_start_loc[i] // BLOCK_Q + i <= pid."""
    lo = 0
    hi = num_seqs
    while lo < hi:
        mid = (lo + hi) // 2
        first = tl.load(query_start_loc_ptr + mid) // BLOCK_Q + mid
        if first <= pid:
            lo = mid + 1
        else:
            hi = mid
    return lo - 1


@triton.jit
def _paged_attention_kernel(
    out_ptr, q_ptr, k_cache_ptr, v_cache_ptr, block_table_ptr, seq_lens_ptr, query_start_loc_ptr,
    part_out_ptr, part_lse_ptr,
    num_seqs, num_heads, qk_scale, softcap, window,
    stride_qt, stride_qh, stride_ot, stride_oh,
    stride_kb, stride_kt, stride_kh, stride_vb, stride_vt, stride_vh, stride_bt,
    GROUP: tl.constexpr, HEAD_SIZE: tl.constexpr, HEAD_PAD: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_SIZE: tl.constexpr, TILE_N: tl.constexpr,
    NUM_SPLITS: tl.constexpr, DECODE: tl.constexpr, USE_WINDOW: tl.constexpr,
    USE_SOFTCAP: tl.constexpr, DOT_PRECISION: tl.constexpr, KV_FP8: tl.constexpr, K_ROWS: tl.constexpr,
):
    kv_head = tl.program_id(0)
    if DECODE:
        seq = tl.program_id(1)
        q_block = 0
    else:
        pid = tl.program_id(1)
        seq = _find_seq(query_start_loc_ptr, num_seqs, pid, BLOCK_Q)
        q_block = pid - (tl.load(query_start_loc_ptr + seq) // BLOCK_Q + seq)
    split = tl.program_id(2)

    q_start = tl.load(query_start_loc_ptr + seq)
    q_len = tl.load(query_start_loc_ptr + seq + 1) - q_start
    if q_block * BLOCK_Q >= q_len:
        return
    seq_len = tl.load(seq_lens_ptr + seq)
    ctx_len = seq_len - q_len  # tokens cached before this step: query j sits at ctx_len + j

    rows = tl.arange(0, BLOCK_M)
    tok = q_block * BLOCK_Q + rows // GROUP
    head = kv_head * GROUP + rows % GROUP
    row_ok = (rows < BLOCK_Q * GROUP) & (tok < q_len)
    d = tl.arange(0, HEAD_PAD)
    d_ok = d < HEAD_SIZE
    q = tl.load(q_ptr + (q_start + tok)[:, None] * stride_qt + head[:, None] * stride_qh + d[None, :],
                mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    if KV_FP8:  # fp8 widens exactly to fp16 (one cvt per pair), and fp16 keeps more of q and p than bf16
        q = q.to(tl.float16)
    q_pos = ctx_len + tok

    # Keys this program can see: up to its last query row, from the window start of its first.
    last_tok = tl.minimum(q_block * BLOCK_Q + BLOCK_Q, q_len) - 1
    key_hi = ctx_len + last_tok + 1
    key_lo = 0
    if USE_WINDOW:
        key_lo = tl.maximum(ctx_len + q_block * BLOCK_Q - window + 1, 0)
    tile_lo = key_lo // TILE_N
    tile_hi = tl.cdiv(key_hi, TILE_N)
    if NUM_SPLITS > 1:
        per_split = tl.cdiv(tile_hi - tile_lo, NUM_SPLITS)
        tile_lo = tile_lo + split * per_split
        tile_hi = tl.minimum(tile_hi, tile_lo + per_split)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_PAD], tl.float32)
    n = tl.arange(0, TILE_N)
    bt_row = block_table_ptr + seq.to(tl.int64) * stride_bt
    for t in range(tile_lo, tile_hi):
        k_pos = t * TILE_N + n
        k_ok = k_pos < key_hi
        # A tile may span several cache blocks (TILE_N > BLOCK_SIZE) or part of one: look up
        # the block of every key; repeated entries hit L1.
        blk = tl.load(bt_row + k_pos // BLOCK_SIZE, mask=k_ok, other=0).to(tl.int64)
        off = k_pos % BLOCK_SIZE
        if K_ROWS:  # keys loaded as they lie (a token's head_size elements along a row), transposed for the dot
            k = tl.load(k_cache_ptr + blk[:, None] * stride_kb + off[:, None] * stride_kt
                        + kv_head * stride_kh + d[None, :],
                        mask=k_ok[:, None] & d_ok[None, :], other=0.0).to(q.dtype)  # [TILE_N, HEAD_PAD]
            s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
        else:
            k = tl.load(k_cache_ptr + blk[None, :] * stride_kb + off[None, :] * stride_kt
                        + kv_head * stride_kh + d[:, None],
                        mask=k_ok[None, :] & d_ok[:, None], other=0.0).to(q.dtype)  # [HEAD_PAD, TILE_N]
            s = tl.dot(q, k, input_precision=DOT_PRECISION)
        if USE_SOFTCAP:  # softcap * tanh(s * scale / softcap), tanh through exp (no libdevice)
            x = s * (qk_scale / softcap)
            s = softcap * LOG2E * (1.0 - 2.0 / (tl.exp(2.0 * x) + 1.0))
        else:
            s = s * (qk_scale * LOG2E)  # log2 domain: exp2 below
        visible = (k_pos[None, :] <= q_pos[:, None]) & k_ok[None, :]
        if USE_WINDOW:
            visible = visible & (q_pos[:, None] - k_pos[None, :] < window)
        s = tl.where(visible, s, float("-inf"))

        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # fully masked rows: avoid inf - inf
        p = tl.exp2(s - m_use[:, None])
        alpha = tl.exp2(m_i - m_use)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v = tl.load(v_cache_ptr + blk[:, None] * stride_vb + off[:, None] * stride_vt
                    + kv_head * stride_vh + d[None, :],
                    mask=k_ok[:, None] & d_ok[None, :], other=0.0).to(q.dtype)  # [TILE_N, HEAD_PAD]
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new

    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    o = acc / l_safe[:, None]
    if NUM_SPLITS == 1:
        tl.store(out_ptr + (q_start + tok)[:, None] * stride_ot + head[:, None] * stride_oh + d[None, :],
                 o.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])
    else:
        part = ((q_start + tok).to(tl.int64) * num_heads + head) * NUM_SPLITS + split
        tl.store(part_out_ptr + part[:, None] * HEAD_PAD + d[None, :], o, mask=row_ok[:, None])
        lse = tl.where(l_i == 0.0, float("-inf"), m_i + tl.log2(l_safe))
        tl.store(part_lse_ptr + part, lse, mask=row_ok)


@triton.jit
def _merge_splits_kernel(out_ptr, part_out_ptr, part_lse_ptr, num_heads, stride_ot, stride_oh,
                         NUM_SPLITS: tl.constexpr, SPLITS_PAD: tl.constexpr,
                         HEAD_SIZE: tl.constexpr, HEAD_PAD: tl.constexpr):
    t = tl.program_id(0)
    h = tl.program_id(1)
    s = tl.arange(0, SPLITS_PAD)
    d = tl.arange(0, HEAD_PAD)
    base = (t.to(tl.int64) * num_heads + h) * NUM_SPLITS
    lse = tl.load(part_lse_ptr + base + s, mask=s < NUM_SPLITS, other=float("-inf"))
    m = tl.max(lse, axis=0)
    m = tl.where(m == float("-inf"), 0.0, m)
    w = tl.exp2(lse - m)  # empty splits (lse -inf) weigh 0
    o = tl.load(part_out_ptr + (base + s)[:, None] * HEAD_PAD + d[None, :],
                mask=(s < NUM_SPLITS)[:, None], other=0.0)
    res = tl.sum(o * w[:, None], axis=0) / tl.maximum(tl.sum(w, axis=0), 1e-30)
    tl.store(out_ptr + t * stride_ot + h * stride_oh + d, res.to(out_ptr.dtype.element_ty), mask=d < HEAD_SIZE)


# ---------------------------------------------------------------------------------------------
# Host side

# LaunchConfig / LaunchTuning / CUDA_TUNING live in launch.py (no triton import: platforms read them)

# Split-KV aims for this many programs per SM on decode batches, and gives each split at least
# MIN_SPLIT_TOKENS keys so the merge stays cheap relative to the attention itself.
TARGET_PROGRAMS_PER_SM = CUDA_TUNING.target_programs_per_sm  # H100 sweep: batch 64 x 8 KV heads runs fastest unsplit
MIN_SPLIT_TOKENS = 512
MAX_SPLITS = 32


def _pow2_floor(x: int) -> int:
    return 1 << (max(1, x).bit_length() - 1)


@functools.lru_cache(maxsize=16)
def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors (NVIDIA), compute units (AMD: torch's HIP build reports CUs
    as multi_processor_count) or Xe cores (Intel XPU: gpu_subslice_count)."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    if device.type == "xpu":
        props = torch.xpu.get_device_properties(device)
        return int(getattr(props, "gpu_subslice_count", 0) or getattr(props, "max_compute_units", 64) // 8 or 8)
    return 4  # the interpreter: any small number


def choose_num_splits(num_seqs: int, num_kv_heads: int, max_seq_len: int, sms: int,
                      programs_per_sm: int = TARGET_PROGRAMS_PER_SM) -> int:
    """Splits for a decode batch: enough programs to fill the GPU, none shorter than
    MIN_SPLIT_TOKENS keys. A power of two, so few variants get compiled."""
    programs = max(1, num_seqs * num_kv_heads)
    want = -(-programs_per_sm * sms // programs)
    cap = max(1, max_seq_len // MIN_SPLIT_TOKENS)
    return _pow2_floor(min(want, cap, MAX_SPLITS))


def group_rows(group: int, want: int) -> int:
    """BLOCK_M for a GQA group: at least 16 (tl.dot), at least the group, a power of two."""
    return max(16, want, triton.next_power_of_2(group))


def default_config(*, group: int, head_size: int, max_query_len: int, num_seqs: int, num_kv_heads: int,
                   max_seq_len: int, device: torch.device, num_splits: Optional[int] = None,
                   tuning: LaunchTuning = CUDA_TUNING, kv_fp8: bool = False) -> LaunchConfig:
    """Heuristic launch configuration (benchmarks/kernel_attention.py sweeps around it)."""
    t = tuning
    head_pad = max(16, triton.next_power_of_2(head_size))
    block_m = group_rows(group, 16)
    if max_query_len <= block_m // group:  # decode-like: one program per (sequence, KV head)
        if num_splits is None:
            num_splits = choose_num_splits(num_seqs, num_kv_heads, max_seq_len, num_sms(device),
                                           t.target_programs_per_sm)
        tile = t.decode_fp8_tile_n if kv_fp8 else t.decode_tile_n  # fp8 halves a tile's bytes: take more keys
        tile_n = tile if head_pad <= 128 else max(16, tile // 2)
        return LaunchConfig(True, block_m, tile_n, num_splits, t.decode_num_warps, t.decode_num_stages,
                            t.decode_extra)
    # prefill / mixed: taller query tiles reuse each K/V tile for more rows
    rows = max_query_len * group
    want = 64 if rows >= 64 else 32 if rows >= 32 else 16
    block_m = group_rows(group, min(want, t.prefill_max_block_m))
    tile_n = t.prefill_tile_n if head_pad <= 128 else max(16, t.prefill_tile_n // 2)
    num_warps = t.prefill_wide_num_warps if block_m * head_pad > t.prefill_wide_elems else t.prefill_num_warps
    return LaunchConfig(False, block_m, tile_n, num_splits or 1, num_warps, t.prefill_num_stages, t.prefill_extra)


def paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, out: torch.Tensor,
                    query_start_loc: torch.Tensor, seq_lens: torch.Tensor, block_table: torch.Tensor, *,
                    max_query_len: int, max_seq_len: int, scale: float,
                    sliding_window: Optional[int] = None, softcap: Optional[float] = None,
                    config: Optional[LaunchConfig] = None,
                    workspace: Optional[dict] = None) -> torch.Tensor:
    """out[t, h] = attention of query token t (head h) over its sequence's cached keys.

    q/out [num_tokens, num_heads, head_size] (last dim contiguous), k_cache/v_cache
    [num_blocks, block_size, num_kv_heads, head_size], query_start_loc [num_seqs + 1] int32,
    seq_lens [num_seqs] int32, block_table [num_seqs, max_blocks] int32. The host ints
    max_query_len/max_seq_len only pick the launch; no device value is read.
    `workspace` (a dict) lets callers reuse split-KV buffers across layers of one step.
    """
    num_tokens, num_heads, head_size = q.shape
    _, block_size, num_kv_heads, _ = k_cache.shape
    num_seqs = seq_lens.shape[0]
    assert num_heads % num_kv_heads == 0, "query heads must be a multiple of KV heads"
    assert q.stride(-1) == 1 and out.stride(-1) == 1 and k_cache.stride(-1) == 1 and v_cache.stride(-1) == 1
    assert block_table.stride(-1) == 1
    group = num_heads // num_kv_heads
    if config is None:
        config = default_config(group=group, head_size=head_size, max_query_len=max_query_len, num_seqs=num_seqs,
                                num_kv_heads=num_kv_heads, max_seq_len=max_seq_len, device=q.device,
                                kv_fp8=k_cache.dtype in (torch.float8_e4m3fn, torch.float8_e5m2))
    head_pad = max(16, triton.next_power_of_2(head_size))
    block_m = group_rows(group, config.block_m)
    block_q = block_m // group
    if config.decode:
        assert max_query_len <= block_q, f"decode launch needs <= {block_q} query tokens per sequence"
        grid = (num_kv_heads, num_seqs, config.num_splits)
    else:
        grid = (num_kv_heads, num_tokens // block_q + num_seqs, config.num_splits)
    if num_tokens == 0 or num_seqs == 0:
        return out

    splits = config.num_splits
    part_out = part_lse = out  # unused when splits == 1
    if splits > 1:
        shape = (num_tokens, num_heads, splits)
        key = (shape, head_pad, q.device)
        bufs = workspace.get(key) if workspace is not None else None
        if bufs is None:
            bufs = (torch.empty(shape + (head_pad,), dtype=torch.float32, device=q.device),
                    torch.empty(shape, dtype=torch.float32, device=q.device))
            if workspace is not None:
                workspace[key] = bufs
        part_out, part_lse = bufs

    extra = dict(config.extra)
    _paged_attention_kernel[grid](
        out, q, k_cache, v_cache, block_table, seq_lens, query_start_loc, part_out, part_lse,
        num_seqs, num_heads, float(scale), float(softcap or 1.0), int(sliding_window or 0),
        q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), block_table.stride(0),
        GROUP=group, HEAD_SIZE=head_size, HEAD_PAD=head_pad, BLOCK_M=block_m, BLOCK_Q=block_q,
        BLOCK_SIZE=block_size, TILE_N=config.tile_n, NUM_SPLITS=splits, DECODE=config.decode,
        USE_WINDOW=bool(sliding_window), USE_SOFTCAP=bool(softcap),
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else None,  # fp32: no silent tf32
        KV_FP8=k_cache.dtype in (torch.float8_e4m3fn, torch.float8_e5m2) and q.dtype != torch.float32,
        K_ROWS=bool(extra.pop("K_ROWS", False)),  # keys row-major: a launch choice carried in extra
        num_warps=config.num_warps, num_stages=config.num_stages, **extra,
    )
    if splits > 1:
        _merge_splits_kernel[(num_tokens, num_heads)](
            out, part_out, part_lse, num_heads, out.stride(0), out.stride(1),
            NUM_SPLITS=splits, SPLITS_PAD=triton.next_power_of_2(splits), HEAD_SIZE=head_size, HEAD_PAD=head_pad,
            num_warps=4 if head_pad >= 128 else 2)
    return out


__all__ = ["LaunchConfig", "LaunchTuning", "CUDA_TUNING", "paged_attention", "default_config", "choose_num_splits",
           "num_sms"]
