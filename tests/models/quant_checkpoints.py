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
                                  seed: int = 0, ignore: tuple = ("lm_head",),
                                  activations_symmetric: bool | None = None) -> Path:
    """Quantize a tiny Llama with a compressed-tensors preset scheme (W8A8, FP8, FP8_DYNAMIC, FP8_BLOCK, W4A16,
    W4A16_ASYM; group_size / activations_symmetric override the preset's) and save it compressed, as llm-compressor
    does.
    Static activation scales (FP8) are the max |input| over `ids`."""
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.offload import update_offload_parameter
    from compressed_tensors.quantization import (QuantizationConfig, QuantizationStatus, apply_quantization_config,
                                                 preset_name_to_scheme)

    model = dense_llama(seed)
    qscheme = preset_name_to_scheme(scheme, ["Linear"])
    if group_size is not None:
        qscheme.weights.group_size = group_size
    if activations_symmetric is not None:
        qscheme.input_activations.symmetric = activations_symmetric
    input_absmax = {}
    if qscheme.input_activations is not None and not qscheme.input_activations.dynamic:
        hooks = [m.register_forward_pre_hook(lambda m, a, n=n: input_absmax.__setitem__(
            n, max(input_absmax.get(n, 0.0), a[0].abs().max().item())))
            for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n not in ignore]
        with torch.no_grad():
            model(ids)
        for h in hooks:
            h.remove()
    apply_quantization_config(model, QuantizationConfig(config_groups={"group_0": qscheme}, ignore=list(ignore)))
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


# Packers of the published layouts (AWQ, GPTQ, Hugging Face fp8): each returns the checkpoint tensors and the
# dequantized weight they stand for.
def _pack_words(codes: torch.Tensor, order=tuple(range(8))) -> torch.Tensor:
    """codes [..., 8m] 0..15 -> [..., m] int32: nibble i of a word holds code order[i] of its eight."""
    c = codes.to(torch.int64).unflatten(-1, (-1, 8))[..., list(order)]
    word = sum(c[..., i] << (4 * i) for i in range(8))
    return torch.where(word >= 2 ** 31, word - 2 ** 32, word).to(torch.int32)


def quantize_groups(w: torch.Tensor, g_idx: torch.Tensor, groups: int, symmetric: bool):
    """4-bit min-max per group of input features (g_idx[k] = group of column k): codes [N, K], scales
    [N, groups], zeros [N, groups] (8 when symmetric)."""
    w = w.float()
    scales = torch.empty(w.shape[0], groups)
    zeros = torch.full((w.shape[0], groups), 8.0)
    for g in range(groups):
        cols = w[:, g_idx == g]
        if symmetric:
            scales[:, g] = cols.abs().amax(1) / 7.5
        else:
            lo, hi = cols.amin(1).clamp(max=0), cols.amax(1).clamp(min=0)
            scales[:, g] = (hi - lo) / 15
            zeros[:, g] = torch.round(-lo / scales[:, g])
    scales = scales.to(torch.float16).float()  # the checkpoints store fp16 scales
    s, z = scales[:, g_idx], zeros[:, g_idx]
    codes = (torch.round(w / s) + z).clamp(0, 15)
    return codes.to(torch.int32), scales, zeros.to(torch.int32), (codes - z) * s


AWQ_PACK_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)


def awq_tensors(w: torch.Tensor, group_size: int):
    k = w.shape[1]
    codes, scales, zeros, deq = quantize_groups(w, torch.arange(k) // group_size, k // group_size, False)
    return {"qweight": _pack_words(codes.t(), AWQ_PACK_ORDER), "qzeros": _pack_words(zeros.t(), AWQ_PACK_ORDER),
            "scales": scales.t().to(torch.float16)}, deq


def gptq_tensors(w: torch.Tensor, group_size: int, symmetric: bool, act_order: bool, seed: int = 0):
    k = w.shape[1]
    if act_order:  # columns quantized in a permuted order, group i = the i-th run of group_size of them
        perm = torch.randperm(k, generator=torch.Generator().manual_seed(seed))
        g_idx = torch.empty(k, dtype=torch.int64)
        g_idx[perm] = torch.arange(k) // group_size
    else:
        g_idx = torch.arange(k) // group_size
    codes, scales, zeros, deq = quantize_groups(w, g_idx, k // group_size, symmetric)
    qweight = _pack_words(codes).t().contiguous()  # codes [N, K]: words along K -> [N, K/8] -> [K/8, N]
    return {"qweight": qweight, "qzeros": _pack_words((zeros - 1).clamp(0, 15).t()),  # v1 stores zero - 1
            "scales": scales.t().to(torch.float16), "g_idx": g_idx.to(torch.int32)}, deq


def fp8_tensors(w: torch.Tensor, block: tuple[int, int] | None):
    wf = w.float()
    n, k = wf.shape
    if block is None:
        s = wf.abs().amax() / 448.0
        q = (wf / s).to(torch.float8_e4m3fn)
        return {"weight": q, "weight_scale_inv": s.reshape(())}, q.float() * s
    bn, bk = block
    s = wf.reshape(n // bn, bn, k // bk, bk).abs().amax((1, 3)) / 448.0
    full = s.repeat_interleave(bn, 0).repeat_interleave(bk, 1)
    q = (wf / full).to(torch.float8_e4m3fn)
    return {"weight": q, "weight_scale_inv": s}, q.float() * full


def packed_checkpoints(path: Path, pack, quantization_config: dict, seed: int = 0) -> tuple[Path, Path]:
    """(quantized checkpoint, dense checkpoint of its dequantized weights): every decoder linear through
    `pack(weight) -> (tensors, dequantized)`; embeddings, norms and the LM head stay dense."""
    model = dense_llama(seed)
    quant, dense = {}, {}
    for name, t in model.state_dict().items():
        module = name.removesuffix(".weight")
        if ".layers." in name and name.endswith("proj.weight"):
            tensors, deq = pack(t)
            quant.update({f"{module}.{k}": v for k, v in tensors.items()})
            dense[name] = deq.to(torch.float32)
        else:
            quant[name] = t
            dense[name] = t.float()
    dense_checkpoint(path / "quantized", quant, seed, quantization_config)
    dense_checkpoint(path / "dense", dense, seed)
    return path / "quantized", path / "dense"
