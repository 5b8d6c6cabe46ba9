"""Checks any platform's attention backend and ops against plain-torch references.

Vendor plugins run it against themselves: `python -m pageport.plugins.conformance NAME`.
Layout-agnostic: the cache is filled only through the backend's own write_kv/forward.
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from typing import Optional

import torch

from pageport.platforms import AttentionMetadata, Ops, Platform, resolve_platform


def reference_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, scale: float,
                        sliding_window: Optional[int] = None) -> torch.Tensor:
    """One sequence, float64. q [Q, Hq, D] are the last Q positions of keys/values [L, Hkv, D]."""
    q, keys, values = q.double(), keys.double(), values.double()
    group = q.shape[1] // keys.shape[1]
    keys, values = keys.repeat_interleave(group, 1), values.repeat_interleave(group, 1)
    seq_len, q_len = keys.shape[0], q.shape[0]
    scores = torch.einsum("qhd,khd->hqk", q, keys) * scale
    q_pos = torch.arange(seq_len - q_len, seq_len)[:, None]
    k_pos = torch.arange(seq_len)[None, :]
    allowed = k_pos <= q_pos
    if sliding_window:
        allowed &= k_pos > q_pos - sliding_window
    scores = scores.masked_fill(~allowed, float("-inf"))
    return torch.einsum("hqk,khd->qhd", scores.softmax(-1), values)


@dataclass
class Case:
    context_lens: list[int]  # tokens already cached per sequence
    query_lens: list[int]  # tokens computed this step per sequence
    num_heads: int = 8
    num_kv_heads: int = 2
    head_size: int = 64
    block_size: int = 16
    sliding_window: Optional[int] = None


DEFAULT_CASES = [
    Case([0, 5, 40, 17], [7, 1, 1, 9]),  # fresh prefill, decodes, a chunk after cached context
    Case([33, 0], [1, 20], num_heads=4, num_kv_heads=4),  # MHA
    Case([30, 3], [1, 12], num_heads=6, num_kv_heads=1, sliding_window=8),  # MQA, sliding window
]


def build_metadata(case: Case, block_tables: list[list[int]], device) -> AttentionMetadata:
    bs = case.block_size
    qsl, seq_lens, slots = [0], [], []
    for ctx, ql, table in zip(case.context_lens, case.query_lens, block_tables):
        qsl.append(qsl[-1] + ql)
        seq_lens.append(ctx + ql)
        slots += [table[p // bs] * bs + p % bs for p in range(ctx, ctx + ql)]
    width = max(len(t) for t in block_tables)
    table = torch.tensor([t + [0] * (width - len(t)) for t in block_tables], dtype=torch.int32)
    return AttentionMetadata(qsl[-1], torch.tensor(qsl, dtype=torch.int32, device=device),
                             torch.tensor(seq_lens, dtype=torch.int32, device=device), table.to(device),
                             torch.tensor(slots, dtype=torch.int64, device=device), max(case.query_lens),
                             max(seq_lens), qsl, seq_lens, bs)


def check_attention(platform: Platform, case: Case, dtype=torch.float32, seed: int = 0) -> float:
    """Max abs error of the platform's paged attention against the float64 reference."""
    g = torch.Generator().manual_seed(seed)
    dev, bs, D = platform.device, case.block_size, case.head_size
    scale = D ** -0.5
    backend = platform.attention_backend(case.num_heads, case.num_kv_heads, D, scale, case.sliding_window)
    totals = [c + q for c, q in zip(case.context_lens, case.query_lens)]
    need = [-(-t // bs) for t in totals]
    num_blocks = sum(need) + 3
    ids = (torch.randperm(num_blocks - 1, generator=g) + 1).tolist()  # scattered, never block 0
    tables = [[ids.pop() for _ in range(n)] for n in need]
    cache = torch.zeros(backend.kv_cache_shape(num_blocks, bs, case.num_kv_heads, D), dtype=dtype, device=dev)

    def rand(*shape):
        return torch.randn(*shape, generator=g).to(dtype)

    keys = [rand(t, case.num_kv_heads, D) for t in totals]
    values = [rand(t, case.num_kv_heads, D) for t in totals]
    # step 1: the cached context, written as a prefill of the context alone
    seqs = [i for i, c in enumerate(case.context_lens) if c > 0]
    if seqs:
        sub = Case([0] * len(seqs), [case.context_lens[i] for i in seqs], case.num_heads, case.num_kv_heads, D, bs)
        md = backend.build_metadata(build_metadata(sub, [tables[i] for i in seqs], dev))
        k = torch.cat([keys[i][:case.context_lens[i]] for i in seqs]).to(dev)
        v = torch.cat([values[i][:case.context_lens[i]] for i in seqs]).to(dev)
        backend.forward(rand(k.shape[0], case.num_heads, D).to(dev), k, v, cache, md)
    # step 2: the ragged batch under test
    md = backend.build_metadata(build_metadata(case, tables, dev))
    qs = [rand(q, case.num_heads, D) for q in case.query_lens]
    k = torch.cat([kk[c:] for kk, c in zip(keys, case.context_lens)]).to(dev)
    v = torch.cat([vv[c:] for vv, c in zip(values, case.context_lens)]).to(dev)
    out = backend.forward(torch.cat(qs).to(dev), k, v, cache, md).cpu()
    ref = torch.cat([reference_attention(q, kk, vv, scale, case.sliding_window)
                     for q, kk, vv in zip(qs, keys, values)])
    return (out.double() - ref).abs().max().item()


def check_ops(platform: Platform, dtype=torch.float32, seed: int = 0) -> dict[str, float]:
    """Max abs error of the platform's ops against the reference Ops."""
    g = torch.Generator().manual_seed(seed)
    ref, ops, dev = Ops(), platform.ops, platform.device
    x, res = (torch.randn(7, 64, generator=g).to(dtype) for _ in range(2))
    w = torch.randn(64, generator=g).to(dtype)
    errs = {}
    a = ops.rms_norm(x.to(dev), w.to(dev), 1e-6)
    errs["rms_norm"] = (a.cpu().float() - ref.rms_norm(x, w, 1e-6).float()).abs().max().item()
    a, ar = ops.rms_norm(x.to(dev), w.to(dev), 1e-6, res.to(dev))
    b, br = ref.rms_norm(x, w, 1e-6, res)
    errs["rms_norm+residual"] = max((a.cpu().float() - b.float()).abs().max().item(),
                                    (ar.cpu().float() - br.float()).abs().max().item())
    pos = torch.randint(0, 32, (7,), generator=g)
    cache = torch.randn(32, 32, generator=g)
    q, k = torch.randn(7, 4, 32, generator=g).to(dtype), torch.randn(7, 2, 32, generator=g).to(dtype)
    qa, ka = ops.rotary(pos.to(dev), q.clone().to(dev), k.clone().to(dev), cache.to(dev))
    qb, kb = ref.rotary(pos, q, k, cache)
    errs["rotary"] = max((qa.cpu().float() - qb.float()).abs().max().item(),
                         (ka.cpu().float() - kb.float()).abs().max().item())
    y = torch.randn(7, 128, generator=g).to(dtype)
    errs["silu_and_mul"] = (ops.silu_and_mul(y.to(dev)).cpu().float() - ref.silu_and_mul(y).float()).abs().max().item()
    return errs


def run(platform: Platform, dtype=torch.float32, tol: float = 1e-4) -> list[tuple[str, float, bool]]:
    rows = [(f"attention {c}", check_attention(platform, c, dtype, seed=i), None)
            for i, c in enumerate(DEFAULT_CASES)]
    rows += [(f"op {k}", v, None) for k, v in check_ops(platform, dtype).items()]
    return [(name, err, err <= tol) for name, err, _ in rows]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m pageport.plugins.conformance")
    p.add_argument("device")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    p.add_argument("--tol", type=float, default=None, help="max abs error (default 1e-4 fp32, 3e-2 bf16/fp16)")
    args = p.parse_args(argv)
    dtype = getattr(torch, args.dtype)
    tol = args.tol or (1e-4 if dtype == torch.float32 else 3e-2)
    rows = run(resolve_platform(args.device), dtype, tol)
    for name, err, ok in rows:
        print(f"{'PASS' if ok else 'FAIL'}  {err:.2e}  {name}")
    return 0 if all(ok for *_, ok in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
