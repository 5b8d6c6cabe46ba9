"""Logit soft-capping (Gemma 2) in the CPU backends: a mixed step (decodes of unequal length, a fresh prefill, a
prefill on cached context) against float64 attention, with and without a sliding window."""
from __future__ import annotations

import pytest
import torch

from pageport.kernels_cpu import native
from pageport.kernels_cpu.attention import NativePagedAttention, TorchPagedAttention
from pageport.platforms import AttentionMetadata


def reference(q, keys, values, seq_lens, query_lens, scale, softcap, window):
    """float64: each query row at absolute position p attends to positions (p - window, p] of its sequence;
    keys/values [seq][L, Hkv, D] hold every position of each sequence."""
    out, row = [], 0
    for s, (n, ql) in enumerate(zip(seq_lens, query_lens)):
        group = q.shape[1] // keys[s].shape[1]
        k = keys[s].double().repeat_interleave(group, dim=1)
        v = values[s].double().repeat_interleave(group, dim=1)
        for p in range(n - ql, n):
            lo = max(0, p - window + 1) if window else 0
            scores = torch.einsum("hd,lhd->hl", q[row].double(), k[lo:p + 1]) * scale
            if softcap:
                scores = softcap * torch.tanh(scores / softcap)
            out.append(torch.einsum("hl,lhd->hd", scores.softmax(-1), v[lo:p + 1]))
            row += 1
    return torch.stack(out)


@pytest.mark.parametrize("backend", [TorchPagedAttention, NativePagedAttention])
@pytest.mark.parametrize("window", [None, 4])
def test_softcap_mixed_step_matches_float64(backend, window):
    if backend is NativePagedAttention and native.load() is not None:
        pytest.skip(f"C++ kernel unavailable: {native.load()}")
    g = torch.Generator().manual_seed(7)
    hq, hkv, d, bs, softcap = 4, 2, 16, 4, 5.0  # a small cap, so capping changes the scores a lot
    attn = backend(hq, hkv, d, d ** -0.5, window, softcap)
    query_lens, seq_lens = [1, 6, 1, 3], [9, 6, 14, 11]
    tables = [[3, 7, 1], [2, 9], [4, 5, 6, 8], [10, 11, 12]]
    cache = torch.zeros(attn.kv_cache_shape(13, bs, hkv, d))
    keys = [torch.randn(n, hkv, d, generator=g) * 3 for n in seq_lens]  # large scores: the cap is active
    values = [torch.randn(n, hkv, d, generator=g) for n in seq_lens]
    for s, n in enumerate(seq_lens):  # the context already cached
        for p in range(n - query_lens[s]):
            slot = tables[s][p // bs] * bs + p % bs
            cache[0].view(-1, hkv, d)[slot], cache[1].view(-1, hkv, d)[slot] = keys[s][p], values[s][p]
    qsl = [0]
    for n in query_lens:
        qsl.append(qsl[-1] + n)
    slots = [tables[s][p // bs] * bs + p % bs
             for s in range(4) for p in range(seq_lens[s] - query_lens[s], seq_lens[s])]
    md = AttentionMetadata(qsl[-1], torch.tensor(qsl, dtype=torch.int32), torch.tensor(seq_lens, dtype=torch.int32),
                           torch.tensor([t + [0] * (4 - len(t)) for t in tables], dtype=torch.int32),
                           torch.tensor(slots), max(query_lens), max(seq_lens), qsl, seq_lens, bs)
    q = torch.randn(qsl[-1], hq, d, generator=g) * 3
    k = torch.cat([keys[s][n - ql:] for s, (n, ql) in enumerate(zip(seq_lens, query_lens))])
    v = torch.cat([values[s][n - ql:] for s, (n, ql) in enumerate(zip(seq_lens, query_lens))])
    out = attn.forward(q, k, v, cache, attn.build_metadata(md))
    ref = reference(q, keys, values, seq_lens, query_lens, d ** -0.5, softcap, window)
    assert (out.double() - ref).abs().max().item() < 1e-5
    uncapped = reference(q, keys, values, seq_lens, query_lens, d ** -0.5, None, window)
    assert (uncapped - ref).abs().max().item() > 0.1  # the cap mattered


def test_bad_softcap_is_an_error():
    with pytest.raises(ValueError, match="softcap"):
        TorchPagedAttention(4, 2, 16, 0.25, None, 0.0)
