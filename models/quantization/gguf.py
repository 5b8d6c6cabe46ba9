"""A GGUF file's 4-bit linears kept 4-bit (`--quantization gguf`): Q4_0 and Q4_1 tensors run as W4A16 with
groups of 32 (the file's blocks), every other type is dequantized as without the option.

The codes come back from the dequantized weights exactly, block by block: Q4_1 stores w = q * d + m with
m = the block's min and d = (max - min) / 15, so the min and max are codes 0 and 15 (llama.cpp's quantizer);
Q4_0 stores w = (q - 8) * d with d = -(the value of largest magnitude) / 8, which is code 0. In the W4A16 form
w = (q - z) * s: Q4_1 has s = d and a float zero point z = -m / d, Q4_0 s = d and z = 8. Only the scale and zero
point are rounded, to the model's dtype.
"""
from __future__ import annotations

import torch

from pageport.models.quantization.base import QuantizationConfig
from pageport.models.quantization.methods import OnlineW4A16LinearMethod

GROUP = 32
FOUR_BIT = ("Q4_0", "Q4_1")


def recover_q4(w: torch.Tensor, symmetric: bool):
    """Dequantized Q4_0 (symmetric) / Q4_1 weights [N, K] -> (codes 0..15, scales [N, K/32], zero points or None)."""
    g = w.float().unflatten(1, (-1, GROUP))
    if symmetric:
        extreme = g.gather(-1, g.abs().argmax(-1, keepdim=True)).squeeze(-1)
        d = torch.where(extreme == 0, torch.ones_like(extreme), -extreme / 8)
        codes = (torch.round(g / d[..., None]) + 8).clamp(0, 15)
        return codes.flatten(1).to(torch.int32), d, None
    lo, hi = g.amin(-1), g.amax(-1)
    d = (hi - lo) / 15
    flat = d == 0  # a constant block: code 0 and zero point -lo with scale 1
    d = torch.where(flat, torch.ones_like(d), d)
    codes = torch.round((g - lo[..., None]) / d[..., None]).clamp(0, 15)
    return codes.flatten(1).to(torch.int32), d, -lo / d


class GgufQ4LinearMethod(OnlineW4A16LinearMethod):
    def unpack(self, layer):
        w = layer.weight.data
        codes, scale, zero = recover_q4(w, self.symmetric)
        return codes, scale.to(w.dtype), None if zero is None else zero.to(w.dtype), None


class GgufConfig(QuantizationConfig):
    name = "gguf"

    def __init__(self, tensor_types: dict[str, str]):
        """tensor_types: Hugging Face module name (model.layers.0.self_attn.q_proj) -> GGML type name."""
        self.types = tensor_types

    def linear_method(self, prefix, layer):
        from pageport.models.quantization.compressed_tensors import _checkpoint_names

        kinds = {self.types.get(p) for p in _checkpoint_names(prefix, layer)}
        if len(kinds) != 1 or next(iter(kinds)) not in FOUR_BIT or layer.input_size % GROUP:
            return None  # mixed or other types: dequantized
        return GgufQ4LinearMethod(GROUP, symmetric=kinds == {"Q4_0"})
