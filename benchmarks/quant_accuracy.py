"""Accuracy of in-run FP8 and INT8 W8A8 (also W4A16, and gguf: the file's own 4-bit codes) on the default model's
real weights (CPU): KL(bf16 || quantized) of the next-token distributions over held-out text, and top-1 agreement.
Writes benchmarks/results/quant_accuracy_cpu.json.

The in-run schemes are what llm-compressor's calibration-free recipes produce (FP8_DYNAMIC; W8A8 without its
SmoothQuant step): per-channel weights, dynamic per-token activations, lm_head / embeddings left dense. Its W8A8
int8 recipe also smooths activations first (SmoothQuantModifier, smoothing_strength 0.8: q/k/v <- input_layernorm,
gate/up <- post_attention_layernorm); `*+smoothquant` applies that transform to the dense model with activation
maxima from CALIB (a text disjoint from the held-out TEXT), then the same in-run quantization and kernels.

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

# calibration text for SmoothQuant's activation maxima (never the held-out TEXT)
CALIB = (
    "The old railway station had been closed for twenty years before the town council decided to turn it into a "
    "library. Volunteers scraped the paint from the iron pillars, repaired the glass roof and built shelves along "
    "the platforms where passengers once waited. Children now read under the departure boards, which still show "
    "the last trains that left. A recipe for bread needs only flour, water, salt and yeast. Mix them, knead the "
    "dough for ten minutes, let it rise until it doubles, shape it, let it rise again and bake it in a hot oven "
    "until the crust is brown and the loaf sounds hollow when tapped. The French Revolution began in 1789 with the "
    "storming of the Bastille and ended a decade later when Napoleon seized power. It abolished feudal privileges, "
    "proclaimed the rights of man and reshaped the map of Europe. In Python, a dictionary maps keys to values; "
    "looking up a key takes constant time on average because the keys are stored in a hash table. "
    "def add(a, b):\n    return a + b\n\nprint(add(2, 3))\n"
    "User: What is the tallest mountain in Africa?\nAssistant: Mount Kilimanjaro in Tanzania, at about 5,895 metres. "
    "Glaciers carve valleys as they move, grinding rock beneath them and leaving moraines of gravel and boulders "
    "when they retreat. Volcanoes form where magma rises through the crust, at the edges of tectonic plates or over "
    "hot spots such as the one beneath Hawaii. The stock market fell sharply on Monday after the central bank raised "
    "interest rates by half a percentage point, its largest increase in two decades."
)


@torch.no_grad()
def smoothquant(model, calib_ids: list[int], alpha: float = 0.8) -> None:
    """SmoothQuant on a dense Llama-family model, in place: for each norm -> linear pair, s_j = max|x_j|^alpha /
    max|W_:,j|^(1 - alpha) over the calibration activations x; the norm's weight is divided by s and the linear's
    input columns multiplied by it (the product is unchanged; the activations' outlier channels shrink)."""
    pairs = [(layer.input_layernorm, layer.self_attn.qkv_proj) for layer in model.model.layers]
    pairs += [(layer.post_attention_layernorm, layer.mlp.gate_up_proj) for layer in model.model.layers]
    amax, hooks = {}, []
    for _, linear in pairs:
        def hook(mod, args):
            x = args[0].detach().float().reshape(-1, args[0].shape[-1]).abs().amax(0)
            amax[mod] = torch.maximum(amax[mod], x) if mod in amax else x
        hooks.append(linear.register_forward_pre_hook(hook))
    prefill_logits(model, calib_ids)
    for h in hooks:
        h.remove()
    for norm, linear in pairs:
        w = linear.weight.data.float()
        s = (amax[linear].clamp_min(1e-5).pow(alpha) / w.abs().amax(0).clamp_min(1e-5).pow(1 - alpha)).clamp_min(1e-5)
        norm.weight.data.copy_((norm.weight.data.float() / s).to(norm.weight.dtype))
        linear.weight.data.copy_((w * s).to(linear.weight.dtype))


def quantize_in_place(model, kind: str, platform) -> None:
    """The in-run method of `kind` ("fp8" / "w8a8") on an already loaded dense model's linears (LM head and
    embeddings stay dense, as in the in-run path)."""
    from pageport.models.layers import LinearBase
    from pageport.models.quantization.online import OnlineConfig

    config = OnlineConfig(kind)
    for prefix, module in model.named_modules():
        if isinstance(module, LinearBase):
            method = config.linear_method(prefix, module)
            method.ops = platform.ops
            method.process_weights(module)
            module.quant_method = method


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
    calib_ids = base.tokenizer(CALIB)["input_ids"]
    results["calibration_tokens"] = len(calib_ids)

    def smoothed(kind):
        model = load(None).model
        smoothquant(model, calib_ids, 0.8)
        quantize_in_place(model, kind, plat)
        return model

    schemes = {q: (lambda q=q: load(q).model) for q in ("fp8", "w8a8", "w4a16", "gguf")}
    schemes["w8a8+smoothquant"] = lambda: smoothed("w8a8")
    schemes["fp8+smoothquant"] = lambda: smoothed("fp8")
    for q, make in schemes.items():
        t0 = time.perf_counter()
        lp = prefill_logits(make(), ids).log_softmax(-1)
        kl = (ref.exp() * (ref - lp)).sum(-1)  # KL(bf16 || quantized) per token, then the mean
        results["schemes"][q] = {"kl_mean": kl.mean().item(), "kl_p95": kl.quantile(0.95).item(),
                                 "top1_agreement": (ref.argmax(-1) == lp.argmax(-1)).float().mean().item(),
                                 # the goal names FP8 and W8A8 only
                                 "goal_kl_le_0.01": kl.mean().item() <= 0.01 if q.startswith(("fp8", "w8a8")) else None,
                                 "seconds": round(time.perf_counter() - t0, 1)}
        print(q, results["schemes"][q])
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
