"""Quantizing a dense checkpoint while it loads (`--quantization fp8 | w8a8 | w4a16`)."""
from __future__ import annotations

import torch

from pageport.models.quantization.base import QuantizationConfig
from pageport.models.quantization.methods import OnlineW4A16LinearMethod, OnlineW8A8LinearMethod, W8A8Scheme

W4A16_GROUP = 128


class OnlineConfig(QuantizationConfig):
    """fp8 / w8a8: per-channel weights, dynamic per-token activations; w4a16: symmetric int4 in groups of 128
    input features (one group per row where the input size is not a multiple of 128)."""

    def __init__(self, kind: str):
        self.name = kind

    def linear_method(self, prefix, layer):
        if self.name == "w4a16":
            return OnlineW4A16LinearMethod(W4A16_GROUP if layer.input_size % W4A16_GROUP == 0 else None, True)
        dtype = torch.float8_e4m3fn if self.name == "fp8" else torch.int8
        return OnlineW8A8LinearMethod(W8A8Scheme(dtype, "channel"))
