"""The Llama family in one implementation: Llama 2/3, Mistral, Qwen2, Qwen3, SmolLM, Phi-3, and the
Mixture-of-Experts members Mixtral, Qwen2-MoE, Qwen3-MoE.

Differences are read from the config: qkv bias (Qwen2, `attention_bias`), per-head q/k RMSNorm
(Qwen3), explicit `head_dim`, sliding window (Mistral; per-layer `layer_types` in Qwen),
tied embeddings (SmolLM, small Qwen), RoPE scaling (llama3, yarn, linear via transformers),
checkpoints with q|k|v and gate|up already fused (Phi-3), routed experts in place of the MLP (Mixtral:
every layer; Qwen-MoE: the layers `decoder_sparse_step` / `mlp_only_layers` pick, with a gated shared expert
in Qwen2-MoE).
"""
from __future__ import annotations

import logging
from typing import Iterable, Optional

import torch
from torch import nn

from pageport.models.layers import (MergedColumnParallelLinear, ParallelLMHead, QKVParallelLinear, ReplicatedLinear,
                                    RMSNorm, RotaryEmbedding, RowParallelLinear, VocabParallelEmbedding,
                                    default_dtype, get_pipeline_parallel, get_tensor_parallel, stage_layers)
from pageport.models.moe import FusedMoE
from pageport.platforms import AttentionBackend, AttentionMetadata, Platform
from pageport.platforms.ops import Ops

logger = logging.getLogger(__name__)


def _head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def _layer_windows(config) -> list[Optional[int]]:
    """Sliding window of each layer (None = full attention)."""
    window = getattr(config, "sliding_window", None)
    types = getattr(config, "layer_types", None)
    n = config.num_hidden_layers
    if not window:
        return [None] * n
    if types is None:  # Mistral: every layer slides
        return [window] * n
    return [window if t == "sliding_attention" else None for t in types]


# Qwen2 and the Qwen2 decoders of Qwen2-VL / Qwen2.5-VL (their text configs' types; older files: flat configs)
_QKV_BIAS_TYPES = ("qwen2", "qwen2_moe", "qwen2_vl", "qwen2_vl_text", "qwen2_5_vl", "qwen2_5_vl_text")


class LlamaAttention(nn.Module):
    def __init__(self, config, ops: Ops, rotary_emb: RotaryEmbedding, attn: AttentionBackend):
        super().__init__()
        _, tp = get_tensor_parallel()
        self.head_dim = _head_dim(config)
        qkv_bias = bool(getattr(config, "attention_bias", False)) or config.model_type in _QKV_BIAS_TYPES
        o_bias = bool(getattr(config, "attention_bias", False))
        self.qkv_proj = QKVParallelLinear(config.hidden_size, self.head_dim, config.num_attention_heads,
                                          config.num_key_value_heads, bias=qkv_bias)
        self.num_heads, self.num_kv_heads = self.qkv_proj.num_heads, self.qkv_proj.num_kv_heads
        self.q_size, self.kv_size = self.qkv_proj.q_size, self.qkv_proj.kv_size
        self.o_proj = RowParallelLinear(config.num_attention_heads * self.head_dim, config.hidden_size, bias=o_bias)
        self.qk_norm = config.model_type in ("qwen3", "qwen3_moe")
        if self.qk_norm:
            self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps, ops)
            self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps, ops)
        self.rotary_emb = rotary_emb  # shared by all layers
        self.attn = attn

    def qkv(self, positions, hidden):
        """q [T, Hq, D], k, v [T, Hkv, D] of the normed hidden states, rotary applied."""
        q, k, v = self.qkv_proj(hidden).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.reshape(-1, self.num_heads, self.head_dim)
        k = k.reshape(-1, self.num_kv_heads, self.head_dim)
        v = v.reshape(-1, self.num_kv_heads, self.head_dim).contiguous()
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = self.rotary_emb(positions, q, k)
        return q, k, v


# gated activations: config name -> the `Ops` method applying it to gate | up
_GATED_ACTIVATIONS = {"silu": "silu_and_mul", "gelu_pytorch_tanh": "gelu_tanh_and_mul"}


