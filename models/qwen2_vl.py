"""Qwen2-VL (`Qwen2VLForConditionalGeneration`) and Qwen2.5-VL (`Qwen2_5_VLForConditionalGeneration`): a ViT over
native-resolution images, a patch merger and the Qwen2 decoder with multimodal rotary embeddings (M-RoPE).

The image processor cuts an image (resized to a multiple of patch x merge size) into patches of
`temporal_patch_size` frames (a still image is repeated), each row of `pixel_values` one flattened patch, the rows
laid out block by block of merge x merge patches; `grid_thw` = (frames, patch rows, patch columns). The tower:
a patch embedding (a 3D convolution, i.e. a linear map of each row), blocks with a 2D rotary embedding of each
patch's (row, column), and the merger, which joins each block of merge x merge patches into one feature. So an
image has t * h * w / merge^2 features, one `<|image_pad|>` placeholder each. Qwen2.5-VL's tower uses RMSNorm and a
gated SiLU MLP, and attends within windows of `window_size` pixels except in `fullatt_block_indexes`.

M-RoPE: each token has three positions (temporal, height, width), and frequency band i of `mrope_section` turns
with axis i % 3. Text tokens have the same position on the three axes, counting on by one; an image's tokens
take its grid's coordinates from where the text stands. `mrope_positions` computes them for a prompt, as
transformers' `get_rope_index`; every token past the last image has position (index + delta) on the three axes,
which the model runner adds itself (decode tokens, text after the images).
"""
from __future__ import annotations

import copy
from typing import Iterable, Optional, Sequence

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from pageport.models.layers import RotaryEmbedding
from pageport.models.llama import LlamaForCausalLM
from pageport.models.llava import _act
from pageport.platforms import AttentionMetadata, Platform


class MRotaryEmbedding(RotaryEmbedding):
    """Rotary embedding over positions [3, T] (temporal, height, width): column j of the cos|sin cache is read at
    the position of axis `mrope_section`-band(j) % 3. Positions [T] are the same on the three axes, i.e. plain RoPE
    (text-only and decode steps, and captured graphs, stay on the 1-D path)."""

    def __init__(self, hf_config, head_size: int, max_position: int, mrope_section: Sequence[int], ops=None):
        super().__init__(hf_config, head_size, max_position, ops)
        if sum(mrope_section) != head_size // 2:
            raise ValueError(f"mrope_section {list(mrope_section)} does not add up to half the head size "
                             f"{head_size}")
        axis = torch.cat([torch.full((n,), i % 3, dtype=torch.long) for i, n in enumerate(mrope_section)])
        # cos and sin halves of the cache follow the same bands
        self.register_buffer("axis", torch.cat([axis, axis]).view(1, 1, -1).to(torch.get_default_device()),
                             persistent=False)

    def forward(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor):
        if positions.dim() == 1:
            return super().forward(positions, q, k)
        cs = self.cos_sin_cache[positions]  # [3, T, D]
        cs = cs.gather(0, self.axis.expand(1, cs.shape[1], -1))[0]  # [T, D], each column from its axis
        return self.ops.rotary(torch.arange(cs.shape[0], device=cs.device), q, k, cs)


def mrope_positions(mm_inputs, merge: int) -> tuple[np.ndarray, int]:
    """(positions [3, E] of a prompt's tokens up to the end E of its last image, delta): every later token i has
    position i + delta on the three axes. As transformers' get_rope_index for images: text counts on by one from
    where it stands; an image's tokens start there and count (frame, row, column) of its merged grid; the text
    after it goes on from that start plus the longer side of the grid."""
    last = mm_inputs[-1]
    end = last.offset + last.length
    pos = np.empty((3, end), dtype=np.int64)
    shift, cur = 0, 0  # position - index of the text so far; the index the text resumes at
    for m in mm_inputs:
        t, h, w = int(m.grid_thw[0]), int(m.grid_thw[1]) // merge, int(m.grid_thw[2]) // merge
        if t * h * w != m.length:
            raise ValueError(f"an image of grid {list(m.grid_thw)} has {t * h * w} features, its placeholder run "
                             f"{m.length}")
        pos[:, cur:m.offset] = np.arange(cur + shift, m.offset + shift)
        start, run = m.offset + shift, slice(m.offset, m.offset + m.length)
        pos[0, run] = start + np.repeat(np.arange(t), h * w)
        pos[1, run] = start + np.tile(np.repeat(np.arange(h), w), t)
        pos[2, run] = start + np.tile(np.arange(w), t * h)
        cur = m.offset + m.length
        shift = start + max(h, w) - cur
    return pos, shift


class VisionRMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        xf = x.float()
        return self.weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)


