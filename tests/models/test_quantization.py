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
from .quant_checkpoints import (awq_tensors, compressed_tensors_checkpoint, dense_checkpoint, dense_llama, fp8_tensors,
                                gptq_tensors, pack_quantized_reference, packed_checkpoints)

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


# Formats that quantize activations are compared layer by layer: each of our decoder linears gets the input the
# matching Transformers linears saw and must give their outputs (q|k|v and gate|up fused). Whole-model logits are
# no test there: a 1e-6 relative change of every e4m3 input moves values across rounding boundaries and this tiny
# model's logits by ~0.5 of 5 (measured), so two correct implementations whose float32 sums round differently
# (torch's CPU _scaled_mm, another compressed-tensors release) differ by that much.
_FUSED = {"self_attn.qkv_proj": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
          "self_attn.o_proj": ("self_attn.o_proj",), "mlp.gate_up_proj": ("mlp.gate_proj", "mlp.up_proj"),
          "mlp.down_proj": ("mlp.down_proj",)}


def _assert_linears_match(model, hf, ids=IDS, tol=1e-3):
    seen = {}

    def keep(name):
        # prepended: the input before any fake-quant pre-hook of the test, as our layer receives it
        def hook(mod, args):
            seen.setdefault(name, [args[0].detach()])  # returns None: the input goes on unchanged
        return hook

    handles = [m.register_forward_pre_hook(keep(n), prepend=True) for n, m in hf.named_modules() if n.endswith("_proj")]
    handles += [m.register_forward_hook(lambda mod, a, out, n=n: seen[n].append(out.detach()))
                for n, m in hf.named_modules() if n.endswith("_proj")]
    with torch.no_grad():
        hf(ids)
        for h in handles:
            h.remove()
        for i, layer in enumerate(model.model.layers):
            for ours, theirs in _FUSED.items():
                names = [f"model.layers.{i}.{t}" for t in theirs]
                x = seen[names[0]][0].reshape(-1, seen[names[0]][0].shape[-1])
                want = torch.cat([seen[n][1].reshape(x.shape[0], -1) for n in names], -1)
                # tol of the output's range: one input crossing an e4m3 boundary moves an output by far less
                torch.testing.assert_close(layer.get_submodule(ours)(x), want, atol=tol * float(want.abs().max()),
                                           rtol=0, msg=lambda m: f"layer {i} {ours}: {m}")


# compressed-tensors -----------------------------------------------------------------------------------------
# Transformers decompresses these on the CPU and runs compressed-tensors' quantize-dequantize forward: the same
# weights and, for fp8, the same activation rounding (e4m3 cast of x / (max|x| / 448)). Weight-only schemes agree
# in the logits to float32 rounding; fp8 ones layer by layer (above). W8A16 is pack-quantized 8-bit.
@pytest.mark.parametrize("scheme, group_size", [("FP8_DYNAMIC", None), ("FP8", None), ("FP8_BLOCK", None),
                                                ("W4A16", 128), ("W4A16", 32), ("W8A16", 128), ("W8A16", 64)])
def test_compressed_tensors_matches_transformers(tmp_path, cpu_platform, scheme, group_size):
    compressed_tensors_checkpoint(tmp_path, scheme, IDS, group_size)
    model = _load(tmp_path, cpu_platform)
    assert model.model.layers[0].mlp.gate_up_proj.quant_method is not None
    hf = _hf(tmp_path)
    if scheme.startswith("FP8"):
        _assert_linears_match(model, hf)
        return
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


# AWQ, GPTQ, Hugging Face fp8: packed here by the published layouts; the reference is the dense checkpoint of the
# weights the packer dequantizes to (pageport on it: the same computation on dense weights, float32 rounding apart;
# Transformers on it: the same greedy tokens).
PACKED = {
    "awq-g64": (lambda w: awq_tensors(w, 64), {"quant_method": "awq", "bits": 4, "group_size": 64,
                                               "zero_point": True, "version": "gemm"}),
    "gptq-sym-g128": (lambda w: gptq_tensors(w, 128, True, False), {"quant_method": "gptq", "bits": 4,
                                                                    "group_size": 128, "sym": True, "desc_act": False}),
    "gptq-asym-actorder-g64": (lambda w: gptq_tensors(w, 64, False, True),
                               {"quant_method": "gptq", "bits": 4, "group_size": 64, "sym": False, "desc_act": True}),
    "fp8-block": (lambda w: fp8_tensors(w, (128, 128)), {"quant_method": "fp8", "activation_scheme": "dynamic",
                                                         "weight_block_size": [128, 128]}),
    "fp8-tensor": (lambda w: fp8_tensors(w, None), {"quant_method": "fp8", "activation_scheme": "dynamic"}),
}


