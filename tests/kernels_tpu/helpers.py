"""A filled cache in the kernel layout plus a padded ragged step, and its float64 reference."""
from __future__ import annotations

import torch

from pageport.kernels_tpu.layout import KVLayout, pad_step
from pageport.plugins.conformance import Case, build_metadata, reference_attention


def random_step(case: Case, seed: int, num_tokens: int, num_seqs: int, width: int, dtype=torch.float32):
    """A filled cache in the kernel layout plus a padded step of `case` (context cached, queries new)."""
    g = torch.Generator().manual_seed(seed)
    lay = KVLayout.for_model(case.num_heads, case.num_kv_heads, case.head_size)
    bs = case.block_size
    totals = [c + q for c, q in zip(case.context_lens, case.query_lens)]
    need = [-(-t // bs) for t in totals]
    nb = sum(need) + 2
    ids = (torch.randperm(nb - 1, generator=g) + 1).tolist()
    tables = [[ids.pop() for _ in range(n)] for n in need]
    cache = torch.zeros(lay.cache_shape(nb, bs), dtype=dtype)
    keys = [torch.randn(t, case.num_kv_heads, case.head_size, generator=g).to(dtype) for t in totals]
    vals = [torch.randn(t, case.num_kv_heads, case.head_size, generator=g).to(dtype) for t in totals]
    for table, k, v in zip(tables, keys, vals):
        slots = torch.tensor([table[p // bs] * bs + p % bs for p in range(k.shape[0])])
        cache.view(-1, *cache.shape[2:])[slots] = lay.pack_kv(k, v)
    md = build_metadata(case, tables, "cpu")
    step = pad_step(md.query_start_loc_cpu, md.seq_lens_cpu, md.block_table, md.slot_mapping, bs,
                    num_tokens, num_seqs, width)
    qs = [torch.randn(q, case.num_heads, case.head_size, generator=g).to(dtype) for q in case.query_lens]
    q = torch.zeros(num_tokens, case.num_heads, case.head_size, dtype=dtype)
    q[:md.num_actual_tokens] = torch.cat(qs)
    ref = torch.cat([reference_attention(qq, kk, vv, case.head_size ** -0.5, case.sliding_window)
                     for qq, kk, vv in zip(qs, keys, vals)])
    return lay, cache, step, q, ref
