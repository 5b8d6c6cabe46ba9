"""`pageport bench throughput | latency`: offline benchmarks with a peer in the same run.

Backends: pageport, hf (Transformers `generate`, static batches), hf-cb (Transformers
`generate_batch`, its paged continuous batching), llama-cpp (llama.cpp through llama-cpp-python's bindings,
all sequences batched, on the same GGUF).
Every backend gets the same token ids and the same weights; results print in vLLM's wording.
"""
from __future__ import annotations

import argparse
import json
import platform as pyplatform
import random
import time
from pathlib import Path
from typing import Optional

from pageport.core.config import EngineConfig



def add_dataset_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dataset", default="random", help="random, or a file: one prompt per line or a JSON list")
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--num-prompts", type=int, default=64)
    p.add_argument("--ignore-eos", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--output-json", default=None)


def make_prompts(args, tokenizer, vocab_size: int) -> list[list[int]]:
    """Token-id prompts: random ids (seeded), or the file's prompts tokenized."""
    if args.dataset == "random":
        rng = random.Random(args.seed)
        return [[rng.randrange(100, vocab_size - 100) for _ in range(args.input_len)]
                for _ in range(args.num_prompts)]
    text = Path(args.dataset).read_text()
    prompts = json.loads(text) if args.dataset.endswith(".json") else [l for l in text.splitlines() if l.strip()]
    prompts = (prompts * (args.num_prompts // len(prompts) + 1))[: args.num_prompts]
    return [tokenizer.encode(p) for p in prompts]


def machine() -> str:
    try:
        import torch
        if torch.cuda.is_available():
            return torch.cuda.get_device_name()
    except Exception:
        pass
    return f"{pyplatform.processor() or pyplatform.machine()} CPU"


# backends: each loads its model once; calling one generates greedily for token-id prompts and returns the
# number of tokens each prompt got. The concurrency sweep (benchmarks/concurrency_sweep.py) uses them too.
class PageportBackend:
    def __init__(self, config: EngineConfig, args=None):
        from pageport import LLM, SamplingParams
        self.llm, self.SamplingParams = LLM(**vars(config)), SamplingParams
        self.info = {"dtype": str(self.llm.config.dtype).removeprefix("torch."), "quantization": config.quantization,
                     "compile": config.compile, "attention": self.llm.engine.attention_backend}

    def __call__(self, prompts, output_len, ignore_eos=True) -> list[int]:
        self.llm.engine.reset_prefix_cache()  # a repeat measures the work again, not the cache
        params = self.SamplingParams(temperature=0, max_tokens=output_len, ignore_eos=ignore_eos)
        outs = self.llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        return [len(o.outputs[0].token_ids) for o in outs]


def _hf_model(config: EngineConfig):
    from transformers import AutoModelForCausalLM
    from pageport.models.loader import resolve_model_path
    from pageport.platforms import resolve_platform
    platform = resolve_platform(config.device)
    config.resolve_dtype(platform.supported_dtypes)
    path = resolve_model_path(config.model)
    kw = {"dtype": config.dtype, "attn_implementation": "sdpa"}
    if path.suffix == ".gguf":
        model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, **kw)
    else:
        model = AutoModelForCausalLM.from_pretrained(path if path.is_dir() else path.parent, **kw)
    return model.to(platform.device).eval()


class HfBackend:
    """Transformers `generate` in static batches of equal-length prompts (random prompts: no padding)."""

    def __init__(self, config: EngineConfig, args=None):
        self.model = _hf_model(config)
        self.batch_size = getattr(args, "hf_batch_size", None) or 64
        self.info = {"dtype": str(self.model.dtype).removeprefix("torch."), "api": "generate (static batches)",
                     "batch_size": self.batch_size}

    def __call__(self, prompts, output_len, ignore_eos=True) -> list[int]:
        import torch
        lens = []
        with torch.inference_mode():
            for i in range(0, len(prompts), self.batch_size):
                chunk = prompts[i:i + self.batch_size]
                if len({len(p) for p in chunk}) != 1:
                    raise ValueError("the hf backend needs equal-length prompts (use --dataset random)")
                ids = torch.tensor(chunk, device=self.model.device)
                out = self.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=output_len,
                                          min_new_tokens=output_len if ignore_eos else None, do_sample=False,
                                          pad_token_id=0)
                lens += [output_len if ignore_eos else int((row[ids.shape[1]:] != 0).sum()) for row in out]
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        return lens


class HfCbBackend:
    """Transformers `generate_batch`: its paged continuous batching."""

    def __init__(self, config: EngineConfig, args=None):
        self.model = _hf_model(config)
        self.info = {"dtype": str(self.model.dtype).removeprefix("torch."),
                     "api": "generate_batch (continuous batching)"}

    def __call__(self, prompts, output_len, ignore_eos=True) -> list[int]:
        import torch
        from transformers import GenerationConfig
        gen = GenerationConfig(max_new_tokens=output_len, do_sample=False, pad_token_id=0,
                               eos_token_id=None if ignore_eos else self.model.generation_config.eos_token_id)
        with torch.no_grad():  # not inference_mode: generate_batch updates its cache from a worker thread
            res = self.model.generate_batch(inputs=prompts, generation_config=gen, progress_bar=False)
        return [len(r.generated_tokens) for r in res.values()]


class LlamaCppBackend:
    """llama.cpp through llama-cpp-python's C bindings, all sequences batched: every prompt token of every
    sequence, then one token per live sequence per llama_decode, greedy. Its own context with one KV stream
    per sequence (a unified stream makes each token attend over every sequence's cells: ~4x slower at 64)."""

    def __init__(self, config: EngineConfig, args=None, max_seqs: int = 64, max_len: int = 512, batch: int = 2048):
        try:
            import llama_cpp
        except ImportError as e:
            raise ImportError("llama-cpp-python is not installed (no prebuilt wheel runs here; "
                              "`CMAKE_ARGS=-DGGML_NATIVE=ON pip install llama-cpp-python` builds it in ~8 min)") from e
        import os
        from pageport.models.loader import resolve_model_path
        if args is not None and hasattr(args, "num_prompts"):
            max_seqs, max_len = min(args.num_prompts, 256), args.input_len + args.output_len + 8
        self.L, self.max_seqs = llama_cpp, max_seqs
        self.llm = llama_cpp.Llama(str(resolve_model_path(config.model)), n_ctx=512, verbose=False)  # the weights
        p = llama_cpp.llama_context_default_params()
        p.n_ctx, p.n_batch, p.n_ubatch, p.n_seq_max, p.kv_unified = max_seqs * max_len, batch, 512, max_seqs, False
        p.n_threads = p.n_threads_batch = config.num_threads or len(os.sched_getaffinity(0))
        self.ctx = llama_cpp.llama_init_from_model(self.llm.model, p)
        self.batch, self.size, self.n_vocab = llama_cpp.llama_batch_init(batch, 0, 1), batch, self.llm.n_vocab()
        self.eos = self.llm.token_eos()
        self.info = {"version": llama_cpp.__version__, "api": "llama_decode, all sequences batched",
                     "threads": p.n_threads}

    def _decode(self, items) -> dict[int, int]:
        """items: (token, position, sequence, wants logits) -> {sequence: argmax of its logits}."""
        import numpy as np
        out = {}
        for start in range(0, len(items), self.size):
            b, rows = self.batch, {}
            for i, (tok, pos, seq, want) in enumerate(items[start:start + self.size]):
                b.token[i], b.pos[i], b.n_seq_id[i], b.logits[i] = tok, pos, 1, want
                b.seq_id[i][0] = seq
                if want:
                    rows[seq] = i
            b.n_tokens = min(self.size, len(items) - start)
            if self.L.llama_decode(self.ctx, b) != 0:
                raise RuntimeError("llama_decode failed")
            for seq, i in rows.items():
                logits = np.ctypeslib.as_array(self.L.llama_get_logits_ith(self.ctx, i), shape=(self.n_vocab,))
                out[seq] = int(logits.argmax())
        return out

    def __call__(self, prompts, output_len, ignore_eos=True) -> list[int]:
        lens = []
        for w in range(0, len(prompts), self.max_seqs):  # waves of at most max_seqs sequences
            wave = prompts[w:w + self.max_seqs]
            self.L.llama_memory_clear(self.L.llama_get_memory(self.ctx), True)
            nxt = self._decode([(t, j, s, j == len(p) - 1) for s, p in enumerate(wave) for j, t in enumerate(p)])
            n = [1] * len(wave)
            live = [s for s in range(len(wave)) if ignore_eos or nxt[s] != self.eos]
            for step in range(1, output_len):
                live = [s for s in live if n[s] < output_len]
                if not live:
                    break
                nxt = self._decode([(nxt[s], len(wave[s]) + step - 1, s, True) for s in live])
                for s in list(live):
                    n[s] += 1
                    if not ignore_eos and nxt[s] == self.eos:
                        live.remove(s)
            lens += n
        return lens


BACKEND_CLASSES = {"pageport": PageportBackend, "hf": HfBackend, "hf-cb": HfCbBackend, "llama-cpp": LlamaCppBackend}


def cmd_throughput(args) -> int:
    config = EngineConfig.from_cli_args(args)
    tokenizer, vocab = _tokenizer_and_vocab(config)
    prompts = make_prompts(args, tokenizer, vocab)
    try:
        backend = BACKEND_CLASSES[args.backend](config, args)
    except ImportError as e:
        raise SystemExit(f"{args.backend}: {e}")
    for n in {1, min(4, len(prompts))}:  # warm-up (and compilation, which specialises on batch 1)
        backend(prompts[:n], 4, True)
    profiling = args.profile_step and args.backend == "pageport"
    if profiling:
        backend.llm.engine.client.call("profile", True)
    llm = backend.llm if args.backend == "pageport" else None
    before = _spec_counters(llm)
    t = time.perf_counter()
    lens = backend(prompts, args.output_len, args.ignore_eos)
    dt = time.perf_counter() - t
    extra = dict(backend.info)
    if before is not None:
        extra["spec_decode"] = spec_decode_stats(before, _spec_counters(llm))
    if profiling:
        extra["step_profile"] = step_profile(backend.llm.engine, dt, args.max_num_seqs)
    n_in, n_out = sum(len(p) for p in prompts), sum(lens)
    result = {"backend": args.backend, "machine": machine(), "model": config.model or "default",
              "load_format": config.load_format, "num_prompts": len(prompts), "input_len": args.input_len,
              "output_len": args.output_len, "elapsed_time": dt, "num_requests": len(prompts),
              "total_num_tokens": n_in + n_out, "num_output_tokens": n_out,
              "requests_per_second": len(prompts) / dt, "tokens_per_second": (n_in + n_out) / dt,
              "output_tokens_per_second": n_out / dt, **extra}
    print(f"Throughput: {result['requests_per_second']:.2f} requests/s, "
          f"{result['tokens_per_second']:.2f} total tokens/s, {result['output_tokens_per_second']:.2f} output tokens/s"
          f"  [{args.backend} on {result['machine']}]")
    _write(args.output_json, result)
    return 0


def _spec_counters(llm) -> Optional[dict]:
    """The engine core's speculative-decoding counters (None without speculation)."""
    if llm is None or llm.engine.config.speculative_config is None:
        return None
    import msgspec
    llm.engine.client.call("stats")
    return {k: v for k, v in msgspec.structs.asdict(llm.engine.client.last_stats).items() if k.startswith("spec_num_")}


def spec_decode_stats(before: dict, after: dict) -> dict:
    """Proposals over a run, as vLLM reports them: acceptance rate = accepted / proposed tokens, mean acceptance
    length = tokens a verifying step emitted on average (accepted + 1)."""
    d = {k.removeprefix("spec_num_"): after[k] - before[k] for k in after}
    d["acceptance_rate"] = d["accepted_tokens"] / max(1, d["draft_tokens"])
    d["mean_acceptance_length"] = 1 + d["accepted_tokens"] / max(1, d["drafts"])
    print(f"speculative decoding: {d['drafts']} verifying steps, acceptance rate {d['acceptance_rate']:.3f}, "
          f"mean acceptance length {d['mean_acceptance_length']:.2f}")
    return d


def step_profile(engine, wall: float, max_rows: int) -> dict:
    """Where the engine core's steps spent the run: preparing and launching, waiting for the device, turning
    samples into outputs; the device-busy share where the platform times steps (CUDA events)."""
    prof = engine.client.call("profile", False)
    steps = max(1, prof["steps"])
    out = {"steps": prof["steps"], "wall_ms_per_step": 1e3 * wall / steps,
           "launch_ms_per_step": 1e3 * prof["launch_s"] / steps, "wait_ms_per_step": 1e3 * prof["wait_s"] / steps,
           "update_ms_per_step": 1e3 * prof["update_s"] / steps}
    if prof.get("device_s") is not None:
        out["device_ms_per_step"] = 1e3 * prof["device_s"] / steps
        out["device_busy"] = prof["device_s"] / wall
    replay = engine.client.call("replay_ms", min(256, max_rows))
    if replay is not None:
        out[f"graph_replay_ms_b{min(256, max_rows)}"] = replay
    print("step profile: " + ", ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}" for k, v in out.items()))
    return out


