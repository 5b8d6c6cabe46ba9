"""The C++ decode kernel (built here, as on any machine with a compiler) against float64 attention, and the
backend that uses it against the torch backend on mixed steps."""
from __future__ import annotations

import pytest
import torch

from pageport.kernels_cpu import native
from pageport.kernels_cpu.attention import NativePagedAttention, TorchPagedAttention
from pageport.platforms import AttentionMetadata


@pytest.fixture(scope="module", autouse=True)
def built():
    assert native.load() is None, native.load()


def reference(q, k_cache, v_cache, table, lens, scale, window):
    """float64 attention of each single-token query over its sequence's cached positions."""
    bs, out = k_cache.shape[1], []
    hkv = k_cache.shape[2]
    for b in range(q.shape[0]):
        n = int(lens[b])
        pos = torch.arange(max(0, n - window) if window else 0, n)
        rows = table[b, pos // bs] * bs + pos % bs
        k = k_cache.flatten(0, 1)[rows].double().repeat_interleave(q.shape[1] // hkv, dim=1)  # [L, Hq, D]
        v = v_cache.flatten(0, 1)[rows].double().repeat_interleave(q.shape[1] // hkv, dim=1)
        p = torch.einsum("hd,lhd->hl", q[b].double() * scale, k).softmax(-1)
        out.append(torch.einsum("hl,lhd->hd", p, v))
    return torch.stack(out)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2), (torch.float16, 3e-3)])
@pytest.mark.parametrize("heads,kv_heads,head_size,window", [(9, 3, 64, None), (8, 8, 32, None), (4, 1, 128, 5),
                                                              (6, 2, 80, 40)])
def test_kernel_matches_float64(dtype, tol, heads, kv_heads, head_size, window):
    g = torch.Generator().manual_seed(heads * 100 + head_size)
    bs, num_blocks = 16, 64
    lens = torch.tensor([1, 17, 100, 33, 16, 250])
    width = -(-int(lens.max()) // bs) + 2  # table padding past each sequence's blocks, as the engine has
    table = torch.zeros(len(lens), width, dtype=torch.long)
    for b, n in enumerate(lens.tolist()):
        table[b, : -(-n // bs)] = torch.randperm(num_blocks - 1, generator=g)[: -(-n // bs)] + 1
    k_cache = torch.randn(num_blocks, bs, kv_heads, head_size, generator=g).to(dtype)
    v_cache = torch.randn(num_blocks, bs, kv_heads, head_size, generator=g).to(dtype)
    q = torch.randn(len(lens), heads, head_size, generator=g).to(dtype)
    scale = head_size ** -0.5
    out = native.paged_decode_attention(torch.empty_like(q), q, k_cache, v_cache, table, lens, scale, window)
    ref = reference(q, k_cache, v_cache, table, lens, scale, window)
    assert (out.double() - ref).abs().max().item() <= tol


def test_kernel_rejects_bad_layouts():
    q = torch.randn(2, 4, 32)
    cache = torch.randn(8, 16, 2, 32)
    table, lens = torch.ones(2, 1, dtype=torch.long), torch.tensor([3, 4])
    with pytest.raises(RuntimeError, match="int64"):
        native.paged_decode_attention(torch.empty_like(q), q, cache, cache, table.int(), lens, 1.0, None)
    with pytest.raises(RuntimeError, match="share a dtype"):
        native.paged_decode_attention(torch.empty_like(q), q, cache.double(), cache.double(), table, lens, 1.0, None)
    with pytest.raises(RuntimeError, match="multiple of KV heads"):
        native.paged_decode_attention(torch.empty(2, 3, 32), torch.randn(2, 3, 32), cache, cache, table, lens, 1.0,
                                      None)


@pytest.mark.parametrize("window", [None, 7])
def test_backend_equals_torch_backend_on_a_mixed_step(window):
    """Two decodes around a fresh prefill and a prefill with cached context, through both backends."""
    g = torch.Generator().manual_seed(3)
    hq, hkv, d, bs = 6, 2, 32, 4
    args = (hq, hkv, d, d ** -0.5, window, None)
    torch_b, native_b = TorchPagedAttention(*args), NativePagedAttention(*args)
    query_lens, seq_lens = [1, 5, 1, 3], [9, 5, 14, 11]
    tables = [[3, 7, 1], [2, 9], [4, 5, 6, 8], [10, 11, 12]]
    qsl = [0]
    for n in query_lens:
        qsl.append(qsl[-1] + n)
    slots = [tables[i][p // bs] * bs + p % bs for i in range(4) for p in range(seq_lens[i] - query_lens[i], seq_lens[i])]
    md = AttentionMetadata(qsl[-1], torch.tensor(qsl, dtype=torch.int32), torch.tensor(seq_lens, dtype=torch.int32),
                           torch.tensor([t + [0] * (4 - len(t)) for t in tables], dtype=torch.int32),
                           torch.tensor(slots), max(query_lens), max(seq_lens), qsl, seq_lens, bs)
    cache = torch.randn(torch_b.kv_cache_shape(13, bs, hkv, d), generator=g)
    q, k, v = (torch.randn(qsl[-1], h, d, generator=g) for h in (hq, hkv, hkv))
    c1, c2 = cache.clone(), cache.clone()
    out_t = torch_b.forward(q, k, v, c1, torch_b.build_metadata(md))
    out_n = native_b.forward(q, k, v, c2, native_b.build_metadata(md))
    assert torch.equal(c1, c2)
    assert (out_t - out_n).abs().max().item() < 1e-5
