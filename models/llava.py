"""LLaVA 1.5 (`LlavaForConditionalGeneration`): a CLIP vision tower, a two-layer projector and a Llama decoder.

The image features replace the embeddings of the `<image>` placeholder tokens (the front end expands each
`<image>` into one placeholder per patch feature); the model runner passes them as `inputs_embeds`.
"""
from __future__ import annotations

from typing import Iterable, Optional

import torch
from torch import nn
from torch.nn import functional as F

from pageport.models.llama import LlamaForCausalLM
from pageport.platforms import AttentionMetadata, Platform


def _act(name: str):
    if name == "quick_gelu":
        return lambda x: x * torch.sigmoid(1.702 * x)
    if name in ("gelu", "gelu_python"):
        return F.gelu
    if name in ("gelu_new", "gelu_pytorch_tanh"):
        return lambda x: F.gelu(x, approximate="tanh")
    if name == "silu":
        return F.silu
    raise ValueError(f"unsupported activation {name!r}")


class CLIPAttention(nn.Module):
    def __init__(self, c):
        super().__init__()
        h = c.hidden_size
        self.num_heads = c.num_attention_heads
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = (nn.Linear(h, h) for _ in range(4))

    def forward(self, x):
        b, t, h = x.shape
        q, k, v = (p(x).view(b, t, self.num_heads, -1).transpose(1, 2) for p in (self.q_proj, self.k_proj, self.v_proj))
        o = F.scaled_dot_product_attention(q, k, v)
        return self.out_proj(o.transpose(1, 2).reshape(b, t, h))


class CLIPMLP(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.fc1 = nn.Linear(c.hidden_size, c.intermediate_size)
        self.fc2 = nn.Linear(c.intermediate_size, c.hidden_size)
        self.act = _act(c.hidden_act)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class CLIPEncoderLayer(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)
        self.self_attn = CLIPAttention(c)
        self.layer_norm2 = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)
        self.mlp = CLIPMLP(c)

    def forward(self, x):
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class CLIPVisionTower(nn.Module):
    """CLIP's vision transformer up to the layer LLaVA reads (`vision_feature_layer`); names as transformers'
    CLIPVisionModel (`vision_model.embeddings...`, `vision_model.encoder.layers.N...`)."""

    def __init__(self, c, feature_layer: int):
        super().__init__()
        self.patch_size = c.patch_size
        n = c.num_hidden_layers
        # hidden_states[0] is the embeddings, [i] the output of layer i
        self.num_layers = feature_layer if feature_layer >= 0 else n + 1 + feature_layer
        if not 0 <= self.num_layers <= n:
            raise ValueError(f"vision_feature_layer {feature_layer} is outside the tower's {n} layers")
        self.class_embedding = nn.Parameter(torch.zeros(c.hidden_size))
        self.patch_embedding = nn.Conv2d(c.num_channels, c.hidden_size, c.patch_size, c.patch_size, bias=False)
        self.num_positions = (c.image_size // c.patch_size) ** 2 + 1
        self.position_embedding = nn.Embedding(self.num_positions, c.hidden_size)
        self.pre_layrnorm = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)
        self.layers = nn.ModuleList(CLIPEncoderLayer(c) for _ in range(self.num_layers))

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        x = self.patch_embedding(pixel_values).flatten(2).transpose(1, 2)
        cls = self.class_embedding.expand(x.shape[0], 1, -1)
        x = torch.cat([cls, x], dim=1) + self.position_embedding.weight[: x.shape[1] + 1]
        x = self.pre_layrnorm(x)
        for layer in self.layers:
            x = layer(x)
        return x


class LlavaProjector(nn.Module):
    def __init__(self, vision_hidden: int, text_hidden: int, act: str, bias: bool):
        super().__init__()
        self.linear_1 = nn.Linear(vision_hidden, text_hidden, bias=bias)
        self.linear_2 = nn.Linear(text_hidden, text_hidden, bias=bias)
        self.act = _act(act)

    def forward(self, x):
        return self.linear_2(self.act(self.linear_1(x)))


