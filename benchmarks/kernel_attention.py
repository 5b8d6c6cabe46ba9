"""Paged decode attention on the GPU: the Triton kernel vs the copy roofline, SDPA and FlexAttention.

    python benchmarks/kernel_attention.py --out benchmarks/results/kernel_attention.json

Decode batch (one query token per sequence; --batch 64 by default, a list such as 1,8,64 shows
the split-KV heuristic at work), every sequence at the same context, block tables of scattered
random block ids. For each context: a correctness check of every launch config
against a float32 torch reference, then medians (triton.testing.do_bench, L2 flushed between
runs) of
  paged       the backend's default launch (what the engine runs),
  sweep       an autotune-lite sweep of launch configs (key tile, warps, stages, KV splits),
  sdpa        torch SDPA on K/V already gathered into dense [B, Hkv, ctx, D] (no paging cost),
  gather+sdpa the block-table gather plus SDPA (what a torch paged path pays),
  flex        torch.compile(flex_attention) on the same dense K/V,
and bytes/s = (K and V of every context token + q + out) / time, beside the device-to-device
copy bandwidth measured in the same run (read + write counted).

--check-only runs just the correctness checks (any device; on the CPU under TRITON_INTERPRET=1
at tiny shapes, as tests/kernels_cuda/test_cuda_benchmark_script.py does).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="JSON result file")
    p.add_argument("--batch", default="64", help="comma-separated batch sizes (e.g. 1,8,64 to see split-KV at work)")
    p.add_argument("--contexts", default="1024,4096,8192", help="comma-separated context lengths")
    p.add_argument("--num-heads", type=int, default=32)
    p.add_argument("--num-kv-heads", type=int, default=8)
    p.add_argument("--head-size", type=int, default=128)
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--dtype", choices=list(DTYPES), default="bfloat16")
    p.add_argument("--device", default="cuda")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--copy-mib", type=int, default=1024, help="size of the bandwidth-probe copy")
    p.add_argument("--no-sweep", action="store_true")
    p.add_argument("--no-flex", action="store_true")
    p.add_argument("--check-only", action="store_true", help="correctness of every config, no timing")
    args = p.parse_args(argv)
    args.context_list = [int(c) for c in args.contexts.split(",") if c]
    args.batch_list = [int(b) for b in args.batch.split(",") if b]
    args.torch_dtype = DTYPES[args.dtype]
    return args


# ---------------------------------------------------------------------------------------------
# Inputs, reference, launches

def make_inputs(batch, ctx, num_heads, num_kv_heads, head_size, block_size, dtype, device, seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    blocks_per_seq = -(-ctx // block_size)
    num_blocks = batch * blocks_per_seq + 7
    block_table = torch.randperm(num_blocks, generator=g)[:batch * blocks_per_seq].view(batch, blocks_per_seq)
    block_table = block_table.to(torch.int32).to(device)
    k_cache = torch.randn(num_blocks, block_size, num_kv_heads, head_size, device=device, dtype=dtype)
    v_cache = torch.randn_like(k_cache)
    q = torch.randn(batch, num_heads, head_size, device=device, dtype=dtype)
    seq_lens = torch.full((batch,), ctx, dtype=torch.int32, device=device)
    qsl = torch.arange(batch + 1, dtype=torch.int32, device=device)
    return dict(q=q, k_cache=k_cache, v_cache=v_cache, block_table=block_table, seq_lens=seq_lens, qsl=qsl,
                ctx=ctx, scale=head_size ** -0.5)


def gather_dense(inp):
    """K, V as dense [B, Hkv, ctx, D] through the block table."""
    bt = inp["block_table"].long()
    b, n = bt.shape

    def one(cache):
        return cache[bt].reshape(b, n * cache.shape[1], *cache.shape[2:])[:, :inp["ctx"]].transpose(1, 2).contiguous()
    return one(inp["k_cache"]), one(inp["v_cache"])


def reference(inp, k, v):
    """float32 SDPA on the gathered K/V: [B, Hq, D]."""
    q = inp["q"].float().unsqueeze(2)
    o = torch.nn.functional.scaled_dot_product_attention(q, k.float(), v.float(), scale=inp["scale"],
                                                         enable_gqa=True)
    return o.squeeze(2)


def run_paged(inp, config, out=None, workspace=None):
    from pageport.kernels_cuda.paged_attention import paged_attention
    out = torch.empty_like(inp["q"]) if out is None else out
    return paged_attention(inp["q"], inp["k_cache"], inp["v_cache"], out, inp["qsl"], inp["seq_lens"],
                           inp["block_table"], max_query_len=1, max_seq_len=inp["ctx"], scale=inp["scale"],
                           config=config, workspace=workspace)


def default_launch(args, batch, ctx, device):
    from pageport.kernels_cuda.paged_attention import default_config
    return default_config(group=args.num_heads // args.num_kv_heads, head_size=args.head_size, max_query_len=1,
                          num_seqs=batch, num_kv_heads=args.num_kv_heads, max_seq_len=ctx,
                          device=torch.device(device))


def sweep_configs(default):
    """A few dozen launches around the default; duplicates dropped, the default first."""
    from pageport.kernels_cuda.paged_attention import LaunchConfig
    bm, d = default.block_m, default.num_splits
    cands = [default]
    for tile in (32, 64):
        for splits in (1, 2, 4, 8, 16):
            cands.append(LaunchConfig(True, bm, tile, splits, 4, 3))
    for warps in (2, 4, 8):
        for stages in (1, 2, 3, 4):
            cands.append(LaunchConfig(True, bm, 64, d, warps, stages))
    for splits in sorted({1, 4, d}):
        cands += [LaunchConfig(True, bm, 128, splits, 4, 2), LaunchConfig(True, bm, 128, splits, 8, 2),
                  LaunchConfig(True, bm, 16, splits, 2, 3)]
    cands.append(LaunchConfig(False, bm, 32, 1, 4, 2))  # the unified launch, for comparison
    seen, out = set(), []
    for c in cands:
        if c not in seen:
            seen.add(c)
            out.append(c)
    return out


def config_dict(c):
    return {"decode": c.decode, "block_m": c.block_m, "tile_n": c.tile_n, "num_splits": c.num_splits,
            "num_warps": c.num_warps, "num_stages": c.num_stages}


def check(inp, ref, config, dtype):
    out = run_paged(inp, config)
    err = (out.float() - ref).abs().max().item()
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    return err, err <= tol


# ---------------------------------------------------------------------------------------------
# Timing

def bench_ms(fn):
    from triton.testing import do_bench
    return do_bench(fn, warmup=25, rep=100, return_mode="median")


def copy_bandwidth(mib, device):
    src = torch.empty(mib << 20, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    ms = bench_ms(lambda: dst.copy_(src))
    return 2 * src.numel() / (ms * 1e-3)


def kv_bytes(args, batch, ctx):
    elem = torch.empty((), dtype=args.torch_dtype).element_size()
    kv = 2 * batch * ctx * args.num_kv_heads * args.head_size * elem
    return kv + 2 * batch * args.num_heads * args.head_size * elem


def main(argv=None) -> dict:
    args = parse_args(argv)
    device = args.device
    torch.manual_seed(args.seed)
    result = {"benchmark": "paged decode attention", "device": _device_name(device), "torch": torch.__version__,
              "triton": _triton_version(), "shape": {k: getattr(args, k) for k in (
                  "num_heads", "num_kv_heads", "head_size", "block_size", "dtype")},
              "check_only": args.check_only, "runs": []}
    if not args.check_only:
        result["copy_bandwidth_GBps"] = copy_bandwidth(args.copy_mib, device) / 1e9
        print(f"device-to-device copy: {result['copy_bandwidth_GBps']:.0f} GB/s (read + write)")
    flex = None if args.no_flex or args.check_only else _compiled_flex()

    for batch, ctx in [(b, c) for b in args.batch_list for c in args.context_list]:
        inp = make_inputs(batch, ctx, args.num_heads, args.num_kv_heads, args.head_size, args.block_size,
                          args.torch_dtype, device, args.seed)
        k, v = gather_dense(inp)
        ref = reference(inp, k, v)
        default = default_launch(args, batch, ctx, device)
        configs = [default] if args.no_sweep else sweep_configs(default)
        nbytes = kv_bytes(args, batch, ctx)
        entry = {"batch": batch, "context": ctx, "bytes": nbytes, "default_config": config_dict(default), "sweep": []}
        for c in configs:
            row = config_dict(c)
            try:
                t0 = time.perf_counter()
                err, ok = check(inp, ref, c, args.torch_dtype)  # also compiles it
                row.update(max_abs_err=err, correct=ok, first_call_s=round(time.perf_counter() - t0, 3))
                if ok and not args.check_only:
                    out, ws = torch.empty_like(inp["q"]), {}
                    row["ms"] = bench_ms(lambda: run_paged(inp, c, out, ws))
                    row["GBps"] = nbytes / (row["ms"] * 1e-3) / 1e9
            except Exception as e:  # e.g. a config out of shared memory: report it, go on
                row.update(correct=False, max_abs_err=float("nan"), error=f"{type(e).__name__}: {str(e)[:300]}")
            entry["sweep"].append(row)
        for r in entry["sweep"]:
            if not r["correct"]:
                print(f"batch {batch} ctx {ctx}: launch failed or wrong: {r}", file=sys.stderr)
        if not args.check_only:
            entry["paged"] = entry["sweep"][0]
            timed = [r for r in entry["sweep"] if "ms" in r]
            entry["best"] = min(timed, key=lambda r: r["ms"]) if timed else None
            entry["peers"] = _peers(inp, k, v, flex, nbytes)
            copy = result["copy_bandwidth_GBps"]
            for r in timed + list(entry["peers"].values()):
                if "GBps" in r:
                    r["frac_of_copy"] = r["GBps"] / copy
        result["runs"].append(entry)
        del inp, k, v, ref
        if device == "cuda":
            torch.cuda.empty_cache()

    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    _print_table(result)
    return result


def _peers(inp, k, v, flex, nbytes):
    q4 = inp["q"].unsqueeze(2)
    sdpa = torch.nn.functional.scaled_dot_product_attention
    peers = {}

    def add(name, fn):
        try:
            fn()
            ms = bench_ms(fn)
            peers[name] = {"ms": ms, "GBps": nbytes / (ms * 1e-3) / 1e9}
        except Exception as e:  # a peer that can't run here is reported, not fatal
            peers[name] = {"error": f"{type(e).__name__}: {str(e)[:300]}"}

    add("sdpa", lambda: sdpa(q4, k, v, scale=inp["scale"], enable_gqa=True))
    add("gather+sdpa", lambda: sdpa(q4, *gather_dense(inp), scale=inp["scale"], enable_gqa=True))
    if flex is not None:
        add("flex", lambda: flex(q4, k, v, scale=inp["scale"], enable_gqa=True))
    return peers


def _compiled_flex():
    try:
        from torch.nn.attention.flex_attention import flex_attention
        return torch.compile(flex_attention, dynamic=False)
    except Exception as e:
        print(f"flex_attention unavailable: {e}", file=sys.stderr)
        return None


def _device_name(device):
    return torch.cuda.get_device_name() if device == "cuda" else "cpu (Triton interpreter)"


def _triton_version():
    try:
        import triton
        return triton.__version__
    except ImportError:
        return None


def _print_table(result):
    copy = result.get("copy_bandwidth_GBps")
    print(f"\n{result['device']}  {result['shape']}" + (f"  copy {copy:.0f} GB/s" if copy else ""))
    for e in result["runs"]:
        print(f"\nbatch {e['batch']}, context {e['context']}")
        print(f"  {'launch':46s} {'ms':>8s} {'GB/s':>8s} {'%copy':>6s} {'err':>9s}")
        for r in e["sweep"]:
            name = (f"{'decode' if r['decode'] else 'unified'} m{r['block_m']} tile{r['tile_n']} "
                    f"split{r['num_splits']} w{r['num_warps']} s{r['num_stages']}")
            ms = f"{r['ms']:.4f}" if "ms" in r else "-"
            bw = f"{r['GBps']:.0f}" if "GBps" in r else "-"
            pct = f"{100 * r['frac_of_copy']:.0f}" if "frac_of_copy" in r else "-"
            print(f"  {name:46s} {ms:>8s} {bw:>8s} {pct:>6s} {r['max_abs_err']:9.2e}"
                  + ("" if r["correct"] else "  " + r.get("error", "WRONG")[:60]))
        for name, r in e.get("peers", {}).items():
            if "error" in r:
                print(f"  {name:46s} {r['error'][:60]}")
            else:
                print(f"  {name:46s} {r['ms']:8.4f} {r['GBps']:8.0f} {100 * r['frac_of_copy']:6.0f}")
        if e.get("best"):
            b = e["best"]
            print(f"  best: tile{b['tile_n']} split{b['num_splits']} w{b['num_warps']} s{b['num_stages']} "
                  f"{b['ms']:.4f} ms ({b['GBps']:.0f} GB/s); default {e['paged'].get('ms', float('nan')):.4f} ms")


if __name__ == "__main__":
    main()
