"""compressed-tensors checkpoints (llm-compressor's output): `quant_method: compressed-tensors`.

Read from `quantization_config`: `config_groups` (each: `targets`, `weights`, `input_activations`, `format`),
the top-level `format` and `ignore`. Served:
- int-quantized / float-quantized (naive): W8A8 int8 or fp8 — weights per tensor, per channel or in blocks
  (fp8 128x128), activations dynamic per token (per token and 128-column group with block weights) or static
  per tensor; symmetric weights; activations symmetric, or asymmetric for int8 dynamic per token.
- pack-quantized: 4- or 8-bit weights (W4A16, W8A16), groups or channels, symmetric or with packed zero points;
  no activation quantization. Codes are stored offset by 2^(bits-1) (4 bits: code = q + 8), 32/bits to an int32
  along the input features; zero points the same way along the output features.
"""
from __future__ import annotations

from typing import Optional

import torch

from pageport.models.quantization.base import (LinearMethod, QuantizationConfig, drop_param, matches, num_shards,
                                                quant_param)
from pageport.models.quantization.methods import WnA16LinearMethod, W8A8LinearMethod, W8A8Scheme
from pageport.platforms.quant_ops import unpack_codes

_W8A8_FORMATS = ("int-quantized", "float-quantized", "naive-quantized")


def _unsupported(what: str) -> ValueError:
    return ValueError(f"compressed-tensors checkpoint with {what} is not supported; supported: W8A8 int8/fp8 "
                      f"(per-tensor, per-channel or 128x128-block weights, dynamic per-token or static per-tensor "
                      f"activations, symmetric; int8 dynamic per-token activations also asymmetric) and W4A16 / "
                      f"W8A16 pack-quantized (groups or channels)")


class CompressedTensorsWnA16(WnA16LinearMethod):
    def create_weights(self, layer, dtype, device) -> None:
        n, k = layer.output_size, layer.input_size
        groups, per_word = self.groups(k), 32 // self.bits
        drop_param(layer, "weight")
        quant_param(layer, "weight_packed", (n, k // per_word), torch.int32, device)
        quant_param(layer, "weight_scale", (n, groups), dtype, device)
        quant_param(layer, "weight_shape", (num_shards(layer), 2), torch.int64, device, per_shard=True)
        if not self.symmetric:
            quant_param(layer, "weight_zero_point", (-(-n // per_word), groups), torch.int32, device,
                        rows_per_elem=per_word)

    def unpack(self, layer):
        codes = unpack_codes(layer.weight_packed.data, self.bits)
        zeros = None
        if not self.symmetric:
            zeros = unpack_codes(layer.weight_zero_point.data.t().contiguous(), self.bits).t()[:layer.output_size]
        return codes, layer.weight_scale.data, zeros, None


class CompressedTensorsConfig(QuantizationConfig):
    name = "compressed-tensors"

    def __init__(self, cfg: dict):
        self.ignore = list(cfg.get("ignore") or [])
        self.groups = []
        top_format = cfg.get("format")
        for name, group in (cfg.get("config_groups") or {}).items():
            fmt = group.get("format") or top_format
            self.groups.append((list(group.get("targets") or []), self._method_factory(group, fmt)))
        if cfg.get("kv_cache_scheme"):
            raise _unsupported("a quantized KV cache (kv_cache_scheme)")
        sparsity = cfg.get("sparsity_config") or {}
        if sparsity.get("format") not in (None, "dense"):
            raise _unsupported(f"sparsity format {sparsity.get('format')!r}")
        if cfg.get("transform_config"):
            raise _unsupported("transforms (transform_config)")
        if not self.groups:
            raise _unsupported("no config_groups")

    @staticmethod
    def _method_factory(group: dict, fmt: Optional[str]):
        w = group.get("weights") or {}
        a = group.get("input_activations")
        if group.get("output_activations"):
            raise _unsupported("output activation quantization")
        bits, wtype, strategy = w.get("num_bits"), w.get("type", "int"), w.get("strategy")
        if fmt == "pack-quantized":
            if bits not in (4, 8) or wtype != "int" or a:
                raise _unsupported(f"pack-quantized {bits}-bit {wtype} weights{' with activations' if a else ''}")
            if strategy not in ("group", "channel"):
                raise _unsupported(f"pack-quantized weights per {strategy}")
            group_size = w.get("group_size") if strategy == "group" else None
            sym = bool(w.get("symmetric", True))
            return lambda: CompressedTensorsWnA16(group_size, sym, bits)
        if fmt in _W8A8_FORMATS:
            if bits != 8 or wtype not in ("int", "float") or not w.get("symmetric", True):
                raise _unsupported(f"{fmt} {bits}-bit {wtype} weights (symmetric={w.get('symmetric')})")
            if not a:
                raise _unsupported(f"{fmt} 8-bit weights without activation quantization (W8A16)")
            asym = not a.get("symmetric", True)
            if (a.get("num_bits") != 8 or a.get("type", "int") != wtype
                    or asym and not (wtype == "int" and a.get("dynamic") and a.get("strategy") == "token")):
                raise _unsupported(f"{wtype} weights with {a.get('num_bits')}-bit {a.get('type')} activations "
                                   f"(symmetric={a.get('symmetric')})")
            dtype = torch.int8 if wtype == "int" else torch.float8_e4m3fn
            block = None
            if strategy == "block":
                block = tuple(w.get("block_structure") or ())
                if wtype != "float" or len(block) != 2:
                    raise _unsupported(f"block weights {block} of type {wtype}")
                if not (a.get("dynamic") and a.get("strategy") == "group" and a.get("group_size") == block[1]):
                    raise _unsupported("block weights without dynamic per-token-group activations")
            elif strategy not in ("tensor", "channel"):
                raise _unsupported(f"8-bit weights per {strategy}")
            elif a.get("dynamic"):
                if a.get("strategy") != "token":
                    raise _unsupported(f"dynamic activations per {a.get('strategy')}")
            elif a.get("strategy") != "tensor":
                raise _unsupported(f"static activations per {a.get('strategy')}")
            scheme = W8A8Scheme(dtype, strategy, block, static_input=not a.get("dynamic"), asymmetric_input=asym)
            return lambda: W8A8LinearMethod(scheme)
        raise _unsupported(f"format {fmt!r}")

    def _group(self, prefix: str):
        if matches(prefix, self.ignore):
            return None
        for targets, factory in self.groups:
            if matches(prefix, targets):
                return factory
        return None

    def linear_method(self, prefix: str, layer) -> Optional[LinearMethod]:
        # a fused layer is quantized when its checkpoint parts are (ignore lists name the unfused modules)
        parts = _checkpoint_names(prefix, layer)
        factories = {self._group(p) is None for p in parts}
        if len(factories) > 1:
            raise ValueError(f"compressed-tensors: the parts of {prefix} ({', '.join(parts)}) are quantized "
                             f"differently; pageport fuses them into one matmul")
        factory = self._group(parts[0])
        return factory() if factory else None

    def check_unquantized(self, prefix: str) -> None:
        if self._group(prefix) is not None:
            raise _unsupported(f"quantized {prefix} (pageport keeps these dense)")


_FUSED_PARTS = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}


def _checkpoint_names(prefix: str, layer) -> list[str]:
    head, _, last = prefix.rpartition(".")
    parts = _FUSED_PARTS.get(last)
    return [f"{head}.{p}" for p in parts] if parts else [prefix]
