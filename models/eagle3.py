"""EAGLE-3 draft heads for Llama-family targets, in the layout their published checkpoints hold
(`LlamaForCausalLMEagle3`, e.g. yuhuili/EAGLE3-LLaMA3.1-Instruct-8B, read by vLLM and SGLang alike).

The head reads, at position p, the embedding of token p + 1 and a fused state of the target: the inputs of three
target layers at p (by default layers 2, L // 2 and L - 3 of L, as vLLM picks them; the head's config may name
others in `eagle_aux_hidden_state_layer_ids`), concatenated and reduced by `fc` (3H -> H). Its one decoder layer
attends over [input_layernorm(embedding), hidden_norm(fused)] (q/k/v take 2H inputs); the fused state itself is
the layer's residual. `norm` and the head's own `lm_head` give logits over a draft vocabulary of
`draft_vocab_size` tokens, draft id d standing for target id d + d2t[d]. The state before `norm` is what the next
proposal reads in place of the fused target state.

Checkpoint tensors: `fc.weight` [H, 3H], `midlayer.{input_layernorm, hidden_norm, post_attention_layernorm,
self_attn.{q,k,v,o}_proj, mlp.{gate,up,down}_proj}.weight`, `norm.weight`, `lm_head.weight` [draft vocab, H],
`d2t` [draft vocab] (int64 offsets), `t2d` [vocab] (bool: which target ids the draft vocabulary holds), and
optionally `embed_tokens.weight` (otherwise the target's embedding is used).
"""
from __future__ import annotations

from typing import Iterable, Optional

import torch
from torch import nn

from pageport.models.layers import (ParallelLMHead, QKVParallelLinear, ReplicatedLinear, RMSNorm, RotaryEmbedding,
                                    VocabParallelEmbedding, default_dtype)
from pageport.models.llama import LlamaDecoderLayer, LlamaForCausalLM, _head_dim, post_attention


def aux_layer_ids(head_config, num_target_layers: int) -> tuple[int, ...]:
    """The target layers whose input states the head fuses: the config's, else vLLM's default. Id j is the
    input of layer j (0: the embedding), as vLLM counts them."""
    ids = getattr(head_config, "eagle_aux_hidden_state_layer_ids", None)
    if not ids:
        ids = (getattr(head_config, "eagle_config", None) or {}).get("eagle_aux_hidden_state_layer_ids")
    n = num_target_layers
    ids = tuple(int(i) for i in ids) if ids else (2, n // 2, n - 3)
    if len(ids) != 3 or not all(0 <= i < n for i in ids):
        raise ValueError(f"speculative_config: the EAGLE-3 head needs three target layers in 0..{n - 1}; it names "
                         f"{list(ids)} (eagle_aux_hidden_state_layer_ids) for a target of {n} layers")
    return ids


class Eagle3Model(nn.Module):
    def __init__(self, config, ops, backend, own_embedding: bool, max_positions: int = 0):
        super().__init__()
        h = config.hidden_size
        rotary = RotaryEmbedding(config, _head_dim(config), max(config.max_position_embeddings, max_positions), ops)
        layer = LlamaDecoderLayer(config, ops, rotary, backend, 0)
        a = layer.self_attn
        # q/k/v read [embedding, fused state]: twice the width the Llama layer was built for
        a.qkv_proj = QKVParallelLinear(2 * h, a.head_dim, config.num_attention_heads, config.num_key_value_heads,
                                       bias=bool(getattr(config, "attention_bias", False)))
        layer.hidden_norm = RMSNorm(h, config.rms_norm_eps, ops)
        self.layers = nn.ModuleList([layer])
        target_h = getattr(config, "target_hidden_size", None) or h
        self.fc = ReplicatedLinear(3 * target_h, h, bias=False)
        self.norm = RMSNorm(h, config.rms_norm_eps, ops)
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, h) if own_embedding else None


