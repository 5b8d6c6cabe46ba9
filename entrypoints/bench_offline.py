"""`pageport bench throughput | latency`: offline benchmarks with a peer in the same run.

Backends: pageport, hf (Transformers `generate`, static batches), hf-cb (Transformers
`generate_batch`, its paged continuous batching), llama-cpp (llama-cpp-python on the same GGUF).
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

BACKENDS = ("pageport", "hf", "hf-cb", "llama-cpp")


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


# backends ---------------------------------------------------------------------------------------
def run_pageport(args, config: EngineConfig, prompts):
    from pageport import LLM, SamplingParams
    llm = LLM(**vars(config))
    params = SamplingParams(temperature=0, max_tokens=args.output_len, ignore_eos=args.ignore_eos)
    llm.generate(prompts[: min(4, len(prompts))], params, use_tqdm=False)  # warm-up
    t = time.perf_counter()
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params)
    dt = time.perf_counter() - t
    return dt, [len(o.outputs[0].token_ids) for o in outs], {"dtype": str(llm.config.dtype)}


def _hf_model(config: EngineConfig):
    import torch
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
    return model.to(platform.device).eval(), torch


def run_hf(args, config: EngineConfig, prompts):
    """Static batches, each batch of equal-length prompts (random prompts: no padding)."""
    model, torch = _hf_model(config)
    batch = args.hf_batch_size
    with torch.inference_mode():
        def go(chunk):
            ids = torch.tensor(chunk, device=model.device)
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=args.output_len,
                                 min_new_tokens=args.output_len if args.ignore_eos else None,
                                 do_sample=False, pad_token_id=0)
            return [args.output_len if args.ignore_eos else int((row[ids.shape[1]:] != 0).sum()) for row in out]
        go(prompts[:1])  # warm-up
        t = time.perf_counter()
        lens = []
        for i in range(0, len(prompts), batch):
            chunk = prompts[i:i + batch]
            if len({len(p) for p in chunk}) != 1:
                raise ValueError("the hf backend needs equal-length prompts (use --dataset random)")
            lens += go(chunk)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        return time.perf_counter() - t, lens, {"batch_size": batch}


def run_hf_cb(args, config: EngineConfig, prompts):
    model, torch = _hf_model(config)
    from transformers import GenerationConfig
    gen = GenerationConfig(max_new_tokens=args.output_len, do_sample=False, eos_token_id=None if args.ignore_eos
                           else model.generation_config.eos_token_id, pad_token_id=0)
    with torch.no_grad():  # not inference_mode: generate_batch updates its cache from a worker thread
        model.generate_batch(inputs=prompts[:2], generation_config=gen)  # warm-up
        t = time.perf_counter()
        res = model.generate_batch(inputs=prompts, generation_config=gen)
        dt = time.perf_counter() - t
    lens = [len(r.generated_tokens) for r in res.values()]
    return dt, lens, {"failed_requests": len(prompts) - sum(1 for n in lens if n > 0)}


def run_llama_cpp(args, config: EngineConfig, prompts):
    try:
        from llama_cpp import Llama
    except ImportError:
        raise SystemExit("llama-cpp: llama-cpp-python is not installed (no prebuilt wheel runs here; "
                         "`CMAKE_ARGS=-DGGML_NATIVE=ON pip install llama-cpp-python` builds it in ~8 min)")
    from pageport.models.loader import resolve_model_path
    import os
    llm = Llama(str(resolve_model_path(config.model)), n_ctx=args.input_len + args.output_len + 8,
                n_threads=config.num_threads or len(os.sched_getaffinity(0)), verbose=False, logits_all=False)
    lens = []
    t = time.perf_counter()
    for p in prompts:  # llama-cpp-python serves one sequence at a time
        n = 0
        llm.reset()
        for tok in llm.generate(p, temp=0.0, reset=True):
            n += 1
            if n >= args.output_len or (not args.ignore_eos and tok == llm.token_eos()):
                break
        lens.append(n)
    return time.perf_counter() - t, lens, {}


RUNNERS = {"pageport": run_pageport, "hf": run_hf, "hf-cb": run_hf_cb, "llama-cpp": run_llama_cpp}


def cmd_throughput(args) -> int:
    config = EngineConfig.from_cli_args(args)
    tokenizer, vocab = _tokenizer_and_vocab(config)
    prompts = make_prompts(args, tokenizer, vocab)
    dt, lens, extra = RUNNERS[args.backend](args, config, prompts)
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
    times = np.array([once() for _ in range(args.num_iters)])
    pct = {f"p{p}": float(np.percentile(times, p)) for p in (10, 25, 50, 75, 90, 99)}
    result = {"machine": machine(), "batch_size": args.batch_size, "input_len": args.input_len,
              "output_len": args.output_len, "avg_latency": float(times.mean()), "latencies": times.tolist(),
              "percentiles": pct, "decode_tokens_per_second_per_seq": args.output_len / pct["p50"]}
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
    p.add_argument("--backend", choices=BACKENDS, default="pageport")
    p.add_argument("--hf-batch-size", type=int, default=64, help="static batch size of the hf backend")
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