def cmd_latency(args) -> int:
    import numpy as np
    from pageport import LLM, SamplingParams
    config = EngineConfig.from_cli_args(args)
    llm = LLM(**vars(config))
    vocab = llm.engine.vocab_size
    rng = random.Random(args.seed)
    prompts = [{"prompt_token_ids": [rng.randrange(100, vocab - 100) for _ in range(args.input_len)]}
               for _ in range(args.batch_size)]
    params = SamplingParams(temperature=0, max_tokens=args.output_len, ignore_eos=True)

    def once() -> float:
        t = time.perf_counter()
        llm.generate(prompts, params, use_tqdm=False)
        return time.perf_counter() - t

    for _ in range(args.num_iters_warmup):
        once()
    before = _spec_counters(llm)
    times = np.array([once() for _ in range(args.num_iters)])
    pct = {f"p{p}": float(np.percentile(times, p)) for p in (10, 25, 50, 75, 90, 99)}
    result = {"machine": machine(), "batch_size": args.batch_size, "input_len": args.input_len,
              "output_len": args.output_len, "avg_latency": float(times.mean()), "latencies": times.tolist(),
              "percentiles": pct, "decode_tokens_per_second_per_seq": args.output_len / pct["p50"]}
    if before is not None:
        result["spec_decode"] = spec_decode_stats(before, _spec_counters(llm))
    print(f"Avg latency: {times.mean():.4f} seconds")
    for k, v in pct.items():
        print(f"{k[1:]}% percentile latency: {v:.4f} seconds")
    _write(args.output_json, result)
    return 0


