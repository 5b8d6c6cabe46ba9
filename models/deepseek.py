"""DeepSeek-V2 and DeepSeek-V3: multi-head latent attention (MLA) and routed + shared experts.

MLA: the KV of a token is one compressed latent c = RMSNorm(W_DKV x) [kv_lora_rank] plus a shared roped key part
k_pe [qk_rope_head_dim]; only [c | k_pe] goes into the paged cache (one vector per token and layer, no per-head K
or V). Attention runs on the latents with the up-projections absorbed: per head, q_lat = W_UK^T q_nope, scores =
q_lat . c + q_pe . k_pe, out = W_UV (softmax . c); `Platform.mla_attention_backend` does the paged part. Queries come
from a low-rank pair (q_a_proj, RMSNorm, q_b_proj; V2-Lite: one q_proj). The rope part is interleaved in pairs
(V2 always, V3 with `rope_interleave`): de-interleaved before the neox rotary. YaRN scaling multiplies the softmax
scale by mscale^2, as transformers does.

MoE (layers from `first_k_dense_replace` on): V2 softmax scores, greedy or group-limited top-k, no renormalisation;
V3 sigmoid scores with a score-correction bias, grouped top-k (groups by their two best), renormalised by
`norm_topk_prob`; both scaled by `routed_scaling_factor`, plus ungated shared experts.
"""
from __future__ import annotations

import math
from typing import Iterable

import torch
from torch import nn

from pageport.models.layers import (ColumnParallelLinear, ParallelLMHead, ReplicatedLinear, RMSNorm,
                                    RotaryEmbedding, RowParallelLinear, VocabParallelEmbedding, _divide, _param,
                                    default_dtype, default_weight_loader, get_tensor_parallel, rope_parameters)
from pageport.models.llama import LlamaForCausalLM, LlamaMLP
from pageport.models.moe import FusedMoE
from pageport.platforms import AttentionBackend, Platform

_LATENT_NORM_EPS = 1e-6  # q_a_layernorm / kv_a_layernorm use the default eps, not rms_norm_eps


def _yarn_mscale(scale: float, mscale: float) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def mla_softmax_scale(hf_config) -> float:
    qk_head_dim = hf_config.qk_nope_head_dim + hf_config.qk_rope_head_dim
    scale = qk_head_dim ** -0.5
    rope = rope_parameters(hf_config)
    if rope.get("rope_type", "default") != "default" and rope.get("mscale_all_dim"):
        scale *= _yarn_mscale(rope["factor"], rope["mscale_all_dim"]) ** 2
    return scale


def _deinterleave(x: torch.Tensor) -> torch.Tensor:
    """(x0, x1), (x2, x3), ... pairs -> x0 x2 ... | x1 x3 ...: the pair layout as neox halves."""
    return torch.cat((x[..., 0::2], x[..., 1::2]), dim=-1)


class AbsorbedProjection(nn.Module):
    """kv_b_proj's weight [heads * (nope + v), kv_lora_rank], this rank's heads: never applied as a linear, only
    folded into the query and the output. Not a linear layer, so quantization methods leave it dense."""

    def __init__(self, input_size: int, output_size: int):
        super().__init__()
        self.tp_rank, self.tp_size = get_tensor_parallel()
        self.weight = _param(_divide(output_size, self.tp_size, "kv_b_proj rows"), input_size,
                             loader=self.weight_loader)

    def weight_loader(self, param: nn.Parameter, w: torch.Tensor, shard_id=None) -> None:
        rows = param.shape[0]
        default_weight_loader(param, w.narrow(0, self.tp_rank * rows, rows) if self.tp_size > 1 else w)


class MLAAttention(nn.Module):
    def __init__(self, config, ops, rotary: RotaryEmbedding, attn: AttentionBackend):
        super().__init__()
        _, tp = get_tensor_parallel()
        h = config.hidden_size
        self.num_heads = _divide(config.num_attention_heads, tp, "number of attention heads")
        self.nope, self.rope = config.qk_nope_head_dim, config.qk_rope_head_dim
        self.v_dim, self.lora = config.v_head_dim, config.kv_lora_rank
        bias = bool(getattr(config, "attention_bias", False))
        total = config.num_attention_heads
        if config.q_lora_rank:
            self.q_a_proj = ReplicatedLinear(h, config.q_lora_rank, bias=bias)
            self.q_a_layernorm = RMSNorm(config.q_lora_rank, _LATENT_NORM_EPS, ops)
            self.q_b_proj = ColumnParallelLinear(config.q_lora_rank, total * (self.nope + self.rope))
        else:
            self.q_proj = ColumnParallelLinear(h, total * (self.nope + self.rope))
        self.kv_a_proj_with_mqa = ReplicatedLinear(h, self.lora + self.rope, bias=bias)
        self.kv_a_layernorm = RMSNorm(self.lora, _LATENT_NORM_EPS, ops)
        self.kv_b_proj = AbsorbedProjection(self.lora, total * (self.nope + self.v_dim))
        self.o_proj = RowParallelLinear(total * self.v_dim, h, bias=bias)
        self.interleaved = config.model_type == "deepseek_v2" or bool(getattr(config, "rope_interleave", False))
        self.rotary_emb, self.attn = rotary, attn

    def forward(self, positions, hidden, kv_cache, attn_metadata):
        t = hidden.shape[0]
        if hasattr(self, "q_a_proj"):
            q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(hidden)))
        else:
            q = self.q_proj(hidden)
        q_nope, q_pe = q.view(t, self.num_heads, self.nope + self.rope).split([self.nope, self.rope], dim=-1)
        latent, k_pe = self.kv_a_proj_with_mqa(hidden).split([self.lora, self.rope], dim=-1)
        latent = self.kv_a_layernorm(latent.contiguous())
        k_pe = k_pe.reshape(t, 1, self.rope)
        if self.interleaved:
            q_pe, k_pe = _deinterleave(q_pe), _deinterleave(k_pe)
        q_pe, k_pe = self.rotary_emb(positions, q_pe.contiguous(), k_pe.contiguous())
        # the up-projections absorbed: W_UK into the query, W_UV into the output
        w = self.kv_b_proj.weight.view(self.num_heads, self.nope + self.v_dim, self.lora)
        w_uk, w_uv = w[:, :self.nope], w[:, self.nope:]
        q_lat = torch.einsum("thn,hnl->thl", q_nope, w_uk)
        out = self.attn.forward(torch.cat((q_lat, q_pe), dim=-1), torch.cat((latent[:, None], k_pe), dim=-1),
                                None, kv_cache, attn_metadata)
        out = torch.einsum("thl,hvl->thv", out, w_uv)
        return self.o_proj(out.reshape(t, self.num_heads * self.v_dim))


