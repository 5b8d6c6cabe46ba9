"""GPTQ checkpoints (`quant_method: gptq`, AutoGPTQ / GPTQModel layout).

qweight [K/8, N] int32: eight 4-bit codes per word along the input features (nibble j = row 8i + j);
qzeros [K/G, N/8]: codes along the output features; `checkpoint_format` gptq (v1, the default) stores
zero - 1, gptq_v2 the zero itself; scales [K/G, N]; g_idx [K]: the group of each input feature (act-order
checkpoints, desc_act, permute them). w[n, k] = (q - z) * s of group g_idx[k].
With act order the input features are sorted by group once at load, so groups are contiguous for the kernel,
and each step gathers the activations in that order.
"""
from __future__ import annotations

import torch

from pageport.models.quantization.base import QuantizationConfig, drop_param, quant_param
from pageport.models.quantization.methods import WnA16LinearMethod
from pageport.platforms.quant_ops import unpack_codes


class GptqLinearMethod(WnA16LinearMethod):
    def __init__(self, group_size, symmetric: bool, zero_offset: int):
        super().__init__(group_size, symmetric)
        self.zero_offset = zero_offset

    def create_weights(self, layer, dtype, device) -> None:
        n, k = layer.output_size, layer.input_size
        groups = self.groups(k)
        drop_param(layer, "weight")
        quant_param(layer, "qweight", (k // 8, n), torch.int32, device, out_dim=1)
        quant_param(layer, "qzeros", (groups, n // 8), torch.int32, device, out_dim=1, rows_per_elem=8)
        quant_param(layer, "scales", (groups, n), dtype, device, out_dim=1)
        quant_param(layer, "g_idx", (k,), torch.int32, device, out_dim=None,
                    fill=None).data.copy_(torch.arange(k, device=device) // (self.group_size or k))

    def unpack(self, layer):
        k = layer.input_size
        g = self.group_size or k
        codes = unpack_codes(layer.qweight.data.t().contiguous())  # [N, K]
        zeros = (unpack_codes(layer.qzeros.data) + self.zero_offset).clamp(0, 15).t().contiguous()  # [N, K/G]
        g_idx = layer.g_idx.data.long()
        perm = None
        if not torch.equal(g_idx, torch.arange(k, device=g_idx.device) // g):
            perm = torch.argsort(g_idx, stable=True)
            if not torch.equal(g_idx[perm], torch.arange(k, device=g_idx.device) // g):
                raise ValueError(f"gptq g_idx does not put exactly {g} input features in every group")
            codes = codes[:, perm]
        return codes, layer.scales.data.t().contiguous(), zeros, perm


class GptqConfig(QuantizationConfig):
    name = "gptq"

    def __init__(self, cfg: dict):
        bits = cfg.get("bits")
        fmt = cfg.get("checkpoint_format", "gptq")
        if bits != 4 or fmt not in ("gptq", "gptq_v2"):
            raise ValueError(f"gptq checkpoint with {bits}-bit weights in format {fmt!r} is not supported; "
                             f"supported: 4-bit, checkpoint_format gptq or gptq_v2")
        self.group_size = cfg.get("group_size", 128)
        self.sym = bool(cfg.get("sym", True))
        self.zero_offset = 1 if fmt == "gptq" else 0
        self.skip = list(cfg.get("modules_to_not_convert") or [])
        if cfg.get("lm_head"):
            raise ValueError("gptq checkpoint with a quantized lm_head is not supported; supported: quantized "
                             "attention and MLP linears")

    def _quantized(self, prefix: str) -> bool:
        return not any(s in prefix for s in self.skip)

    def linear_method(self, prefix, layer):
        if not self._quantized(prefix):
            return None
        return GptqLinearMethod(None if self.group_size in (-1, None) else self.group_size, self.sym,
                                self.zero_offset)

    def check_unquantized(self, prefix: str) -> None:
        if self._quantized(prefix):
            raise ValueError(f"gptq checkpoint with quantized {prefix} is not supported (pageport keeps MoE experts "
                             f"dense); supported: quantized attention and MLP linears")
