"""AWQ checkpoints (`quant_method: awq`, AutoAWQ's GEMM layout).

qweight [K, N/8] int32 and qzeros [K/G, N/8] hold eight 4-bit codes per word along the output features, in
AWQ's interleaved order: nibble i of a word is output column AWQ_ORDER[i] of its eight. scales [K/G, N].
w[n, k] = (q - z) * s of k's group. Only 4 bits, GEMM packing, with zero points.
"""
from __future__ import annotations

import torch

from pageport.models.quantization.base import QuantizationConfig, drop_param, quant_param
from pageport.models.quantization.methods import WnA16LinearMethod
from pageport.platforms.quant_ops import unpack_codes

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)


def unpack_awq(packed: torch.Tensor) -> torch.Tensor:
    """[R, N/8] int32 -> codes [R, N] in output-column order."""
    nib = unpack_codes(packed).unflatten(-1, (-1, 8))  # [R, N/8, 8]: nibble i
    out = torch.empty_like(nib)
    out[..., list(AWQ_ORDER)] = nib
    return out.flatten(-2)


class AwqLinearMethod(WnA16LinearMethod):
    def create_weights(self, layer, dtype, device) -> None:
        n, k = layer.output_size, layer.input_size
        groups = self.groups(k)
        drop_param(layer, "weight")
        quant_param(layer, "qweight", (k, n // 8), torch.int32, device, out_dim=1, rows_per_elem=8)
        quant_param(layer, "qzeros", (groups, n // 8), torch.int32, device, out_dim=1, rows_per_elem=8)
        quant_param(layer, "scales", (groups, n), dtype, device, out_dim=1)

    def unpack(self, layer):
        codes = unpack_awq(layer.qweight.data).t().contiguous()  # [N, K]
        zeros = unpack_awq(layer.qzeros.data).t().contiguous()  # [N, K/G]
        return codes, layer.scales.data.t().contiguous(), zeros, None


class AwqConfig(QuantizationConfig):
    name = "awq"

    def __init__(self, cfg: dict):
        bits = cfg.get("bits", cfg.get("w_bit"))
        version = str(cfg.get("version", "gemm")).lower()
        zero_point = cfg.get("zero_point", True)
        if bits != 4 or version != "gemm" or not zero_point:
            raise ValueError(f"awq checkpoint with {bits}-bit weights, version {version!r}, zero_point={zero_point} "
                             f"is not supported; supported: 4-bit GEMM packing with zero points")
        self.group_size = cfg.get("group_size", cfg.get("q_group_size", 128))
        self.skip = list(cfg.get("modules_to_not_convert") or [])

    def _quantized(self, prefix: str) -> bool:
        return not any(s in prefix for s in self.skip)

    def linear_method(self, prefix, layer):
        if not self._quantized(prefix):
            return None
        return AwqLinearMethod(None if self.group_size in (-1, None) else self.group_size, symmetric=False)

    def check_unquantized(self, prefix: str) -> None:
        if self._quantized(prefix):
            raise ValueError(f"awq checkpoint with quantized {prefix} is not supported (pageport keeps MoE experts "
                             f"dense); supported: quantized attention and MLP linears")
