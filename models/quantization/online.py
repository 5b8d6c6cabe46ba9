"""Quantizing a dense checkpoint while it loads (`--quantization fp8 | w8a8 | w4a16`)."""
from __future__ import annotations

import torch

from pageport.models.quantization.base import QuantizationConfig
from pageport.models.quantization.methods import OnlineW4A16LinearMethod, OnlineW8A8LinearMethod, W8A8Scheme

W4A16_GROUPS = (128, 64, 32)  # the largest that divides the input size; one group per row if none does


class OnlineConfig(QuantizationConfig):
    """fp8 / w8a8: per-channel weights, dynamic per-token activations; w4a16: symmetric int4 in groups of 128
    input features (64 or 32 where the input size is not a multiple of 128, as SmolLM2's 576)."""

    def __init__(self, kind: str):
        self.name = kind

    def linear_method(self, prefix, layer):
        if self.name == "w4a16":
            group = next((g for g in W4A16_GROUPS if layer.input_size % g == 0), None)
            return OnlineW4A16LinearMethod(group, True)
        dtype = torch.float8_e4m3fn if self.name == "fp8" else torch.int8
        return OnlineW8A8LinearMethod(W8A8Scheme(dtype, "channel"))
