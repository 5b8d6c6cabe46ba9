"""The XLA tier: the TPU code path on XLA's CPU device (torch-xla 2.9, PJRT_DEVICE=CPU).

torch-xla needs torch 2.9 (a 7 GB CUDA build), so this tier has its own venv and runs through
`scripts/tpu_xla_check.sh`, which records the results in benchmarks/results/tpu_xla_check.{json,txt}.
In the main venv these tests are skipped with that pointer; what they cover is not hidden.

- paged attention in the kernel layout on the XLA device vs float64 torch and vs torch-xla's own
  `ragged_paged_attention(use_kernel=False)` on the same padded step;
- the conformance kit on the `xla` platform;
- greedy parity with the CPU platform on the default model (float32, token ids equal);
- no XLA compilation after start-up across batches of varying composition (CompileTime metric);
- the persistent compilation cache across two processes.
"""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pageport.plugins import conformance

from .helpers import random_step

SCRIPT = "scripts/tpu_xla_check.sh"
RESULTS = os.environ.get("PAGEPORT_TPU_RESULTS")  # the script points this at benchmarks/results/

pytestmark = [
    pytest.mark.skipif(importlib.util.find_spec("torch_xla") is None,
                       reason=f"needs torch_xla (torch 2.9, own venv): run {SCRIPT}; "
                              "results in benchmarks/results/tpu_xla_check.json"),
    pytest.mark.skipif(not os.environ.get("PJRT_DEVICE"),
                       reason=f"set PJRT_DEVICE=CPU (as {SCRIPT} does) to run the XLA tier"),
]

PROMPTS = ["What is the capital of France?", "Write a haiku about paging.",
           "Explain in one sentence what a compiler does.", "List three colors."]
ENGINE = dict(dtype="float32", max_model_len=512, max_num_seqs=8, max_num_batched_tokens=128,
              kv_cache_memory_bytes=256 << 20)

_results: dict = {}


def _record(key, value):
    _results[key] = value
    if RESULTS:
        Path(RESULTS).parent.mkdir(parents=True, exist_ok=True)
        Path(RESULTS).write_text(json.dumps(_results, indent=2, default=str) + "\n")


@pytest.fixture(scope="module")
def xla_platform():
    from pageport.platforms import resolve_platform
    return resolve_platform("xla")


# --- attention ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("i", range(len(conformance.DEFAULT_CASES)))
def test_xla_paged_attention_vs_torch_and_torch_xla_reference(xla_platform, i):
    from pageport.kernels_tpu.attention import reference_kernel_call

    case = conformance.DEFAULT_CASES[i]
    lay, cache, step, q, ref = random_step(case, 200 + i, num_tokens=32, num_seqs=8, width=8)
    dev = xla_platform.device
    backend = xla_platform.attention_backend(case.num_heads, case.num_kv_heads, case.head_size,
                                             case.head_size ** -0.5, case.sliding_window)
    assert not backend.use_kernel  # the XLA-native path: PJRT_DEVICE is not TPU
    n = step.num_actual_tokens
    # this step's own K/V are already in `cache`; writing them again through forward() is idempotent
    k, v = lay.unpack_cache(cache)
    slots = step.slot_mapping
    kk = k.reshape(-1, case.num_kv_heads, case.head_size)[slots]
    vv = v.reshape(-1, case.num_kv_heads, case.head_size)[slots]
    xcache = cache.to(dev)
    out = backend.forward(q.to(dev), kk.to(dev), vv.to(dev), xcache, step.to(dev)).cpu()
    err = (out[:n].double() - ref).abs().max().item()
    theirs = reference_kernel_call(backend, q.to(dev), cache.to(dev), step.to(dev)).cpu()
    err_theirs = (theirs[:n].double() - ref).abs().max().item()
    _record(f"attention_case_{i}", {"case": str(case), "max_abs_err_vs_float64": err,
                                    "torch_xla_nonkernel_max_abs_err_vs_float64": err_theirs})
    assert err < 1e-5 and err_theirs < 1e-5
    assert out[n:].abs().sum() == 0


def test_conformance_kit_on_xla_platform(xla_platform):
    rows = conformance.run(xla_platform)
    _record("conformance_xla", {name: {"max_abs_err": err, "ok": ok} for name, err, ok in rows})
    assert all(ok for *_, ok in rows), rows


# --- the engine on XLA --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def engines():
    from pageport import LLM
    t0 = time.perf_counter()
    xla = LLM(device="xla", **ENGINE)
    t1 = time.perf_counter()
    cpu = LLM(device="cpu", **ENGINE)
    graphs = xla.engine.core.runner.graphs
    _record("engine", {"config": {k: v for k, v in ENGINE.items()}, "xla_startup_s": round(t1 - t0, 1),
                       "capture_s": round(graphs.capture_seconds, 1), "token_buckets": graphs.token_buckets,
                       "logits_buckets": graphs.row_buckets, "compilations_in_capture": graphs.compiles_in_capture,
                       "kv_cache_shape": list(xla.engine.core.runner.kv_caches[0].shape)})
    return xla, cpu


def _ids(outs):
    return [list(c.token_ids) for o in outs for c in o.outputs]


def test_greedy_parity_with_cpu(engines):
    from pageport import SamplingParams
    xla, cpu = engines
    sp = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    conv = [[{"role": "user", "content": p}] for p in PROMPTS]
    t = time.perf_counter()
    a = xla.chat(conv, sp, use_tqdm=False)
    dt = time.perf_counter() - t
    b = cpu.chat(conv, sp, use_tqdm=False)
    _record("greedy_parity", {"prompts": PROMPTS, "max_tokens": 24, "xla_token_ids": _ids(a), "cpu_token_ids": _ids(b),
                              "equal": _ids(a) == _ids(b), "xla_texts": [o.outputs[0].text for o in a],
                              "xla_generate_s": round(dt, 1)})
    assert _ids(a) == _ids(b)


