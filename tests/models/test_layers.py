"""Layer-level checks: rotary cache vs transformers, fused/sharded weight loaders, ops dispatch."""
import pytest
import torch
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

from pageport.kernels_cpu.platform import CpuPlatform
from pageport.models import layers
from pageport.models.layers import (MergedColumnParallelLinear, ParallelLMHead, QKVParallelLinear, RowParallelLinear,
                                    VocabParallelEmbedding, compute_cos_sin_cache, rope_parameters)
from pageport.models.llama import LlamaForCausalLM
from pageport.platforms import Ops

ROPES = {
    "default": None,
    "linear": {"rope_type": "linear", "factor": 2.0},
    "llama3": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 32},
    "yarn": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64},
}


@pytest.mark.parametrize("rope", list(ROPES))
def test_cos_sin_cache_matches_transformers(rope):
    cfg = LlamaConfig(hidden_size=128, num_attention_heads=2, max_position_embeddings=256, rope_theta=50000.0,
                      rope_scaling=ROPES[rope])
    cache = compute_cos_sin_cache(cfg, 64, 256)
    assert cache.shape == (256, 64) and cache.dtype == torch.float32
    pos = torch.arange(256)[None]
    cos, sin = LlamaRotaryEmbedding(cfg)(torch.zeros(1, dtype=torch.float32), pos)
    # HF's cos/sin repeat the 32 frequencies twice; ours stores each half once: cos | sin
    torch.testing.assert_close(cache[:, :32], cos[0, :, :32], rtol=0, atol=1e-6)
    torch.testing.assert_close(cache[:, 32:], sin[0, :, :32], rtol=0, atol=1e-6)
    assert rope_parameters(cfg)["rope_type"] == rope


def test_dynamic_rope_is_refused():
    cfg = LlamaConfig(hidden_size=128, num_attention_heads=2, rope_scaling={"rope_type": "dynamic", "factor": 2.0})
    with pytest.raises(NotImplementedError, match="dynamic"):
        compute_cos_sin_cache(cfg, 64, 16)


@pytest.fixture
def tp2_rank1():
    layers.set_tensor_parallel(1, 2)
    yield
    layers.set_tensor_parallel(0, 1)


def test_fused_loaders_world_size_1():
    qkv = QKVParallelLinear(8, head_size=2, total_num_heads=4, total_num_kv_heads=2, bias=True)
    q, k, v = torch.randn(8, 8), torch.randn(4, 8), torch.randn(4, 8)
    qb, kb, vb = torch.randn(8), torch.randn(4), torch.randn(4)
    for shard, w, b in (("q", q, qb), ("k", k, kb), ("v", v, vb)):
        qkv.weight.weight_loader(qkv.weight, w, shard)
        qkv.bias.weight_loader(qkv.bias, b, shard)
    assert torch.equal(qkv.weight, torch.cat([q, k, v])) and torch.equal(qkv.bias, torch.cat([qb, kb, vb]))
    x = torch.randn(3, 8)
    torch.testing.assert_close(qkv(x), torch.cat([x @ q.T + qb, x @ k.T + kb, x @ v.T + vb], -1))

    gu = MergedColumnParallelLinear(8, [6, 6])
    g, u = torch.randn(6, 8), torch.randn(6, 8)
    gu.weight.weight_loader(gu.weight, u, 1)
    gu.weight.weight_loader(gu.weight, g, 0)
    assert torch.equal(gu.weight, torch.cat([g, u]))
    with pytest.raises(ValueError, match="shape"):
        gu.weight.weight_loader(gu.weight, torch.randn(5, 8), 0)


def test_loaders_take_this_ranks_shard(tp2_rank1):
    """At tensor-parallel size 2, rank 1 keeps the second half of each part of the full HF tensor."""
    qkv = QKVParallelLinear(8, head_size=2, total_num_heads=4, total_num_kv_heads=2)
    assert (qkv.num_heads, qkv.num_kv_heads) == (2, 1) and qkv.weight.shape == (8, 8)
    q, k, v = torch.randn(8, 8), torch.randn(4, 8), torch.randn(4, 8)
    for shard, w in (("q", q), ("k", k), ("v", v)):
        qkv.weight.weight_loader(qkv.weight, w, shard)
    assert torch.equal(qkv.weight, torch.cat([q[4:], k[2:], v[2:]]))

    gu = MergedColumnParallelLinear(8, [6, 6])
    g, u = torch.randn(6, 8), torch.randn(6, 8)
    gu.weight.weight_loader(gu.weight, g, 0)
    gu.weight.weight_loader(gu.weight, u, 1)
    assert torch.equal(gu.weight, torch.cat([g[3:], u[3:]]))

    row = RowParallelLinear(8, 4, bias=True)
    w, b = torch.randn(4, 8), torch.randn(4)
    row.weight.weight_loader(row.weight, w)
    row.bias.weight_loader(row.bias, b)
    assert torch.equal(row.weight, w[:, 4:]) and torch.equal(row.bias, b)  # bias whole, added on rank 0 only

    emb = VocabParallelEmbedding(10, 4)
    e = torch.randn(10, 4)
    emb.weight.weight_loader(emb.weight, e)
    assert torch.equal(emb.weight, e[5:])
    head = ParallelLMHead(10, 4)
    head.weight.weight_loader(head.weight, e)
    assert torch.equal(head.weight, e[5:])


class CountingOps(Ops):
    def __init__(self):
        self.calls = {"rms_norm": 0, "rotary": 0, "silu_and_mul": 0}

    def rms_norm(self, *a, **k):
        self.calls["rms_norm"] += 1
        return super().rms_norm(*a, **k)

    def rotary(self, *a, **k):
        self.calls["rotary"] += 1
        return super().rotary(*a, **k)

    def silu_and_mul(self, *a, **k):
        self.calls["silu_and_mul"] += 1
        return super().silu_and_mul(*a, **k)


def test_model_uses_the_platforms_ops():
    from .helpers import PagedRunner

    class Plat(CpuPlatform):
        ops = CountingOps()

    cfg = LlamaConfig(vocab_size=32, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32,
                      architectures=["LlamaForCausalLM"])
    model = LlamaForCausalLM(cfg, Plat(), torch.float32)
    from pageport.models.loader import init_dummy_weights
    init_dummy_weights(model, 0)
    PagedRunner(model).step([("a", [1, 2, 3])])
    # 2 norms per layer + the final one; one rotary and one silu_and_mul per layer
    assert Plat.ops.calls == {"rms_norm": 7, "rotary": 3, "silu_and_mul": 3}


def test_missing_weights_are_an_error():
    cfg = LlamaConfig(vocab_size=32, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32)
    model = LlamaForCausalLM(cfg, CpuPlatform(), torch.float32)
    with pytest.raises(ValueError, match=r"qkv_proj.weight \(has \['q'\]\)"):
        model.load_weights([("model.layers.0.self_attn.q_proj.weight", torch.zeros(32, 32))])