class LlamaMLP(nn.Module):
    def __init__(self, config, ops: Ops, intermediate_size: Optional[int] = None):
        super().__init__()
        act = getattr(config, "hidden_activation", None) or config.hidden_act  # Gemma names it hidden_activation
        if act not in _GATED_ACTIVATIONS:
            raise ValueError(f"unsupported activation {act!r}; supported: {', '.join(_GATED_ACTIVATIONS)}")
        bias = bool(getattr(config, "mlp_bias", False))
        inter = intermediate_size or config.intermediate_size
        self.gate_up_proj = MergedColumnParallelLinear(config.hidden_size, [inter] * 2, bias=bias)
        self.down_proj = RowParallelLinear(inter, config.hidden_size, bias=bias)
        self.act_and_mul = getattr(ops, _GATED_ACTIVATIONS[act])

    def forward(self, x):
        return self.down_proj(self.act_and_mul(self.gate_up_proj(x)))


class SparseMoeBlock(nn.Module):
    """Router + routed experts (+ Qwen2-MoE's shared expert, scaled by sigmoid(shared_expert_gate(x)))."""

    def __init__(self, config, ops: Ops):
        super().__init__()
        num_experts = getattr(config, "num_local_experts", None) or config.num_experts
        inter = getattr(config, "moe_intermediate_size", None) or config.intermediate_size
        # Mixtral always renormalises; Qwen-MoE only with norm_topk_prob
        renorm = config.model_type == "mixtral" or bool(getattr(config, "norm_topk_prob", False))
        self.gate = ReplicatedLinear(config.hidden_size, num_experts)
        self.experts = FusedMoE(num_experts, config.num_experts_per_tok, config.hidden_size, inter, ops,
                                renormalize=renorm, activation=config.hidden_act)
        shared = getattr(config, "shared_expert_intermediate_size", 0) or 0
        self.shared_expert = LlamaMLP(config, ops, shared) if shared else None
        self.shared_expert_gate = ReplicatedLinear(config.hidden_size, 1) if shared else None

    def forward(self, x):
        out = self.experts(x, self.gate(x))
        if self.shared_expert is not None:
            out = out + torch.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)
        return out


def _is_moe_layer(config, layer_idx: int) -> bool:
    if config.model_type == "mixtral":
        return True
    num_experts = getattr(config, "num_experts", 0) or 0
    if num_experts <= 0:
        return False
    return (layer_idx not in (getattr(config, "mlp_only_layers", None) or [])
            and (layer_idx + 1) % getattr(config, "decoder_sparse_step", 1) == 0)


class LlamaDecoderLayer(nn.Module):
    def __init__(self, config, ops, rotary_emb, attn, layer_idx: int = 0):
        super().__init__()
        self.self_attn = LlamaAttention(config, ops, rotary_emb, attn)
        self.mlp = SparseMoeBlock(config, ops) if _is_moe_layer(config, layer_idx) else LlamaMLP(config, ops)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, ops)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, ops)

    def forward(self, positions, hidden, residual, kv_cache, attn_metadata, pre, post):
        """pre / post: `pre_attention` / `post_attention`, as the platform compiled them."""
        q, k, v, residual = pre(self, positions, hidden, residual)
        out = self.self_attn.attn.forward(q, k, v, kv_cache, attn_metadata)
        return post(self, out, residual)


def pre_attention(layer: LlamaDecoderLayer, positions, hidden, residual):
    """Input norm (adding the residual), qkv projection, rotary: everything of a layer before attention."""
    if residual is None:
        residual, hidden = hidden, layer.input_layernorm(hidden)
    else:
        hidden, residual = layer.input_layernorm(hidden, residual)
    q, k, v = layer.self_attn.qkv(positions, hidden)
    return q, k, v, residual


def post_attention(layer: LlamaDecoderLayer, attn_out, residual):
    """Output projection, post-attention norm, MLP: everything of a layer after attention."""
    a = layer.self_attn
    hidden = a.o_proj(attn_out.reshape(-1, a.num_heads * a.head_dim))
    hidden, residual = layer.post_attention_layernorm(hidden, residual)
    return layer.mlp(hidden), residual


def _layer_params(config) -> int:
    """Weights of one decoder layer (attention and a dense MLP)."""
    h, d = config.hidden_size, _head_dim(config)
    kv = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    attn = h * d * (2 * config.num_attention_heads + 2 * kv)
    return attn + 3 * h * config.intermediate_size