class DeepseekMoE(nn.Module):
    def __init__(self, config, ops):
        super().__init__()
        v3 = config.model_type == "deepseek_v3"
        num_experts = config.n_routed_experts
        grouped = v3 or getattr(config, "topk_method", "greedy") == "group_limited_greedy"
        self.gate = ReplicatedLinear(config.hidden_size, num_experts)
        self.experts = FusedMoE(num_experts, config.num_experts_per_tok, config.hidden_size,
                                config.moe_intermediate_size, ops, scoring="sigmoid" if v3 else "softmax",
                                renormalize=v3 and bool(config.norm_topk_prob),
                                num_expert_group=config.n_group if grouped else None,
                                topk_group=config.topk_group if grouped else None,
                                routed_scaling_factor=float(config.routed_scaling_factor), correction_bias=v3,
                                activation=config.hidden_act)
        shared = config.n_shared_experts or 0
        self.shared_experts = LlamaMLP(config, ops, config.moe_intermediate_size * shared) if shared else None

    def forward(self, x):
        out = self.experts(x, self.gate(x))
        return out if self.shared_experts is None else out + self.shared_experts(x)


class DeepseekDecoderLayer(nn.Module):
    def __init__(self, config, ops, rotary, attn, layer_idx: int):
        super().__init__()
        self.self_attn = MLAAttention(config, ops, rotary, attn)
        moe = layer_idx >= config.first_k_dense_replace and config.n_routed_experts
        self.mlp = DeepseekMoE(config, ops) if moe else LlamaMLP(config, ops)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, ops)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, ops)

    def forward(self, positions, hidden, residual, kv_cache, attn_metadata):
        if residual is None:
            residual, hidden = hidden, self.input_layernorm(hidden)
        else:
            hidden, residual = self.input_layernorm(hidden, residual)
        hidden = self.self_attn(positions, hidden, kv_cache, attn_metadata)
        hidden, residual = self.post_attention_layernorm(hidden, residual)
        return self.mlp(hidden), residual


class DeepseekModel(nn.Module):
    def __init__(self, config, ops, backend: AttentionBackend):
        super().__init__()
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size)
        rotary = RotaryEmbedding(config, config.qk_rope_head_dim, config.max_position_embeddings, ops)
        self.layers = nn.ModuleList(DeepseekDecoderLayer(config, ops, rotary, backend, i)
                                    for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, ops)

    def forward(self, input_ids, positions, kv_caches, attn_metadata):
        hidden, residual = self.embed_tokens(input_ids), None
        for layer, kv_cache in zip(self.layers, kv_caches, strict=True):
            hidden, residual = layer(positions, hidden, residual, kv_cache, attn_metadata)
        hidden, _ = self.norm(hidden, residual)
        return hidden


class DeepseekForCausalLM(LlamaForCausalLM):
    """DeepSeek-V2 / V3; the engine interface of LlamaForCausalLM, with one latent "KV head" of
    kv_lora_rank + qk_rope_head_dim per token in the cache."""

    # only gate|up are fused here (q_proj is a plain projection of its own)
    stacked_params = (("gate_up_proj", "gate_proj", 0), ("gate_up_proj", "up_proj", 1))

    def __init__(self, hf_config, platform: Platform, dtype: torch.dtype):
        nn.Module.__init__(self)  # the attention layout differs from LlamaForCausalLM's from the start
        self.config, self.dtype = hf_config, dtype
        _, tp = get_tensor_parallel()
        self.num_layers = hf_config.num_hidden_layers
        self.num_heads = hf_config.num_attention_heads // tp
        self.num_kv_heads, self.head_size = 1, hf_config.kv_lora_rank + hf_config.qk_rope_head_dim
        self.sliding_windows = [None] * self.num_layers
        self.attn_backend = platform.mla_attention_backend(self.num_heads, hf_config.kv_lora_rank,
                                                           hf_config.qk_rope_head_dim, mla_softmax_scale(hf_config))
        self.attn_backends = [self.attn_backend] * self.num_layers
        self.tie_word_embeddings = bool(getattr(hf_config, "tie_word_embeddings", False))
        with torch.device(platform.device), default_dtype(dtype):
            self.model = DeepseekModel(hf_config, platform.ops, self.attn_backend)
        with torch.device("meta" if self.tie_word_embeddings else platform.device), default_dtype(dtype):
            self.lm_head = ParallelLMHead(hf_config.vocab_size, hf_config.hidden_size)
        if self.tie_word_embeddings:
            self.lm_head.tie(self.model.embed_tokens)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        # the router's score-correction bias lives with the experts here
        renamed = ((n.replace(".mlp.gate.e_score_correction_bias", ".mlp.experts.e_score_correction_bias"), w)
                   for n, w in weights)
        return super().load_weights(renamed)