class Eagle3LlamaForCausalLM(LlamaForCausalLM):
    """Engine interface of a draft: forward(input_ids, positions, kv_caches, attn_metadata, hidden_states [T, H])
    -> the pre-norm state [T, H] (fed back for the next proposal); compute_logits(state) -> float32 logits over
    the target's vocabulary (-inf outside the draft vocabulary); combine(aux [T, 3H]) -> the fused state [T, H].
    `share(target)` before the first forward."""

    def __init__(self, hf_config, platform, dtype: torch.dtype, own_embedding: bool = False, max_positions: int = 0):
        nn.Module.__init__(self)
        if hf_config.num_hidden_layers != 1:
            raise ValueError(f"speculative_config: EAGLE-3 heads of {hf_config.num_hidden_layers} layers are not "
                             "supported (the published heads have one)")
        if getattr(hf_config, "norm_before_residual", False):
            raise ValueError("speculative_config: EAGLE-3 heads with norm_before_residual are not supported")
        self.config = hf_config
        self.dtype = dtype
        self.head_size = _head_dim(hf_config)
        self.num_layers = 1
        self.num_heads = hf_config.num_attention_heads
        self.num_kv_heads = hf_config.num_key_value_heads
        self.draft_vocab_size = getattr(hf_config, "draft_vocab_size", None) or hf_config.vocab_size
        self.attn_backend = platform.attention_backend(self.num_heads, self.num_kv_heads, self.head_size,
                                                       self.head_size ** -0.5)
        self.tie_word_embeddings = False  # its own LM head over the draft vocabulary
        with torch.device(platform.device), default_dtype(dtype):
            self.model = Eagle3Model(hf_config, platform.ops, self.attn_backend, own_embedding, max_positions)
            self.lm_head = ParallelLMHead(self.draft_vocab_size, hf_config.hidden_size)
        self.draft_to_target: Optional[torch.Tensor] = None  # target id of each draft id (None: the same vocabulary)
        # the target's unless the checkpoint has its own; in a list, so the target's is no parameter of the head
        self._embed = [self.model.embed_tokens]

    def share(self, target: nn.Module) -> None:
        c, t = self.config, target.config
        fused = getattr(c, "target_hidden_size", None) or c.hidden_size
        if fused != t.hidden_size:
            raise ValueError(f"speculative_config: the EAGLE-3 head's fc reads 3 x {fused} features (its hidden size "
                             f"{c.hidden_size}), but the target's hidden size is {t.hidden_size}")
        if self._embed[0] is None:
            if c.hidden_size != t.hidden_size:
                raise ValueError(f"speculative_config: the EAGLE-3 head's hidden size {c.hidden_size} is not the "
                                 f"target's {t.hidden_size}, and it has no embedding of its own")
            self._embed = [target.model.embed_tokens]
        if c.vocab_size != t.vocab_size:
            raise ValueError(f"speculative_config: the EAGLE-3 head is for a vocabulary of {c.vocab_size} tokens, "
                             f"the target has {t.vocab_size}")

    def combine(self, aux: torch.Tensor) -> torch.Tensor:
        """The target's three layer inputs [T, 3H], concatenated in the head's order -> the fused state [T, H]."""
        return self.model.fc(aux.to(self.dtype))

    def forward(self, input_ids, positions, kv_caches, attn_metadata, hidden_states):
        layer = self.model.layers[0]
        residual = hidden_states.to(self.dtype)
        x = torch.cat([layer.input_layernorm(self._embed[0](input_ids)), layer.hidden_norm(residual)], dim=-1)
        q, k, v = layer.self_attn.qkv(positions, x)
        out = layer.self_attn.attn.forward(q, k, v, kv_caches[0], attn_metadata)
        hidden, residual = post_attention(layer, out, residual)
        return hidden + residual

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.lm_head(self.model.norm(hidden)).float()
        if self.draft_to_target is None:
            return logits
        out = logits.new_full((logits.shape[0], self.config.vocab_size), float("-inf"))
        out[:, self.draft_to_target] = logits  # tokens outside the draft vocabulary are never proposed
        return out

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        d2t = t2d = None
        named = []
        for n, w in weights:
            n = n.removeprefix("model.")
            if n == "d2t":
                d2t = w
            elif n == "t2d":
                t2d = w
            elif n.startswith("lm_head."):
                named.append((n, w))
            else:
                named.append(("model." + n.replace("midlayer.", "layers.0.", 1), w))
        loaded = super().load_weights(named)
        self._vocab_map(d2t, t2d)
        return loaded

    def _vocab_map(self, d2t: Optional[torch.Tensor], t2d: Optional[torch.Tensor]) -> None:
        """Check d2t (and t2d, where present) against the vocabularies and keep draft id -> target id."""
        vd, v = self.draft_vocab_size, self.config.vocab_size
        if d2t is None:
            if vd != v:
                raise ValueError(f"EAGLE-3 head: a draft vocabulary of {vd} tokens (of {v}) needs the d2t map")
            return
        if tuple(d2t.shape) != (vd,) or d2t.dtype.is_floating_point:
            raise ValueError(f"EAGLE-3 head: d2t must be {vd} integer offsets, got {tuple(d2t.shape)} {d2t.dtype}")
        targets = torch.arange(vd) + d2t.long().cpu()
        if int(targets.min()) < 0 or int(targets.max()) >= v or len(torch.unique(targets)) != vd:
            raise ValueError(f"EAGLE-3 head: d2t maps draft ids outside the target's {v} tokens or onto one twice")
        if t2d is not None:
            t2d = t2d.bool().cpu()
            if tuple(t2d.shape) != (v,) or int(t2d.sum()) != vd or not bool(t2d[targets].all()):
                raise ValueError("EAGLE-3 head: t2d does not mark the target ids d2t maps to")
        if vd != v or bool((targets != torch.arange(v)).any()):
            self.draft_to_target = targets.to(self.lm_head.weight.device)
