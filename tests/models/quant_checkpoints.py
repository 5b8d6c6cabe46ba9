"""Tiny quantized checkpoints for the tests: compressed-tensors ones made by compressed-tensors itself (the
library llm-compressor saves with), the others by packers that follow each format's published layout."""
from __future__ import annotations

import json
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

TINY_LLAMA = dict(vocab_size=256, hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=False)


def dense_llama(seed: int = 0, **overrides) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**{**TINY_LLAMA, **overrides}))
    with torch.no_grad():  # weights of a trained model's size (the default init makes a near-constant output)
        for name, p in model.named_parameters():
            if "norm" not in name:
                p.normal_(0, 0.08)
    return model.to(torch.bfloat16).eval()


def _weight_qparams(module, args):
    """min-max observer: the scale and zero point llm-compressor's default observer computes."""
    from compressed_tensors.quantization.utils import calculate_qparams

    w = module.weight.data.float()
    strategy = str(getattr(args.strategy, "value", args.strategy))
    if strategy == "channel":
        lo, hi = w.amin(1, keepdim=True), w.amax(1, keepdim=True)
    elif strategy == "tensor":
        lo, hi = w.amin().reshape(1), w.amax().reshape(1)
    elif strategy == "group":
        g = w.unflatten(-1, (-1, args.group_size))
        lo, hi = g.amin(-1), g.amax(-1)
    elif strategy == "block":
        br, bc = args.block_structure
        b = w.reshape(w.shape[0] // br, br, w.shape[1] // bc, bc)
        lo, hi = b.amin((1, 3)), b.amax((1, 3))
    else:
        raise ValueError(strategy)
    return calculate_qparams(lo, hi, args)


def compressed_tensors_checkpoint(path: Path, scheme: str, ids: torch.Tensor, group_size: int | None = None,
                                  seed: int = 0) -> Path:
    """Quantize a tiny Llama with a compressed-tensors preset scheme (W8A8, FP8, FP8_DYNAMIC, FP8_BLOCK, W4A16,
    W4A16_ASYM; group_size overrides the preset's) and save it compressed, as llm-compressor does.
    Static activation scales (FP8) are the max |input| over `ids`."""
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.offload import update_offload_parameter
    from compressed_tensors.quantization import (QuantizationConfig, QuantizationStatus, apply_quantization_config,
                                                 preset_name_to_scheme)

    model = dense_llama(seed)
    qscheme = preset_name_to_scheme(scheme, ["Linear"])
    if group_size is not None:
        qscheme.weights.group_size = group_size
    input_absmax = {}
    if qscheme.input_activations is not None and not qscheme.input_activations.dynamic:
        hooks = [m.register_forward_pre_hook(lambda m, a, n=n: input_absmax.__setitem__(
            n, max(input_absmax.get(n, 0.0), a[0].abs().max().item())))
            for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head"]
        with torch.no_grad():
            model(ids)
        for h in hooks:
            h.remove()
    apply_quantization_config(model, QuantizationConfig(config_groups={"group_0": qscheme}, ignore=["lm_head"]))
    for name, m in model.named_modules():
        s = getattr(m, "quantization_scheme", None)
        if s is None:
            continue
        scale, zp = _weight_qparams(m, s.weights)
        update_offload_parameter(m, "weight_scale", scale.to(m.weight_scale.dtype))
        if hasattr(m, "weight_zero_point"):
            update_offload_parameter(m, "weight_zero_point", zp.to(m.weight_zero_point.dtype))
        if name in input_absmax:
            update_offload_parameter(m, "input_scale", torch.tensor([input_absmax[name] / 448.0],
                                                                    dtype=m.input_scale.dtype))
        m.quantization_status = QuantizationStatus.FROZEN
    compressor = ModelCompressor.from_pretrained_model(model)
    compressor.compress_model(model)
    model.save_pretrained(path)
    compressor.update_config(str(path))
    return path


def pack_quantized_reference(path: Path, seed: int = 0) -> LlamaForCausalLM:
    """The dense float32 model of a pack-quantized checkpoint: W = (code - zero) * scale from compressed-tensors'
    own unpacking (its `decompress` rounds W to the scales' bf16; this keeps float32)."""
    from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32
    from safetensors import safe_open

    group = json.loads((path / "config.json").read_text())["quantization_config"]["config_groups"]["group_0"]
    g = group["weights"]["group_size"]
    model = dense_llama(seed).float()
    with safe_open(path / "model.safetensors", "pt") as f:
        for name, mod in model.named_modules():
            if f"{name}.weight_packed" not in f.keys():
                continue
            n, k = mod.weight.shape
            scale = f.get_tensor(f"{name}.weight_scale").float()
            q = unpack_from_int32(f.get_tensor(f"{name}.weight_packed"), 4, torch.Size([n, k])).float()
            zp = f.get_tensor(f"{name}.weight_zero_point") if f"{name}.weight_zero_point" in f.keys() else None
            z = 0.0 if zp is None else unpack_from_int32(zp, 4, torch.Size([n, scale.shape[1]]), packed_dim=0).float()
            z = z if zp is None else z.repeat_interleave(g, 1)
            mod.weight.data.copy_((q - z) * scale.repeat_interleave(g, 1))
    return model


def dense_checkpoint(path: Path, state_dict: dict, seed: int = 0, quantization_config: dict | None = None,
                     **overrides) -> Path:
    """Save a tiny Llama's config with `state_dict` as its safetensors (a packer's output, or a dequantized
    reference), and quantization_config in its config.json."""
    from safetensors.torch import save_file

    model = dense_llama(seed, **overrides)
    model.config.save_pretrained(path)
    if quantization_config is not None:
        cfg = json.loads((path / "config.json").read_text())
        cfg["quantization_config"] = quantization_config
        (path / "config.json").write_text(json.dumps(cfg, indent=1))
    save_file({k: v.contiguous() for k, v in state_dict.items()}, str(path / "model.safetensors"))
    return path
