"""`pageport bench kv-memory` accounting on handmade cases, and `bench prefix-caching` on a tiny model."""
import json

import pytest
import torch

from pageport.entrypoints.bench_memory import RequestSpec, make_specs, run_prefix_caching, simulate
from pageport.entrypoints.cli import build_parser


def test_two_prefills_known_waste():
    # block size 4: a 6-token prompt holds 2 blocks (8 slots, 2 unused), a 3-token prompt 1 block (1 unused)
    specs = [RequestSpec(6, 1, 10), RequestSpec(3, 1, 13)]  # max_tokens: the rest of a 16-token context
    paged = simulate(specs, 40, block_size=4, allocator="paged", max_model_len=16)
    assert (paged.steps, paged.max_running, paged.peak_allocated, paged.peak_used) == (1, 2, 12, 9)
    assert paged.waste_at_peak == pytest.approx(3 / 12)
    assert paged.generated_tokens == 2 and paged.preemptions == 0

    contiguous = simulate(specs, 40, block_size=4, allocator="contiguous-max", max_model_len=16)
    assert (contiguous.peak_allocated, contiguous.peak_used) == (32, 9)  # 16 reserved each
    assert contiguous.waste_at_peak == pytest.approx(23 / 32)

    oracle = simulate(specs, 40, block_size=4, allocator="contiguous-oracle", max_model_len=16)
    assert (oracle.peak_allocated, oracle.peak_used) == (11, 9)  # prompt + the 1 output token each


def test_decode_growth_and_peak():
    # prompt 3, 4 output tokens, block size 4: after each step 3, 4, 5, 6 tokens are cached in 4, 4, 8, 8 slots;
    # the peak (8 slots) is first reached with 5 tokens: 3 of 8 slots unused
    res = simulate([RequestSpec(3, 4, 4)], 64, block_size=4, allocator="paged", max_model_len=16)
    assert res.steps == 4 and res.generated_tokens == 4
    assert (res.peak_allocated, res.peak_used) == (8, 5)
    assert res.waste_at_peak == pytest.approx(3 / 8)


def test_contiguous_admits_fewer_sequences():
    specs = [RequestSpec(8, 8, 56)] * 4  # each asks for the whole 64-token context
    paged = simulate(specs, 64, block_size=4, allocator="paged", max_model_len=64)
    contiguous = simulate(specs, 64, block_size=4, allocator="contiguous-max", max_model_len=64)
    assert paged.max_running == 4 and contiguous.max_running == 1
    assert contiguous.steps > paged.steps


def test_specs_are_seeded_and_bounded():
    a = make_specs("sharegpt-like", 200, 512, seed=3)
    assert a == make_specs("sharegpt-like", 200, 512, seed=3)
    assert all(s.prompt_len + s.max_tokens <= 512 and 1 <= s.output_len <= s.max_tokens for s in a)


def test_cli_writes_json(tmp_path):
    out = tmp_path / "kv.json"
    args = build_parser().parse_args(["bench", "kv-memory", "--num-prompts", "60", "--kv-tokens", "4096",
                                      "--max-model-len", "512", "--output-json", str(out)])
    assert args.func(args) == 0
    res = json.loads(out.read_text())
    paged, cont = res["results"]["paged"], res["results"]["contiguous-max"]
    assert paged["max_running"] > cont["max_running"] and 0 <= paged["waste_at_peak"] < cont["waste_at_peak"]


def test_prefix_caching_reports_hits(tmp_path):
    from transformers import LlamaConfig
    LlamaConfig(vocab_size=512, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=128,
                architectures=["LlamaForCausalLM"]).save_pretrained(tmp_path)
    from pageport.core.config import EngineConfig
    old = torch.get_num_threads()
    try:
        cfg = EngineConfig(model=str(tmp_path), load_format="dummy", dtype="float32", block_size=4,
                           num_gpu_blocks_override=64, num_threads=1)
        res = run_prefix_caching(cfg, num_prompts=4, prefix_len=16, suffix_len=3, output_len=2, repeats=1,
                                 log=lambda *_: None)
    finally:
        torch.set_num_threads(old)
    # 3 of the 4 requests find the 16-token prefix (4 full blocks) cached: 48 of 76 prompt tokens
    assert res["on"]["hit_rate"] == pytest.approx(48 / 76)
    assert res["off"]["hit_rate"] == 0
    assert res["outputs_identical"] == 4 and res["speedup"] > 0