@pytest.mark.parametrize("kind", list(PACKED))
def test_packed_formats_match_the_dequantized_reference(tmp_path, cpu_platform, kind):
    pack, qcfg = PACKED[kind]
    quantized, dense = packed_checkpoints(tmp_path, pack, qcfg)
    model = _load(quantized, cpu_platform)
    assert model.model.layers[0].self_attn.qkv_proj.quant_method is not None
    if kind.startswith("fp8"):
        # activations are quantized too: Transformers on the dequantized weights with each decoder linear's input
        # cast to e4m3 per token (and 128-column group with block weights), as the checkpoint's loaders do
        hf = _hf(dense)
        _fake_quant_fp8_inputs(hf, 128 if "block" in kind else None)
        _assert_linears_match(model, hf)
    else:
        torch.testing.assert_close(_logits(model), _logits(_load(dense, cpu_platform)), atol=1e-4, rtol=0)
        assert _greedy(model, IDS) == _hf_greedy(_hf(dense), IDS)


def _fake_quant_fp8_inputs(hf, group, dtype=torch.float8_e4m3fn):
    qmax = 127.0 if dtype == torch.int8 else 448.0

    def hook(module, args):
        x = args[0].float()
        g = x.unflatten(-1, (-1, group or x.shape[-1]))
        s = g.abs().amax(-1, keepdim=True).clamp_min(1e-10) / qmax
        q = (g / s).round().clamp(-qmax, qmax) if dtype == torch.int8 else (g / s).to(dtype).float()
        return (q * s).flatten(-2)

    for name, m in hf.named_modules():
        if isinstance(m, torch.nn.Linear) and ".layers." in name:
            m.register_forward_pre_hook(hook)


# quantized while loading a dense checkpoint ----------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["fp8", "w8a8", "w4a16"])
def test_in_run_quantization_of_a_dense_checkpoint(tmp_path, cpu_platform, kind):
    # reference: Transformers with each decoder linear's weight replaced by its quantize-dequantize (per-channel
    # round to nearest; w4a16: symmetric groups of 128) and, for W8A8, its input fake-quantized per token
    from pageport.models.quantization.methods import quantize_weight_w4, quantize_weight_w8a8

    dense_llama().save_pretrained(tmp_path)
    hf = _hf(tmp_path)  # loaded, not converted in memory (.to(bf16) would round its rotary frequencies too)
    for name, m in hf.named_modules():
        if isinstance(m, torch.nn.Linear) and ".layers." in name:
            w = m.weight.data.to(torch.float32)
            if kind == "w4a16":
                codes, scale, _ = quantize_weight_w4(w, 128)
                m.weight.data = (codes.float() - 8) * scale.repeat_interleave(128, 1)
            else:
                q, scale = quantize_weight_w8a8(w, torch.float8_e4m3fn if kind == "fp8" else torch.int8)
                m.weight.data = q.float() * scale[:, None]
    model = _load(tmp_path, cpu_platform, quantization=kind)
    assert model.model.layers[0].mlp.down_proj.quant_method is not None
    if kind != "w4a16":
        _fake_quant_fp8_inputs(hf, None, torch.float8_e4m3fn if kind == "fp8" else torch.int8)
        _assert_linears_match(model, hf)
        return
    with torch.no_grad():
        torch.testing.assert_close(_logits(model), hf(IDS).logits[0], atol=1e-4, rtol=0)


def test_in_run_quantization_keeps_bf16_and_the_cpu_kernels(tmp_path, cpu_platform):
    dense_llama().save_pretrained(tmp_path)
    cfg = EngineConfig(model=str(tmp_path), dtype=torch.bfloat16, quantization="w4a16")
    cpu_platform.check_config(cfg)
    model = load_model(cfg, cpu_platform).model
    layer = model.model.layers[0].mlp.gate_up_proj
    assert "int4pack" in layer.wna16 and "weight" not in dict(layer.named_parameters())
    assert torch.isfinite(_logits(model)).all()


@pytest.mark.parametrize("kind", ["gptq-asym-actorder-g64", "awq-g64", "fp8-block"])
def test_dummy_weights_for_a_quantized_config(tmp_path, cpu_platform, kind):
    # --load-format dummy on a quantized checkpoint's config: random codes and small scales, the layer's own
    # metadata (g_idx) kept, so the quantized shapes can be benchmarked without weights
    model = dense_llama()
    model.config.quantization_config = PACKED[kind][1]
    model.config.save_pretrained(tmp_path)
    loaded = _load(tmp_path, cpu_platform, load_format="dummy")
    assert loaded.model.layers[0].mlp.down_proj.quant_method is not None
    assert torch.isfinite(_logits(loaded)).all()


# errors ---------------------------------------------------------------------------------------------------
def test_unsupported_format_fails_at_load_with_one_line(tmp_path, cpu_platform):
    dense_checkpoint(tmp_path, dense_llama().state_dict(), quantization_config={"quant_method": "bitsandbytes"})
    with pytest.raises(ValueError) as e:
        _load(tmp_path, cpu_platform)
    msg = str(e.value)
    assert "\n" not in msg and "'bitsandbytes'" in msg
    assert all(f in msg for f in ("compressed-tensors", "fp8", "awq", "gptq"))


