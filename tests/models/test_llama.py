"""Every built-in architecture vs transformers on tiny random models (float32): the Llama family, Phi-3, the MoE
members, Gemma 2/3 and DeepSeek-V2/V3.

Each case is built with transformers' own config class, saved with save_pretrained (safetensors;
one case sharded so the index path runs), loaded by our loader on the CPU platform and run
through paged attention: one prompt in one step, and a ragged batch with a chunked prefill and decodes.
"""
import pytest
import torch
from transformers import (AutoModelForCausalLM, DeepseekV2Config, DeepseekV3Config, Gemma2Config, Gemma3TextConfig,
                          LlamaConfig, MistralConfig, MixtralConfig, Phi3Config, Qwen2Config, Qwen2MoeConfig,
                          Qwen3Config, Qwen3MoeConfig)

from pageport.core.config import EngineConfig
from pageport.models import load_model
from pageport.models.deepseek import DeepseekMoE
from pageport.models.llama import SparseMoeBlock

from .helpers import PagedRunner

# float32 on both sides; only the summation order differs (paged SDPA vs eager, fused qkv/gate_up).
# Logits are O(1) here (std ~0.8, max ~3), so 1e-4 absolute is ~1e-4 relative.
ATOL = 1e-4

COMMON = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-5)
LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 16}
YARN_ROPE = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16}
MLA = dict(COMMON, num_key_value_heads=4, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=12,
           moe_intermediate_size=16, n_shared_experts=1, num_experts_per_tok=2, first_k_dense_replace=1)
DEEPSEEK_YARN = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16, "mscale": 1.0,
                 "mscale_all_dim": 1.0, "beta_fast": 32, "beta_slow": 1}

CASES = {
    "llama": lambda: LlamaConfig(**COMMON),
    # llama3 rope scaling, plus attention and MLP biases (o_proj and down_proj get one too)
    "llama3-rope-bias": lambda: LlamaConfig(**COMMON, rope_scaling=LLAMA3_ROPE, rope_theta=500000.0,
                                            attention_bias=True, mlp_bias=True),
    # window 5 < prompt lengths: the window changes every row after the 5th
    "mistral-sliding": lambda: MistralConfig(**COMMON, sliding_window=5),
    "qwen2-bias": lambda: Qwen2Config(**COMMON),
    "qwen2-yarn": lambda: Qwen2Config(**COMMON, rope_scaling=YARN_ROPE),
    # explicit head_dim (32) != hidden / heads (16); per-head q/k norms
    "qwen3": lambda: Qwen3Config(**COMMON, head_dim=32),
    # layer 0 full attention, layer 1 a window of 4 (layer_types): one backend per distinct window
    "qwen2-mixed-window": lambda: Qwen2Config(**COMMON, use_sliding_window=True, sliding_window=4, max_window_layers=1),
    "smollm-tied-sharded": lambda: LlamaConfig(**COMMON, tie_word_embeddings=True),
    # checkpoint with q|k|v and gate|up already fused
    "phi3": lambda: Phi3Config(**COMMON, pad_token_id=0),
    # MoE: 4 experts, top-2; Mixtral renormalises over the chosen two
    "mixtral": lambda: MixtralConfig(**COMMON, num_local_experts=4, num_experts_per_tok=2),
    # layer 0 a dense MLP (mlp_only_layers), layer 1 routed experts + the gated shared expert; no renormalisation
    "qwen2-moe": lambda: Qwen2MoeConfig(**COMMON, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                                        shared_expert_intermediate_size=48, mlp_only_layers=[0]),
    "qwen3-moe": lambda: Qwen3MoeConfig(**COMMON, head_dim=32, num_experts=4, num_experts_per_tok=2,
                                        moe_intermediate_size=32, norm_topk_prob=True),
    # Gemma 2: alternating window / global layers, query scale 24^-1/2 (not head_dim's), small caps so that
    # the attention and final soft-capping both change the result
    "gemma2-softcap": lambda: Gemma2Config(**COMMON, head_dim=16, sliding_window=5, query_pre_attn_scalar=24,
                                           attn_logit_softcapping=2.0, final_logit_softcapping=3.0),
    # Gemma 3: q/k norms, a local layer (theta 10k) and a global one (theta 1M, linear scaling x8)
    "gemma3": lambda: Gemma3TextConfig(**COMMON, head_dim=16, sliding_window=5, query_pre_attn_scalar=24,
                                       layer_types=["sliding_attention", "full_attention"],
                                       rope_parameters={"sliding_attention": {"rope_type": "default",
                                                                              "rope_theta": 10000.0},
                                                        "full_attention": {"rope_type": "linear", "factor": 8.0,
                                                                           "rope_theta": 1000000.0}}),
    # DeepSeek MLA (latent 16 + rope 8 in the cache; nope 8, v 12 per head); layer 0 dense, layer 1 routed + shared
    # V2-Lite style: one q_proj, softmax greedy top-2, scaled; rope interleaved in pairs
    "deepseek-v2-lite": lambda: DeepseekV2Config(**MLA, q_lora_rank=None, n_routed_experts=4, topk_method="greedy",
                                                 routed_scaling_factor=1.5),
    "deepseek-v2-grouped": lambda: DeepseekV2Config(**MLA, q_lora_rank=24, n_routed_experts=8, n_group=4, topk_group=2,
                                                    topk_method="group_limited_greedy"),
    # V3: sigmoid scores + correction bias, 2 of 4 groups, renormalised, x2.5; interleaved rope
    "deepseek-v3": lambda: DeepseekV3Config(**MLA, q_lora_rank=24, n_routed_experts=8, n_group=4, topk_group=2,
                                            routed_scaling_factor=2.5, norm_topk_prob=True),
    # V3 with neox rope and YaRN (the softmax scale gains mscale^2)
    "deepseek-v3-yarn": lambda: DeepseekV3Config(**MLA, q_lora_rank=24, n_routed_experts=8, n_group=4, topk_group=2,
                                                 rope_interleave=False, rope_scaling=DEEPSEEK_YARN),
}
# which layers of each MoE case have routed experts
MOE_LAYERS = {"mixtral": [0, 1], "qwen2-moe": [1], "qwen3-moe": [0, 1], "deepseek-v2-lite": [1],
              "deepseek-v2-grouped": [1], "deepseek-v3": [1], "deepseek-v3-yarn": [1]}


