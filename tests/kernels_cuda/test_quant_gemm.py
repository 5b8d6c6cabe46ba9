"""Quantized GEMM kernels (activation quantization, fp8/int8 W8A8, fp8 block, W4A16 / W8A16 with split-K) against a
float64 reference of the same quantized numbers. On the CPU under TRITON_INTERPRET=1 (conftest), fp32 / fp16
activations (the interpreter's bf16 dot is wrong); torch._scaled_mm and torch._int_mm run on the CPU too.

Tolerances: the reference is computed from the kernel's own activation codes and scales where rounding could
differ, so what is left is accumulation order: fp32 1e-4 relative to the output's max, fp16 output 2e-3.
"""
import pytest
import torch

from pageport.kernels_cuda.quant_gemm import (WnA16Launch, quantize_activations, scaled_linear, wna16_linear,
                                              wna16_prepare)
from pageport.models.quantization.methods import quantize_weight_w4, quantize_weight_w8a8
from pageport.platforms.quant_ops import FP8_MAX, dequantize_block, pack_codes

FP8 = torch.float8_e4m3fn


def _close(y, ref, tol):
    assert (y.double() - ref).abs().max() <= tol * ref.abs().max(), (y.double() - ref).abs().max()


@pytest.mark.parametrize("dtype", [torch.int8, FP8])
@pytest.mark.parametrize("group", [None, 128])
def test_activation_quantization(device, dtype, group):
    x = torch.randn(5, 384, device=device) * 3
    q, s = quantize_activations(x, dtype, group)
    g = group or 384
    amax = x.double().unflatten(-1, (-1, g)).abs().amax(-1)
    qmax = 127 if dtype == torch.int8 else FP8_MAX
    torch.testing.assert_close(s.double(), amax / qmax, rtol=1e-6, atol=0)
    deq = (q.double().unflatten(-1, (-1, g)) * s.double().unsqueeze(-1)).flatten(-2)
    step = s.double().repeat_interleave(g, 1) * (0.5 if dtype == torch.int8 else 16)  # e4m3: 32 apart at 256..448
    assert ((deq - x.double()).abs() <= step * (1 + 1e-6)).all()  # within half a step


@pytest.mark.parametrize("wdtype", [torch.int8, FP8])
@pytest.mark.parametrize("m", [1, 7, 33])
def test_w8a8_per_token_per_channel(device, wdtype, m):
    g = torch.Generator().manual_seed(m)
    x = torch.randn(m, 256, generator=g).to(device)
    w = torch.randn(96, 256, generator=g).to(device) * 0.05
    bias = torch.randn(96, generator=g).to(device)
    wq, ws = quantize_weight_w8a8(w, wdtype)
    y = scaled_linear(x, wq, ws, bias=bias)
    xq, xs = quantize_activations(x, wdtype)
    ref = (xq.double() @ wq.double().t()) * xs.double() * ws.double() + bias.double()
    _close(y, ref, 1e-4)


def test_w8a8_static_input_scale(device):
    x = torch.randn(9, 128, device=device)
    w = torch.randn(64, 128, device=device) * 0.05
    wq, ws = quantize_weight_w8a8(w, FP8)
    s_in = (x.abs().max() / FP8_MAX).reshape(1)
    y = scaled_linear(x, wq, ws, input_scale=s_in)
    xq = (x / s_in).to(FP8)
    _close(y, (xq.double() @ wq.double().t()) * s_in.double() * ws.double(), 1e-4)


@pytest.mark.parametrize("m", [1, 20])
def test_fp8_block_scaled(device, m):
    g = torch.Generator().manual_seed(m)
    x = torch.randn(m, 256, generator=g).to(device)
    w = torch.randn(384, 256, generator=g).to(device) * 0.05
    wq, ws = quantize_weight_w8a8(w, FP8, (128, 128))
    y = scaled_linear(x, wq, ws, block=(128, 128))
    xq, xs = quantize_activations(x, FP8, 128)
    xd = (xq.double().unflatten(-1, (-1, 128)) * xs.double().unsqueeze(-1)).flatten(-2)
    _close(y, xd @ dequantize_block(wq, ws, (128, 128)).double().t(), 1e-4)


def _quantize_w8(w, group, symmetric):
    """8-bit round to nearest, unsigned codes around 128 (symmetric) or with zero codes."""
    gw = w.float().unflatten(1, (-1, group))
    if symmetric:
        scale = gw.abs().amax(-1) / 127.5
        return (torch.round(gw / scale[..., None]) + 128).clamp(0, 255).flatten(1).int(), scale, None
    lo, hi = gw.amin(-1).clamp(max=0), gw.amax(-1).clamp(min=0)
    scale = (hi - lo) / 255
    zero = torch.round(-lo / scale).clamp(0, 255)
    return (torch.round(gw / scale[..., None]) + zero[..., None]).clamp(0, 255).flatten(1).int(), scale, zero.int()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("m, group, symmetric", [(1, 128, True), (3, 32, False), (40, 64, True)])
