"""Gemma 2 and Gemma 3 (text): the Llama layout with Gemma's differences, read from the config.

- RMSNorm scales by (1 + w): the parameter holds 1 + w (added when the checkpoint's w is loaded), so the
  platform's plain `rms_norm` runs it.
- Four norms a layer: after attention and around the MLP (pre- and post-feedforward), each branch normed
  before it joins the residual.
- Embeddings scaled by sqrt(hidden_size); a GELU-tanh gated MLP; queries scaled by query_pre_attn_scalar^-1/2
  instead of head_dim^-1/2.
- Sliding-window and global layers as `layer_types` says (Gemma 2: alternating; Gemma 3: five local to one
  global); Gemma 3 gives each layer type its own RoPE (local theta 10k, global 1M, maybe linearly scaled) and
  per-head q/k norms.
- Gemma 2 soft-caps the attention scores (`attn_logit_softcapping`, the attention backend's concern) and the
  final logits (`final_logit_softcapping`).
"""
from __future__ import annotations

import torch
from torch import nn

from pageport.models.layers import RMSNorm, RotaryEmbedding, VocabParallelEmbedding, default_weight_loader
from pageport.models.llama import LlamaAttention, LlamaForCausalLM, LlamaMLP, _head_dim, pre_attention
from pageport.platforms import AttentionBackend, Platform


def _load_one_plus(param: nn.Parameter, w: torch.Tensor, shard_id=None) -> None:
    default_weight_loader(param, w.float() + 1.0)


class GemmaRMSNorm(RMSNorm):
    """x / rms(x) * (1 + w), with 1 + w stored (a fresh norm, or dummy weights at 1, is the identity scale)."""

    def __init__(self, hidden_size: int, eps: float = 1e-6, ops=None):
        super().__init__(hidden_size, eps, ops)
        self.weight.weight_loader = _load_one_plus


class GemmaAttention(LlamaAttention):
    def __init__(self, config, ops, rotary_emb, attn):
        super().__init__(config, ops, rotary_emb, attn)
        self.qk_norm = config.model_type in ("gemma3", "gemma3_text")
        if self.qk_norm:
            self.q_norm = GemmaRMSNorm(self.head_dim, config.rms_norm_eps, ops)
            self.k_norm = GemmaRMSNorm(self.head_dim, config.rms_norm_eps, ops)


class GemmaDecoderLayer(nn.Module):
    def __init__(self, config, ops, rotary_emb, attn):
        super().__init__()
        self.self_attn = GemmaAttention(config, ops, rotary_emb, attn)
        self.mlp = LlamaMLP(config, ops)
        h, eps = config.hidden_size, config.rms_norm_eps
        self.input_layernorm = GemmaRMSNorm(h, eps, ops)
        self.post_attention_layernorm = GemmaRMSNorm(h, eps, ops)
        self.pre_feedforward_layernorm = GemmaRMSNorm(h, eps, ops)
        self.post_feedforward_layernorm = GemmaRMSNorm(h, eps, ops)

    def forward(self, positions, hidden, residual, kv_cache, attn_metadata, pre, post):
        q, k, v, residual = pre(self, positions, hidden, residual)
        out = self.self_attn.attn.forward(q, k, v, kv_cache, attn_metadata)
        return post(self, out, residual)


def post_attention(layer: GemmaDecoderLayer, attn_out, residual):
    """Output projection and its norm, residual add, pre-feedforward norm, MLP, post-feedforward norm; the MLP
    branch joins the residual in the next layer's input norm (or the final norm)."""
    a = layer.self_attn
    hidden = layer.post_attention_layernorm(a.o_proj(attn_out.reshape(-1, a.num_heads * a.head_dim)))
    hidden, residual = layer.pre_feedforward_layernorm(hidden, residual)
    return layer.post_feedforward_layernorm(layer.mlp(hidden)), residual


class GemmaModel(nn.Module):
    def __init__(self, config, ops, backends: list[AttentionBackend], platform: Platform):
        super().__init__()
        head_dim = _head_dim(config)
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size)
        # transformers rounds the scale to the weights' dtype (sqrt(640) -> 25.25 in bfloat16): so do we
        self.register_buffer("normalizer", torch.tensor(config.hidden_size ** 0.5), persistent=False)
        types = list(getattr(config, "layer_types", None) or ["full_attention"] * config.num_hidden_layers)
        # one rotary table per layer type (Gemma 3's local and global RoPE; one shared table for Gemma 2)
        rotary = {t: RotaryEmbedding(config, head_dim, config.max_position_embeddings, ops, layer_type=t)
                  for t in dict.fromkeys(types)}
        self.rotary = nn.ModuleDict(rotary)
        self.layers = nn.ModuleList(GemmaDecoderLayer(config, ops, rotary[types[i]], backends[i])
                                    for i in range(config.num_hidden_layers))
        self.pre, self.post = platform.compile(pre_attention), platform.compile(post_attention)
        self.norm = GemmaRMSNorm(config.hidden_size, config.rms_norm_eps, ops)

    def forward(self, input_ids, positions, kv_caches, attn_metadata):
        embeds = self.embed_tokens(input_ids)
        hidden, residual = embeds * self.normalizer.to(embeds.dtype), None
        for layer, kv_cache in zip(self.layers, kv_caches, strict=True):
            hidden, residual = layer(positions, hidden, residual, kv_cache, attn_metadata, self.pre, self.post)
        hidden, _ = self.norm(hidden, residual)
        return hidden


class GemmaForCausalLM(LlamaForCausalLM):
    """Gemma 2 / Gemma 3 text models; the engine interface of LlamaForCausalLM."""

    model_cls = GemmaModel

    def __init__(self, hf_config, platform: Platform, dtype: torch.dtype):
        super().__init__(hf_config, platform, dtype)
        self.final_softcap = getattr(hf_config, "final_logit_softcapping", None)

    def attention_scale(self, hf_config) -> float:
        return float(getattr(hf_config, "query_pre_attn_scalar", None) or self.head_size) ** -0.5

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.lm_head(hidden).float()
        if self.final_softcap:
            logits = torch.tanh(logits / self.final_softcap) * self.final_softcap
        return logits