class VisionMLP(nn.Module):
    """Qwen2-VL: fc1 -> act -> fc2."""

    def __init__(self, dim: int, hidden: int, act: str):
        super().__init__()
        self.fc1, self.fc2, self.act = nn.Linear(dim, hidden), nn.Linear(hidden, dim), _act(act)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class VisionGatedMLP(nn.Module):
    """Qwen2.5-VL: down(act(gate(x)) * up(x)), with biases."""

    def __init__(self, dim: int, hidden: int, act: str):
        super().__init__()
        self.gate_proj, self.up_proj = nn.Linear(dim, hidden), nn.Linear(dim, hidden)
        self.down_proj, self.act = nn.Linear(hidden, dim), _act(act)

    def forward(self, x):
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Neox-style rotation in float32 (as the reference), x [N, H, D], cos/sin [N, 1, D]."""
    xf = x.float()
    x1, x2 = xf.chunk(2, dim=-1)
    return (xf * cos + torch.cat((-x2, x1), dim=-1) * sin).to(x.dtype)


class VisionAttention(nn.Module):
    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x, cos, sin, segments: list[torch.Tensor]):
        """`segments`: index tensors [k, L] of patches that attend to each other (k groups of L patches)."""
        n = x.shape[0]
        q, k, v = self.qkv(x).view(n, 3, self.num_heads, -1).unbind(1)
        q, k = _rotate(q, cos, sin), _rotate(k, cos, sin)
        if len(segments) == 1 and segments[0].shape[0] == 1:  # the whole image at once
            o = F.scaled_dot_product_attention(*(t.transpose(0, 1)[None] for t in (q, k, v)))[0].transpose(0, 1)
        else:
            o = torch.empty_like(q)
            for idx in segments:  # one call per group size: windows of equal length batched together
                qs, ks, vs = (t[idx].transpose(1, 2) for t in (q, k, v))  # [k, H, L, D]
                o[idx] = F.scaled_dot_product_attention(qs, ks, vs).transpose(1, 2)
        return self.proj(o.reshape(n, -1))


class VisionBlock(nn.Module):
    def __init__(self, dim: int, num_heads: int, mlp: nn.Module, rms: bool):
        super().__init__()
        self.norm1 = VisionRMSNorm(dim) if rms else nn.LayerNorm(dim, eps=1e-6)
        self.norm2 = VisionRMSNorm(dim) if rms else nn.LayerNorm(dim, eps=1e-6)
        self.attn = VisionAttention(dim, num_heads)
        self.mlp = mlp

    def forward(self, x, cos, sin, segments):
        x = x + self.attn(self.norm1(x), cos, sin, segments)
        return x + self.mlp(self.norm2(x))


class PatchEmbed(nn.Module):
    def __init__(self, in_channels: int, temporal: int, patch: int, dim: int):
        super().__init__()
        # the checkpoint's Conv3d weight; kernel = stride = the patch, so it is a linear map of each flattened row
        self.proj = nn.Module()
        self.proj.weight = nn.Parameter(torch.empty(dim, in_channels, temporal, patch, patch))

    def forward(self, x):
        w = self.proj.weight
        return F.linear(x.to(w.dtype), w.view(w.shape[0], -1))


class PatchMerger(nn.Module):
    def __init__(self, out_dim: int, dim: int, merge: int, rms: bool):
        super().__init__()
        self.hidden = dim * merge * merge
        self.ln_q = VisionRMSNorm(dim) if rms else nn.LayerNorm(dim, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(self.hidden, self.hidden), nn.GELU(), nn.Linear(self.hidden, out_dim))

    def forward(self, x):
        return self.mlp(self.ln_q(x).view(-1, self.hidden))


def _vision_rope_theta(vc) -> float:
    params = getattr(vc, "rope_parameters", None) or {}
    return float(params.get("rope_theta", 10000.0))


class Qwen2VisionTransformer(nn.Module):
    """The vision tower of both: names as transformers' (`patch_embed.proj`, `blocks.N.{norm1,attn.qkv,...}`,
    `merger.{ln_q,mlp.0,mlp.2}`)."""

    def __init__(self, vc, v25: bool):
        super().__init__()
        self.v25 = v25
        self.merge = vc.spatial_merge_size
        self.patch_size = vc.patch_size
        channels = getattr(vc, "in_channels", None) or getattr(vc, "in_chans", 3)
        if v25:
            dim, out = vc.hidden_size, vc.out_hidden_size
            self.window = vc.window_size // self.merge // self.patch_size  # in merged features
            self.full_blocks = set(vc.fullatt_block_indexes)
            mlp = lambda: VisionGatedMLP(dim, vc.intermediate_size, vc.hidden_act)  # noqa: E731
        else:
            dim, out = vc.embed_dim, vc.hidden_size
            self.window, self.full_blocks = None, set(range(vc.depth))
            mlp = lambda: VisionMLP(dim, int(dim * vc.mlp_ratio), vc.hidden_act)  # noqa: E731
        self.num_heads = vc.num_heads
        self.head_dim = dim // vc.num_heads
        self.row_size = channels * vc.temporal_patch_size * vc.patch_size ** 2
        self.patch_embed = PatchEmbed(channels, vc.temporal_patch_size, vc.patch_size, dim)
        self.blocks = nn.ModuleList(VisionBlock(dim, vc.num_heads, mlp(), v25) for _ in range(vc.depth))
        self.merger = PatchMerger(out, dim, self.merge, v25)
        # axial 2D RoPE: a quarter of the head's frequencies for the row, a quarter for the column
        quarter = self.head_dim // 2
        self.register_buffer("inv_freq", 1.0 / _vision_rope_theta(vc) ** (
            torch.arange(0, quarter, 2, dtype=torch.float32) / quarter), persistent=False)

    def _rotary(self, grids: list[tuple[int, int, int]], device) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin [N, 1, head_dim] of each patch's (row, column), patches in the processor's order (merge x merge
        blocks, row-major inside and across blocks), frames repeated."""
        m, rows = self.merge, []
        for t, h, w in grids:
            hpos = torch.arange(h, device=device)[:, None].expand(h, w)
            wpos = torch.arange(w, device=device)[None, :].expand(h, w)
            hw = torch.stack([p.reshape(h // m, m, w // m, m).transpose(1, 2).flatten() for p in (hpos, wpos)], -1)
            rows.append(hw.repeat(t, 1))
        freqs = (torch.cat(rows)[..., None].float() * self.inv_freq.to(device)).flatten(1)  # [N, row | column]
        emb = torch.cat([freqs, freqs], dim=-1)[:, None]
        return emb.cos(), emb.sin()

    def _segments(self, grids, windowed: bool) -> list[torch.Tensor]:
        """Groups of patches that attend to each other, as index tensors [k, L] (one per distinct L): each frame
        whole, or (Qwen2.5-VL's windowed blocks) each window of `window` x `window` merged features in a frame."""
        unit, base, by_len = self.merge ** 2, 0, {}
        for t, h, w in grids:
            lh, lw = h // self.merge, w // self.merge
            if not windowed:
                idx = base + torch.arange(t * h * w).view(t, h * w)
                by_len.setdefault(h * w, []).append(idx)
            else:
                v = self.window
                nh, nw = -(-lh // v), -(-lw // v)
                win = ((torch.arange(t)[:, None, None] * nh + torch.arange(lh)[None, :, None] // v) * nw
                       + torch.arange(lw)[None, None, :] // v).flatten()  # window of each merged feature
                order = torch.argsort(win, stable=True)  # features grouped by window, in raster order inside
                counts = torch.bincount(win, minlength=t * nh * nw)
                starts = torch.cumsum(counts, 0) - counts
                for c in counts.unique().tolist():
                    if c == 0:
                        continue
                    wins = (counts == c).nonzero()[:, 0]
                    feats = order[starts[wins][:, None] + torch.arange(c)]  # [k, c]
                    patches = (feats[..., None] * unit + torch.arange(unit)).view(len(wins), c * unit)
                    by_len.setdefault(c * unit, []).append(base + patches)
            base += t * h * w
        return [torch.cat(v) for v in by_len.values()]

    def forward(self, pixel_values: torch.Tensor, grid_thw: Sequence[Sequence[int]]) -> torch.Tensor:
        """pixel_values [N, C * T * P * P] (the images' patches one after another) -> merged features [N / m^2, out]."""
        grids = [tuple(int(v) for v in g) for g in grid_thw]
        if pixel_values.shape[-1] != self.row_size:
            raise ValueError(f"pixel rows of {pixel_values.shape[-1]} values, the tower takes {self.row_size}")
        if sum(t * h * w for t, h, w in grids) != pixel_values.shape[0]:
            raise ValueError(f"{pixel_values.shape[0]} patches do not fill the grids {[list(g) for g in grids]}")
        dev = pixel_values.device
        x = self.patch_embed(pixel_values)
        cos, sin = self._rotary(grids, dev)
        full = [s.to(dev) for s in self._segments(grids, windowed=False)]
        windows = [s.to(dev) for s in self._segments(grids, windowed=True)] if self.window else full
        for i, blk in enumerate(self.blocks):
            x = blk(x, cos, sin, full if i in self.full_blocks else windows)
        return self.merger(x)


def _text_config(hf_config):
    """The decoder's config: `text_config` (transformers >= 4.52 and 5), else the flat config of older files;
    a shallow copy with the tie flag of the whole model (kept at its top level), no sliding window unless
    use_sliding_window, and the old rope_scaling type "mrope" (plain RoPE frequencies) read as the default."""
    tc = copy.copy(getattr(hf_config, "text_config", None) or hf_config)
    if getattr(tc, "tie_word_embeddings", None) is None:
        tc.tie_word_embeddings = bool(getattr(hf_config, "tie_word_embeddings", False))
    if not getattr(tc, "use_sliding_window", False):  # older flat configs name a window they do not use
        tc.sliding_window = None
    for attr in ("rope_parameters", "rope_scaling"):
        params = getattr(tc, attr, None)
        if isinstance(params, dict) and "mrope" in (params.get("rope_type"), params.get("type")):
            params = {k: v for k, v in params.items() if k != "type"}
            params["rope_type"] = "default"
            setattr(tc, attr, params)
    return tc


def mrope_section(hf_config) -> list[int]:
    tc = getattr(hf_config, "text_config", None) or hf_config
    for params in (getattr(tc, "rope_parameters", None), getattr(tc, "rope_scaling", None)):
        if isinstance(params, dict) and params.get("mrope_section"):
            return list(params["mrope_section"])
    raise ValueError("the config names no mrope_section (rope_parameters / rope_scaling)")


class Qwen2VLForConditionalGeneration(nn.Module):
    """Engine interface as LLaVA's (`embed_images`, `embed_input_ids`, forward(..., inputs_embeds=)), plus
    `uses_mrope` and `mrope_positions(mm_inputs)`; forward takes positions [T] or [3, T]."""

    supports_multimodal = True
    uses_mrope = True
    v25 = False

    def __init__(self, hf_config, platform: Platform, dtype: torch.dtype):
        super().__init__()
        self.config = hf_config
        self.dtype = dtype
        vc = hf_config.vision_config
        tc = _text_config(hf_config)
        self.image_token_id = hf_config.image_token_id
        self.merge = vc.spatial_merge_size
        self.language_model = LlamaForCausalLM(tc, platform, dtype)
        lm = self.language_model
        self.head_size, self.num_layers = lm.head_size, lm.num_layers
        self.num_heads, self.num_kv_heads = lm.num_heads, lm.num_kv_heads
        self.sliding_windows, self.attn_backends, self.attn_backend = lm.sliding_windows, lm.attn_backends, \
            lm.attn_backend
        with torch.device(platform.device):
            rotary = MRotaryEmbedding(tc, lm.head_size, tc.max_position_embeddings, mrope_section(hf_config),
                                      platform.ops)
            for layer in lm.model.layers:
                if hasattr(layer, "self_attn"):  # not another pipeline stage's placeholder
                    layer.self_attn.rotary_emb = rotary
            self.visual = Qwen2VisionTransformer(vc, self.v25).to(dtype)

    def mrope_positions(self, mm_inputs) -> tuple[np.ndarray, int]:
        return mrope_positions(mm_inputs, self.merge)

    def embed_images(self, pixel_values: torch.Tensor, grid_thw: Optional[Sequence] = None) -> torch.Tensor:
        """pixel_values [N, row] of the images given by `grid_thw` [(t, h, w), ...] -> [images, features, hidden]
        (images of equal feature counts; the model runner embeds one at a time)."""
        if grid_thw is None:
            raise ValueError("Qwen2-VL embeds images with their grid (t, h, w)")
        feats = self.visual(pixel_values.to(self.dtype), grid_thw)
        return feats.view(len(grid_thw), -1, feats.shape[-1])

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
        """Names of either layout: `visual.*`, `model.*`, `lm_head.*` (what transformers 4.x and 5.x's
        save_pretrained write) or `model.visual.*`, `model.language_model.*` (the in-memory names of
        transformers >= 4.52)."""
        text, own = [], set()
        params = dict(self.visual.named_parameters())
        for name, w in weights:
            if name.startswith(("visual.", "model.visual.")):
                key = name.split("visual.", 1)[1]
                if key.startswith("rotary_pos_emb."):  # inv_freq of old checkpoints
                    continue
                if key not in params:
                    raise ValueError(f"unexpected checkpoint tensor {name}")
                with torch.no_grad():
                    params[key].copy_(w.to(params[key].dtype))
                own.add(key)
            elif name.startswith("model.language_model."):
                text.append(("model." + name[len("model.language_model."):], w))
            else:
                text.append((name, w))
        missing = sorted(set(params) - own)
        if missing:
            raise ValueError(f"checkpoint lacks {len(missing)} vision weights: {', '.join(missing[:8])}")
        loaded = {"language_model." + n for n in self.language_model.load_weights(text)}
        return loaded | {"visual." + n for n in own}


class Qwen2_5_VLForConditionalGeneration(Qwen2VLForConditionalGeneration):
    """Qwen2.5-VL: the tower with RMSNorm, a gated MLP and window attention; the same decoder and M-RoPE (still
    images have no temporal spacing, so `tokens_per_second` does not enter)."""

    v25 = True
