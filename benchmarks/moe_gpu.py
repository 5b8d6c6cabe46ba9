"""Mixture-of-Experts on one GPU: the Triton fused-MoE kernel against the per-expert torch loop and Transformers.

    python benchmarks/moe_gpu.py --shape qwen3-30b-a3b --num-layers 24 --out benchmarks/results/h200_moe_qwen3.json
    python benchmarks/moe_gpu.py --shape mixtral-8x7b --num-layers 8 --out benchmarks/results/h200_moe_mixtral.json

1. Kernel: one layer's routed experts at the shape's hidden / intermediate / experts / top-k, for token counts from
   decode (1, 16, 64) to prefill (1024, 4096): `fused_moe` (Triton, tokens sorted by expert, grouped GEMM) vs
   `Ops.fused_moe` (one pair of matmuls per expert with tokens) vs Transformers' own experts module of the
   architecture, bf16, CUDA-event timed medians; the fused result is checked against the loop.
2. End to end: a random-weight checkpoint of the shape (all of its layers, or --num-layers of them: the full
   Qwen3-30B-A3B is 61 GB in bf16) written with save_pretrained, then `pageport bench throughput` on it three
   times in separate processes: pageport with the fused kernel, pageport with the per-expert loop
   (PAGEPORT_FUSED_MOE=torch), Transformers `generate` in static batches; same prompts (random ids), greedy,
   EOS ignored. The goal: pageport (fused) >= 5x Transformers.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

SHAPES = {
    "qwen3-30b-a3b": dict(architectures=["Qwen3MoeForCausalLM"], model_type="qwen3_moe", hidden_size=2048,
                          intermediate_size=6144, moe_intermediate_size=768, num_experts=128, num_experts_per_tok=8,
                          norm_topk_prob=True, num_hidden_layers=48, num_attention_heads=32, num_key_value_heads=4,
                          head_dim=128, vocab_size=151936, max_position_embeddings=40960, rms_norm_eps=1e-6,
                          rope_theta=1000000.0, hidden_act="silu", tie_word_embeddings=False,
                          decoder_sparse_step=1, mlp_only_layers=[]),
    "mixtral-8x7b": dict(architectures=["MixtralForCausalLM"], model_type="mixtral", hidden_size=4096,
                         intermediate_size=14336, num_local_experts=8, num_experts_per_tok=2, num_hidden_layers=32,
                         num_attention_heads=32, num_key_value_heads=8, vocab_size=32000,
                         max_position_embeddings=32768, rms_norm_eps=1e-5, rope_theta=1000000.0, hidden_act="silu",
                         tie_word_embeddings=False, sliding_window=None),
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", choices=list(SHAPES), default="qwen3-30b-a3b")
    p.add_argument("--num-layers", type=int, default=None, help="layers of the checkpoint (default: all)")
    p.add_argument("--out", required=True, help="result JSON")
    p.add_argument("--tokens", type=int, nargs="+", default=[1, 16, 64, 256, 1024, 4096])
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--skip-e2e", action="store_true", help="only the kernel comparison")
    p.add_argument("--checkpoint", default=None, help="where to write the checkpoint (default: a temp dir)")
    p.add_argument("--num-prompts", type=int, default=256)
    p.add_argument("--input-len", type=int, default=512)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--hf-batch-size", type=int, default=64)
    p.add_argument("--timeout", type=int, default=1200, help="seconds for each end-to-end run")
    return p.parse_args(argv)


def _dims(cfg: dict) -> tuple[int, int, int, int]:
    """(hidden, expert intermediate, experts, top-k)."""
    inter = cfg.get("moe_intermediate_size") or cfg["intermediate_size"]
    experts = cfg.get("num_experts") or cfg["num_local_experts"]
    return cfg["hidden_size"], inter, experts, cfg["num_experts_per_tok"]


def _time(fn, iters: int) -> float:
    """Median milliseconds of fn() over iters runs (CUDA events), after 3 warm-ups."""
    for _ in range(3):
        fn()
    times = []
    for _ in range(iters):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b))
    return statistics.median(times)


def _hf_experts(cfg: dict, w13: torch.Tensor, w2: torch.Tensor):
    """Transformers' experts module of the architecture holding the same weights, called (x, ids, weights)."""
    from transformers import AutoConfig

    config = AutoConfig.for_model(cfg["model_type"], **{k: v for k, v in cfg.items() if k != "model_type"})
    if cfg["model_type"] == "mixtral":
        from transformers.models.mixtral.modeling_mixtral import MixtralExperts as Experts
    else:
        from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeExperts as Experts
    with torch.device(w13.device):
        experts = Experts(config).to(w13.dtype)
    experts.gate_up_proj.data.copy_(w13)
    experts.down_proj.data.copy_(w2)
    return experts


