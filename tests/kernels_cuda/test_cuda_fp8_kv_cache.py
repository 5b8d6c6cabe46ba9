"""FP8 KV cache (--kv-cache-dtype fp8 / fp8_e5m2) in the Triton backend: the cache write casts (scale 1.0,
saturating), the attention kernel widens fp8 K/V as it loads them.

Against float64 attention over the same fp8 cache (only the kernel's own rounding left: fp16 tolerance 4e-3), and
against attention over the unquantized cache within fp8's error: on N(0, 1) K/V the largest output error measured
here is ~0.11 with e4m3 (3 mantissa bits) and ~0.35 with e5m2 (2 bits); bounds 0.2 / 0.5."""
import pytest
import torch
from test_cuda_attention import _metadata, make_batch, reference_attention  # noqa: E402  (same folder)

from pageport.kernels_cuda.attention import TritonPagedAttention
from pageport.kernels_cuda.paged_attention import paged_attention

FP8_ERR = {torch.float8_e4m3fn: 0.2, torch.float8_e5m2: 0.5}


@pytest.mark.parametrize("kv_dtype", list(FP8_ERR))
@pytest.mark.parametrize("q_lens, ctx", [([1, 7, 1, 20, 3], [30, 9, 50, 0, 40]), ([1] * 4, [70, 2, 300, 33])],
                         ids=["mixed", "decode"])
def test_attention_reads_an_fp8_cache(device, kv_dtype, q_lens, ctx):
    b = make_batch(q_lens, ctx, 8, 2, 64, 16, torch.float16, device, seed=5)
    k8, v8 = b["k_cache"].to(kv_dtype), b["v_cache"].to(kv_dtype)
    out = torch.empty_like(b["q"])
    paged_attention(b["q"], k8, v8, out, b["qsl_t"], b["seq_lens_t"], b["block_table"], max_query_len=max(q_lens),
                    max_seq_len=max(b["seq_lens"]), scale=0.125)
    ref8 = reference_attention(b["q"], k8, v8, b["qsl"], b["seq_lens"], b["block_table"], 0.125)
    assert (out.double() - ref8).abs().max().item() <= 4e-3
    ref = reference_attention(b["q"], b["k_cache"], b["v_cache"], b["qsl"], b["seq_lens"], b["block_table"], 0.125)
    assert (out.double() - ref).abs().max().item() <= FP8_ERR[kv_dtype]


@pytest.mark.parametrize("kv_dtype", list(FP8_ERR))
def test_backend_writes_and_reads_fp8(device, kv_dtype):
    b = make_batch([1, 5, 1], [20, 10, 40], 4, 2, 64, 16, torch.float16, device, seed=9)
    md = _metadata(b, 16)
    full = torch.stack([b["k_cache"], b["v_cache"]])
    flat = full.view(2, -1, 2, 64)
    k_new, v_new = flat[0][md.slot_mapping].clone(), flat[1][md.slot_mapping].clone()
    k_new[0, 0, 0] = 1e6  # past the range: saturates, never inf
    kv_cache = full.to(kv_dtype)
    kv_cache.view(2, -1, 2, 64)[:, md.slot_mapping] = float("nan")
    out = TritonPagedAttention(4, 2, 64, 0.125).forward(b["q"], k_new, v_new, kv_cache, md)
    written = kv_cache.view(2, -1, 2, 64)[0][md.slot_mapping]
    assert written.dtype == kv_dtype and written.float()[0, 0, 0] == torch.finfo(kv_dtype).max
    torch.testing.assert_close(written.float()[1:], k_new[1:].to(kv_dtype).float())
    ref = reference_attention(b["q"], kv_cache[0], kv_cache[1], b["qsl"], b["seq_lens"], b["block_table"], 0.125)
    assert (out.double() - ref).abs().max().item() <= 4e-3


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("kv_dtype", list(FP8_ERR))
def test_gpu_bf16_queries_over_fp8_cache(kv_dtype):
    # 8B heads (32 / 8 of 128), mixed prefill chunks and decodes over contexts up to 2k, the GPU's own fp8 casts
    b = make_batch([1, 64, 1, 1, 17], [2000, 300, 1024, 5, 0], 32, 8, 128, 16, torch.bfloat16, "cuda", seed=2)
    md = _metadata(b, 16)
    full = torch.stack([b["k_cache"], b["v_cache"]])
    flat = full.view(2, -1, 8, 128)
    k_new, v_new = flat[0][md.slot_mapping].clone(), flat[1][md.slot_mapping].clone()
    kv_cache = full.to(kv_dtype)
    out = TritonPagedAttention(32, 8, 128, 128 ** -0.5).forward(b["q"], k_new, v_new, kv_cache, md)
    written = kv_cache.view(2, -1, 8, 128)[0][md.slot_mapping]
    assert torch.equal(written.float(), k_new.float().to(kv_dtype).float())  # the kernel's cast = torch's
    ref8 = reference_attention(b["q"], kv_cache[0], kv_cache[1], b["qsl"], b["seq_lens"], b["block_table"],
                               128 ** -0.5)
    assert (out.double() - ref8).abs().max().item() <= 2e-2  # bf16
