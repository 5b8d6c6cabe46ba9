"""Quantized GEMMs for CUDA (and ROCm, same Triton): W8A8 fp8 / int8 and W4A16.

- activation quantization: one Triton program per (row, group) finds max|x| and writes the codes and the
  float32 scale (fp8 e4m3: 448, int8: 127) — per token, or per token and 128 columns for block weights;
- fp8 W8A8: torch._scaled_mm with row-wise scales (per-token activations x per-channel weights; cuBLASLt's
  fp8 GEMM on Hopper); int8 W8A8: torch._int_mm (int32 accumulation) and the scales applied after;
- fp8 with 128x128 block weight scales: a Triton GEMM that scales each K block's partial product;
- W4A16 / W8A16: for one row an FMA kernel over the packed words; above, a tensor-core GEMM that unpacks the
  codes and applies the group scale in registers. For decode shapes the K loop is split over programs
  (split-K) whose float32 partial sums one small kernel adds, so a batch-1 GEMM still spreads over every SM.
The weight-only layout here is K-major: codes [K*bits/32, N] int32, scales and zero points [K/G, N], so a
tile's loads run along N (coalesced).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Optional

import torch
import triton
import triton.language as tl

from pageport.platforms.quant_ops import fp8_e4m3fn_to_fnuz, qmax


@triton.jit
def _act_quant_kernel(x_ptr, q_ptr, s_ptr, K, GROUP, stride_x, stride_q, n_groups, QMAX: tl.constexpr,
                      IS_INT: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    grp = tl.program_id(1)
    start = grp * GROUP
    amax = tl.zeros((BLOCK,), dtype=tl.float32)
    for off in range(0, GROUP, BLOCK):
        cols = start + off + tl.arange(0, BLOCK)
        mask = (cols < K) & (off + tl.arange(0, BLOCK) < GROUP)
        x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
        amax = tl.maximum(amax, tl.abs(x))
    scale = tl.maximum(tl.max(amax, 0) / QMAX, 1e-10)
    tl.store(s_ptr + row * n_groups + grp, scale)
    for off in range(0, GROUP, BLOCK):
        cols = start + off + tl.arange(0, BLOCK)
        mask = (cols < K) & (off + tl.arange(0, BLOCK) < GROUP)
        x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
        q = tl.minimum(tl.maximum(x / scale, -QMAX), QMAX)
        if IS_INT:
            q = tl.where(q >= 0, tl.floor(q + 0.5), tl.ceil(q - 0.5))  # half away from zero
        tl.store(q_ptr + row * stride_q + cols, q.to(q_ptr.dtype.element_ty), mask=mask)


def quantize_activations(x: torch.Tensor, dtype: torch.dtype, group_size: Optional[int] = None):
    """x [M, K] -> (codes [M, K] of dtype, float32 scales [M, K / group_size] or [M, 1])."""
    m, k = x.shape
    group = group_size or k
    n_groups = triton.cdiv(k, group)
    # the Triton interpreter's float -> e4m3 cast halves values that round up across a power of two; there the
    # kernel writes float32 codes and torch casts them (on a GPU the kernel casts)
    cast_after = dtype != torch.int8 and not x.is_cuda
    q = torch.empty(m, k, dtype=torch.float32 if cast_after else dtype, device=x.device)
    s = torch.empty(m, n_groups, dtype=torch.float32, device=x.device)
    block = min(triton.next_power_of_2(group), 1024)
    _act_quant_kernel[(m, n_groups)](x, q, s, k, group, x.stride(0), q.stride(0), n_groups,
                                     QMAX=qmax(dtype),
                                     IS_INT=dtype == torch.int8, BLOCK=block)
    return (q.to(dtype) if cast_after else q), s


@triton.jit
def _block_fp8_kernel(a_ptr, b_ptr, c_ptr, as_ptr, bs_ptr, M, N, K, stride_am, stride_bn, stride_cm,
                      stride_as, stride_bs, BN_SCALE, BK_SCALE,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + rk
        a = tl.load(a_ptr + rm[:, None] * stride_am + kk[None, :], mask=(rm[:, None] < M) & (kk[None, :] < K),
                    other=0.0)
        b = tl.load(b_ptr + rn[None, :] * stride_bn + kk[:, None], mask=(rn[None, :] < N) & (kk[:, None] < K),
                    other=0.0)
        sa = tl.load(as_ptr + rm * stride_as + k0 // BK_SCALE, mask=rm < M, other=0.0)
        sb = tl.load(bs_ptr + (rn // BN_SCALE) * stride_bs + k0 // BK_SCALE, mask=rn < N, other=0.0)
        acc += tl.dot(a, b, out_dtype=tl.float32) * sa[:, None] * sb[None, :]
    tl.store(c_ptr + rm[:, None] * stride_cm + rn[None, :], acc.to(c_ptr.dtype.element_ty),
             mask=(rm[:, None] < M) & (rn[None, :] < N))


def block_fp8_linear(x, weight, weight_scale, block, bias=None):
    m, k = x.shape
    n = weight.shape[0]
    bn, bk = block
    xq, xs = quantize_activations(x, weight.dtype, bk)
    out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    block_k = bk if bk <= 128 else 128
    block_n = min(64, bn)
    block_m = 16 if m <= 16 else 64
    grid = (triton.cdiv(m, block_m), triton.cdiv(n, block_n))
    _block_fp8_kernel[grid](xq, weight, out, xs, weight_scale, m, n, k, xq.stride(0), weight.stride(0),
                            out.stride(0), xs.stride(0), weight_scale.stride(0), bn, bk,
                            BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k)
    return out if bias is None else out + bias


def native_fp8(device: torch.device) -> torch.dtype:
    """The e4m3 flavour the GPU's fp8 instructions take: MI300 (gfx942, ROCm) float8_e4m3fnuz, else e4m3fn."""
    if torch.version.hip and "gfx942" in getattr(torch.cuda.get_device_properties(device), "gcnArchName", ""):
        return torch.float8_e4m3fnuz
    return torch.float8_e4m3fn


