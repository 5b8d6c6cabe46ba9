"""FP8 KV cache in the CPU backends (torch and cpu-native, which hands fp8 decodes to the torch path): writes cast
with scale 1.0 (saturating), reads widen. Against float64 attention over the same fp8 cache (fp32 queries: 1e-5)
and over the unquantized cache within fp8's error: on N(0, 1) K/V the largest output error measured
here is ~0.11 with e4m3 (3 mantissa bits) and ~0.35 with e5m2 (2 bits); bounds 0.2 / 0.5."""
import pytest
import torch

from pageport.kernels_cpu import native
from pageport.kernels_cpu.attention import NativePagedAttention, TorchPagedAttention
from pageport.platforms import AttentionMetadata

FP8_ERR = {torch.float8_e4m3fn: 0.2, torch.float8_e5m2: 0.5}


def _reference(q, k_flat, v_flat, slots_per_seq, q_lens, scale, group):
    out, row = [], 0
    for slots, ql in zip(slots_per_seq, q_lens):
        k = k_flat[slots].double().repeat_interleave(group, 1)
        v = v_flat[slots].double().repeat_interleave(group, 1)
        n = len(slots)
        s = torch.einsum("qhd,khd->hqk", q[row:row + ql].double(), k) * scale
        mask = torch.arange(n)[None, :] <= torch.arange(n - ql, n)[:, None]
        out.append(torch.einsum("hqk,khd->qhd", s.masked_fill(~mask, float("-inf")).softmax(-1), v))
        row += ql
    return torch.cat(out)


@pytest.mark.parametrize("backend_cls", [TorchPagedAttention, NativePagedAttention])
@pytest.mark.parametrize("kv_dtype", list(FP8_ERR))
def test_fp8_cache_mixed_step(backend_cls, kv_dtype):
    if backend_cls is NativePagedAttention:
        assert native.load() is None
    g = torch.Generator().manual_seed(1)
    bs, hq, hkv, d, num_blocks = 16, 6, 2, 32, 32
    ctx, q_lens = [30, 0, 50], [1, 9, 4]  # a decode, a fresh prompt, a chunk over cached context
    perm = torch.randperm(num_blocks, generator=g)
    table = torch.zeros(3, 5, dtype=torch.int32)
    used, slots_per_seq = 0, []
    for i, (c, ql) in enumerate(zip(ctx, q_lens)):
        n = -(-(c + ql) // bs)
        table[i, :n] = perm[used:used + n].int()
        used += n
        pos = torch.arange(c + ql)
        slots_per_seq.append(table[i].long()[pos // bs] * bs + pos % bs)
    k_full = torch.randn(num_blocks * bs, hkv, d, generator=g)
    v_full = torch.randn(num_blocks * bs, hkv, d, generator=g)
    new_slots = torch.cat([s[c:] for s, c in zip(slots_per_seq, ctx)])
    kv_cache = torch.stack([k_full, v_full]).to(kv_dtype).view(2, num_blocks, bs, hkv, d)
    q = torch.randn(sum(q_lens), hq, d, generator=g)
    starts = [0, 1, 10, 14]
    lens = [c + ql for c, ql in zip(ctx, q_lens)]
    md = AttentionMetadata(num_actual_tokens=14, query_start_loc=torch.tensor(starts, dtype=torch.int32),
                           seq_lens=torch.tensor(lens, dtype=torch.int32), block_table=table, slot_mapping=new_slots,
                           max_query_len=9, max_seq_len=max(lens), query_start_loc_cpu=starts, seq_lens_cpu=lens,
                           block_size=bs)
    backend = backend_cls(hq, hkv, d, d ** -0.5)
    out = backend.forward(q, k_full[new_slots], v_full[new_slots], kv_cache, md)
    k8, v8 = kv_cache[0].view(-1, hkv, d), kv_cache[1].view(-1, hkv, d)
    assert torch.equal(k8[new_slots].float(), k_full[new_slots].to(kv_dtype).float())
    # the fresh prompt attends its own (unquantized) K/V, the others the cache
    ref8 = _reference(q, k8, v8, slots_per_seq, q_lens, d ** -0.5, hq // hkv)
    fresh = slice(1, 10)
    keep = torch.ones(14, dtype=torch.bool)
    keep[fresh] = False
    assert (out[keep].double() - ref8[keep]).abs().max() <= 1e-5
    ref = _reference(q, k_full, v_full, slots_per_seq, q_lens, d ** -0.5, hq // hkv)
    assert (out.double() - ref).abs().max() <= FP8_ERR[kv_dtype]