class LlamaModel(nn.Module):
    def __init__(self, config, ops, backends: list[AttentionBackend], platform: Platform):
        super().__init__()
        # one compiled function serves every layer (the layer's weights are its inputs)
        head_dim = _head_dim(config)
        # a pipeline stage builds its own layers only (placeholders keep the others' indices); the first stage
        # the embedding, the last the final norm
        stage, stages = get_pipeline_parallel()
        n = config.num_hidden_layers
        self.layer_range = range(n)
        if stages > 1:  # the LM head on stage 0 weighs as many layers as its weights (decode: a row each)
            head = config.vocab_size * config.hidden_size / _layer_params(config)
            self.layer_range = stage_layers(n, stage, stages, head)
        self.first_stage, self.last_stage = stage == 0, stage == stages - 1
        self.embed_tokens = (VocabParallelEmbedding(config.vocab_size, config.hidden_size) if self.first_stage
                             else None)
        rotary = RotaryEmbedding(config, head_dim, config.max_position_embeddings, ops)
        self.layers = nn.ModuleList(LlamaDecoderLayer(config, ops, rotary, backends[i], i) if i in self.layer_range
                                    else nn.Identity() for i in range(n))
        # routed experts pick their rows at run time (data-dependent shapes): their layers stay eager after attention
        moe = any(isinstance(getattr(layer, "mlp", None), SparseMoeBlock) for layer in self.layers)
        self.pre = platform.compile(pre_attention)
        self.post = post_attention if moe else platform.compile(post_attention)
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, ops)

    def forward(self, input_ids, positions, kv_caches, attn_metadata, intermediate=None):
        """`intermediate`: (hidden, residual) from the previous pipeline stage, in place of the embedding; a
        stage before the last returns them for the next one."""
        hidden, residual = (self.embed_tokens(input_ids), None) if intermediate is None else intermediate
        layers = self.layers
        for i in self.layer_range:
            hidden, residual = layers[i](positions, hidden, residual, kv_caches[i], attn_metadata, self.pre,
                                         self.post)
        if not self.last_stage:
            return hidden, residual
        hidden, _ = self.norm(hidden, residual)
        return hidden