def scaled_prepare(weight, weight_scale):
    """Checkpoints hold e4m3fn; on MI300 the weights are re-expressed in e4m3fnuz once (activations follow the
    weight's dtype)."""
    if weight.dtype == torch.float8_e4m3fn and weight.is_cuda and native_fp8(weight.device) != weight.dtype:
        return fp8_e4m3fn_to_fnuz(weight, weight_scale)
    return weight, weight_scale


def scaled_linear(x, weight, weight_scale, input_scale=None, block=None, bias=None):
    """`Ops.scaled_linear` on CUDA tensors (or CPU ones under the Triton interpreter)."""
    shape = x.shape
    x2 = x.reshape(-1, shape[-1]).contiguous()
    if block is not None:
        y = block_fp8_linear(x2, weight, weight_scale, block, bias)
        return y.reshape(*shape[:-1], -1)
    if input_scale is not None:
        top = qmax(weight.dtype)
        xq = (x2.float() / input_scale).clamp(-top, top)
        xq = xq.round().to(torch.int8) if weight.dtype == torch.int8 else xq.to(weight.dtype)
        xs = input_scale.float().reshape(1, 1).expand(x2.shape[0], 1).contiguous()
    else:
        xq, xs = quantize_activations(x2, weight.dtype)
    ws = weight_scale.reshape(1, -1)
    if weight.dtype == torch.int8:
        m = xq.shape[0]
        pad = 17 - m if m <= 16 else 0  # cuBLAS's int8 GEMM wants more than 16 rows
        a = torch.nn.functional.pad(xq, (0, 0, 0, pad)) if pad else xq
        acc = torch._int_mm(a, weight.t())[:m]
        y = (acc.float() * xs * ws).to(x.dtype)
        if bias is not None:
            y = y + bias
    else:
        # cuBLASLt's row-wise scaled fp8 GEMM writes bfloat16 only: other dtypes are cast after
        out_dtype = torch.bfloat16 if x.is_cuda else x.dtype
        b = None if bias is None else bias.to(out_dtype)
        y = torch._scaled_mm(xq, weight.t(), scale_a=xs, scale_b=ws.contiguous(), out_dtype=out_dtype, bias=b)
        y = y.to(x.dtype)
    return y.reshape(*shape[:-1], -1)


