"""A GGUF file's quantized linears kept quantized (`--quantization gguf`): Q4_0 and Q4_1 tensors run as W4A16,
Q8_0 as W8A16, with groups of 32 (the file's blocks); every other type is dequantized as without the option.

The codes come back from the dequantized weights exactly, block by block (llama.cpp's quantizers): Q4_1 stores
w = q * d + m with m = the block's min and d = (max - min) / 15, so the min and max are codes 0 and 15; Q4_0
stores w = (q - 8) * d with d = -(the value of largest magnitude) / 8, which is code 0; Q8_0 stores w = q * d
with d = max|w| / 127. In the weight-only form w = (q - z) * s: Q4_1 has s = d and a float zero point z = -m / d,
Q4_0 s = d and z = 8, Q8_0 s = d and z = 128 (unsigned codes q + 128). Only the scale and zero point are rounded,
to the model's dtype.
"""
from __future__ import annotations

import torch

from pageport.models.quantization.base import QuantizationConfig
from pageport.models.quantization.methods import OnlineW4A16LinearMethod

GROUP = 32
KEPT = ("Q4_0", "Q4_1", "Q8_0")


def recover_codes(w: torch.Tensor, kind: str):
    """Dequantized Q4_0 / Q4_1 / Q8_0 weights [N, K] -> (unsigned codes, scales [N, K/32], zero points or None)."""
    g = w.float().unflatten(1, (-1, GROUP))
    if kind == "Q8_0":
        d = g.abs().amax(-1) / 127
        d = torch.where(d == 0, torch.ones_like(d), d)
        return (torch.round(g / d[..., None]) + 128).clamp(0, 255).flatten(1).to(torch.int32), d, None
    if kind == "Q4_0":
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


class GgufLinearMethod(OnlineW4A16LinearMethod):
    def __init__(self, kind: str):
        super().__init__(GROUP, symmetric=kind != "Q4_1")
        self.kind, self.bits = kind, 8 if kind == "Q8_0" else 4

    def unpack(self, layer):
        w = layer.weight.data
        codes, scale, zero = recover_codes(w, self.kind)
        return codes, scale.to(w.dtype), None if zero is None else zero.to(w.dtype), None


class GgufConfig(QuantizationConfig):
    name = "gguf"

    def __init__(self, tensor_types: dict[str, str]):
        """tensor_types: Hugging Face module name (model.layers.0.self_attn.q_proj) -> GGML type name."""
        self.types = tensor_types

    def linear_method(self, prefix, layer):
        from pageport.models.quantization.compressed_tensors import _checkpoint_names

        kinds = {self.types.get(p) for p in _checkpoint_names(prefix, layer)}
        if len(kinds) != 1 or next(iter(kinds)) not in KEPT or layer.input_size % GROUP:
            return None  # mixed or other types: dequantized
        return GgufLinearMethod(next(iter(kinds)))
