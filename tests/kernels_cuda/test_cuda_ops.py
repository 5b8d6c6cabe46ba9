"""Triton rms_norm / rotary / silu_and_mul against platforms.ops.Ops (the torch reference).

Tolerance: |out - ref| <= ATOL + RTOL * |ref| with RTOL one unit in the last place of the
dtype (fp32 2^-20 with ATOL 1e-6; fp16 2^-10, bf16 2^-7, ATOL 1e-3 / 1e-2). The kernels compute
in fp32 and round where the reference rounds, so results differ by at most a last-bit flip from
a different summation order or FMA contraction.

bf16 runs on the GPU only: besides its wrong tl.dot, the interpreter (triton 3.9) truncates
fp32 -> bf16 casts instead of rounding to nearest even, so bf16 results there are off by an ulp.
"""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from pageport.kernels_cuda.ops import TritonOps  # noqa: E402
from pageport.platforms.ops import Ops  # noqa: E402

ATOL = {torch.float32: 1e-6, torch.float16: 1e-3, torch.bfloat16: 1e-2}
RTOL = {torch.float32: 2.0 ** -20, torch.float16: 2.0 ** -10, torch.bfloat16: 2.0 ** -7}
REF, TRI = Ops(), TritonOps()
gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def close(a, b, dtype):
    assert a.dtype == b.dtype and a.shape == b.shape
    a, b = a.double(), b.double()
    excess = ((a - b).abs() - ATOL[dtype] - RTOL[dtype] * b.abs()).max().item()
    assert excess <= 0, f"max abs error {(a - b).abs().max().item():.3g} beyond tolerance by {excess:.3g}"


def cos_sin_cache(max_pos, head_size, base=10000.0, device="cpu"):
    inv = 1.0 / base ** (torch.arange(0, head_size, 2, dtype=torch.float32) / head_size)
    freqs = torch.outer(torch.arange(max_pos, dtype=torch.float32), inv)
    return torch.cat([freqs.cos(), freqs.sin()], dim=-1).to(device)


def check_rms_norm(device, dtype, rows, hidden, residual: bool):
    x = torch.randn(rows, hidden, dtype=dtype, device=device)
    w = (1 + 0.1 * torch.randn(hidden)).to(dtype=dtype, device=device)
    r = torch.randn_like(x) if residual else None
    ref = REF.rms_norm(x, w, 1e-6, r)
    out = TRI.rms_norm(x, w, 1e-6, r)
    if residual:
        close(out[0], ref[0], dtype)
        assert torch.equal(out[1], ref[1])  # the residual sum rounds exactly like torch
    else:
        close(out, ref, dtype)


def check_rotary(device, dtype, tokens, q_heads, k_heads, head_size):
    cache = cos_sin_cache(4096, head_size, device=device)
    pos = torch.randint(0, 4096, (tokens,), device=device)
    qkv = torch.randn(tokens, (q_heads + 2 * k_heads) * head_size, dtype=dtype, device=device)
    q = qkv[:, :q_heads * head_size].view(tokens, q_heads, head_size)  # views of a fused projection
    k = qkv[:, q_heads * head_size:(q_heads + k_heads) * head_size].view(tokens, k_heads, head_size)
    v_before = qkv[:, (q_heads + k_heads) * head_size:].clone()
    q_ref, k_ref = REF.rotary(pos, q.clone(), k.clone(), cache)
    q_out, k_out = TRI.rotary(pos, q, k, cache)
    assert q_out.data_ptr() == q.data_ptr() and k_out.data_ptr() == k.data_ptr()  # in place
    close(q_out, q_ref, dtype)
    close(k_out, k_ref, dtype)
    assert torch.equal(qkv[:, (q_heads + k_heads) * head_size:], v_before)  # v untouched


def check_silu_and_mul(device, dtype, shape):
    x = torch.randn(*shape, dtype=dtype, device=device) * 3
    close(TRI.silu_and_mul(x), REF.silu_and_mul(x), dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("residual", [False, True])
@pytest.mark.parametrize("hidden", [64, 200])
def test_rms_norm(device, dtype, residual, hidden):
    check_rms_norm(device, dtype, 7, hidden, residual)


def test_rms_norm_3d_and_float32_weight(device):
    x = torch.randn(2, 3, 96, dtype=torch.float16, device=device)
    w = torch.rand(96, device=device)  # fp32 weight: the output promotes like torch does
    ref, out = REF.rms_norm(x, w, 1e-5), TRI.rms_norm(x, w, 1e-5)
    assert out.dtype == torch.float32 and out.shape == x.shape
    assert (out - ref).abs().max().item() <= 1e-5


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("heads,head_size", [((4, 2), 64), ((3, 1), 128)])
def test_rotary(device, dtype, heads, head_size):
    check_rotary(device, dtype, 9, *heads, head_size)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("shape", [(5, 128), (2, 3, 200), (1, 4096)])
def test_silu_and_mul(device, dtype, shape):
    check_silu_and_mul(device, dtype, shape)


def test_falls_back_to_torch_when_triton_cannot_run(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    x = torch.randn(3, 64)
    assert torch.equal(TRI.silu_and_mul(x), REF.silu_and_mul(x))


# GPU: bf16 at model shapes (Llama-3-8B-like)
@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("residual", [False, True])
def test_gpu_bf16_rms_norm(residual):
    check_rms_norm("cuda", torch.bfloat16, 512, 4096, residual)


@pytest.mark.gpu
@gpu
def test_gpu_bf16_rotary():
    check_rotary("cuda", torch.bfloat16, 512, 32, 8, 128)


@pytest.mark.gpu
@gpu
def test_gpu_bf16_silu_and_mul():
    check_silu_and_mul("cuda", torch.bfloat16, (512, 2 * 14336))
