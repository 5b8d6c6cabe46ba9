"""Quantized checkpoints and in-run quantization of the linear layers.

The format comes from `quantization_config.quant_method` in config.json; `--quantization` overrides it (and
must then agree with a quantized checkpoint), or quantizes a dense checkpoint while it loads:
- checkpoint formats: compressed-tensors, fp8 (Hugging Face's, incl. block scales), awq, gptq
- in the run: fp8 (FP8 W8A8: per-channel weights, dynamic per-token activations), w8a8 (the same in int8),
  w4a16 (symmetric int4, group 128)
- gguf: a GGUF file's Q4_0 / Q4_1 / Q8_0 linears kept quantized with their own codes (W4A16 / W8A16, group 32)
(`int4` / `int8` are the CPU's weight-only speed mode, `pageport.kernels_cpu.quant`, applied after loading.)

Loading: the model is built inside `layers.quantized_linears()` (dense weights left on "meta"), then
`create_weights` gives each linear its method's checkpoint-shaped parameters, the model loads as usual, and
`process_weights` converts them to the kernels' layout.
"""
from __future__ import annotations

import logging
from typing import Optional

import torch
from torch import nn

from pageport.models.quantization.base import LinearMethod, QuantizationConfig, dense_weight

logger = logging.getLogger(__name__)

CHECKPOINT_FORMATS = ("compressed-tensors", "fp8", "awq", "gptq")
ONLINE = ("fp8", "w8a8", "w4a16")
GGUF = "gguf"  # needs the file's tensor types: made by the loader (`gguf_config`)
RUNTIME = ("int4", "int8")  # the CPU's weight-only mode, applied after loading by the platform
QUANTIZATIONS = tuple(dict.fromkeys((*CHECKPOINT_FORMATS, *ONLINE, GGUF, *RUNTIME)))


def _supported() -> str:
    return (f"checkpoint formats {', '.join(CHECKPOINT_FORMATS)}; in-run quantization "
            f"{', '.join(ONLINE)}; gguf (a GGUF file's Q4_0 / Q4_1 / Q8_0 linears); CPU weight-only {', '.join(RUNTIME)}")


def _hf_quant_config(hf_config) -> Optional[dict]:
    q = getattr(hf_config, "quantization_config", None)
    if q is None:
        return None
    return q if isinstance(q, dict) else q.to_dict()


def get_quantization_config(hf_config, override: Optional[str] = None) -> Optional[QuantizationConfig]:
    """The model's QuantizationConfig, or None for dense linears (also for the CPU's `int4`/`int8` mode).
    Raises ValueError, one line naming the format and what is supported, for anything pageport cannot serve."""
    cfg = _hf_quant_config(hf_config)
    method = (cfg or {}).get("quant_method")
    method = method.lower().replace("_", "-") if isinstance(method, str) else method
    if override is not None and override not in QUANTIZATIONS:
        raise ValueError(f"unknown quantization {override!r}; supported: {_supported()}")
    if cfg is not None and method not in CHECKPOINT_FORMATS:
        raise ValueError(f"quantization format {method!r} of this checkpoint is not supported; "
                         f"supported: {_supported()}")
    if cfg is not None and override is not None and override != method:
        raise ValueError(f"--quantization {override} does not match the checkpoint's quantization {method!r}")
    if cfg is None:
        if override in RUNTIME or override is None:
            return None
        if override == GGUF:
            raise ValueError("--quantization gguf needs a .gguf model")
        if override not in ONLINE:
            raise ValueError(f"--quantization {override} needs a checkpoint quantized as {override}; this one is "
                             f"dense (in-run quantization: {', '.join(ONLINE)})")
        from pageport.models.quantization.online import OnlineConfig
        return OnlineConfig(override)
    if method == "compressed-tensors":
        from pageport.models.quantization.compressed_tensors import CompressedTensorsConfig
        return CompressedTensorsConfig(cfg)
    if method == "fp8":
        from pageport.models.quantization.fp8 import Fp8Config
        return Fp8Config(cfg)
    if method == "awq":
        from pageport.models.quantization.awq import AwqConfig
        return AwqConfig(cfg)
    from pageport.models.quantization.gptq import GptqConfig
    return GptqConfig(cfg)


def gguf_config(tensors) -> QuantizationConfig:
    """`--quantization gguf` for a GGUF file's tensor table (`gguf_loader.TensorInfo`s)."""
    from gguf import GGMLQuantizationType

    from pageport.models.gguf_loader import hf_name
    from pageport.models.quantization.gguf import GgufConfig
    types = {}
    for t in tensors:
        name = hf_name(t.name)
        if name and name.endswith(".weight"):
            types[name.removesuffix(".weight")] = GGMLQuantizationType(t.qtype).name
    return GgufConfig(types)


def create_weights(model: nn.Module, quant_config: QuantizationConfig, platform, dtype: torch.dtype) -> int:
    """Give each linear of a model built inside `quantized_linears()` its parameters: its method's, or the
    dense weight. Returns the number of quantized linears."""
    from pageport.models.layers import LinearBase

    n = 0
    for prefix, module in model.named_modules():
        if type(module).__name__ == "FusedMoE":
            quant_config.check_unquantized(f"{prefix}.0.gate_proj")
        if not isinstance(module, LinearBase) or not module.weight.is_meta:
            continue
        method = quant_config.linear_method(prefix, module)
        if method is None:
            dense_weight(module, dtype, platform.device)
            continue
        method.ops = platform.ops
        method.create_weights(module, dtype, platform.device)
        module.quant_method = method
        n += 1
    return n


@torch.no_grad()
def process_weights(model: nn.Module) -> None:
    """After loading: every quantized linear converts its checkpoint tensors to its kernel's layout."""
    for module in model.modules():
        method = getattr(module, "quant_method", None)
        if isinstance(method, LinearMethod):
            method.process_weights(module)


__all__ = ["QUANTIZATIONS", "gguf_config", "QuantizationConfig", "LinearMethod", "get_quantization_config",
           "create_weights",
           "process_weights"]