class LlavaForConditionalGeneration(nn.Module):
    """Engine interface as LlamaForCausalLM, plus `embed_images(pixel_values [N, 3, H, W]) -> [N, F, hidden]`,
    `embed_input_ids(ids) -> [T, hidden]` and forward(..., inputs_embeds=[T, hidden])."""

    supports_multimodal = True
    extra_weights: tuple[str, ...] = ()  # further top-level tensors of a subclass (LLaVA-NeXT's image_newline)

    def __init__(self, hf_config, platform: Platform, dtype: torch.dtype):
        super().__init__()
        self.config = hf_config
        self.dtype = dtype
        tc, vc = hf_config.text_config, hf_config.vision_config
        if getattr(hf_config, "vision_feature_select_strategy", "default") not in ("default", "full"):
            raise ValueError(f"unsupported vision_feature_select_strategy "
                             f"{hf_config.vision_feature_select_strategy!r}")
        layer = hf_config.vision_feature_layer
        if not isinstance(layer, int):
            raise ValueError("vision_feature_layer as a list (several layers concatenated) is not supported")
        self.select_default = getattr(hf_config, "vision_feature_select_strategy", "default") == "default"
        self.image_token_id = hf_config.image_token_index if hasattr(hf_config, "image_token_index") \
            else hf_config.image_token_id
        self.language_model = LlamaForCausalLM(tc, platform, dtype)
        lm = self.language_model
        self.head_size, self.num_layers = lm.head_size, lm.num_layers
        self.num_heads, self.num_kv_heads = lm.num_heads, lm.num_kv_heads
        self.sliding_windows, self.attn_backends, self.attn_backend = lm.sliding_windows, lm.attn_backends, \
            lm.attn_backend
        with torch.device(platform.device):
            self.vision_tower = CLIPVisionTower(vc, layer).to(dtype)
            self.multi_modal_projector = LlavaProjector(
                vc.hidden_size, tc.hidden_size, hf_config.projector_hidden_act,
                getattr(hf_config, "multimodal_projector_bias", True)).to(dtype)
        grid = vc.image_size // vc.patch_size
        self.num_image_features = grid * grid + (0 if self.select_default else 1)

    def embed_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        feats = self.vision_tower(pixel_values.to(self.dtype))
        if self.select_default:
            feats = feats[:, 1:]
        return self.multi_modal_projector(feats)

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.language_model.model.embed_tokens(input_ids)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, kv_caches: list[torch.Tensor],
                attn_metadata: AttentionMetadata, inputs_embeds: Optional[torch.Tensor] = None) -> torch.Tensor:
        m = self.language_model.model
        if inputs_embeds is None:
            return m(input_ids, positions, kv_caches, attn_metadata)
        hidden, residual = inputs_embeds, None
        for layer, kv_cache in zip(m.layers, kv_caches, strict=True):
            hidden, residual = layer(positions, hidden, residual, kv_cache, attn_metadata, m.pre, m.post)
        hidden, _ = m.norm(hidden, residual)
        return hidden

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.language_model.compute_logits(hidden)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        text, own = [], {}
        params = dict(self.named_parameters())
        for name, w in weights:
            # transformers >= 4.52 writes model.language_model / model.vision_tower; older files
            # language_model.model / vision_tower
            for old, new in (("model.language_model.", "model."), ("language_model.model.", "model."),
                             ("language_model.lm_head.", "lm_head.")):
                if name.startswith(old):
                    text.append((new + name[len(old):], w))
                    break
            else:
                if name == "lm_head.weight":
                    text.append((name, w))
                    continue
                name = name.removeprefix("model.")
                for part in ("vision_model.", "embeddings.", "encoder."):  # CLIPVisionModel's nesting
                    name = name.replace("vision_tower." + part, "vision_tower.")
                if name.startswith("vision_tower.") and name not in params:
                    continue  # layers past the feature layer, the post layernorm, position ids
                if name.startswith("vision_tower.") or name.startswith("multi_modal_projector.") \
                        or name in self.extra_weights:
                    key = name
                    if key not in params:
                        raise ValueError(f"unexpected checkpoint tensor {name}")
                    with torch.no_grad():
                        params[key].copy_(w.to(params[key].dtype))
                    own[key] = True
        loaded = {"language_model." + n for n in self.language_model.load_weights(text)}
        missing = [n for n in params if not n.startswith("language_model.") and n not in own]
        if missing:
            raise ValueError(f"checkpoint lacks {len(missing)} weights: {', '.join(missing[:8])}")
        return loaded | set(own)


def image_feature_count(hf_config) -> int:
    vc = hf_config.vision_config
    grid = vc.image_size // vc.patch_size
    default = getattr(hf_config, "vision_feature_select_strategy", "default") == "default"
    return grid * grid + (0 if default else 1)

