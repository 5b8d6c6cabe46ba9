"""MoE GGUF files (Mixtral, Qwen2-MoE, Qwen3-MoE): tiny random models written with the gguf package's GGUFWriter in
the layout llama.cpp's convert_hf_to_gguf.py produces (tensor names from the gguf package's own name map, q/k rope
permutation for arch "llama", experts stacked per layer as ffn_{gate,up,down}_exps [experts, rows, cols], the
router as ffn_gate_inp, Qwen2-MoE's shared expert as ffn_*_shexp with a 1-D ffn_gate_inp_shexp, expert sizes in
{arch}.expert_feed_forward_length / expert_shared_feed_forward_length), float32 tensors.

References, float32, logits within 1e-4 absolute (they are O(1): std ~0.8):
- Qwen2-MoE / Qwen3-MoE: Transformers loading the same GGUF file. Its GGUF loader takes the expert sizes from its
  config defaults (1408 / 5632 for Qwen2-MoE, 768 for Qwen3-MoE) rather than from the file, so these models use
  those sizes.
- Mixtral, and a Qwen2-MoE with other expert sizes: Transformers on the model the file was written from (its GGUF
  loader reads a Mixtral file, arch "llama", as a dense Llama and drops the experts).
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, MixtralConfig, Qwen2MoeConfig, Qwen3MoeConfig

from pageport.core.config import EngineConfig
from pageport.models import load_model

from .helpers import PagedRunner
from .test_llama import _perturb

gguf = pytest.importorskip("gguf")

ATOL = 1e-4
COMMON = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-5)
CASES = {  # name: (config, GGUF arch, reference)
    "mixtral": (lambda: MixtralConfig(**COMMON, num_local_experts=4, num_experts_per_tok=2), "llama", "source"),
    "qwen2-moe": (lambda: Qwen2MoeConfig(**COMMON, num_experts=4, num_experts_per_tok=2), "qwen2moe", "gguf"),
    "qwen2-moe-small": (lambda: Qwen2MoeConfig(**COMMON, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                                               shared_expert_intermediate_size=48), "qwen2moe", "source"),
    "qwen3-moe": (lambda: Qwen3MoeConfig(**COMMON, head_dim=32, num_experts=4, num_experts_per_tok=2,
                                         norm_topk_prob=True), "qwen3moe", "gguf"),
}


def _permute(w: np.ndarray, n_head: int, n_head_kv: int) -> np.ndarray:
    """convert_hf_to_gguf.py's LlamaModel.permute (q and k of arch "llama")."""
    if n_head != n_head_kv:
        n_head = n_head_kv
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_gguf(hf, path, arch: str) -> None:
    cfg = hf.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    n_experts = getattr(cfg, "num_local_experts", None) or cfg.num_experts
    w = gguf.GGUFWriter(str(path), arch)
    w.add_name("tiny-moe")
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
    w.add_rope_dimension_count(head_dim)
    if arch == "qwen3moe":
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)
    w.add_vocab_size(cfg.vocab_size)
    w.add_expert_count(n_experts)
    w.add_expert_used_count(cfg.num_experts_per_tok)
    if arch != "llama":
        w.add_expert_feed_forward_length(cfg.moe_intermediate_size)
    if arch == "qwen2moe":
        w.add_expert_shared_feed_forward_length(cfg.shared_expert_intermediate_size)
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    # a placeholder byte-level vocabulary (the loader builds a tokenizer from it; the test feeds token ids)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list([f"t{i}" for i in range(cfg.vocab_size)])
    w.add_token_types([gguf.TokenType.NORMAL] * cfg.vocab_size)
    w.add_token_scores([0.0] * cfg.vocab_size)
    w.add_token_merges([])
    w.add_bos_token_id(0)
    w.add_eos_token_id(1)
    model_arch = {"llama": gguf.MODEL_ARCH.LLAMA, "qwen2moe": gguf.MODEL_ARCH.QWEN2MOE,
                  "qwen3moe": gguf.MODEL_ARCH.QWEN3MOE}[arch]
    names = gguf.get_tensor_name_map(model_arch, cfg.num_hidden_layers)
    for key, t in hf.state_dict().items():
        if key == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        v = t.detach().float().numpy()
        base, suffix = key.rsplit(".", 1)
        # transformers holds the experts stacked as experts.gate_up_proj [E, 2I, H] (gate rows first) and
        # experts.down_proj [E, H, I]; the converter stacks a checkpoint's per-expert matrices the same way into
        # ffn_gate_exps / ffn_up_exps [E, I, H] and ffn_down_exps [E, H, I]
        if suffix == "gate_up_proj":
            half = v.shape[1] // 2
            w.add_tensor(names.get_name(f"{base}.gate_proj") + ".weight", np.ascontiguousarray(v[:, :half]))
            w.add_tensor(names.get_name(f"{base}.up_proj") + ".weight", np.ascontiguousarray(v[:, half:]))
            continue
        if suffix == "down_proj":
            w.add_tensor(names.get_name(f"{base}.down_proj") + ".weight", np.ascontiguousarray(v))
            continue
        name = names.get_name(base)
        assert name is not None, key
        if arch == "llama" and name.endswith(".attn_q"):
            v = _permute(v, cfg.num_attention_heads, cfg.num_attention_heads)
        elif arch == "llama" and name.endswith(".attn_k"):
            v = _permute(v, cfg.num_attention_heads, cfg.num_key_value_heads)
        elif name.endswith(".ffn_gate_inp_shexp"):
            v = v.reshape(-1)
        w.add_tensor(f"{name}.{suffix}", np.ascontiguousarray(v))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.mark.parametrize("name", list(CASES))
def test_moe_gguf_matches_transformers(name, tmp_path, monkeypatch, cpu_platform):
    make_config, arch, reference = CASES[name]
    monkeypatch.setenv("PAGEPORT_CACHE_DIR", str(tmp_path / "cache"))
    torch.manual_seed(0)
    source = AutoModelForCausalLM.from_config(make_config(), attn_implementation="eager").eval()
    _perturb(source)
    path = tmp_path / "model.gguf"
    write_gguf(source, path, arch)
    names = {t.name for t in gguf.GGUFReader(path).tensors}
    assert {"blk.1.ffn_gate_inp.weight", "blk.1.ffn_gate_exps.weight", "blk.1.ffn_down_exps.weight"} <= names
    assert ("blk.1.ffn_gate_inp_shexp.weight" in names) == arch.startswith("qwen2")
    if reference == "gguf":
        ref_model = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=path.name, dtype=torch.float32,
                                                         attn_implementation="eager").eval()
    else:
        ref_model = source
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 128, (24,), generator=g).tolist()
    with torch.no_grad():
        ref = ref_model(torch.tensor([ids])).logits[0].float()
    assert ref.std() > 0.3  # the comparison means something
    for attempt in ("converted", "cached"):  # the second load reads the config from the GGUF cache
        loaded = load_model(EngineConfig(model=str(path), dtype=torch.float32), cpu_platform)
        assert loaded.load_format == "gguf" and loaded.hf_config.model_type == source.config.model_type, attempt
        runner = PagedRunner(loaded.model, block_size=4)
        first, second = runner.step([("a", ids[:17])])[0], runner.step([("a", ids[17:])])[0]  # prefill, then decode
        diff = (torch.cat([first, second]) - ref).abs().max().item()
        assert diff <= ATOL, f"{name} ({attempt}): max |logit diff| {diff:.2e} > {ATOL}"
