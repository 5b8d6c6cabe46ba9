"""`pageport bench kv-memory` and `pageport bench prefix-caching`.

kv-memory: the vLLM paper's measurement (Kwon et al. 2023, Fig. 2 and section 6). At a fixed KV budget, the
real scheduler and KV-cache manager run a stream of requests with realistic lengths; sampling is simulated
(no model), so the run is exact and takes seconds. Reported at the peak of KV usage: how many sequences run
at once and the waste, i.e. (allocated but unused KV slots) / (allocated KV slots). The same scheduler then
runs with a contiguous allocation per sequence (each admitted sequence reserves its maximum length up front,
as Orca/FasterTransformer-style systems do) for comparison.

prefix-caching: many requests share a long prefix; the real model runs them with prefix caching on and off
(two engines in one process, timed alternately, medians of repeats), and reports throughput, the speed-up
and the prefix-cache hit rate.
"""
from __future__ import annotations

import argparse
import json
import math
import random
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

from pageport.core.config import EngineConfig
from pageport.core.kv_cache import KVCacheManager
from pageport.core.request import Request, RequestStatus
from pageport.core.sampling_params import SamplingParams
from pageport.core.scheduler import Scheduler

# Length distributions ------------------------------------------------------------------------------------
# Log-normal fits with the means the vLLM paper reports for its traces (Fig. 11): ShareGPT prompts 161.3 /
# outputs 338.0 tokens (long, heavy-tailed conversations), Alpaca 19.3 / 58.5 (short instructions). The
# traces themselves are not on this machine; these are synthetic lengths with the same means and a
# ShareGPT-like spread (sigma ~ 1: median about 0.6 x mean, a long tail), seeded.
DISTRIBUTIONS = {
    # name: ((prompt mean, sigma), (output mean, sigma))
    "sharegpt-like": ((161.3, 1.0), (338.0, 0.9)),
    "alpaca-like": ((19.3, 0.6), (58.5, 0.8)),
}


def _lognormal(rng: random.Random, mean: float, sigma: float) -> int:
    return max(1, round(rng.lognormvariate(math.log(mean) - sigma * sigma / 2, sigma)))


@dataclass
class RequestSpec:
    prompt_len: int
    output_len: int  # tokens it generates before (simulated) EOS
    max_tokens: int  # what it asked for: a contiguous allocator reserves prompt_len + max_tokens


