"""IPEX vs the torch CPU path on this CPU: the paged-attention decode kernel and end-to-end decode.

Run in the IPEX venv (scripts/ipex_check.sh). Writes benchmarks/results/ipex_cpu.json.
Kernel: 4 sequences x 8 heads (8 KV heads) x head 64 x 256 cached tokens, one decode step through
each backend's forward (KV write + attention), 1 thread. End to end: the default model
(SmolLM2-135M), greedy, 64 new tokens per request, batch 1 and 8, both attention paths.
Medians over repeats: this machine is noisy."""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch


def kernel_bench(dtype, reps: int) -> dict:
    from pageport.kernels_cpu.platform import CpuPlatform
    from pageport.plugins.conformance import Case, build_metadata
    seqs, heads, dim, ctx, bs = 4, 8, 64, 256, 16
    res = {}
    for mode in ("torch", "ipex"):
        be = CpuPlatform(attention=mode).attention_backend(heads, heads, dim, dim ** -0.5)
        nblk = seqs * (ctx // bs + 1) + 1
        cache = torch.randn(be.kv_cache_shape(nblk, bs, heads, dim)).to(dtype)
        tables = [[1 + i * (ctx // bs + 1) + j for j in range(ctx // bs + 1)] for i in range(seqs)]
        md = be.build_metadata(build_metadata(Case([ctx - 1] * seqs, [1] * seqs, heads, heads, dim, bs), tables, "cpu"))
        q, k = torch.randn(seqs, heads, dim).to(dtype), torch.randn(seqs, heads, dim).to(dtype)
        for _ in range(5):
            be.forward(q, k, k, cache, md)
        times = []
        for _ in range(reps):
            t = time.perf_counter()
            be.forward(q, k, k, cache, md)
            times.append(time.perf_counter() - t)
        res[mode] = {"backend": be.name, "median_ms": round(statistics.median(times) * 1e3, 4),
                     "min_ms": round(min(times) * 1e3, 4)}
    res["speedup"] = round(res["torch"]["median_ms"] / res["ipex"]["median_ms"], 2)
    return res


def e2e_bench(dtype: str, batch: int, new_tokens: int, repeats: int) -> dict:
    from pageport import LLM, SamplingParams
    res = {}
    prompts = [f"Write a short story about robot number {i}." for i in range(batch)]
    sp = SamplingParams(temperature=0, max_tokens=new_tokens, ignore_eos=True)
    for mode in ("torch", "ipex"):
        os.environ["PAGEPORT_CPU_ATTENTION"] = mode
        llm = LLM(dtype=dtype, max_model_len=512, device="cpu")
        llm.generate(prompts[:1], SamplingParams(temperature=0, max_tokens=4), use_tqdm=False)  # warm-up
        rates, tokens = [], None
        for _ in range(repeats):
            t = time.perf_counter()
            outs = llm.generate(prompts, sp, use_tqdm=False)
            dt = time.perf_counter() - t
            rates.append(sum(len(o.outputs[0].token_ids) for o in outs) / dt)
            tokens = [o.outputs[0].token_ids for o in outs]
        res[mode] = {"backend": llm.engine.attention_backend,
                     "output_tok_s": round(statistics.median(rates), 1), "all_tok_s": [round(r, 1) for r in rates],
                     "tokens": tokens}
        del llm
    res["speedup"] = round(res["ipex"]["output_tok_s"] / res["torch"]["output_tok_s"], 2)
    res["same_greedy_tokens"] = res["ipex"].pop("tokens") == res["torch"].pop("tokens")
    return res


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", default="benchmarks/results/ipex_cpu.json")
    p.add_argument("--reps", type=int, default=200)
    p.add_argument("--e2e-threads", type=int, default=2)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--no-e2e", action="store_true", help="the kernel benchmark only")
    args = p.parse_args()
    import intel_extension_for_pytorch as ipex
    from pageport.kernels_cpu import cpuinfo
    torch.set_num_threads(1)
    result = {"what": "IPEX paged attention vs the torch (gather + SDPA) CPU path",
              "cpu": cpuinfo.detect().model, "isa": list(cpuinfo.detect().isa), "machine": platform.machine(),
              "torch": torch.__version__, "ipex": ipex.__version__,
              "kernel": {"shape": "decode, 4 seqs x 8 heads x 64 dim x 256 ctx, block 16, 1 thread"}}
    for dt in (torch.float32, torch.bfloat16):
        result["kernel"][str(dt).removeprefix("torch.")] = kernel_bench(dt, args.reps)
        print(json.dumps(result["kernel"]), flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    if args.no_e2e:
        return
    torch.set_num_threads(args.e2e_threads)
    result["e2e"] = {"model": "SmolLM2-135M-Instruct (Q4_1 GGUF, dequantized)", "threads": args.e2e_threads,
                     "new_tokens": args.new_tokens, "runs": []}
    for dtype in ("float32", "bfloat16"):
        for batch in (1, 8):
            r = e2e_bench(dtype, batch, args.new_tokens, args.repeats)
            result["e2e"]["runs"].append({"dtype": dtype, "batch": batch, **r})
            print(json.dumps(result["e2e"]["runs"][-1]), flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(json.dumps(result["kernel"], indent=1))


if __name__ == "__main__":
    main()