# W4A16 ------------------------------------------------------------------------------------------------------
@triton.jit
def _as_f32(c):
    """Small non-negative int32 -> float32 without the quarter-rate int-to-float instruction: 2^23 + c carries c
    in its mantissa, and subtracting 2^23 is exact."""
    return (c | 0x4B000000).to(tl.float32, bitcast=True) - 8388608.0


@triton.jit
def _wna16_store(out_ptr, acc, rm, rn, M, N, stride_om, stride_split, SPLIT_OUT: tl.constexpr):
    mask = (rm[:, None] < M) & (rn[None, :] < N)
    if SPLIT_OUT:  # split-K: this split's partial sums, in float32, for _sum_splits_kernel
        out_ptr += tl.program_id(2) * stride_split
    tl.store(out_ptr + rm[:, None] * stride_om + rn[None, :], acc.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _wna16_kernel(x_ptr, q_ptr, s_ptr, z_ptr, out_ptr, M, N, K, G, stride_xm, stride_qk, stride_sk, stride_om,
                  stride_split, K_PER_SPLIT, BITS: tl.constexpr, HAS_ZEROS: tl.constexpr, SPLIT_OUT: tl.constexpr,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    # tensor-core tiles; BLOCK_K divides the group size: one scale (and zero point) row per K step
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_k = tl.program_id(2)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    PER_WORD: tl.constexpr = 32 // BITS
    rw = tl.arange(0, BLOCK_K // PER_WORD)
    shifts = tl.arange(0, PER_WORD) * BITS
    n_ok = rn < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    k_start = pid_k * K_PER_SPLIT
    for k0 in range(k_start, k_start + K_PER_SPLIT, BLOCK_K):
        x = tl.load(x_ptr + rm[:, None] * stride_xm + (k0 + rk)[None, :], mask=rm[:, None] < M, other=0.0)
        words = tl.load(q_ptr + (k0 // PER_WORD + rw)[:, None] * stride_qk + rn[None, :], mask=n_ok[None, :],
                        other=0)
        codes = tl.reshape((words[:, None, :] >> shifts[None, :, None]) & ((1 << BITS) - 1),
                           (BLOCK_K, BLOCK_N))  # row PER_WORD * i + j
        g = k0 // G
        s = tl.load(s_ptr + g * stride_sk + rn, mask=n_ok, other=0.0).to(tl.float32)
        if HAS_ZEROS:
            z = tl.load(z_ptr + g * stride_sk + rn, mask=n_ok, other=0).to(tl.float32)
        else:
            z = tl.full((BLOCK_N,), 1 << (BITS - 1), tl.float32)
        w = ((_as_f32(codes) - z[None, :]) * s[None, :]).to(x.dtype)
        acc += tl.dot(x, w, out_dtype=tl.float32)
    _wna16_store(out_ptr, acc, rm, rn, M, N, stride_om, stride_split, SPLIT_OUT)


@triton.jit
def _wna16_gemv_kernel(x_ptr, q_ptr, s_ptr, z_ptr, out_ptr, M, N, K, G, stride_xm, stride_qk, stride_sk, stride_om,
                       stride_split, K_PER_SPLIT, BITS: tl.constexpr, HAS_ZEROS: tl.constexpr,
                       SPLIT_OUT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    # One decode row per program (BLOCK_M is 1): no tensor-core tile to fill, so plain FMAs over the codes as they
    # sit in their words (row PER_WORD * i + j of the tile is bits j*BITS of word i): no unpacking reshape. The
    # products stay element-wise in a [words, BLOCK_N] accumulator, reduced once at the end; with one scale per K
    # step, sum_k x_k (c_k - z) s = s * (sum_k x_k c_k - z * sum_k x_k).
    row = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_k = tl.program_id(2)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    PER_WORD: tl.constexpr = 32 // BITS
    WORDS: tl.constexpr = BLOCK_K // PER_WORD
    rw = tl.arange(0, WORDS)
    n_ok = rn < N
    acc = tl.zeros((WORDS, BLOCK_N), dtype=tl.float32)
    k_start = pid_k * K_PER_SPLIT
    for k0 in range(k_start, k_start + K_PER_SPLIT, BLOCK_K):
        words = tl.load(q_ptr + (k0 // PER_WORD + rw)[:, None] * stride_qk + rn[None, :], mask=n_ok[None, :],
                        other=0)
        g = k0 // G
        s = tl.load(s_ptr + g * stride_sk + rn, mask=n_ok, other=0.0).to(tl.float32)
        if HAS_ZEROS:
            z = tl.load(z_ptr + g * stride_sk + rn, mask=n_ok, other=0).to(tl.float32)
        else:
            z = tl.full((BLOCK_N,), 1 << (BITS - 1), tl.float32)
        part = tl.zeros((WORDS, BLOCK_N), dtype=tl.float32)
        xsum = tl.zeros((WORDS,), dtype=tl.float32)
        for j in tl.static_range(PER_WORD):
            xj = tl.load(x_ptr + row * stride_xm + k0 + rw * PER_WORD + j).to(tl.float32)
            part += _as_f32((words >> (j * BITS)) & ((1 << BITS) - 1)) * xj[:, None]
            xsum += xj
        acc += (part - xsum[:, None] * z[None, :]) * s[None, :]
    res = tl.sum(acc, axis=0)
    _wna16_store(out_ptr, res[None, :], row + tl.arange(0, 1), rn, M, N, stride_om, stride_split, SPLIT_OUT)


@triton.jit
def _sum_splits_kernel(part_ptr, out_ptr, bias_ptr, MN, N, SPLIT: tl.constexpr, HAS_BIAS: tl.constexpr,
                       BLOCK: tl.constexpr):
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = i < MN
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for sp in tl.static_range(SPLIT):
        acc += tl.load(part_ptr + sp * MN + i, mask=ok, other=0.0)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + i % N, mask=ok, other=0.0).to(tl.float32)
    tl.store(out_ptr + i, acc.to(out_ptr.dtype.element_ty), mask=ok)


def wna16_prepare(qweight, scales, zeros, group_size, bits=4) -> dict:
    """[N, K*bits/32] codes (packed along K), scales/zeros [N, K/G] -> the K-major layout the kernel reads."""
    from pageport.platforms.quant_ops import unpack_codes

    return {"qweight": _pack_along_rows(unpack_codes(qweight, bits).t().contiguous(), bits), "bits": bits,
            "scales": scales.t().contiguous(),
            "zeros": None if zeros is None else zeros.t().contiguous(), "group_size": group_size}


def _pack_along_rows(codes_kn: torch.Tensor, bits: int) -> torch.Tensor:
    """codes [K, N] -> [K*bits/32, N] int32: word (i, n) holds rows p*i..p*i+p-1 of column n (p = 32/bits),
    row p*i+j in bits j*bits.."""
    per_word = 32 // bits
    c = codes_kn.to(torch.int32).unflatten(0, (-1, per_word))  # [K/p, p, N]
    out = torch.zeros(c.shape[0], c.shape[2], dtype=torch.int32, device=c.device)
    for j in range(per_word):
        out |= c[:, j] << (bits * j)
    return out


@dataclass(frozen=True)
class WnA16Launch:
    """One launch of the weight-only GEMM. block_m 1 picks the FMA kernel (a program per row), 16 or more the
    tensor-core one; split > 1 writes each K split's float32 partial sums, then one small kernel adds them."""
    block_m: int
    block_n: int
    block_k: int
    split: int = 1
    num_warps: int = 4
    num_stages: int = 3


def _split_for(k: int, block_k: int, tiles: int, num_sms: int, waves: int, cap: int = 16) -> int:
    """K splits until the grid covers the SMs `waves` times (at most `cap`), each split at least 2 K steps,
    dividing K."""
    split = max(1, min(cap, k // (block_k * 2), triton.cdiv(waves * num_sms, tiles)))
    while split > 1 and k % (split * block_k):
        split -= 1
    return split


def wna16_config(m: int, n: int, k: int, group_size: int, num_sms: int = 132) -> WnA16Launch:
    """Decode rows (up to 16) take tensor-core tiles split over K to fill the GPU, more rows the plain tiled GEMM.
    The decode choices follow the H200 sweep of benchmarks/quant_gpu.py at Llama-3-8B shapes (one row: 128
    columns, K steps of 64, ~8 waves of programs; 16 rows: K steps of 128, 64 columns unless N is wide). The FMA
    kernel (block_m 1) is reached through an explicit launch only, until a sweep on a GPU shows it pays."""
    if m <= 16:
        block_k = next((b for b in ((64,) if m == 1 else (128, 64)) + (32, 16) if group_size % b == 0), 16)
        block_n = 128 if m == 1 or n > 8192 else 64
        waves = 8 if m == 1 else 4
        return WnA16Launch(16, block_n, block_k, _split_for(k, block_k, triton.cdiv(n, block_n), num_sms, waves))
    block_k = 64 if group_size % 64 == 0 else 32 if group_size % 32 == 0 else 16
    return WnA16Launch(32 if m <= 64 else 64, 128, block_k, 1)


@functools.lru_cache(maxsize=None)
def _num_sms(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def wna16_linear(x, w: dict, bias=None, config: Optional[WnA16Launch] = None):
    shape = x.shape
    x2 = x.reshape(-1, shape[-1]).contiguous()
    m, k = x2.shape
    q, s, z, g = w["qweight"], w["scales"], w["zeros"], w["group_size"]
    n = q.shape[1]
    num_sms = _num_sms(x.device.index or 0) if x.is_cuda else 132
    c = config or wna16_config(m, n, k, g, num_sms)
    if g % c.block_k or c.block_k % (32 // w["bits"]) or k % (c.split * c.block_k):
        raise ValueError(f"W4A16 launch: BLOCK_K {c.block_k} must divide the group size {g} and K {k} split "
                         f"{c.split} ways")
    out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    part = torch.empty(c.split, m, n, dtype=torch.float32, device=x.device) if c.split > 1 else out
    gemv = c.block_m == 1
    grid = (m if gemv else triton.cdiv(m, c.block_m), triton.cdiv(n, c.block_n), c.split)
    (_wna16_gemv_kernel if gemv else _wna16_kernel)[grid](
        x2, q, s, z if z is not None else s, part, m, n, k, g, x2.stride(0), q.stride(0), s.stride(0), n, m * n,
        k // c.split, BITS=w["bits"], HAS_ZEROS=z is not None, SPLIT_OUT=c.split > 1, BLOCK_M=c.block_m,
        BLOCK_N=c.block_n, BLOCK_K=c.block_k, num_warps=c.num_warps, num_stages=c.num_stages)
    if c.split > 1:
        _sum_splits_kernel[(triton.cdiv(m * n, 1024),)](part, out, bias if bias is not None else out, m * n, n,
                                                       SPLIT=c.split, HAS_BIAS=bias is not None, BLOCK=1024)
    elif bias is not None:
        out = out + bias
    return out.reshape(*shape[:-1], -1)
