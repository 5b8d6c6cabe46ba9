"""Triton paged attention and KV write against an independent float64 torch reference.

On the CPU these run under TRITON_INTERPRET=1 (conftest.py) at small shapes; on a GPU the
same tests run natively, and the `gpu`-marked ones add bf16 at real model shapes.
Tolerances (max abs error, outputs are O(1)): fp32 1e-4, fp16 4e-3 (P is cast to fp16 for
the P@V dot, as on the GPU), bf16 2e-2.
"""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from pageport.kernels_cuda.attention import TritonAttentionMetadata, TritonPagedAttention  # noqa: E402
from pageport.kernels_cuda.kv_cache import reshape_and_cache  # noqa: E402
from pageport.kernels_cuda.paged_attention import (LaunchConfig, choose_num_splits,  # noqa: E402
                                                   default_config, paged_attention)
from pageport.platforms import AttentionMetadata  # noqa: E402

ATOL = {torch.float32: 1e-4, torch.float16: 4e-3, torch.bfloat16: 2e-2}
gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


# --------------------------------------------------------------------------------------------
# Reference and batch builder

def reference_attention(q, k_cache, v_cache, query_start_loc, seq_lens, block_table, scale,
                        window=None, softcap=None):
    """float64, one sequence at a time: gather K/V slot by slot through the block table,
    explicit causal mask by absolute position (query j of sequence i sits at seq_len - q_len + j)."""
    num_tokens, num_heads, head_size = q.shape
    block_size, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
    group = num_heads // num_kv_heads
    k_flat = k_cache.reshape(-1, num_kv_heads, head_size)
    v_flat = v_cache.reshape(-1, num_kv_heads, head_size)
    out = torch.zeros(num_tokens, num_heads, head_size, dtype=torch.float64, device=q.device)
    for i, seq_len in enumerate(seq_lens):
        start, end = query_start_loc[i], query_start_loc[i + 1]
        pos = torch.arange(seq_len, device=q.device)
        slots = block_table[i].long()[pos // block_size] * block_size + pos % block_size
        k = k_flat[slots].double().repeat_interleave(group, dim=1)  # [L, H, D]
        v = v_flat[slots].double().repeat_interleave(group, dim=1)
        q_pos = torch.arange(seq_len - (end - start), seq_len, device=q.device)
        mask = pos[None, :] <= q_pos[:, None]
        if window:
            mask &= q_pos[:, None] - pos[None, :] < window
        s = torch.einsum("qhd,khd->hqk", q[start:end].double(), k) * scale
        if softcap:
            s = softcap * torch.tanh(s / softcap)
        s = s.masked_fill(~mask, float("-inf"))
        out[start:end] = torch.einsum("hqk,khd->qhd", s.softmax(-1), v)
    return out


def make_batch(q_lens, ctx_lens, num_heads, num_kv_heads, head_size, block_size, dtype, device,
               seed=0, spare_blocks=5):
    """A ragged batch over a cache with scattered block ids. Cache slots no sequence owns
    (free blocks, tails of last blocks) hold NaN, so any read of them shows in the output;
    block-table padding is -1, so any read of it is out of bounds."""
    g = torch.Generator().manual_seed(seed)
    seq_lens = [c + q for c, q in zip(ctx_lens, q_lens)]
    n_blocks = [-(-s // block_size) for s in seq_lens]
    num_blocks = sum(n_blocks) + spare_blocks
    perm = torch.randperm(num_blocks, generator=g)
    block_table = torch.full((len(seq_lens), max(n_blocks) + 2), -1, dtype=torch.int32)
    k_cache = torch.randn(num_blocks, block_size, num_kv_heads, head_size, generator=g)
    v_cache = torch.randn(num_blocks, block_size, num_kv_heads, head_size, generator=g)
    owned = torch.zeros(num_blocks * block_size, dtype=torch.bool)
    used = 0
    for i, (s, n) in enumerate(zip(seq_lens, n_blocks)):
        block_table[i, :n] = perm[used:used + n].int()
        used += n
        pos = torch.arange(s)
        owned[block_table[i].long()[pos // block_size] * block_size + pos % block_size] = True
    owned = owned.view(num_blocks, block_size)
    k_cache[~owned] = float("nan")
    v_cache[~owned] = float("nan")
    qsl = [0]
    for n in q_lens:
        qsl.append(qsl[-1] + n)
    q = torch.randn(qsl[-1], num_heads, head_size, generator=g)
    to = dict(dtype=dtype, device=device)
    return dict(q=q.to(**to), k_cache=k_cache.to(**to), v_cache=v_cache.to(**to),
                qsl=qsl, seq_lens=seq_lens, block_table=block_table.to(device),
                qsl_t=torch.tensor(qsl, dtype=torch.int32, device=device),
                seq_lens_t=torch.tensor(seq_lens, dtype=torch.int32, device=device))


def run_and_check(b, scale, dtype, config=None, window=None, softcap=None, q=None):
    q = b["q"] if q is None else q
    out = torch.full_like(q, float("nan"))
    paged_attention(q, b["k_cache"], b["v_cache"], out, b["qsl_t"], b["seq_lens_t"], b["block_table"],
                    max_query_len=max(b["qsl"][i + 1] - b["qsl"][i] for i in range(len(b["seq_lens"]))),
                    max_seq_len=max(b["seq_lens"]), scale=scale, sliding_window=window, softcap=softcap,
                    config=config)
    ref = reference_attention(q, b["k_cache"], b["v_cache"], b["qsl"], b["seq_lens"], b["block_table"], scale,
                              window, softcap)
    err = (out.double() - ref).abs().max().item()
    assert err <= ATOL[dtype], f"max abs error {err:.3g} > {ATOL[dtype]}"
    return out


# Prefill chunks with cached context, fresh prompts, decodes (some at 0 context), query
# lengths around the tile edges; 9 sequences so the binary search walks a few levels.
MIXED_Q = [1, 7, 1, 20, 1, 16, 3, 1, 5]
MIXED_CTX = [30, 9, 50, 0, 0, 17, 40, 64, 1]


# --------------------------------------------------------------------------------------------
# Interpreter tests (small shapes)

@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("heads", [(2, 2), (6, 2), (8, 2), (4, 1)], ids=["mha", "gqa3", "gqa4", "mqa"])
@pytest.mark.parametrize("head_size,block_size", [(64, 16), (128, 32), (128, 16)])
def test_unified_mixed_batch(device, dtype, heads, head_size, block_size):
    num_heads, num_kv_heads = heads
    b = make_batch(MIXED_Q, MIXED_CTX, num_heads, num_kv_heads, head_size, block_size, dtype, device,
                   seed=head_size + block_size + num_heads)
    run_and_check(b, head_size ** -0.5, dtype)


def test_head_size_256(device):
    b = make_batch([1, 6], [20, 11], 4, 2, 256, 16, torch.float16, device)
    run_and_check(b, 256 ** -0.5, torch.float16)


def test_odd_head_size_is_padded(device):
    b = make_batch([1, 9], [20, 11], 4, 2, 80, 16, torch.float32, device)
    run_and_check(b, 80 ** -0.5, torch.float32)


@pytest.mark.parametrize("block_m,tile_n,block_size", [(16, 16, 32), (32, 32, 16), (64, 64, 16), (16, 64, 32),
                                                        (64, 16, 16)])
def test_unified_tile_shapes(device, block_m, tile_n, block_size):
    """Key tiles inside one cache block, spanning several, and taller query tiles."""
    b = make_batch(MIXED_Q, MIXED_CTX, 8, 2, 64, block_size, torch.float32, device, seed=block_m + tile_n)
    run_and_check(b, 0.125, torch.float32, config=LaunchConfig(False, block_m, tile_n, 1, 4, 2))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("window", [1, 8, 21])
def test_sliding_window_unified(device, dtype, window):
    b = make_batch(MIXED_Q, MIXED_CTX, 6, 2, 64, 16, dtype, device, seed=window)
    run_and_check(b, 0.125, dtype, window=window)


def test_softcap(device):
    b = make_batch(MIXED_Q, MIXED_CTX, 8, 2, 64, 16, torch.float32, device, seed=3)
    run_and_check(b, 0.3, torch.float32, softcap=5.0)  # scale 0.3: scores reach the cap


@pytest.mark.parametrize("dtype,splits", [(torch.float32, 1), (torch.float32, 2), (torch.float32, 8),
                                          (torch.float16, 4), (torch.float16, 5)])
@pytest.mark.parametrize("heads,block_size", [((8, 2), 16), ((6, 2), 32), ((4, 1), 16)], ids=["gqa4", "gqa3", "mqa"])
def test_split_kv_decode(device, dtype, splits, heads, block_size):
    """Decode launch with 1..8 splits (5: not a power of two); a 2-token context leaves most
    splits empty."""
    ctx = [70, 2, 33, 0, 100]
    b = make_batch([1] * len(ctx), ctx, *heads, 64, block_size, dtype, device, seed=splits)
    run_and_check(b, 0.125, dtype, config=LaunchConfig(True, 16, 16, splits, 4, 2))


@pytest.mark.parametrize("splits", [1, 4])
def test_split_kv_decode_sliding_window(device, splits):
    # context 54: the window's first key (31) is the last key of a 32-key tile
    b = make_batch([1, 1, 1, 1], [70, 5, 90, 54], 8, 2, 64, 16, torch.float32, device, seed=7)
    run_and_check(b, 0.125, torch.float32, config=LaunchConfig(True, 16, 32, splits, 4, 2), window=24)


def test_decode_launch_takes_short_multi_token_queries(device):
    """Decode launch handles up to BLOCK_Q query tokens per sequence (MHA: BLOCK_Q = 16)."""
    b = make_batch([3, 1, 2, 1], [40, 7, 0, 19], 2, 2, 64, 16, torch.float32, device, seed=11)
    run_and_check(b, 0.125, torch.float32, config=LaunchConfig(True, 16, 16, 2, 4, 2))


def test_unified_with_splits(device):
    """Split-KV is not restricted to decodes: the unified launch merges splits too."""
    b = make_batch(MIXED_Q, MIXED_CTX, 8, 2, 64, 16, torch.float32, device, seed=5)
    run_and_check(b, 0.125, torch.float32, config=LaunchConfig(False, 32, 16, 4, 4, 2))


def test_default_configs(device):
    """The heuristic launches (what the backend uses) on a decode batch and on a mixed one."""
    b = make_batch([1, 1, 1, 1], [600, 50, 1100, 3], 8, 2, 64, 16, torch.float16, device, seed=9)
    run_and_check(b, 0.125, torch.float16)
    b = make_batch(MIXED_Q, MIXED_CTX, 8, 2, 64, 16, torch.float16, device, seed=10)
    run_and_check(b, 0.125, torch.float16)


def test_strided_query_view(device):
    """q as a view into a fused qkv projection (token stride > heads * head_size)."""
    b = make_batch(MIXED_Q, MIXED_CTX, 4, 2, 64, 16, torch.float32, device, seed=12)
    qkv = torch.randn(b["q"].shape[0], (4 + 2 * 2) * 64, device=device)
    q = qkv[:, :4 * 64].view(-1, 4, 64)
    q.copy_(b["q"])
    assert not q.is_contiguous()
    run_and_check(b, 0.125, torch.float32, q=q)


def test_choose_num_splits():
    assert choose_num_splits(num_seqs=1, num_kv_heads=8, max_seq_len=8192, sms=132) == 16
    assert choose_num_splits(num_seqs=1, num_kv_heads=8, max_seq_len=100_000, sms=132) == 32  # MAX_SPLITS
    assert choose_num_splits(num_seqs=1, num_kv_heads=8, max_seq_len=1000, sms=132) == 1  # too short to split
    assert choose_num_splits(num_seqs=256, num_kv_heads=8, max_seq_len=8192, sms=132) == 1  # GPU already full
    for n in (1, 3, 17, 64):
        s = choose_num_splits(num_seqs=n, num_kv_heads=8, max_seq_len=4096, sms=132)
        assert s & (s - 1) == 0
    cfg = default_config(group=4, head_size=128, max_query_len=1, num_seqs=64, num_kv_heads=8,
                         max_seq_len=4096, device=torch.device("cpu"))
    assert cfg.decode
    cfg = default_config(group=4, head_size=128, max_query_len=512, num_seqs=2, num_kv_heads=8,
                         max_seq_len=4096, device=torch.device("cpu"))
    assert not cfg.decode and cfg.num_splits == 1 and cfg.block_m == 64


# --------------------------------------------------------------------------------------------
# KV write and the backend

@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_reshape_and_cache_skips_padding(device, dtype):
    num_blocks, block_size, num_kv_heads, head_size = 6, 16, 3, 64
    k_cache = torch.randn(num_blocks, block_size, num_kv_heads, head_size).to(dtype=dtype, device=device)
    v_cache = torch.randn_like(k_cache)
    kv = torch.randn(5, 2 * num_kv_heads, head_size).to(dtype=dtype, device=device)  # k | v of a fused projection
    k, v = kv[:, :num_kv_heads], kv[:, num_kv_heads:]
    slots = torch.tensor([17, 3, -1, 95, 40], dtype=torch.int64, device=device)
    k_ref, v_ref = k_cache.clone(), v_cache.clone()
    for t, s in enumerate(slots.tolist()):
        if s >= 0:
            k_ref[s // block_size, s % block_size] = k[t]
            v_ref[s // block_size, s % block_size] = v[t]
    reshape_and_cache(k, v, k_cache, v_cache, slots)
    assert torch.equal(k_cache, k_ref) and torch.equal(v_cache, v_ref)


def _metadata(b, block_size, num_actual_tokens=None):
    q_lens = [b["qsl"][i + 1] - b["qsl"][i] for i in range(len(b["seq_lens"]))]
    slots = []
    for i, (s, ql) in enumerate(zip(b["seq_lens"], q_lens)):
        for p in range(s - ql, s):
            slots.append(int(b["block_table"][i, p // block_size]) * block_size + p % block_size)
    n = len(slots) if num_actual_tokens is None else num_actual_tokens
    slots += [-1] * (b["q"].shape[0] - len(slots))
    dev = b["q"].device
    return AttentionMetadata(num_actual_tokens=n, query_start_loc=b["qsl_t"], seq_lens=b["seq_lens_t"],
                             block_table=b["block_table"], slot_mapping=torch.tensor(slots, device=dev),
                             max_query_len=max(q_lens), max_seq_len=max(b["seq_lens"]),
                             query_start_loc_cpu=b["qsl"], seq_lens_cpu=b["seq_lens"], block_size=block_size)


@pytest.mark.parametrize("q_lens,ctx", [(MIXED_Q, MIXED_CTX), ([1] * 5, [70, 2, 33, 0, 600])],
                         ids=["mixed", "decode"])
@pytest.mark.parametrize("window", [None, 16])
def test_backend_forward_writes_then_attends(device, q_lens, ctx, window):
    """forward() = write this step's K/V at slot_mapping, then attend (both launches)."""
    dtype, block_size = torch.float16, 16
    b = make_batch(q_lens, ctx, 8, 2, 64, block_size, dtype, device, seed=21)
    md = _metadata(b, block_size)
    backend = TritonPagedAttention(8, 2, 64, 0.125, sliding_window=window)
    kv_cache = torch.stack([b["k_cache"], b["v_cache"]])
    assert tuple(kv_cache.shape) == backend.kv_cache_shape(*b["k_cache"].shape)
    # this step's K/V: the rows the reference cache holds at the new positions
    flat = kv_cache.view(2, -1, 2, 64)
    k_new, v_new = flat[0][md.slot_mapping].clone(), flat[1][md.slot_mapping].clone()
    flat[:, md.slot_mapping] = float("nan")  # forward must write them
    tmd = backend.build_metadata(md)
    assert isinstance(tmd, TritonAttentionMetadata) and tmd.config.decode == (max(q_lens) == 1)
    out = backend.forward(b["q"], k_new, v_new, kv_cache, tmd)
    ref = reference_attention(b["q"], kv_cache[0], kv_cache[1], b["qsl"], b["seq_lens"], b["block_table"],
                              0.125, window)
    assert not kv_cache.view(2, -1, 2, 64)[:, md.slot_mapping].isnan().any()
    assert (out.double() - ref).abs().max().item() <= ATOL[dtype]
    out2 = backend.forward(b["q"], k_new, v_new, kv_cache, md)  # plain AttentionMetadata works too
    assert torch.equal(out, out2)


def test_backend_padded_tokens(device):
    """A batch padded past num_actual_tokens (slot -1): padding is neither written nor attended."""
    b = make_batch([1, 1, 1], [20, 5, 40], 4, 2, 64, 16, torch.float32, device, seed=4)
    q_pad = torch.cat([b["q"], torch.randn(2, 4, 64, device=device)])
    b_pad = dict(b, q=q_pad)
    md = _metadata(b_pad, 16, num_actual_tokens=3)
    kv_cache = torch.stack([b["k_cache"], b["v_cache"]])
    before = kv_cache.clone()
    flat = kv_cache.view(2, -1, 2, 64)
    k_new = torch.cat([flat[0][md.slot_mapping[:3]], torch.randn(2, 2, 64, device=device)])
    v_new = torch.cat([flat[1][md.slot_mapping[:3]], torch.randn(2, 2, 64, device=device)])
    out = TritonPagedAttention(4, 2, 64, 0.125).forward(q_pad, k_new, v_new, kv_cache, md)
    assert out.shape == q_pad.shape
    assert torch.equal(kv_cache.nan_to_num(7.0), before.nan_to_num(7.0))
    ref = reference_attention(b["q"], kv_cache[0], kv_cache[1], b["qsl"], b["seq_lens"], b["block_table"], 0.125)
    assert (out[:3].double() - ref).abs().max().item() <= ATOL[torch.float32]


@pytest.mark.parametrize("heads", [(8, 2), (2, 2)], ids=["gqa4-unified", "mha-decode"])
def test_graph_layout_ragged_rows_then_empty_ones(device, heads):
    """The CUDA-graph layout (kernels_cuda/graphs.py): a launch sized for bs rows of q tokens (q = 1 + k, a
    verifying step) holds n < bs ragged rows, then empty rows (q_len 0), then token slots past every row; the
    real tokens match the reference and the launch picks what the capture picked (max lengths, not the step's)."""
    from pageport.kernels_cuda.paged_attention import default_config
    q_lens, ctx = [5, 1, 3, 5, 2], [30, 7, 0, 61, 18]
    bs, qmax, max_len = 8, 5, 256
    b = make_batch(q_lens, ctx, *heads, 64, 16, torch.float32, device, seed=31)
    t = b["qsl"][-1]
    n = len(q_lens)
    table = torch.zeros(bs, max_len // 16, dtype=torch.int32, device=device)
    table[:n, :b["block_table"].shape[1]] = b["block_table"].clamp(min=0)
    qsl = torch.tensor(b["qsl"] + [t] * (bs - n), dtype=torch.int32, device=device)
    seq_lens = torch.tensor(b["seq_lens"] + [1] * (bs - n), dtype=torch.int32, device=device)
    q = torch.cat([b["q"], torch.randn(bs * qmax - t, heads[0], 64, device=device)])
    out = torch.full_like(q, float("nan"))
    config = default_config(group=heads[0] // heads[1], head_size=64, max_query_len=qmax, num_seqs=bs,
                            num_kv_heads=heads[1], max_seq_len=max_len, device=q.device)
    paged_attention(q, b["k_cache"], b["v_cache"], out, qsl, seq_lens, table, max_query_len=qmax,
                    max_seq_len=max_len, scale=0.125, config=config)
    ref = reference_attention(b["q"], b["k_cache"], b["v_cache"], b["qsl"], b["seq_lens"], b["block_table"], 0.125)
    assert (out[:t].double() - ref).abs().max().item() <= ATOL[torch.float32]


# --------------------------------------------------------------------------------------------
# GPU: bf16 at real shapes (32 query heads / 8 KV heads, head 128, block 16, contexts to 4k)

@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("window", [None, 1024])
def test_gpu_bf16_mixed_batch(window):
    q_lens = [1, 1, 1, 1, 512, 300, 1, 64, 1, 17]
    ctx = [4095, 1000, 2047, 0, 1024, 0, 3000, 2500, 77, 4000]
    b = make_batch(q_lens, ctx, 32, 8, 128, 16, torch.bfloat16, "cuda", seed=1)
    run_and_check(b, 128 ** -0.5, torch.bfloat16, window=window)


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("splits", [None, 1, 4, 16])
def test_gpu_bf16_decode_split_kv(splits):
    ctx = [4095, 1, 2048, 3000, 512, 100, 4000, 1024] * 2
    b = make_batch([1] * len(ctx), ctx, 32, 8, 128, 16, torch.bfloat16, "cuda", seed=2)
    config = None if splits is None else LaunchConfig(True, 16, 64, splits, 4, 3)
    run_and_check(b, 128 ** -0.5, torch.bfloat16, config=config)


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("head_size,block_size", [(64, 32), (256, 16), (128, 64)])
def test_gpu_fp16_other_shapes(head_size, block_size):
    b = make_batch([1, 200, 1, 33], [1500, 300, 20, 900], 16, 4, head_size, block_size, torch.float16, "cuda")
    run_and_check(b, head_size ** -0.5, torch.float16)


@pytest.mark.gpu
@gpu
def test_gpu_bf16_backend_forward():
    b = make_batch([1] * 6 + [256], [4000, 10, 2000, 3000, 1, 700, 512], 32, 8, 128, 16, torch.bfloat16, "cuda")
    md = _metadata(b, 16)
    kv_cache = torch.stack([b["k_cache"], b["v_cache"]])
    flat = kv_cache.view(2, -1, 8, 128)
    k_new, v_new = flat[0][md.slot_mapping].clone(), flat[1][md.slot_mapping].clone()
    flat[:, md.slot_mapping] = 0
    out = TritonPagedAttention(32, 8, 128, 128 ** -0.5).forward(b["q"], k_new, v_new, kv_cache, md)
    ref = reference_attention(b["q"], kv_cache[0], kv_cache[1], b["qsl"], b["seq_lens"], b["block_table"],
                              128 ** -0.5)
    assert (out.double() - ref).abs().max().item() <= ATOL[torch.bfloat16]
