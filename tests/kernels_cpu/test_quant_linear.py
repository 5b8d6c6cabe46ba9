"""The CPU's quantized matmuls for checkpoint formats (torch._int_mm, torch._scaled_mm, the int4 / int8 weight-only
CPU kernels) against a float64 reference of the same quantized numbers. Tolerances relative to the output's max:
int8 / fp8 1e-5 (exact int32 accumulation / float32), weight-only with bf16 activations 1e-2 (bf16 output and
scale rounding)."""
import pytest
import torch

from pageport.kernels_cpu.ops import CpuOps
from pageport.models.quantization.methods import quantize_weight_w4, quantize_weight_w8a8
from pageport.platforms.quant_ops import pack_codes, quantize_activations


@pytest.mark.parametrize("dtype", [torch.int8, torch.float8_e4m3fn])
@pytest.mark.parametrize("m", [1, 20])
def test_w8a8(dtype, m):
    g = torch.Generator().manual_seed(m)
    x, w = torch.randn(m, 256, generator=g), torch.randn(96, 256, generator=g) * 0.05
    q, s = quantize_weight_w8a8(w, dtype)
    y = CpuOps().scaled_linear(x, q, s)
    xq, xs = quantize_activations(x, dtype)
    ref = (xq.double() @ q.double().t()) * xs.double() * s.double()
    assert (y.double() - ref).abs().max() <= 1e-5 * ref.abs().max()


@pytest.mark.parametrize("symmetric", [True, False])
def test_w4a16_int4_kernel(symmetric):
    g = torch.Generator().manual_seed(3)
    x, w = torch.randn(2, 256, generator=g).to(torch.bfloat16), torch.randn(128, 256, generator=g) * 0.05
    codes, s, z = quantize_weight_w4(w, 64, symmetric)
    s = s.to(torch.bfloat16)
    prepared = CpuOps().wna16_prepare(pack_codes(codes), s, None if z is None else z.to(torch.uint8), 64)
    assert "int4pack" in prepared  # the CPU kernel took it
    zf = 8.0 if z is None else z.double().repeat_interleave(64, 1)
    ref = x.double() @ ((codes.double() - zf) * s.double().repeat_interleave(64, 1)).t()
    y = CpuOps().wna16_linear(x, prepared)
    assert (y.double() - ref).abs().max() <= 1e-2 * ref.abs().max()


def test_w8a16_int8_kernel():
    g = torch.Generator().manual_seed(4)
    x, w = torch.randn(3, 256, generator=g).to(torch.bfloat16), torch.randn(64, 256, generator=g) * 0.05
    scale = w.abs().amax(1, keepdim=True) / 127.5
    codes = (torch.round(w / scale) + 128).clamp(0, 255).int()
    prepared = CpuOps().wna16_prepare(pack_codes(codes, 8), scale.to(torch.bfloat16), None, 256, 8)
    assert "int8pack" in prepared  # symmetric per channel: torch's int8 weight-only kernel
    ref = x.double() @ ((codes.double() - 128) * scale.to(torch.bfloat16).double()).t()
    y = CpuOps().wna16_linear(x, prepared)
    assert (y.double() - ref).abs().max() <= 1e-2 * ref.abs().max()
