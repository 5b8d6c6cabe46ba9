"""LLaVA-NeXT (`LlavaNextForConditionalGeneration`): LLaVA with "anyres" images.

The image processor resizes each image to the best-fitting resolution of `image_grid_pinpoints`, cuts it into
tiles of the vision tower's size and adds the whole image, downscaled, as a first "base" tile. The features of
the tiles are laid out again as one feature map over the grid, the padding the resize added is cut off
("unpadded" by the original aspect ratio), a learned `image_newline` vector ends each row of the map, and the
base tile's features come first. So the number of features depends on the image's size: `feature_count`
below gives it to the front end, which expands each `<image>` to that many placeholders.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import nn

from pageport.models.llava import LlavaForConditionalGeneration
from pageport.platforms import Platform


def best_resolution(height: int, width: int, pinpoints) -> tuple[int, int]:
    """The (height, width) of `pinpoints` that keeps most of the image's pixels after an aspect-preserving
    resize, and of those the one with least padding (the rule of LLaVA-NeXT's image processor)."""
    best, best_eff, best_waste = None, -1, None
    for ph, pw in pinpoints:
        scale = min(pw / width, ph / height)
        eff = min(int(width * scale) * int(height * scale), width * height)
        waste = ph * pw - eff
        if eff > best_eff or (eff == best_eff and waste < best_waste):
            best, best_eff, best_waste = (ph, pw), eff, waste
    return best


def _unpadded(height: int, width: int, cur_h: int, cur_w: int) -> tuple[int, int, int, int]:
    """The rows [top, bottom) and columns [left, right) of a cur_h x cur_w feature map that hold the image
    (an image of `height` x `width` resized to fit and centred with padding)."""
    if width / height > cur_w / cur_h:  # wider than the map: padding above and below
        new_h = int(round(height * (cur_w / width), 7))
        pad = (cur_h - new_h) // 2
        return pad, cur_h - pad, 0, cur_w
    new_w = int(round(width * (cur_h / height), 7))
    pad = (cur_w - new_w) // 2
    return 0, cur_h, pad, cur_w - pad


def _grid(hf_config, height: int, width: int) -> tuple[int, int, int]:
    """(tile rows, tile columns, features per tile side) of an image of this original size."""
    vc = hf_config.vision_config
    bh, bw = best_resolution(height, width, hf_config.image_grid_pinpoints)
    return bh // vc.image_size, bw // vc.image_size, vc.image_size // vc.patch_size


def feature_count(hf_config, height: int, width: int) -> int:
    """Image features (= placeholder tokens) of an image of this original size."""
    rows, cols, g = _grid(hf_config, height, width)
    top, bottom, left, right = _unpadded(height, width, rows * g, cols * g)
    return g * g + (bottom - top) * (right - left + 1)  # base tile, then each kept row plus its newline


class LlavaNextForConditionalGeneration(LlavaForConditionalGeneration):
    """As LLaVA 1.5, with `embed_images(pixel_values [tiles, 3, H, W], image_sizes=[(h, w)])` for one image."""

    extra_weights = ("image_newline",)

    def __init__(self, hf_config, platform: Platform, dtype: torch.dtype):
        if getattr(hf_config, "vision_feature_select_strategy", "default") != "default":
            # "full" keeps CLS, and the tiles' features no longer form a square map
            raise ValueError("LLaVA-NeXT with vision_feature_select_strategy other than 'default' is not supported")
        super().__init__(hf_config, platform, dtype)
        with torch.device(platform.device):
            self.image_newline = nn.Parameter(torch.zeros(hf_config.text_config.hidden_size, dtype=dtype))

    def embed_images(self, pixel_values: torch.Tensor, image_sizes: Optional[Sequence] = None) -> torch.Tensor:
        if image_sizes is None or len(image_sizes) != 1:
            raise ValueError("LLaVA-NeXT embeds one image at a time, with its original (height, width)")
        if pixel_values.dim() == 5:
            pixel_values = pixel_values[0]
        height, width = (int(v) for v in image_sizes[0])
        rows, cols, g = _grid(self.config, height, width)
        if pixel_values.shape[0] < rows * cols + 1:
            raise ValueError(f"the image has {pixel_values.shape[0]} tiles, its size needs {rows * cols + 1}")
        tiles = super().embed_images(pixel_values[:rows * cols + 1])  # [tiles, g*g, hidden]
        base, grid = tiles[0], tiles[1:]
        hidden = grid.shape[-1]
        # tile (r, c)'s feature (i, j) sits at row r*g + i, column c*g + j of the whole map
        fmap = grid.view(rows, cols, g, g, hidden).permute(0, 2, 1, 3, 4).reshape(rows * g, cols * g, hidden)
        top, bottom, left, right = _unpadded(height, width, rows * g, cols * g)
        fmap = fmap[top:bottom, left:right]
        newline = self.image_newline.to(fmap.dtype).expand(fmap.shape[0], 1, hidden)
        return torch.cat([base, torch.cat([fmap, newline], dim=1).reshape(-1, hidden)])[None]
