"""Hugging Face's fp8 checkpoints (`quant_method: fp8`, transformers' FineGrainedFP8 and DeepSeek-V3 style).

float8_e4m3fn weights with `weight_scale_inv` (it multiplies: w = q * weight_scale_inv): a [N/bn, K/bk] grid when
`weight_block_size` is set (activations then quantized per token and bk-column group), else one scale per
tensor (activations per token). `activation_scheme: static` adds a per-tensor `input_scale`.
`modules_to_not_convert` stay dense.
"""
from __future__ import annotations

import torch

from pageport.models.quantization.base import QuantizationConfig, matches
from pageport.models.quantization.methods import W8A8LinearMethod, W8A8Scheme


class Fp8Config(QuantizationConfig):
    name = "fp8"

    def __init__(self, cfg: dict):
        block = cfg.get("weight_block_size")
        scheme = cfg.get("activation_scheme", "dynamic")
        if scheme not in ("dynamic", "static"):
            raise ValueError(f"fp8 checkpoint with activation_scheme {scheme!r} is not supported; "
                             f"supported: dynamic, static")
        if block is not None and (len(block) != 2 or scheme != "dynamic"):
            raise ValueError(f"fp8 checkpoint with weight_block_size {block} and {scheme} activations is not "
                             f"supported; supported: 2-d blocks with dynamic activations")
        self.skip = list(cfg.get("modules_to_not_convert") or cfg.get("ignored_layers") or [])
        self.scheme = W8A8Scheme(torch.float8_e4m3fn, "block" if block else "tensor",
                                 tuple(block) if block else None, static_input=scheme == "static",
                                 scale_name="weight_scale_inv")

    def _quantized(self, prefix: str) -> bool:
        return not any(prefix == p or prefix.startswith(p + ".") or prefix.endswith("." + p) for p in self.skip) \
            and not matches(prefix, [p for p in self.skip if p.startswith("re:")])

    def linear_method(self, prefix, layer):
        return W8A8LinearMethod(self.scheme) if self._quantized(prefix) else None

    def check_unquantized(self, prefix: str) -> None:
        if self._quantized(prefix):
            raise ValueError(f"fp8 checkpoint with quantized {prefix} is not supported (pageport keeps MoE "
                             f"experts dense); supported: quantized attention and MLP linears")
