"""KV-cache write (reshape_and_cache): this step's K/V rows into their cache slots."""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _reshape_and_cache_kernel(k_ptr, v_ptr, k_cache_ptr, v_cache_ptr, slot_ptr,
                              stride_kt, stride_kh, stride_vt, stride_vh,
                              stride_kcb, stride_kct, stride_kch, stride_vcb, stride_vct, stride_vch,
                              BLOCK_SIZE: tl.constexpr, NUM_KV_HEADS: tl.constexpr, HEAD_SIZE: tl.constexpr,
                              HEADS_PAD: tl.constexpr, HEAD_PAD: tl.constexpr, CLAMP: tl.constexpr):
    t = tl.program_id(0)
    slot = tl.load(slot_ptr + t).to(tl.int64)
    if slot < 0:  # padding token (e.g. a CUDA-graph batch rounded up): nothing to write
        return
    blk = slot // BLOCK_SIZE
    off = slot % BLOCK_SIZE
    h = tl.arange(0, HEADS_PAD)[:, None]
    d = tl.arange(0, HEAD_PAD)[None, :]
    mask = (h < NUM_KV_HEADS) & (d < HEAD_SIZE)
    k = tl.load(k_ptr + t * stride_kt + h * stride_kh + d, mask=mask)
    v = tl.load(v_ptr + t * stride_vt + h * stride_vh + d, mask=mask)
    if CLAMP > 0:  # an fp8 cache: saturate at the format's largest value (e5m2 would overflow to inf)
        k = tl.minimum(tl.maximum(k.to(tl.float32), -CLAMP), CLAMP).to(k_cache_ptr.dtype.element_ty,
                                                                         fp_downcast_rounding="rtne")
        v = tl.minimum(tl.maximum(v.to(tl.float32), -CLAMP), CLAMP).to(v_cache_ptr.dtype.element_ty,
                                                                         fp_downcast_rounding="rtne")
    tl.store(k_cache_ptr + blk * stride_kcb + off * stride_kct + h * stride_kch + d,
             k.to(k_cache_ptr.dtype.element_ty), mask=mask)
    tl.store(v_cache_ptr + blk * stride_vcb + off * stride_vct + h * stride_vch + d,
             v.to(v_cache_ptr.dtype.element_ty), mask=mask)


def reshape_and_cache(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                      slot_mapping: torch.Tensor) -> None:
    """k/v [num_tokens, num_kv_heads, head_size] (any token/head strides, last dim contiguous) into
    k_cache/v_cache [num_blocks, block_size, num_kv_heads, head_size] at slot_mapping [num_tokens]
    (slot = block * block_size + offset; a negative slot is skipped). An fp8 cache (float8_e4m3fn / e5m2) stores
    the values cast with scale 1.0, saturated at the format's range."""
    num_tokens, num_kv_heads, head_size = k.shape
    if num_tokens == 0:
        return
    assert k.stride(-1) == 1 and v.stride(-1) == 1 and k_cache.stride(-1) == 1 and v_cache.stride(-1) == 1
    assert slot_mapping.shape[0] >= num_tokens
    block_size = k_cache.shape[1]
    fp8 = k_cache.dtype in (torch.float8_e4m3fn, torch.float8_e5m2)
    if fp8 and not k.is_cuda:
        # the Triton interpreter's float -> fp8 cast halves values that round up across a power of two:
        # there the cast is torch's (on a GPU the kernel casts)
        lim = torch.finfo(k_cache.dtype).max
        k, v = k.float().clamp(-lim, lim), v.float().clamp(-lim, lim)
        rows = slot_mapping[:num_tokens]
        ok = rows >= 0
        k_cache.view(-1, num_kv_heads, head_size)[rows[ok]] = k[ok].to(k_cache.dtype)
        v_cache.view(-1, num_kv_heads, head_size)[rows[ok]] = v[ok].to(v_cache.dtype)
        return
    heads_pad = triton.next_power_of_2(num_kv_heads)
    head_pad = triton.next_power_of_2(head_size)
    _reshape_and_cache_kernel[(num_tokens,)](
        k, v, k_cache, v_cache, slot_mapping,
        k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        BLOCK_SIZE=block_size, NUM_KV_HEADS=num_kv_heads, HEAD_SIZE=head_size,
        HEADS_PAD=heads_pad, HEAD_PAD=head_pad, CLAMP=torch.finfo(k_cache.dtype).max if fp8 else 0.0,
        num_warps=4 if heads_pad * head_pad >= 1024 else 1)