def _perturb(model, seed=0):
    """Random values everywhere (transformers inits biases at 0 and norms at 1, which would hide loading bugs)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5, generator=g)
            else:
                p.normal_(0.0, 0.1, generator=g)
        for name, b in model.named_buffers():
            if "e_score_correction_bias" in name:  # DeepSeek-V3's router bias is a buffer
                b.normal_(0.0, 0.1, generator=g)


@pytest.fixture(scope="module", params=list(CASES))
def case(request, tmp_path_factory, cpu_platform):
    name = request.param
    hf_config = CASES[name]()
    torch.manual_seed(0)
    hf = AutoModelForCausalLM.from_config(hf_config, attn_implementation="eager").eval()
    _perturb(hf)
    folder = tmp_path_factory.mktemp(name)
    sharded = "sharded" in name
    hf.save_pretrained(folder, max_shard_size="20KB" if sharded else "1GB")
    assert (folder / "model.safetensors.index.json").is_file() == sharded
    cfg = EngineConfig(model=str(folder), dtype=torch.float32)
    loaded = load_model(cfg, cpu_platform)
    assert loaded.load_format == "safetensors" and loaded.tokenizer is None
    assert cfg.max_model_len == 64
    return name, hf, loaded.model


def _ref_logits(hf, ids):
    with torch.no_grad():
        return hf(torch.tensor([ids])).logits[0].float()


def test_one_prompt_matches_transformers(case):
    name, hf, model = case
    ids = torch.randint(0, 128, (24,), generator=torch.Generator().manual_seed(1)).tolist()
    ref = _ref_logits(hf, ids)
    (ours,) = PagedRunner(model).step([("a", ids)])
    assert ours.dtype == torch.float32 and ours.shape == ref.shape
    assert ref.std() > 0.3  # the comparison means something
    diff = (ours - ref).abs().max().item()
    assert diff <= ATOL, f"{name}: max |logit diff| {diff:.2e} > {ATOL}"
    assert torch.equal(ours.argmax(-1), ref.argmax(-1))


def test_ragged_batch_chunked_prefill_and_decode(case):
    """Step 1: A's first chunk + all of B. Step 2: A's second chunk (attends to chunk 1 through the
    block table) + B's first decode + all of C. Step 3: decodes of B and C. Every row vs transformers."""
    name, hf, model = case
    g = torch.Generator().manual_seed(2)
    a, b, c = (torch.randint(0, 128, (n,), generator=g).tolist() for n in (24, 11, 18))
    runner = PagedRunner(model, block_size=4)
    a1, b1 = runner.step([("A", a[:10]), ("B", b[:9])])
    a2, b2, c1 = runner.step([("A", a[10:]), ("B", b[9:10]), ("C", c[:17])])
    b3, c2 = runner.step([("B", b[10:]), ("C", c[17:])])

    blocks = runner.tables["A"]
    assert any(y != x + 1 for x, y in zip(blocks, blocks[1:])), "A's blocks should be scattered"

    for label, ours, ref in [("A", torch.cat([a1, a2]), _ref_logits(hf, a)),
                             ("B", torch.cat([b1, b2, b3]), _ref_logits(hf, b)),
                             ("C", torch.cat([c1, c2]), _ref_logits(hf, c))]:
        diff = (ours - ref).abs().max().item()
        assert diff <= ATOL, f"{name} seq {label}: max |logit diff| {diff:.2e} > {ATOL}"


def test_interface(case):
    name, hf, model = case
    mla = name.startswith("deepseek")
    assert model.num_layers == 2 and model.num_kv_heads == (1 if mla else 2)
    # MLA: one cached latent of kv_lora_rank + qk_rope_head_dim a token
    assert model.head_size == (32 if name in ("qwen3", "qwen3-moe") else 24 if mla else 16)
    if mla:  # one vector per token and layer, no separate K and V
        assert model.attn_backend.kv_cache_shape(7, 4, 1, 24) == (7, 4, 1, 24)
    windows = {"mistral-sliding": [5, 5], "qwen2-mixed-window": [None, 4], "gemma2-softcap": [5, None],
               "gemma3": [5, None]}.get(name, [None, None])
    assert [b.sliding_window for b in model.attn_backends] == windows
    assert model.attn_backend is model.attn_backends[0]
    if windows[0] == windows[1]:
        assert model.attn_backends[0] is model.attn_backends[1]  # one backend shared by all layers
    if name.startswith("gemma"):
        assert model.attn_backend.scale == 24 ** -0.5
        assert model.attn_backend.softcap == (2.0 if name == "gemma2-softcap" else None)
    if "tied" in name or name.startswith("gemma"):
        assert model.lm_head.weight is model.model.embed_tokens.weight
    moe = [i for i, layer in enumerate(model.model.layers) if isinstance(layer.mlp, (SparseMoeBlock, DeepseekMoE))]
    assert moe == MOE_LAYERS.get(name, [])
