"""Multi-LoRA throughput: a batch whose requests are spread over N adapters (rank R, on every projection) against
the same batch on the base model alone (an engine without LoRA), offline, same prompts and lengths (random ids,
EOS ignored). Also the LoRA engine running the batch without adapters (what base rows pay on a LoRA engine).
The adapters are random PEFT folders written here for the model's shapes. Runs go engine by engine (one engine
lives at a time); each figure is the median over --repeats.

    OMP_NUM_THREADS=2 python benchmarks/lora_throughput.py                   # the default model, this CPU: 4 x 32
    python benchmarks/lora_throughput.py --device cuda --model DIR --dtype bfloat16 --adapters 8 --batch 256 \
        --input-len 256 --output-len 128 --out benchmarks/results/h200_lora.json

Writes benchmarks/results/cpu_lora_throughput.json unless --out says otherwise.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def write_adapter(folder: Path, hf, rank: int, seed: int) -> None:
    """A random PEFT adapter (adapter_config.json + adapter_model.safetensors) for a Llama-shaped model."""
    import torch
    from safetensors.torch import save_file

    heads, kv = hf.num_attention_heads, getattr(hf, "num_key_value_heads", hf.num_attention_heads)
    hd = getattr(hf, "head_dim", None) or hf.hidden_size // heads
    h, inter = hf.hidden_size, hf.intermediate_size
    shapes = {"q_proj": (h, heads * hd), "k_proj": (h, kv * hd), "v_proj": (h, kv * hd), "o_proj": (heads * hd, h),
              "gate_proj": (h, inter), "up_proj": (h, inter), "down_proj": (inter, h)}
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for i in range(hf.num_hidden_layers):
        for t in TARGETS:
            k, n = shapes[t]
            part = "self_attn" if t in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp"
            name = f"base_model.model.model.layers.{i}.{part}.{t}"
            tensors[f"{name}.lora_A.weight"] = torch.randn(rank, k, generator=g) / k ** 0.5
            tensors[f"{name}.lora_B.weight"] = torch.randn(n, rank, generator=g) * 0.01
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, folder / "adapter_model.safetensors")
    (folder / "adapter_config.json").write_text(json.dumps({"r": rank, "lora_alpha": rank, "target_modules":
                                                            list(TARGETS), "peft_type": "LORA"}))


def timed(llm, prompts, params, loras) -> tuple[float, int]:
    t0 = time.perf_counter()
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False, lora_request=loras)
    dt = time.perf_counter() - t0
    return dt, sum(len(o.outputs[0].token_ids) for o in outs)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--adapters", type=int, default=4)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--input-len", type=int, default=128)
    ap.add_argument("--output-len", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--model", default=None, help="a model folder (default: the default model)")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "cpu_lora_throughput.json"))
    args = ap.parse_args()

    import random

    from pageport import LLM, LoRARequest, SamplingParams

    common = dict(device=args.device, dtype=args.dtype, max_num_seqs=args.batch,
                  max_model_len=args.input_len + args.output_len + 16)
    rng = random.Random(0)
    params = SamplingParams(temperature=0.0, max_tokens=args.output_len, ignore_eos=True)
    results = {}

    base = LLM(args.model, **common)
    vocab = base.engine.vocab_size
    prompts = [[rng.randrange(100, vocab) for _ in range(args.input_len)] for _ in range(args.batch)]
    hf = base.engine.hf_config
    timed(base, prompts[:4], params, None)  # warm-up
    results["base"] = [args.batch * args.output_len / timed(base, prompts, params, None)[0]
                       for _ in range(args.repeats)]
    base.engine.shutdown()
    del base

    with tempfile.TemporaryDirectory() as tmp:
        loras = []
        for i in range(args.adapters):
            write_adapter(Path(tmp) / f"a{i}", hf, args.rank, seed=i)
            loras.append(LoRARequest(f"a{i}", i + 1, str(Path(tmp) / f"a{i}")))
        llm = LLM(args.model, enable_lora=True, max_loras=args.adapters, max_lora_rank=args.rank, **common)
        spread = [loras[j % args.adapters] for j in range(args.batch)]
        timed(llm, prompts[:4], params, spread[:4])  # warm-up (reads the adapters)
        results["lora"], results["lora_engine_base_rows"] = [], []
        for _ in range(args.repeats):
            dt, n = timed(llm, prompts, params, spread)
            results["lora"].append(n / dt)
            dt, n = timed(llm, prompts, params, None)
            results["lora_engine_base_rows"].append(n / dt)
        graphs = llm.engine.uses_graphs
        llm.engine.shutdown()

    med = {k: statistics.median(v) for k, v in results.items()}
    out = {"benchmark": "lora_throughput", "model": args.model or "default (SmolLM2-135M-Instruct Q4_1 GGUF)",
           "device": args.device, "dtype": args.dtype, "adapters": args.adapters, "rank": args.rank,
           "batch": args.batch, "input_len": args.input_len, "output_len": args.output_len,
           "repeats": args.repeats, "cuda_graphs": graphs, "threads": os.environ.get("OMP_NUM_THREADS"),
           "host": platform.node(), "output_tok_s": results, "median_output_tok_s": med,
           "ratio_lora_vs_base": med["lora"] / med["base"],
           "ratio_base_rows_on_lora_engine_vs_base": med["lora_engine_base_rows"] / med["base"]}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps({k: out[k] for k in ("median_output_tok_s", "ratio_lora_vs_base",
                                           "ratio_base_rows_on_lora_engine_vs_base", "cuda_graphs")}, indent=2))


if __name__ == "__main__":
    main()