def _tokenizer_and_vocab(config: EngineConfig):
    from transformers import AutoConfig
    from pageport.models.loader import resolve_model_path
    path = resolve_model_path(config.model)
    if path.suffix == ".gguf":
        from pageport.models.gguf_loader import open_gguf
        gg = open_gguf(path, tokenizer=True)
        return gg.tokenizer, gg.hf_config.vocab_size
    folder = path if path.is_dir() else path.parent
    hf = AutoConfig.from_pretrained(folder)
    try:
        from transformers import AutoTokenizer
        tok = AutoTokenizer.from_pretrained(folder)
    except Exception:
        tok = None
    return tok, hf.vocab_size


def _write(path: Optional[str], result: dict) -> None:
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(result, indent=2) + "\n")


def register(bench_sub) -> None:
    p = bench_sub.add_parser("throughput", help="offline throughput, pageport or a peer")
    p.add_argument("--backend", choices=list(BACKEND_CLASSES), default="pageport")
    p.add_argument("--hf-batch-size", type=int, default=64, help="static batch size of the hf backend")
    p.add_argument("--profile-step", action="store_true",
                   help="report where the engine core's steps spend their time, and the device-busy share")
    add_dataset_args(p)
    EngineConfig.add_cli_args(p, model_positional=False)
    p.set_defaults(func=cmd_throughput)

    p = bench_sub.add_parser("latency", help="latency of one fixed batch, with percentiles")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--input-len", type=int, default=32)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--num-iters-warmup", type=int, default=3)
    p.add_argument("--num-iters", type=int, default=10)
    p.add_argument("--output-json", default=None)
    EngineConfig.add_cli_args(p, model_positional=False)
    p.set_defaults(func=cmd_latency)