def make_specs(dataset: str, num_requests: int, max_model_len: int, max_tokens: Optional[int] = None,
               seed: int = 0) -> list[RequestSpec]:
    """Request lengths: a named distribution or a JSON file of [prompt_len, output_len] pairs.

    max_tokens: what each request asks for (default: the rest of the context, max_model_len - prompt_len, as
    an OpenAI client that sets no max_tokens gets). Outputs stop at their drawn length (EOS), never past it.
    """
    rng = random.Random(seed)
    if dataset in DISTRIBUTIONS:
        (pm, ps), (om, os_) = DISTRIBUTIONS[dataset]
        pairs = [(_lognormal(rng, pm, ps), _lognormal(rng, om, os_)) for _ in range(num_requests)]
    else:
        rows = json.loads(Path(dataset).read_text())
        pairs = [(int(a), int(b)) for a, b in rows]
        pairs = (pairs * (num_requests // len(pairs) + 1))[:num_requests]
    specs = []
    for p, o in pairs:
        p = min(p, max_model_len - 1)
        cap = max_model_len - p if max_tokens is None else min(max_tokens, max_model_len - p)
        specs.append(RequestSpec(p, max(1, min(o, cap)), cap))
    return specs


# The contiguous baseline: the same scheduler over a KV manager that reserves a request's maximum at admission
class ContiguousKVManager(KVCacheManager):
    """One slot per block (block_size 1): a request's first allocation reserves `reserve(request)` slots at
    once (contiguous in a real system), and it never allocates again. No prefix caching."""

    def __init__(self, num_slots: int, reserve: Callable[[Request], int]):
        super().__init__(num_slots + 1, 1, enable_caching=False)  # + the null block
        self.reserve = reserve

    def allocate_slots(self, req: Request, num_new_tokens: int, computed=()) -> bool:
        if req.request_id in self.req_blocks:
            return True
        need = self.reserve(req)
        if need > self.pool.num_free:
            return False
        self.req_blocks[req.request_id] = self.pool.allocate(need)
        return True


@dataclass
class StepStat:
    running: int
    allocated: int  # KV slots held by running requests
    used: int  # of those, slots that hold a token's K/V


@dataclass
class MemoryResult:
    allocator: str
    capacity_slots: int
    steps: int
    preemptions: int
    max_running: int
    mean_running: float
    peak_allocated: int  # slots, at the step of peak allocation
    peak_used: int
    peak_running: int
    waste_at_peak: float  # (allocated - used) / allocated at that step
    mean_waste_when_full: Optional[float]  # mean over steps with >= 90 % of the capacity allocated
    generated_tokens: int
    trace: list = field(default_factory=list, repr=False)


def _used_slots(kv: KVCacheManager, running: Sequence[Request]) -> tuple[int, int]:
    """(allocated, used) KV slots of the running requests, shared blocks counted once."""
    if isinstance(kv, ContiguousKVManager):
        alloc = sum(len(kv.req_blocks.get(r.request_id, ())) for r in running)
        return alloc, sum(r.num_computed_tokens for r in running)
    bs = kv.block_size
    fill: dict[int, int] = {}
    for r in running:
        blocks = kv.req_blocks.get(r.request_id, ())
        for i, b in enumerate(blocks):
            n = max(0, min(bs, r.num_computed_tokens - i * bs))
            fill[b.block_id] = max(fill.get(b.block_id, 0), n)
    return len(fill) * bs, sum(fill.values())


def simulate(specs: Sequence[RequestSpec], capacity_slots: int, block_size: int = 16,
             allocator: str = "paged", max_num_seqs: int = 256, max_num_batched_tokens: int = 2048,
             max_model_len: int = 2048, keep_trace: bool = False) -> MemoryResult:
    """Run the requests through the real Scheduler with sampling simulated; measure KV use after every step.

    allocator: "paged" (KVCacheManager, `capacity_slots // block_size` blocks), "contiguous-max" (each
    request reserves prompt + max_tokens) or "contiguous-oracle" (reserves exactly prompt + output length:
    the unattainable best case of a contiguous allocator).
    """
    if allocator == "paged":
        kv: KVCacheManager = KVCacheManager(capacity_slots // block_size + 1, block_size, enable_caching=False)
        capacity = (capacity_slots // block_size) * block_size
    elif allocator in ("contiguous-max", "contiguous-oracle"):
        by_id: dict[str, RequestSpec] = {}
        if allocator == "contiguous-max":
            reserve = lambda r: by_id[r.request_id].prompt_len + by_id[r.request_id].max_tokens  # noqa: E731
        else:
            reserve = lambda r: by_id[r.request_id].prompt_len + by_id[r.request_id].output_len  # noqa: E731
        kv = ContiguousKVManager(capacity_slots, reserve)
        capacity = capacity_slots
    else:
        raise ValueError(f"unknown allocator {allocator!r}")
    sched = Scheduler(kv, max_num_seqs, max_num_batched_tokens, max_model_len)
    rng = random.Random(1)
    for i, s in enumerate(specs):
        rid = f"r{i}"
        if allocator != "paged":
            by_id[rid] = s
        ids = [rng.randrange(100, 30000) for _ in range(s.prompt_len)]
        req = Request(rid, ids, SamplingParams(max_tokens=s.max_tokens, ignore_eos=True), None, arrival_time=i)
        req.target_len = s.output_len  # simulated EOS
        sched.add(req)

    trace: list[StepStat] = []
    generated = steps = 0
    while sched.has_unfinished():
        out = sched.schedule()
        if not out:
            if out.preempted:
                continue
            raise RuntimeError(f"{allocator}: a request does not fit a KV cache of {capacity} slots")
        steps += 1
        done = []
        for s in out.scheduled:  # the model ran: the step's tokens are now in the cache
            r = s.request
            samples = s.samples
            r.num_computed_tokens += s.num_tokens
            if samples:
                r.append_token(7)
                generated += 1
                if r.num_output_tokens >= r.target_len:
                    done.append(r)
        alloc, used = _used_slots(kv, sched.running)
        trace.append(StepStat(len(sched.running), alloc, used))
        for r in done:
            sched.finish(r, RequestStatus.FINISHED_STOPPED)

    peak = max(trace, key=lambda t: (t.allocated, t.running))
    full = [t for t in trace if t.allocated >= 0.9 * capacity]
    return MemoryResult(
        allocator=allocator, capacity_slots=capacity, steps=steps, preemptions=sched.num_preemptions,
        max_running=max(t.running for t in trace), mean_running=statistics.fmean(t.running for t in trace),
        peak_allocated=peak.allocated, peak_used=peak.used, peak_running=peak.running,
        waste_at_peak=(peak.allocated - peak.used) / peak.allocated if peak.allocated else 0.0,
        mean_waste_when_full=(statistics.fmean((t.allocated - t.used) / t.allocated for t in full)
                              if full else None),
        generated_tokens=generated, trace=[asdict(t) for t in trace] if keep_trace else [])


def kv_block_bytes(hf_config, block_size: int, dtype_bytes: int) -> int:
    head_dim = getattr(hf_config, "head_dim", None) or hf_config.hidden_size // hf_config.num_attention_heads
    return 2 * block_size * hf_config.num_key_value_heads * head_dim * dtype_bytes * hf_config.num_hidden_layers


def cmd_kv_memory(args) -> int:
    capacity = args.kv_tokens
    note = ""
    if args.kv_cache_memory_bytes:  # a byte budget: the default model's KV bytes per token decide the slots
        from pageport.models.gguf_loader import open_gguf
        from pageport.models.loader import resolve_model_path
        hf = open_gguf(resolve_model_path(args.model), tokenizer=False).hf_config
        per_block = kv_block_bytes(hf, args.block_size, 2)
        capacity = args.kv_cache_memory_bytes // per_block * args.block_size
        note = f" ({args.kv_cache_memory_bytes / 2**20:.0f} MiB of bf16 KV for {args.model or 'the default model'})"
    specs = make_specs(args.dataset, args.num_prompts, args.max_model_len, args.max_tokens, args.seed)
    results = {}
    for alloc in args.allocators:
        t = time.perf_counter()
        results[alloc] = simulate(specs, capacity, args.block_size, alloc, args.max_num_seqs,
                                  args.max_num_batched_tokens, args.max_model_len)
        results[alloc].sim_seconds = time.perf_counter() - t
    mean_p = statistics.fmean(s.prompt_len for s in specs)
    mean_o = statistics.fmean(s.output_len for s in specs)
    print(f"KV memory: {len(specs)} requests ({args.dataset}: mean prompt {mean_p:.0f}, mean output {mean_o:.0f} "
          f"tokens), KV budget {capacity} token slots{note}, block size {args.block_size}, max_model_len "
          f"{args.max_model_len}, max_num_seqs {args.max_num_seqs}")
    print(f"{'allocator':<18} {'max seqs':>8} {'seqs@peak':>9} {'waste@peak':>10} {'waste(full)':>11} "
          f"{'used@peak':>9} {'steps':>6} {'preempt':>7}")
    for r in results.values():
        full = "-" if r.mean_waste_when_full is None else f"{100 * r.mean_waste_when_full:.2f}%"
        print(f"{r.allocator:<18} {r.max_running:>8} {r.peak_running:>9} {100 * r.waste_at_peak:>9.2f}% "
              f"{full:>11} {100 * r.peak_used / r.capacity_slots:>8.1f}% {r.steps:>6} {r.preemptions:>7}")
    out = {"benchmark": "kv-memory", "dataset": args.dataset, "num_prompts": len(specs),
           "mean_prompt_len": mean_p, "mean_output_len": mean_o, "kv_token_slots": capacity,
           "block_size": args.block_size, "max_model_len": args.max_model_len, "max_num_seqs": args.max_num_seqs,
           "max_num_batched_tokens": args.max_num_batched_tokens, "max_tokens": args.max_tokens,
           "seed": args.seed, "goal": "paged waste at peak < 4 %",
           "goal_met": results["paged"].waste_at_peak < 0.04 if "paged" in results else None,
           "results": {k: {kk: vv for kk, vv in vars(v).items() if kk != "trace"} for k, v in results.items()}}
    if "paged" in results and "contiguous-max" in results:
        out["concurrency_ratio_vs_contiguous_max"] = (results["paged"].max_running
                                                      / max(1, results["contiguous-max"].max_running))
        out["steps_ratio_contiguous_max_over_paged"] = results["contiguous-max"].steps / results["paged"].steps
        print(f"paged runs {out['concurrency_ratio_vs_contiguous_max']:.1f}x the sequences of contiguous-max at once "
              f"and finishes in {1 / out['steps_ratio_contiguous_max_over_paged']:.2f}x its steps")
    _write(args.output_json, out)
    return 0


# Prefix caching ------------------------------------------------------------------------------------------------
def prefix_prompts(num_prompts: int, prefix_len: int, suffix_len: int, vocab_size: int, seed: int = 0):
    rng = random.Random(seed)
    prefix = [rng.randrange(100, vocab_size - 100) for _ in range(prefix_len)]
    return [prefix + [rng.randrange(100, vocab_size - 100) for _ in range(suffix_len)] for _ in range(num_prompts)]


def run_prefix_caching(config: EngineConfig, num_prompts: int, prefix_len: int, suffix_len: int, output_len: int,
                       repeats: int = 3, seed: int = 0, log=print) -> dict:
    from pageport import LLM
    kw = {k: v for k, v in vars(config).items() if k != "enable_prefix_caching"}
    engines = {"on": LLM(enable_prefix_caching=True, **kw), "off": LLM(enable_prefix_caching=False, **kw)}
    vocab = engines["on"].engine.vocab_size
    prompts = prefix_prompts(num_prompts, prefix_len, suffix_len, vocab, seed)
    params = SamplingParams(temperature=0, max_tokens=output_len, ignore_eos=True)
    warm = prefix_prompts(2, 16, 16, vocab, seed + 1)
    for llm in engines.values():
        llm.generate([{"prompt_token_ids": p} for p in warm], params, use_tqdm=False)
    times: dict[str, list[float]] = {"on": [], "off": []}
    hits: dict[str, list[float]] = {"on": [], "off": []}
    outputs: dict[str, list] = {}
    for i in range(repeats):
        for mode in (("on", "off") if i % 2 == 0 else ("off", "on")):  # alternate: the machine drifts
            llm = engines[mode]
            llm.engine.reset_prefix_cache()  # every repeat starts cold: the first request computes the prefix
            t = time.perf_counter()
            outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
            times[mode].append(time.perf_counter() - t)
            hits[mode].append(sum(o.num_cached_tokens for o in outs) / sum(len(p) for p in prompts))
            outputs[mode] = [o.outputs[0].token_ids for o in outs]
            log(f"  repeat {i} caching {mode:>3}: {times[mode][-1]:.2f} s, prefix-cache hit rate "
                f"{100 * hits[mode][-1]:.1f}%")
    n_in = sum(len(p) for p in prompts)
    n_out = num_prompts * output_len
    res = {"benchmark": "prefix-caching", "num_prompts": num_prompts, "prefix_len": prefix_len,
           "suffix_len": suffix_len, "output_len": output_len, "repeats": repeats,
           "dtype": str(engines["on"].config.dtype).removeprefix("torch."),
           "num_threads": __import__("torch").get_num_threads()}
    for mode in ("on", "off"):
        med = statistics.median(times[mode])
        res[mode] = {"elapsed_median_s": med, "elapsed_s": times[mode], "requests_per_second": num_prompts / med,
                     "total_tokens_per_second": (n_in + n_out) / med, "output_tokens_per_second": n_out / med,
                     "hit_rate": statistics.median(hits[mode])}
    res["speedup"] = res["off"]["elapsed_median_s"] / res["on"]["elapsed_median_s"]
    res["speedups_pairwise"] = [b / a for a, b in zip(times["on"], times["off"])]
    res["ideal_hit_rate"] = (prefix_len // config.block_size * config.block_size) / (prefix_len + suffix_len) * (
        num_prompts - 1) / num_prompts
    res["outputs_identical"] = sum(a == b for a, b in zip(outputs["on"], outputs["off"]))
    return res


def cmd_prefix_caching(args) -> int:
    config = EngineConfig.from_cli_args(args)
    if config.kv_cache_memory_bytes is None and config.num_gpu_blocks_override is None:
        config.kv_cache_memory_bytes = 1 << 30  # two engines in one process: 1 GiB of KV each is plenty
    res = run_prefix_caching(config, args.num_prompts, args.prefix_len, args.suffix_len, args.output_len,
                             args.repeats, args.seed)
    from pageport.entrypoints.bench_offline import machine
    res["machine"] = machine()
    for mode in ("on", "off"):
        r = res[mode]
        print(f"prefix caching {mode:>3}: Throughput: {r['requests_per_second']:.2f} requests/s, "
              f"{r['total_tokens_per_second']:.2f} total tokens/s, {r['output_tokens_per_second']:.2f} output "
              f"tokens/s (median of {args.repeats}); hit rate {100 * r['hit_rate']:.1f}%")
    print(f"speed-up with prefix caching: {res['speedup']:.2f}x ({args.num_prompts} requests, shared prefix "
          f"{args.prefix_len} + unique {args.suffix_len} tokens, {args.output_len} out; ideal hit rate "
          f"{100 * res['ideal_hit_rate']:.1f}%; {res['outputs_identical']}/{args.num_prompts} outputs identical "
          f"on vs off) on {res['machine']}")
    _write(args.output_json, res)
    return 0


def _write(path: Optional[str], result: dict) -> None:
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(result, indent=2) + "\n")


def register(bench_sub) -> None:
    p = bench_sub.add_parser("kv-memory", help="KV-cache waste and concurrency at a fixed budget, paged vs "
                                               "contiguous (simulated sampling, no model)",
                             description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default="sharegpt-like",
                   help=f"{' | '.join(DISTRIBUTIONS)} | a JSON file of [prompt_len, output_len] pairs")
    p.add_argument("--num-prompts", type=int, default=1000)
    p.add_argument("--kv-tokens", type=int, default=32768, help="KV budget in token slots")
    p.add_argument("--kv-cache-memory-bytes", type=int, default=None,
                   help="KV budget in bytes instead (bf16 KV of --model, the default model if not given)")
    p.add_argument("--model", default=None)
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--max-model-len", type=int, default=2048)
    p.add_argument("--max-tokens", type=int, default=None,
                   help="each request's max_tokens (default: the rest of the context)")
    p.add_argument("--max-num-seqs", type=int, default=256)
    p.add_argument("--max-num-batched-tokens", type=int, default=2048)
    p.add_argument("--allocators", nargs="+", default=["paged", "contiguous-max", "contiguous-oracle"],
                   choices=["paged", "contiguous-max", "contiguous-oracle"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output-json", default=None)
    p.set_defaults(func=cmd_kv_memory)

    p = bench_sub.add_parser("prefix-caching", help="requests sharing a long prefix, prefix caching on vs off "
                                                    "(real model)")
    p.add_argument("--num-prompts", type=int, default=32)
    p.add_argument("--prefix-len", type=int, default=512)
    p.add_argument("--suffix-len", type=int, default=32)
    p.add_argument("--output-len", type=int, default=16)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--output-json", default=None)
    EngineConfig.add_cli_args(p, model_positional=False)
    p.set_defaults(func=cmd_prefix_caching)
