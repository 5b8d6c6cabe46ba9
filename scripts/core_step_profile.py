"""Where the engine core's host time goes in decode steps: drives an EngineCore directly (no front end), times
each phase of every step (scheduling, input preparation, the forward launch, logits + sampling, reading the
samples, turning them into outputs) and prints a cProfile of the same run.

  python scripts/core_step_profile.py MODEL_DIR [--rows 256] [--input-len 128] [--output-len 256] [--dtype bfloat16]

MODEL_DIR holds a config.json (random weights are made with load_format=dummy). Output: one JSON line of
milliseconds per step, then the profile's top functions by own time.
"""
import argparse
import cProfile
import json
import pickle
import pstats
import random
import time
from collections import defaultdict

from pageport.core.config import EngineConfig
from pageport.core.engine_core import CoreRequest, EngineCore
from pageport.core.model_runner import StepOutput
from pageport.core.sampling_params import SamplingParams

p = argparse.ArgumentParser()
p.add_argument("model")
p.add_argument("--rows", type=int, default=256)
p.add_argument("--input-len", type=int, default=128)
p.add_argument("--output-len", type=int, default=256)
p.add_argument("--dtype", default="auto")
p.add_argument("--top", type=int, default=30)
p.add_argument("--trace", action="store_true", help="also a torch.profiler trace of 8 steps: device kernels by time")
p.add_argument("--kv-cache-memory-bytes", type=int, default=None)
p.add_argument("--max-model-len", type=int, default=None, help="default: the model's (graphs are captured for it)")
args = p.parse_args()

core = EngineCore(EngineConfig(model=args.model, load_format="dummy", dtype=args.dtype, max_num_seqs=args.rows,
                               max_model_len=args.max_model_len,
                               kv_cache_memory_bytes=args.kv_cache_memory_bytes))
vocab = core.loaded.hf_config.vocab_size
params = pickle.dumps(SamplingParams(temperature=0, max_tokens=args.output_len, ignore_eos=True))
rng = random.Random(0)


def run(n: int, tag: str) -> int:
    for i in range(n):
        core.add_request(CoreRequest(f"{tag}{i}", [rng.randrange(vocab) for _ in range(args.input_len)], params))
    steps = 0
    while core.has_work():
        core.step()
        steps += 1
    return steps


run(min(8, args.rows), "warm")

spent: dict = defaultdict(float)


def timed(name, fn):
    def wrapper(*a, **k):
        t = time.perf_counter()
        try:
            return fn(*a, **k)
        finally:
            spent[name] += time.perf_counter() - t
    return wrapper


runner = core.runner
core.scheduler.schedule = timed("schedule", core.scheduler.schedule)
runner.execute = timed("execute (all)", runner.execute)
if runner.graphs is not None:
    runner.graphs.run = timed("execute: graph run", runner.graphs.run)
runner._logits = timed("execute: logits", runner._logits)
class TimedSampler:  # the runner reads the sampler's attributes too
    def __init__(self, inner):
        self.inner, self.call = inner, timed("execute: sampler", inner.__call__)

    def __call__(self, *a, **k):
        return self.call(*a, **k)

    def __getattr__(self, name):
        return getattr(self.inner, name)


runner.sampler = TimedSampler(runner.sampler)
core._process = timed("process (all)", core._process)
StepOutput.token_list = timed("process: wait for samples", StepOutput.token_list)

# prefill first (not profiled), then decode steps only
for i in range(args.rows):
    core.add_request(CoreRequest(f"r{i}", [rng.randrange(vocab) for _ in range(args.input_len)], params))
while any(not r.prefill_done for r in core.requests.values()) or core.scheduler.waiting:
    core.step()
spent.clear()
prof = cProfile.Profile()
steps, t0 = 0, time.perf_counter()
decode_steps = args.output_len // 2
for _ in range(decode_steps // 2):  # half without the profiler: clean timings
    core.step()
    steps += 1
wall = time.perf_counter() - t0
clean = {k: round(v / steps * 1e3, 3) for k, v in spent.items()}
prof.enable()
for _ in range(decode_steps // 2):
    core.step()
prof.disable()
if args.trace:
    from torch.profiler import ProfilerActivity, profile
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if core.platform.device.type == "cuda" else [])
    with profile(activities=acts) as trace:
        for _ in range(8):
            core.step()
    print(trace.key_averages().table(sort_by="self_device_time_total" if len(acts) > 1 else "self_cpu_time_total",
                                     row_limit=25), flush=True)
while core.has_work():
    core.step()
sizes = getattr(runner.graphs, "sizes", None)
replay = core.replay_ms(next(s for s in sizes if s >= args.rows)) if sizes else None
print(json.dumps({"rows": args.rows, "steps": steps, "wall_ms_per_step": round(wall / steps * 1e3, 3),
                  "phases_ms_per_step": clean, "platform": core.platform.name,
                  "graph_replay_ms": replay}), flush=True)
pstats.Stats(prof).sort_stats("tottime").print_stats(args.top)