class LlamaForCausalLM(nn.Module):
    """Engine interface: forward(input_ids [T], positions [T], kv_caches, attn_metadata) -> hidden [T, H];
    compute_logits(hidden [N, H]) -> float32 [N, vocab]; load_weights(iterable of (HF name, tensor))."""

    model_cls = LlamaModel  # subclasses with another layer structure swap it

    # (our fused parameter, checkpoint name, shard id)
    stacked_params = (("qkv_proj", "q_proj", "q"), ("qkv_proj", "k_proj", "k"), ("qkv_proj", "v_proj", "v"),
                      ("gate_up_proj", "gate_proj", 0), ("gate_up_proj", "up_proj", 1))

    def __init__(self, hf_config, platform: Platform, dtype: torch.dtype):
        super().__init__()
        self.config = hf_config
        self.dtype = dtype
        _, tp = get_tensor_parallel()
        self.head_size = _head_dim(hf_config)
        self.num_layers = hf_config.num_hidden_layers
        self.num_heads = hf_config.num_attention_heads // tp
        self.num_kv_heads = max(1, hf_config.num_key_value_heads // tp)
        self.sliding_windows = _layer_windows(hf_config)
        # One backend per distinct window; a uniform model (the usual case) shares a single one.
        scale, softcap = self.attention_scale(hf_config), getattr(hf_config, "attn_logit_softcapping", None)
        by_window = {w: platform.attention_backend(self.num_heads, self.num_kv_heads, self.head_size, scale, w,
                                                   softcap)
                     for w in dict.fromkeys(self.sliding_windows)}
        self.attn_backends = [by_window[w] for w in self.sliding_windows]
        self.attn_backend = self.attn_backends[0]
        ops = platform.ops
        self.tie_word_embeddings = bool(getattr(hf_config, "tie_word_embeddings", False))
        with torch.device(platform.device), default_dtype(dtype):
            self.model = self.model_cls(hf_config, ops, self.attn_backends, platform)
        self.lm_head = None  # pipeline stages after the first: the first samples
        if get_pipeline_parallel()[0] == 0:
            # a tied head is built on "meta" (no memory) and then shares the embedding's weight
            with torch.device("meta" if self.tie_word_embeddings else platform.device), default_dtype(dtype):
                self.lm_head = ParallelLMHead(hf_config.vocab_size, hf_config.hidden_size)
            if self.tie_word_embeddings:
                self.lm_head.tie(self.model.embed_tokens)

    @property
    def layer_range(self) -> range:
        """The layers this pipeline stage holds (all of them at size 1; models without stages hold all)."""
        return getattr(self.model, "layer_range", range(self.num_layers))

    def attention_scale(self, hf_config) -> float:
        return self.head_size ** -0.5

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, kv_caches: list[torch.Tensor],
                attn_metadata: AttentionMetadata, **kw) -> torch.Tensor:
        return self.model(input_ids, positions, kv_caches, attn_metadata, **kw)

    def _owns(self, name: str) -> bool:
        """Whether this pipeline stage holds the checkpoint tensor `name` (every stage does at size 1)."""
        if name.startswith("model.layers."):
            return int(name.split(".", 3)[2]) in self.layer_range
        if name.startswith(("model.embed_tokens.", "lm_head.")):
            return getattr(self.model, "first_stage", True)
        return True

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden).float()

    _EXPERT_PARTS = {"gate_proj": 0, "w1": 0, "up_proj": 1, "w3": 1, "down_proj": 2, "w2": 2}

    @classmethod
    def _expert_param(cls, name: str):
        """An expert tensor's (stacked parameter, shard id): per expert `...experts.{e}.{gate_proj|w1|up_proj|w3|
        down_proj|w2}.weight` (Mixtral / Qwen checkpoints), or all experts at once as `...experts.gate_up_proj` /
        `...experts.down_proj` (transformers' stacked layout)."""
        prefix, _, rest = name.partition(".mlp.experts.")
        parts = rest.split(".")
        if parts[0].isdigit() and len(parts) == 3 and parts[1] in cls._EXPERT_PARTS:
            which = cls._EXPERT_PARTS[parts[1]]
            return f"{prefix}.mlp.experts.{'w2' if which == 2 else 'w13'}_weight", (int(parts[0]), which)
        if rest in ("gate_up_proj", "down_proj"):
            return f"{prefix}.mlp.experts.{'w13' if rest == 'gate_up_proj' else 'w2'}_weight", None
        return name, None

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """Load Hugging Face-named tensors; returns the names of the parameters that were filled.
        Raises ValueError if a parameter was never loaded."""
        params = dict(self.named_parameters())
        loaded: dict[str, set] = {}  # parameter -> shard ids seen (None for unfused)
        unexpected: list[str] = []
        for name, w in weights:
            if "rotary_emb." in name:  # inv_freq / cos_cached buffers of old checkpoints
                continue
            if (name == "lm_head.weight" and self.tie_word_embeddings) or not self._owns(name):
                continue
            name = name.replace(".block_sparse_moe.", ".mlp.")  # Mixtral's name for the MoE block
            shard = None
            if ".mlp.experts." in name:
                name, shard = self._expert_param(name)
            for fused, part, shard_id in (() if ".mlp.experts." in name else self.stacked_params):
                if f".{part}." in name:
                    name, shard = name.replace(f".{part}.", f".{fused}."), shard_id
                    break
            param = params.get(name)
            if param is None:
                unexpected.append(name)
                continue
            param.weight_loader(param, w, shard)
            loaded.setdefault(name, set()).add(shard)
        if unexpected:
            logger.warning("ignored %d checkpoint tensors the model does not have: %s", len(unexpected),
                           ", ".join(unexpected[:8]) + (" ..." if len(unexpected) > 8 else ""))
        shards = {"qkv_proj": {"q", "k", "v"}, "gate_up_proj": {0, 1}}
        missing = []
        for name, param in params.items():
            fused = name.split(".")[-2]
            need = getattr(param, "required_shards", None) or shards.get(fused, {None})
            got = loaded.get(name, set())
            if not (need <= got or (None in got)):
                missing.append(name if not got else f"{name} (has {sorted(map(str, got))})")
        if missing:
            raise ValueError(f"checkpoint lacks {len(missing)} weights: {', '.join(missing[:8])}"
                             + (" ..." if len(missing) > 8 else ""))
        return set(loaded)
