"""Quantized checkpoints: compressed-tensors made by compressed-tensors; fp8, AWQ and GPTQ by packers of the
published layouts. pageport's logits against Transformers on the same checkpoint, or against the producer's
quantize-dequantize model / the dequantized reference; greedy tokens equal; clear errors for what is not served."""
import json

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM

from pageport.core.config import EngineConfig
from pageport.models import load_model

from .helpers import PagedRunner
from .quant_checkpoints import compressed_tensors_checkpoint, dense_checkpoint, dense_llama, pack_quantized_reference

IDS = torch.randint(0, 256, (1, 24), generator=torch.Generator().manual_seed(1))


def _load(path, cpu_platform, **kw):
    cfg = EngineConfig(model=str(path), dtype=torch.float32, **kw)
    cpu_platform.check_config(cfg)
    return load_model(cfg, cpu_platform).model


def _logits(model, ids=IDS):
    (out,) = PagedRunner(model).step([("a", ids[0].tolist())])
    return out


def _greedy(model, ids, n=8):
    runner, toks = PagedRunner(model), []
    logits = runner.step([("g", ids[0].tolist())])[0][-1]
    for _ in range(n):
        toks.append(int(logits.argmax()))
        logits = runner.step([("g", [toks[-1]])])[0][-1]
    return toks


def _hf(path):
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def _hf_greedy(hf, ids, n=8):
    with torch.no_grad():
        return hf.generate(ids, max_new_tokens=n, do_sample=False)[0, ids.shape[1]:].tolist()


# compressed-tensors -----------------------------------------------------------------------------------------
# Transformers decompresses these on the CPU and runs compressed-tensors' quantize-dequantize forward: the same
# weights and, for fp8, the same activation rounding (e4m3 cast of x / (max|x| / 448)), so the logits agree to
# float32 rounding (measured: <= 4e-6 at logits of magnitude ~5).
@pytest.mark.parametrize("scheme, group_size", [("FP8_DYNAMIC", None), ("FP8", None), ("FP8_BLOCK", None),
                                                ("W4A16", 128), ("W4A16", 32)])
def test_compressed_tensors_matches_transformers(tmp_path, cpu_platform, scheme, group_size):
    compressed_tensors_checkpoint(tmp_path, scheme, IDS, group_size)
    model = _load(tmp_path, cpu_platform)
    assert model.model.layers[0].mlp.gate_up_proj.quant_method is not None
    hf = _hf(tmp_path)
    with torch.no_grad():
        ref = hf(IDS).logits[0]
    torch.testing.assert_close(_logits(model), ref, atol=1e-4, rtol=0)
    assert _greedy(model, IDS) == _hf_greedy(hf, IDS)


def test_compressed_tensors_w4a16_asymmetric_matches_the_dequantized_reference(tmp_path, cpu_platform):
    # Transformers cannot load asymmetric pack-quantized zero points (it expects them unpacked): the reference is
    # pageport's dense model of the weights compressed-tensors' own unpacking gives (the same computation on
    # dense weights: equal to float32 rounding).
    compressed_tensors_checkpoint(tmp_path, "W4A16_ASYM", IDS, group_size=64)
    cfg = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    assert cfg["config_groups"]["group_0"]["weights"]["symmetric"] is False
    pack_quantized_reference(tmp_path).save_pretrained(tmp_path / "dense")
    ours = _logits(_load(tmp_path, cpu_platform))
    torch.testing.assert_close(ours, _logits(_load(tmp_path / "dense", cpu_platform)), atol=1e-5, rtol=0)


def test_compressed_tensors_w8a8_int8(tmp_path, cpu_platform):
    # The weights load exactly (fused q|k|v = the checkpoint's q, k, v codes and scales). Activations: pageport
    # rounds x / (max|x| / 127) as vLLM's int8 kernels do, compressed-tensors x / (max|x| / 127.5); the two
    # roundings differ by about one quantization step, so the logits are compared at 10 % of their range.
    compressed_tensors_checkpoint(tmp_path, "W8A8", IDS)
    with torch.no_grad():
        ref = _hf(tmp_path)(IDS).logits[0]
    model = _load(tmp_path, cpu_platform)
    qkv = model.model.layers[1].self_attn.qkv_proj
    with safe_open(tmp_path / "model.safetensors", "pt") as f:
        names = [f"model.layers.1.self_attn.{p}_proj" for p in "qkv"]
        w = torch.cat([f.get_tensor(f"{n}.weight") for n in names])
        s = torch.cat([f.get_tensor(f"{n}.weight_scale") for n in names]).float().reshape(-1)
    assert qkv.weight.dtype == torch.int8 and torch.equal(qkv.weight, w) and torch.equal(qkv.weight_scale, s)
    ours = _logits(model)
    assert (ours - ref).abs().max() <= 0.1 * ref.abs().max()
    assert (ours.argmax(-1) == ref.argmax(-1)).float().mean() >= 0.9


# errors ---------------------------------------------------------------------------------------------------
def test_unsupported_format_fails_at_load_with_one_line(tmp_path, cpu_platform):
    dense_checkpoint(tmp_path, dense_llama().state_dict(), quantization_config={"quant_method": "bitsandbytes"})
    with pytest.raises(ValueError) as e:
        _load(tmp_path, cpu_platform)
    msg = str(e.value)
    assert "\n" not in msg and "'bitsandbytes'" in msg
    assert all(f in msg for f in ("compressed-tensors", "fp8", "awq", "gptq"))


def test_unsupported_compressed_tensors_scheme_names_it(tmp_path, cpu_platform):
    compressed_tensors_checkpoint(tmp_path, "W8A16", IDS)  # 8-bit weights, activations left alone
    with pytest.raises(ValueError, match="compressed-tensors checkpoint with pack-quantized 8-bit int weights is not supported; supported: W8A8"):
        _load(tmp_path, cpu_platform)


def test_quantization_flag_must_agree_with_the_checkpoint(tmp_path, cpu_platform):
    compressed_tensors_checkpoint(tmp_path, "FP8_DYNAMIC", IDS)
    with pytest.raises(ValueError, match="does not match the checkpoint's quantization 'compressed-tensors'"):
        _load(tmp_path, cpu_platform, quantization="awq")
