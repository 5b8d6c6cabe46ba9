"""EAGLE draft heads for Llama-family targets (EAGLE-1 layout, as its published checkpoints hold it).

The head reads, at position p, the target's final hidden state h_p and the embedding of token p + 1:
fc([embed(x_{p+1}), h_p]) -> H, then its decoder layer(s) (the first without an input norm) -> g_p, whose logits
under the target's LM head propose x_{p+2}. Later proposals feed g back in place of h. The embedding and the LM
head are the target's (a checkpoint's own copies are ignored). Checkpoint tensors: `fc.weight` [H, 2H], optionally
`fc.bias`, `layers.{i}.*` in Llama names, with or without a `model.` prefix.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterable

import torch
from torch import nn

from pageport.models.layers import ReplicatedLinear, RotaryEmbedding, default_dtype
from pageport.models.llama import (LlamaDecoderLayer, LlamaForCausalLM, _head_dim, post_attention,
                                   pre_attention)


class EagleModel(nn.Module):
    def __init__(self, config, ops, backends, platform):
        super().__init__()
        rotary = RotaryEmbedding(config, _head_dim(config), config.max_position_embeddings, ops)
        self.layers = nn.ModuleList(LlamaDecoderLayer(config, ops, rotary, backends[i], i)
                                    for i in range(config.num_hidden_layers))
        self.layers[0].input_layernorm = nn.Identity()  # EAGLE's first layer reads fc's output as it is
        self.fc = ReplicatedLinear(2 * config.hidden_size, config.hidden_size,
                                   bias=bool(getattr(config, "eagle_fc_bias", False)))
        self.pre, self.post = platform.compile(pre_attention), platform.compile(post_attention)


class EagleLlamaForCausalLM(LlamaForCausalLM):
    """Engine interface of a draft: forward(input_ids, positions, kv_caches, attn_metadata, hidden_states) ->
    hidden; compute_logits through the target's LM head. `share(target)` before the first forward."""

    model_cls = EagleModel

    def __init__(self, hf_config, platform, dtype: torch.dtype):
        nn.Module.__init__(self)
        self.config = hf_config
        self.dtype = dtype
        self.head_size = _head_dim(hf_config)
        self.num_layers = hf_config.num_hidden_layers
        self.num_heads = hf_config.num_attention_heads
        self.num_kv_heads = hf_config.num_key_value_heads
        self.attn_backend = platform.attention_backend(self.num_heads, self.num_kv_heads, self.head_size,
                                                       self.head_size ** -0.5)
        self.tie_word_embeddings = True  # the head is the target's: a checkpoint's lm_head is skipped
        with torch.device(platform.device), default_dtype(dtype):
            self.model = EagleModel(hf_config, platform.ops, [self.attn_backend] * self.num_layers, platform)
        self._target = None  # (embed_tokens, lm_head) of the target, not parameters of this module

    def share(self, target: nn.Module) -> None:
        if target.config.hidden_size != self.config.hidden_size:
            raise ValueError(f"speculative_config: the EAGLE head's hidden size {self.config.hidden_size} is not the "
                             f"target's {target.config.hidden_size}")
        self._target = (target.model.embed_tokens, target.lm_head)

    def forward(self, input_ids, positions, kv_caches, attn_metadata, hidden_states):
        m = self.model
        hidden = m.fc(torch.cat([self._target[0](input_ids), hidden_states.to(self.dtype)], dim=-1))
        residual = None
        for layer, kv_cache in zip(m.layers, kv_caches, strict=True):
            hidden, residual = layer(positions, hidden, residual, kv_cache, attn_metadata, m.pre, m.post)
        return hidden + residual

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self._target[1](hidden).float()

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        named = ((n if n.startswith("model.") else f"model.{n}", w) for n, w in weights
                 if not n.removeprefix("model.").startswith(("embed_tokens.", "lm_head.")))
        return super().load_weights(named)


def read_eagle_weights(folder: Path) -> dict[str, torch.Tensor]:
    """The head's tensors (one or a few layers: read whole), from safetensors or the PyTorch .bin files its
    published checkpoints come in (loaded with weights_only: tensors, no code)."""
    files = sorted(folder.glob("*.safetensors"))
    out: dict[str, torch.Tensor] = {}
    if files:
        from safetensors.torch import load_file
        for f in files:
            out.update(load_file(str(f)))
        return out
    files = sorted(folder.glob("*.bin"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors or *.bin weights in {folder}")
    for f in files:
        out.update(torch.load(f, map_location="cpu", weights_only=True))
    return out
