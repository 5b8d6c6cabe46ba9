"""Accuracy of in-run FP8 and INT8 W8A8 (also W4A16, and gguf: the file's own 4-bit codes) on the default model's
real weights (CPU): KL(bf16 || quantized) of the next-token distributions over held-out text, and top-1 agreement.
Writes benchmarks/results/quant_accuracy_cpu.json.

    python benchmarks/quant_accuracy.py [--out PATH]
"""
from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

TEXT = (
    "The lighthouse keeper climbed the spiral stairs every evening at dusk, counting the steps as his father had "
    "done before him. From the lamp room he could see the fishing boats returning to the harbour, their wakes "
    "drawing pale lines across the darkening water. In winter the storms came in from the west, and the whole "
    "tower hummed with the wind. He kept a logbook of every ship that passed, noting the weather, the state of "
    "the sea and anything unusual he saw. Over forty years the book grew into a shelf of volumes, and historians "
    "later used them to study how shipping in the region had changed. When the light was finally automated, he "
    "moved into a small cottage in the village, but he still walked out to the headland each night to watch the "
    "beam sweep across the bay. Photosynthesis converts light energy into chemical energy stored in glucose. "
    "In the first stage, chlorophyll absorbs light and splits water molecules, releasing oxygen as a by-product. "
    "The energy captured is used to make ATP and NADPH, which power the Calvin cycle, where carbon dioxide from "
    "the air is fixed into sugars. To sort a list efficiently, merge sort divides it into halves, sorts each half "
    "recursively and then merges the two sorted halves in linear time, giving n log n comparisons in the worst case."
)


def prefill_logits(model, ids: list[int]) -> torch.Tensor:
    """float32 logits [len(ids), vocab] of one sequence in one prefill step."""
    from pageport.platforms import AttentionMetadata

    block, n = 16, len(ids)
    blocks = (n + block - 1) // block
    shape = model.attn_backend.kv_cache_shape(blocks, block, model.num_kv_heads, model.head_size)
    caches = [torch.zeros(shape, dtype=model.dtype) for _ in range(model.num_layers)]
    md = AttentionMetadata(num_actual_tokens=n, query_start_loc=torch.tensor([0, n], dtype=torch.int32),
                           seq_lens=torch.tensor([n], dtype=torch.int32),
                           block_table=torch.arange(blocks, dtype=torch.int32)[None],
                           slot_mapping=torch.arange(n, dtype=torch.int64), max_query_len=n, max_seq_len=n,
                           query_start_loc_cpu=[0, n], seq_lens_cpu=[n], block_size=block)
    with torch.no_grad():
        hidden = model(torch.tensor(ids), torch.arange(n), caches, md)
        return model.compute_logits(hidden)


def main() -> None:
    from pageport.core.config import EngineConfig
    from pageport.kernels_cpu.platform import CpuPlatform
    from pageport.models import load_model

    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "quant_accuracy_cpu.json"))
    args = ap.parse_args()
    torch.manual_seed(0)
    plat = CpuPlatform()

    def load(quantization):
        cfg = EngineConfig(dtype=torch.bfloat16, quantization=quantization)
        plat.check_config(cfg)
        return load_model(cfg, plat)

    base = load(None)
    ids = base.tokenizer(TEXT)["input_ids"]
    ref = prefill_logits(base.model, ids).log_softmax(-1)
    results = {"model": "SmolLM2-135M-Instruct (Q4_1 GGUF, dequantized to bf16)", "tokens": len(ids),
               "reference": "the same weights, dense bf16", "machine": platform.processor() or platform.machine(),
               "threads": torch.get_num_threads(), "schemes": {}}
    for q in ("fp8", "w8a8", "w4a16", "gguf"):
        t0 = time.perf_counter()
        lp = prefill_logits(load(q).model, ids).log_softmax(-1)
        kl = (ref.exp() * (ref - lp)).sum(-1)
        results["schemes"][q] = {"kl_mean": kl.mean().item(), "kl_p95": kl.quantile(0.95).item(),
                                 "top1_agreement": (ref.argmax(-1) == lp.argmax(-1)).float().mean().item(),
                                 # the goal names FP8 and W8A8 only
                                 "goal_kl_le_0.01": kl.mean().item() <= 0.01 if q in ("fp8", "w8a8") else None,
                                 "seconds": round(time.perf_counter() - t0, 1)}
        print(q, results["schemes"][q])
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
