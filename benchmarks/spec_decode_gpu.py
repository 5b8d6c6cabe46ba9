"""Speculative decoding on one GPU, greedy, 128 output tokens, every figure against plain decoding in the same run.

The target is a random-weight checkpoint of the given shape (`--load-format dummy`). Random weights continue no
text, so the predictable prompts are built from the model's own output: P (random ids), then G = the model's
greedy continuation of P, and the prompt P + G + P, whose continuation may repeat G (n-gram lookup finds it; the acceptance it gets is measured,
not assumed). A random model attends to its whole context, so it rarely does; `--markov` zeroes every layer's output
projections (o_proj, down_proj) after loading: each layer still runs all its matmuls, but adds nothing, so the next
token depends on the current one alone and P + G + P continues with G exactly. That is the upper bound: proposals that
cost nothing and are always right, which leaves the cost of verifying. (The engines run in this process there, so
their weights can be reached.) The unpredictable prompts are random ids.

- n-gram (k = 4) on predictable prompts at batch 1 to 256: speed-up, acceptance, mean acceptance length, and
  the batch where speculation stops paying;
- n-gram on random prompts at batch 1 (nothing to find: the cost of being ready to speculate);
- a draft model at batch 1 on random prompts: the target itself (`--self-draft`: every proposal right, the cost
  of a draft as large as the target) and a small random draft (`--draft`: nearly every proposal wrong).

    python benchmarks/spec_decode_gpu.py --model DIR --draft DIR --out OUT.json
"""
from __future__ import annotations

import argparse
import gc
import json
import random
import statistics
import time


def timed(llm, prompts, params, repeats: int) -> tuple[float, list[list[int]]]:
    llm.generate(prompts, params, use_tqdm=False)  # warm-up
    times, outs = [], None
    for _ in range(repeats):
        t = time.perf_counter()
        outs = llm.generate(prompts, params, use_tqdm=False)
        times.append(time.perf_counter() - t)
    return statistics.median(times), [list(o.outputs[0].token_ids) for o in outs]


def counters(llm) -> dict:
    import msgspec
    llm.engine.client.call("stats")
    return {k: v for k, v in msgspec.structs.asdict(llm.engine.client.last_stats).items() if k.startswith("spec_num_")}


def spec_figures(before: dict, after: dict) -> dict:
    from pageport.entrypoints.bench_offline import spec_decode_stats
    return spec_decode_stats(before, after)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--draft", default=None, help="a small draft checkpoint with the target's vocabulary")
    ap.add_argument("--self-draft", action="store_true", help="also the target as its own draft")
    ap.add_argument("--load-format", default="dummy")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--input-len", type=int, default=128)
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 4, 16, 64, 128, 256])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--markov", action="store_true", help="zero the layers' output projections (see above)")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    if args.markov:
        import os
        os.environ["PAGEPORT_ENGINE_INPROC"] = "1"

    import torch

    from pageport import LLM, SamplingParams

    common = dict(model=args.model, load_format=args.load_format, dtype=args.dtype, max_model_len=2048,
                  gpu_memory_utilization=0.4)
    params = SamplingParams(temperature=0, max_tokens=args.output_len, ignore_eos=True)
    rng = random.Random(0)
    res: dict = {"device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu", "model": args.model, "dtype": args.dtype, "k": args.k,
                 "input_len": args.input_len, "output_len": args.output_len, "repeats": args.repeats,
                 "markov": args.markov}

    def make(**kw):
        llm = LLM(**common, **kw)
        if args.markov:  # in place: the captured graphs read the same tensors
            core = llm.engine.core
            for m in [core.runner.model] + ([core.drafter.model] if core.drafter is not None else []):
                for name, p in m.named_parameters():
                    if name.endswith(("o_proj.weight", "down_proj.weight")):
                        p.data.zero_()
        return llm

    nmax = max(args.batches)
    plain = make()
    vocab = plain.engine.vocab_size

    def ids(n):
        return [rng.randrange(100, vocab - 100) for _ in range(n)]

    seeds = [ids(args.input_len) for _ in range(nmax)]
    conts = [o.outputs[0].token_ids for o in plain.generate([{"prompt_token_ids": p} for p in seeds],
                                                            SamplingParams(temperature=0, max_tokens=args.input_len,
                                                                           ignore_eos=True), use_tqdm=False)]
    predictable = [{"prompt_token_ids": p + list(g) + p} for p, g in zip(seeds, conts)]
    unpredictable = [{"prompt_token_ids": ids(3 * args.input_len)} for _ in range(nmax)]
    base = {}
    for b in args.batches:
        base[("pred", b)] = timed(plain, predictable[:b], params, args.repeats)
    base[("rand", 1)] = timed(plain, unpredictable[:1], params, args.repeats)
    plain.engine.shutdown()
    del plain
    gc.collect()
    torch.cuda.empty_cache()

    def save():  # after every row: a run cut short keeps what it measured
        with open(args.out, "w") as f:
            json.dump(res, f, indent=2)

    def run_spec(name, spec, cases):
        llm = make(speculative_config=spec)
        for kind, b in cases:
            prompts = (predictable if kind == "pred" else unpredictable)[:b]
            before = counters(llm)
            t, outs = timed(llm, prompts, params, args.repeats)
            figs = spec_figures(before, counters(llm))
            t0, ref = base[(kind, b)]
            same = sum(next((i for i, (x, y) in enumerate(zip(o, r)) if x != y), len(r)) for o, r in zip(outs, ref))
            row = {"proposer": name, "prompts": kind, "batch": b, "plain_s": t0, "spec_s": t, "speedup": t0 / t,
                   "plain_tok_s": b * args.output_len / t0, "spec_tok_s": b * args.output_len / t,
                   "identical_tokens_fraction": same / (b * args.output_len), **figs}
            res.setdefault("runs", []).append(row)
            print(json.dumps(row), flush=True)
            save()
        llm.engine.shutdown()
        del llm
        gc.collect()  # the next engine profiles the free memory
        torch.cuda.empty_cache()

    ngram = {"method": "ngram", "num_speculative_tokens": args.k, "prompt_lookup_max": 4, "prompt_lookup_min": 2}
    run_spec("ngram", ngram, [("pred", b) for b in args.batches] + [("rand", 1)])
    if args.self_draft:
        run_spec("self-draft", {"model": args.model, "num_speculative_tokens": args.k}, [("rand", 1), ("pred", 1)])
    if args.draft:
        run_spec("small random draft", {"model": args.draft, "num_speculative_tokens": args.k}, [("rand", 1)])
    paying = [r["batch"] for r in res["runs"] if r["proposer"] == "ngram" and r["prompts"] == "pred"
              and r["speedup"] > 1.0]
    res["ngram_pays_up_to_batch"] = max(paying) if paying else None
    save()


if __name__ == "__main__":
    main()