@torch.inference_mode()
def kernel_bench(cfg: dict, token_counts: list[int], iters: int) -> list[dict]:
    from pageport.kernels_cuda.fused_moe import fused_moe
    from pageport.models.moe import select_experts
    from pageport.platforms.ops import Ops

    h, i, e, k = _dims(cfg)
    g = torch.Generator(device="cuda").manual_seed(0)
    w13 = (torch.randn(e, 2 * i, h, device="cuda", generator=g) * h ** -0.5).bfloat16()
    w2 = (torch.randn(e, h, i, device="cuda", generator=g) * i ** -0.5).bfloat16()
    hf = _hf_experts(cfg, w13, w2)
    loop = Ops()
    rows = []
    for t in token_counts:
        x = torch.randn(t, h, device="cuda", generator=g).bfloat16()
        weights, ids = select_experts(torch.randn(t, e, device="cuda", generator=g), k,
                                      renormalize=bool(cfg.get("norm_topk_prob", True)))
        fused_out, loop_out = fused_moe(x, w13, w2, weights, ids), loop.fused_moe(x, w13, w2, weights, ids)
        rel = ((fused_out.float() - loop_out.float()).abs().max() / loop_out.float().abs().max()).item()
        row = {"tokens": t, "fused_ms": _time(lambda: fused_moe(x, w13, w2, weights, ids), iters),
               "loop_ms": _time(lambda: loop.fused_moe(x, w13, w2, weights, ids), iters),
               "hf_experts_ms": _time(lambda: hf(x, ids, weights.to(x.dtype)), iters),
               "fused_vs_loop_max_rel_diff": rel}
        row["speedup_vs_loop"] = row["loop_ms"] / row["fused_ms"]
        row["speedup_vs_hf"] = row["hf_experts_ms"] / row["fused_ms"]
        print(f"T={t:5d}: fused {row['fused_ms']:.3f} ms, loop {row['loop_ms']:.3f} ms, "
              f"transformers {row['hf_experts_ms']:.3f} ms  (x{row['speedup_vs_loop']:.1f} / "
              f"x{row['speedup_vs_hf']:.1f}), rel diff {rel:.1e}", flush=True)
        rows.append(row)
    return rows


def write_checkpoint(cfg: dict, folder: Path) -> int:
    from transformers import AutoConfig, AutoModelForCausalLM

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps({**cfg, "torch_dtype": "bfloat16"}, indent=2))
    config = AutoConfig.from_pretrained(folder)
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    n = sum(p.numel() for p in model.parameters())
    model.save_pretrained(folder, safe_serialization=True)
    del model
    torch.cuda.empty_cache()
    return n


def e2e(args, folder: Path) -> dict:
    common = ["pageport", "bench", "throughput", "--model", str(folder), "--dtype", "bfloat16",
              "--input-len", str(args.input_len), "--output-len", str(args.output_len),
              "--num-prompts", str(args.num_prompts)]
    runs = {"pageport_fused": (["--backend", "pageport"], {}),
            "pageport_loop": (["--backend", "pageport"], {"PAGEPORT_FUSED_MOE": "torch"}),
            "hf_generate": (["--backend", "hf", "--hf-batch-size", str(args.hf_batch_size)], {})}
    out = {}
    for name, (extra, env) in runs.items():
        with tempfile.NamedTemporaryFile(suffix=".json") as f:
            t0 = time.perf_counter()
            proc = subprocess.run(common + extra + ["--output-json", f.name], env={**os.environ, **env},
                                  capture_output=True, text=True, timeout=args.timeout)
            tail = (proc.stdout + proc.stderr).strip().splitlines()[-3:]
            if proc.returncode != 0:
                out[name] = {"error": "\n".join(tail), "returncode": proc.returncode}
            else:
                out[name] = json.loads(Path(f.name).read_text())
            out[name]["wall_s"] = time.perf_counter() - t0
        print(f"{name}: " + (f"{out[name]['output_tokens_per_second']:.1f} output tok/s"
                             if "error" not in out[name] else out[name]["error"]), flush=True)
    ok = [n for n in runs if "error" not in out[n]]
    if "pageport_fused" in ok and "hf_generate" in ok:
        out["ratio_fused_to_hf"] = (out["pageport_fused"]["output_tokens_per_second"]
                                    / out["hf_generate"]["output_tokens_per_second"])
        out["goal_5x_met"] = out["ratio_fused_to_hf"] >= 5
    if "pageport_fused" in ok and "pageport_loop" in ok:
        out["ratio_fused_to_loop"] = (out["pageport_fused"]["output_tokens_per_second"]
                                      / out["pageport_loop"]["output_tokens_per_second"])
    return out


def main(argv=None) -> int:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("needs a CUDA GPU")
    cfg = dict(SHAPES[args.shape])
    if args.num_layers:
        cfg["num_hidden_layers"] = args.num_layers
    res = {"shape": args.shape, "config": cfg, "gpu": torch.cuda.get_device_name(), "torch": torch.__version__}
    res["kernel"] = kernel_bench(cfg, args.tokens, args.iters)
    if not args.skip_e2e:
        folder = Path(args.checkpoint or tempfile.mkdtemp(prefix=f"moe-{args.shape}-"))
        t0 = time.perf_counter()
        res["checkpoint_parameters"] = write_checkpoint(cfg, folder)
        res["checkpoint_write_s"] = time.perf_counter() - t0
        res["e2e"] = e2e(args, folder)
        res["e2e"].update(num_prompts=args.num_prompts, input_len=args.input_len, output_len=args.output_len)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