def test_no_compilation_after_warmup(engines):
    """Batches of every composition run on the executables compiled at start-up."""
    from pageport import SamplingParams
    from pageport.kernels_tpu.runner import compile_count
    import torch_xla.debug.metrics as met

    xla, cpu = engines
    graphs = xla.engine.core.runner.graphs
    start = graphs.compiles_at_capture
    assert start is not None and compile_count() == start
    # capture compiled one program per token bucket and per logits bucket (+ one materializing the weights)
    programs = len(graphs.token_buckets) + len(graphs.row_buckets)
    assert programs <= graphs.compiles_in_capture <= programs + 1
    greedy = SamplingParams(temperature=0, max_tokens=16)
    long_prompt = " ".join(f"item {i}," for i in range(100))  # ~300 tokens: chunked prefill beside decodes
    batches = {
        "one prompt": (["Hello!"], greedy),
        "8 prompts, mixed lengths and max_tokens": (
            [p * (1 + i % 3) for i, p in enumerate(PROMPTS * 2)],
            [SamplingParams(temperature=0, max_tokens=4 + 3 * i) for i in range(8)]),
        "a chunked 300-token prompt beside short ones": ([long_prompt, "Hi", "Tell me a joke."], greedy),
        "prompt logprobs (row chunks)": (["The quick brown fox jumps over the lazy dog. " * 4],
                                         SamplingParams(temperature=0, max_tokens=2, prompt_logprobs=1)),
    }
    counts, equal = {}, {}
    for name, (prompts, params) in batches.items():
        a = xla.generate(prompts, params, use_tqdm=False)
        b = cpu.generate(prompts, params, use_tqdm=False)
        equal[name] = _ids(a) == _ids(b)
        counts[name] = compile_count() - start
        if params is batches["prompt logprobs (row chunks)"][1]:
            toks = a[0].prompt_token_ids
            la = [d[t].logprob for d, t in zip(a[0].prompt_logprobs[1:], toks[1:])]
            lb = [d[t].logprob for d, t in zip(b[0].prompt_logprobs[1:], toks[1:])]
            assert len(la) == len(toks) - 1 > 8
            equal[name + ": logprobs within 1e-3"] = max(abs(x - y) for x, y in zip(la, lb)) < 1e-3
    sampled = xla.generate(["Once upon a time"], SamplingParams(temperature=0.8, top_p=0.9, seed=7, n=2,
                                                                 max_tokens=8), use_tqdm=False)
    counts["seeded sampling, n=2"] = compile_count() - start
    _record("compilations", {"at_capture": start, "new_after_capture_per_batch": counts,
                             "token_ids_equal_cpu": equal, "sampled": _ids(sampled),
                             "counters": {k: met.counter_value(k) for k in ("UncachedCompile", "CachedCompile")}})
    assert all(c == 0 for c in counts.values()), counts
    assert all(equal.values()), equal


# --- persistent compilation cache -------------------------------------------------------------------------------
_TINY = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 64,
         "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
         "vocab_size": 256, "max_position_embeddings": 256, "rms_norm_eps": 1e-5, "hidden_act": "silu",
         "tie_word_embeddings": True, "bos_token_id": 1, "eos_token_id": 2}
_CHILD = """
import json, os, sys
import torch_xla.debug.metrics as met
from pageport import LLM, SamplingParams
llm = LLM(sys.argv[1], load_format="dummy", device="xla", dtype="float32", max_model_len=128, max_num_seqs=4,
          max_num_batched_tokens=32, kv_cache_memory_bytes=16 << 20)
out = llm.generate([[1, 5, 9, 3]], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True), use_tqdm=False)
names = ("PersistentCacheHit", "PersistentCacheMiss", "PersistentCacheDeserializeFailure", "UncachedCompile")
print(json.dumps({"ids": list(out[0].outputs[0].token_ids), "graphs": llm.engine.core.runner.graphs.compiles_in_capture,
                  **{n: met.counter_value(n) or 0 for n in names}}))
"""


def test_persistent_compilation_cache_across_processes(tmp_path):
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text(json.dumps(_TINY))
    cache = tmp_path / "xla-cache"
    env = {**os.environ, "PAGEPORT_XLA_CACHE_DIR": str(cache)}
    runs = []
    for _ in range(2):
        p = subprocess.run([sys.executable, "-c", _CHILD, str(tmp_path / "model")], env=env, capture_output=True,
                           text=True, timeout=600)
        assert p.returncode == 0, p.stderr[-3000:]
        runs.append(json.loads(p.stdout.strip().splitlines()[-1]))
    files = sorted(f.name for f in cache.iterdir())
    _record("persistent_cache", {"pjrt_device": os.environ["PJRT_DEVICE"], "files_written": len(files),
                                 "first_run": runs[0], "second_run": runs[1]})
    assert runs[0]["ids"] == runs[1]["ids"]
    assert len(files) >= runs[0]["graphs"] > 0  # every start-up executable was written
    assert runs[0]["PersistentCacheMiss"] >= runs[0]["graphs"]
    # the second process finds every one on disk; the TPU and GPU clients load it (a hit), the CPU client
    # cannot deserialize executables (UNIMPLEMENTED in torch-xla 2.9) and compiles again
    found = runs[1]["PersistentCacheHit"] + runs[1]["PersistentCacheDeserializeFailure"]
    assert runs[1]["PersistentCacheMiss"] == 0 and found >= runs[0]["graphs"]
    if os.environ["PJRT_DEVICE"] == "TPU":
        assert runs[1]["PersistentCacheHit"] >= runs[0]["graphs"]
