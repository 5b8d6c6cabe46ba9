"""H200 benchmark of the quantized GEMMs at Llama-3-8B's linear shapes, weights quantized in the run, bf16 in the
same call: FP8 W8A8 (torch._scaled_mm + Triton activation quantization) at prefill/throughput sizes, and W4A16
(Triton, split-K) at batch-1 decode; and decode attention over an 8k context with a bf16 and an fp8 KV cache.
Times every linear of one decoder layer (qkv, o, gate|up, down) inside CUDA graphs (as the engine's decode steps
replay them: launch costs on the host don't count), with CUDA events; writes benchmarks/results/quant_gpu.json.
--sweep also times the W4A16 launch and the decode-attention launch over a grid of configurations and reports the
best beside the default heuristic's.

    python benchmarks/quant_gpu.py [--out PATH] [--sweep]
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

# Llama-3-8B: hidden 4096, 32 q heads / 8 kv heads of 128, intermediate 14336
SHAPES = {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336)}


def bench(fn, iters=20, reps=7):
    """ms per call: `iters` calls captured in one CUDA graph, the median of `reps` replays."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(iters):
            fn()
    graph.replay()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / iters)
    return sorted(times)[len(times) // 2]


def sweep_w4a16(x, w, n, k):
    from pageport.kernels_cuda.quant_gemm import WnA16Launch, wna16_linear
    best = []
    for bm in ((1, 16) if x.shape[0] == 1 else (16,)):
        for bn in (64, 128, 256):
            for bk in (64, 128):
                for split in (1, 2, 4, 8, 16):
                    if k % (split * bk) or k // split < 2 * bk:
                        continue
                    for warps, stages in ((4, 3), (4, 4), (8, 4)):
                        c = WnA16Launch(bm, bn, bk, split, warps, stages)
                        try:
                            best.append((bench(lambda: wna16_linear(x, w, config=c), 10, 3), c))
                        except Exception:  # noqa: BLE001 - out of shared memory / registers: not a candidate
                            continue
    best.sort(key=lambda t: t[0])
    return [{"ms": t, "config": vars(c)} for t, c in best[:3]]


def sweep_attention(q, k, v, out, qsl, lens, table, ctx):
    from pageport.kernels_cuda.paged_attention import LaunchConfig, paged_attention
    best = []
    for tile_n, k_rows in ((64, False), (128, False), (64, True), (128, True), (256, True)):
        for splits in (2, 4, 8):
            for warps, stages in ((4, 2), (4, 3), (8, 3)):
                c = LaunchConfig(True, 16, tile_n, splits, warps, stages, (("K_ROWS", k_rows),))
                ws = {}
                try:
                    t = bench(lambda: paged_attention(q, k, v, out, qsl, lens, table, max_query_len=1, max_seq_len=ctx,
                                                      scale=128 ** -0.5, config=c, workspace=ws), 5, 3)
                except Exception:  # noqa: BLE001 - a launch that does not fit: not a candidate
                    continue
                best.append((t, c))
    best.sort(key=lambda t: t[0])
    return [{"ms": t, "config": {"tile_n": c.tile_n, "num_splits": c.num_splits, "num_warps": c.num_warps,
                                 "num_stages": c.num_stages, **dict(c.extra)}} for t, c in best[:3]]


def main() -> None:
    from pageport.kernels_cuda.quant_gemm import scaled_linear, wna16_linear, wna16_prepare
    from pageport.models.quantization.methods import quantize_weight_w4, quantize_weight_w8a8
    from pageport.platforms.quant_ops import pack_codes

    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "quant_gpu.json"))
    ap.add_argument("--sweep", action="store_true", help="also sweep W4A16 and decode-attention launches")
    args = ap.parse_args()
    dev = torch.device("cuda")
    res = {"device": torch.cuda.get_device_name(), "shapes": SHAPES, "fp8_w8a8": {}, "w4a16_decode": {}}
    weights = {k: torch.randn(n, kk, device=dev, dtype=torch.bfloat16) * 0.02 for k, (n, kk) in SHAPES.items()}
    fp8 = {k: quantize_weight_w8a8(w, torch.float8_e4m3fn) for k, w in weights.items()}
    w4 = {}
    for k, w in weights.items():
        codes, s, _ = quantize_weight_w4(w, 128)
        w4[k] = wna16_prepare(pack_codes(codes), s.to(torch.bfloat16), None, 128)
    for m in (1024, 4096, 8192):  # tokens per step of a throughput run (1000 x 1024/128 prefills chunked)
        row = {}
        for k, w in weights.items():
            x = torch.randn(m, w.shape[1], device=dev, dtype=torch.bfloat16)
            t_bf16 = bench(lambda: torch.nn.functional.linear(x, w))
            t_fp8 = bench(lambda: scaled_linear(x, *fp8[k]))
            err = (scaled_linear(x, *fp8[k]).float() - torch.nn.functional.linear(x, w).float()).abs().max().item()
            row[k] = {"bf16_ms": t_bf16, "fp8_ms": t_fp8, "speedup": t_bf16 / t_fp8, "max_abs_err": err}
        tot_b, tot_f = sum(r["bf16_ms"] for r in row.values()), sum(r["fp8_ms"] for r in row.values())
        res["fp8_w8a8"][m] = {"per_linear": row, "layer_speedup": tot_b / tot_f}
        print("fp8", m, round(tot_b / tot_f, 2))
    for m in (1, 4, 16):
        row = {}
        for k, w in weights.items():
            x = torch.randn(m, w.shape[1], device=dev, dtype=torch.bfloat16)
            t_bf16 = bench(lambda: torch.nn.functional.linear(x, w))
            t_w4 = bench(lambda: wna16_linear(x, w4[k]))
            row[k] = {"bf16_ms": t_bf16, "w4a16_ms": t_w4, "speedup": t_bf16 / t_w4,
                      "w4a16_gbps": w4[k]["qweight"].numel() * 4 / t_w4 / 1e6}
            if args.sweep and m in (1, 16):
                row[k]["sweep"] = sweep_w4a16(x, w4[k], *w.shape)
                print("w4a16 sweep", m, k, t_w4, row[k]["sweep"][0], flush=True)
        tot_b, tot_w = sum(r["bf16_ms"] for r in row.values()), sum(r["w4a16_ms"] for r in row.values())
        res["w4a16_decode"][m] = {"per_linear": row, "layer_speedup": tot_b / tot_w}
        print("w4a16", m, round(tot_b / tot_w, 2))
    # decode attention, 8B heads (32 q / 8 kv of 128), 32 sequences x 8192 tokens of context, block 16
    from pageport.kernels_cuda.paged_attention import paged_attention
    seqs, ctx, bs = 32, 8192, 16
    nb = seqs * ctx // bs
    table = torch.randperm(nb, device=dev, dtype=torch.int32).view(seqs, -1)
    q = torch.randn(seqs, 32, 128, device=dev, dtype=torch.bfloat16)
    lens = torch.full((seqs,), ctx, device=dev, dtype=torch.int32)
    qsl = torch.arange(seqs + 1, device=dev, dtype=torch.int32)
    res["decode_attention_8k"] = {}
    for name, dtype in (("bf16", torch.bfloat16), ("fp8_e4m3", torch.float8_e4m3fn)):
        k = torch.randn(nb, bs, 8, 128, device=dev).to(dtype)
        v = torch.randn(nb, bs, 8, 128, device=dev).to(dtype)
        out = torch.empty_like(q)
        ws = {}
        row = res["decode_attention_8k"][name] = {"ms": bench(lambda: paged_attention(
            q, k, v, out, qsl, lens, table, max_query_len=1, max_seq_len=ctx, scale=128 ** -0.5, workspace=ws), 10),
            "kv_bytes": 2 * k.numel() * k.element_size()}
        row["gbps"] = row["kv_bytes"] / row["ms"] / 1e6
        if args.sweep:
            row["sweep"] = sweep_attention(q, k, v, out, qsl, lens, table, ctx)
            print("attention sweep", name, row["ms"], row["sweep"][0], flush=True)
        del k, v
    att = res["decode_attention_8k"]
    att["speedup"] = att["bf16"]["ms"] / att["fp8_e4m3"]["ms"]
    if args.sweep:
        att["best_vs_best"] = att["bf16"]["sweep"][0]["ms"] / att["fp8_e4m3"]["sweep"][0]["ms"]
    print("fp8 kv decode attention 8k", round(att["speedup"], 2))
    res["goals"] = {"fp8_kv_decode_attention_ge_1.7x": att["speedup"] >= 1.7,
                    "fp8_ge_1.5x_at_4096_tokens": res["fp8_w8a8"][4096]["layer_speedup"] >= 1.5,
                    "w4a16_batch1_ge_2x": res["w4a16_decode"][1]["layer_speedup"] >= 2.0}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