def test_unsupported_compressed_tensors_scheme_names_it(tmp_path, cpu_platform):
    compressed_tensors_checkpoint(tmp_path, "W4A8", IDS)  # 4-bit weights with int8 activations
    with pytest.raises(ValueError, match="compressed-tensors checkpoint with int-quantized 4-bit int weights "
                                         r"\(symmetric=True\) is not supported; supported: W8A8"):
        _load(tmp_path, cpu_platform)


def test_quantized_moe_experts_are_refused(tmp_path, cpu_platform):
    from transformers import MixtralConfig

    cfg = MixtralConfig(vocab_size=64, hidden_size=64, intermediate_size=64, num_hidden_layers=1,
                        num_attention_heads=4, num_key_value_heads=2, num_local_experts=2, max_position_embeddings=64)
    cfg.quantization_config = {"quant_method": "fp8", "activation_scheme": "dynamic"}
    cfg.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="experts.*not supported"):
        _load(tmp_path, cpu_platform, load_format="dummy")


def test_a_quantized_lm_head_is_refused_not_cast(tmp_path, cpu_platform):
    compressed_tensors_checkpoint(tmp_path, "W8A8", IDS, ignore=())  # the LM head quantized too
    with pytest.raises(ValueError, match="quantized int8 checkpoint tensor for a dense parameter"):
        _load(tmp_path, cpu_platform)


def test_sparse_compressed_tensors_checkpoint_is_refused(tmp_path, cpu_platform):
    compressed_tensors_checkpoint(tmp_path, "FP8_DYNAMIC", IDS)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["quantization_config"]["sparsity_config"] = {"format": "sparse-24-bitmask", "targets": ["Linear"]}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="sparsity format 'sparse-24-bitmask' is not supported"):
        _load(tmp_path, cpu_platform)


def test_quantization_flag_must_agree_with_the_checkpoint(tmp_path, cpu_platform):
    compressed_tensors_checkpoint(tmp_path, "FP8_DYNAMIC", IDS)
    with pytest.raises(ValueError, match="does not match the checkpoint's quantization 'compressed-tensors'"):
        _load(tmp_path, cpu_platform, quantization="awq")


# GGUF ------------------------------------------------------------------------------------------------------------
@pytest.mark.slow  # loads the default model twice in float32 (~15 s)
def test_gguf_q4_linears_stay_4bit_with_the_files_codes(cpu_platform):
    # the default model (Q4_1 linears, Q8_0 embedding) in float32: the W4A16 weights equal the file's dequantized
    # ones to float32 rounding (codes recovered exactly, scale and zero point kept in float32), so the logits agree
    from pageport.models.default import default_model_path
    from pageport.platforms.quant_ops import dequantize_wn

    def load(q):
        cfg = EngineConfig(model=str(default_model_path()), dtype=torch.float32, quantization=q)
        cpu_platform.check_config(cfg)
        return load_model(cfg, cpu_platform).model

    dense, quant = load(None), load("gguf")
    n = 0
    for (name, d), (_, q) in zip(dense.named_modules(), quant.named_modules()):
        if getattr(q, "wna16", None) is not None:
            w = q.wna16
            assert w["group_size"] == 32 and w["zeros"] is not None  # Q4_1: fractional zero points
            deq = dequantize_wn(w["qweight"], w["scales"], w["zeros"], 32)
            assert (deq - d.weight).abs().max() <= 1e-6, name
            n += 1
    assert n == 30 * 4  # qkv, o, gate|up, down of every layer; the Q8_0 embedding / tied head stay dense
    ids = IDS.clamp(max=255)
    torch.testing.assert_close(_logits(quant, ids), _logits(dense, ids), atol=1e-3, rtol=0)


@pytest.mark.parametrize("kind", ["Q4_0", "Q4_1", "Q8_0"])
def test_gguf_codes_come_back_exactly(kind):
    # blocks made by the gguf package's own quantizers (llama.cpp's reference); the weight-only form of the codes
    # recovered from their dequantized values gives back those values (float32 rounding)
    import numpy as np
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize, quantize

    from pageport.models.quantization.gguf import recover_codes
    from pageport.platforms.quant_ops import dequantize_wn, pack_codes

    w = np.random.default_rng(0).standard_normal((64, 256)).astype(np.float32)
    w[3, :32] = 0.25  # a constant block
    qtype = GGMLQuantizationType[kind]
    deq = torch.from_numpy(dequantize(quantize(w, qtype), qtype).copy())
    codes, scale, zero = recover_codes(deq, kind)
    bits = 8 if kind == "Q8_0" else 4
    back = dequantize_wn(pack_codes(codes, bits), scale, zero, 32, bits)
    assert (back - deq).abs().max() <= 1e-6 * deq.abs().max()


def test_gguf_quantization_needs_a_gguf_file(tmp_path, cpu_platform):
    dense_llama().save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="--quantization gguf needs a .gguf model"):
        _load(tmp_path, cpu_platform, quantization="gguf")
