"""benchmarks/moe_gpu.py on the CPU: its shapes are valid transformers configs of architectures pageport serves,
and the Transformers experts module it times holds the same weights the same way as our per-expert loop."""
from __future__ import annotations

import pytest
import torch

from pageport.models.moe import select_experts
from pageport.models.registry import get_model_class
from pageport.platforms.ops import Ops
from tests.conftest import load_benchmark_script


def test_imports_and_parses():
    bench = load_benchmark_script("moe_gpu")
    args = bench.parse_args(["--out", "x.json", "--num-layers", "4"])
    assert (args.shape, args.num_layers, args.tokens[0], args.tokens[-1]) == ("qwen3-30b-a3b", 4, 1, 4096)
    assert bench._dims(bench.SHAPES["qwen3-30b-a3b"]) == (2048, 768, 128, 8)
    assert bench._dims(bench.SHAPES["mixtral-8x7b"]) == (4096, 14336, 8, 2)


@pytest.mark.parametrize("shape", ["qwen3-30b-a3b", "mixtral-8x7b"])
def test_hf_experts_match_the_loop(shape):
    bench = load_benchmark_script("moe_gpu")
    cfg = dict(bench.SHAPES[shape], hidden_size=32, intermediate_size=48, num_hidden_layers=1)
    if "moe_intermediate_size" in cfg:
        cfg["moe_intermediate_size"] = 16
    assert get_model_class(cfg["architectures"]).__name__ == "LlamaForCausalLM"
    h, i, e, k = bench._dims(cfg)
    g = torch.Generator().manual_seed(0)
    w13, w2 = torch.randn(e, 2 * i, h, generator=g), torch.randn(e, h, i, generator=g)
    hf = bench._hf_experts(cfg, w13, w2)
    x = torch.randn(7, h, generator=g)
    weights, ids = select_experts(torch.randn(7, e, generator=g), k)
    with torch.no_grad():
        ref = Ops().fused_moe(x, w13, w2, weights, ids)
        assert (hf(x, ids, weights) - ref).abs().max().item() <= 1e-4 * ref.abs().max().item()