@pytest.mark.parametrize("bits", [4, 8])
def test_weight_only_gemm(device, dtype, m, group, symmetric, bits):
    g = torch.Generator().manual_seed(m + group)
    k, n = 512, 192
    x = torch.randn(m, k, generator=g).to(device, dtype)
    w = torch.randn(n, k, generator=g).to(device) * 0.05
    codes, scale, zero = (quantize_weight_w4 if bits == 4 else _quantize_w8)(w, group, symmetric)
    scale = scale.to(dtype)
    prepared = wna16_prepare(pack_codes(codes, bits), scale, None if zero is None else zero.to(torch.uint8), group,
                             bits)
    mid = float(1 << (bits - 1))
    wd = (codes.double() - (mid if zero is None else zero.double().repeat_interleave(group, 1))) \
        * scale.double().repeat_interleave(group, 1)
    ref = x.double() @ wd.t()
    tol = 1e-4 if dtype == torch.float32 else 2e-3
    _close(wna16_linear(x, prepared), ref, tol)
    # both kernels (tensor-core tiles; FMAs for decode rows), split over K or not, give the same result
    for block_m, block_n, split in ((16, 64, 4), (1, 64, 1), (1, 32, 4)):
        _close(wna16_linear(x, prepared, config=WnA16Launch(block_m, block_n, 32, split)), ref, tol)


# On a CUDA device: bf16 activations at Llama-3-8B's linear shapes (the paths the H200 benchmark times).
gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("m", [1, 16, 512])
@pytest.mark.parametrize("n, k", [(6144, 4096), (4096, 14336)])
def test_gpu_bf16_at_8b_shapes(m, n, k):
    g = torch.Generator(device="cuda").manual_seed(m)
    x = torch.randn(m, k, device="cuda", generator=g).to(torch.bfloat16)
    w = (torch.randn(n, k, device="cuda", generator=g) * 0.02).to(torch.bfloat16)
    for dtype, block in ((FP8, None), (torch.int8, None), (FP8, (128, 128))):
        wq, ws = quantize_weight_w8a8(w, dtype, block)
        y = scaled_linear(x, wq, ws, block=block)
        xq, xs = quantize_activations(x, dtype, block[1] if block else None)
        if block:
            xd = (xq.double().unflatten(-1, (-1, 128)) * xs.double().unsqueeze(-1)).flatten(-2)
            ref = xd @ dequantize_block(wq, ws, block).double().t()
        else:
            ref = (xq.double() @ wq.double().t()) * xs.double() * ws.double()
        _close(y, ref, 1e-2)  # bf16 output
    codes, scale, _ = quantize_weight_w4(w, 128)
    prepared = wna16_prepare(pack_codes(codes), scale.to(torch.bfloat16), None, 128, 4)
    wd = (codes.double() - 8) * scale.to(torch.bfloat16).double().repeat_interleave(128, 1)
    _close(wna16_linear(x, prepared), x.double() @ wd.t(), 1e-2)


def test_fp8_weights_re_expressed_for_mi300():
    # MI300 computes in float8_e4m3fnuz: the checkpoint's e4m3fn weights are re-expressed once (same bits, scale
    # doubled; -0 becomes +0) and the activations follow the weight's dtype (largest value 240)
    from pageport.platforms.quant_ops import fp8_e4m3fn_to_fnuz

    g = torch.Generator().manual_seed(7)
    w = torch.randn(64, 128, generator=g) * 0.05
    wq, ws = quantize_weight_w8a8(w, FP8)
    wq.view(torch.int8)[0, 0] = -128  # -0.0 in e4m3fn
    fq, fs = fp8_e4m3fn_to_fnuz(wq, ws)
    assert fq.dtype == torch.float8_e4m3fnuz and fq.float()[0, 0] == 0
    torch.testing.assert_close(fq.float() * fs[:, None], wq.float() * ws[:, None], rtol=0, atol=0)
    x = torch.randn(5, 128, generator=g)
    xq, xs = quantize_activations(x, torch.float8_e4m3fnuz)
    assert xq.float().abs().max() == 240
    y = scaled_linear(x, fq, fs)
    _close(y, (xq.double() @ fq.double().t()) * xs.double() * fs.double(), 1e-4)
