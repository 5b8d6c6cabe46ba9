"""The kernel's KV layout, shape buckets, step padding and the XLA-native attention, in plain torch.

XlaPagedAttention is all torch ops, so on CPU tensors it runs here exactly as XLA traces it (minus the
compilation): the conformance kit checks it against float64 references through a CPU-device stub platform.
"""
from __future__ import annotations

import pytest
import torch

from pageport.kernels_tpu.attention import XlaPagedAttention
from pageport.kernels_tpu.layout import (KVLayout, PaddedStep, buckets, pad_step, padded_head_size,
                                         padded_kv_heads, pick_bucket, reference_ragged_paged_attention,
                                         xla_native_paged_attention)
from pageport.plugins import conformance
from pageport.plugins.conformance import Case, build_metadata
from pageport.platforms import Platform

from .helpers import random_step


def test_kv_heads_padded_to_what_the_kernel_tiles():
    # combined = 2 * heads must be in (1, 2, 4, 8) or a multiple of 8, for packing 1 (fp32) and 2 (bf16)
    assert [padded_kv_heads(h) for h in (1, 2, 3, 4, 5, 8, 12, 16)] == [1, 2, 4, 4, 8, 8, 16, 16]
    assert [padded_head_size(d) for d in (64, 128, 80, 256)] == [128, 128, 128, 256]
    lay = KVLayout.for_model(9, 3, 64)  # SmolLM2-135M
    assert (lay.kv_heads_padded, lay.head_size_padded, lay.num_heads_padded, lay.group) == (4, 128, 12, 3)
    assert lay.cache_shape(10, 16) == (10, 16, 8, 128)
    with pytest.raises(ValueError, match="multiple"):
        KVLayout.for_model(9, 2, 64)


def test_pad_and_pack_round_trip():
    g = torch.Generator().manual_seed(0)
    lay = KVLayout.for_model(6, 3, 64)
    q = torch.randn(5, 6, 64, generator=g)
    qp = lay.pad_q(q)
    assert qp.shape == (5, 8, 128)
    # query head j*group + i keeps KV head j; padding is zeros
    assert torch.equal(qp.reshape(5, 4, 2, 128)[:, :3, :, :64], q.reshape(5, 3, 2, 64))
    assert qp.reshape(5, 4, 2, 128)[:, 3].abs().sum() == 0 and qp[..., 64:].abs().sum() == 0
    assert torch.equal(lay.unpad_out(qp), q)
    k, v = torch.randn(5, 3, 64, generator=g), torch.randn(5, 3, 64, generator=g)
    kv = lay.pack_kv(k, v)
    assert kv.shape == (5, 8, 128)
    assert torch.equal(kv[:, 0:6:2, :64], k) and torch.equal(kv[:, 1:6:2, :64], v)  # K/V interleaved
    cache = torch.zeros(lay.cache_shape(2, 4))
    cache.view(-1, 8, 128)[:5] = kv
    ck, cv = lay.unpack_cache(cache)
    assert torch.equal(ck.reshape(-1, 3, 64)[:5], k) and torch.equal(cv.reshape(-1, 3, 64)[:5], v)


def test_buckets():
    assert buckets(128, 16) == [16, 32, 64, 128]
    assert buckets(100, 16) == [16, 32, 64, 100]
    assert buckets(8, 16) == [8]
    assert buckets(256, 8) == [8, 16, 32, 64, 128, 256]
    assert [pick_bucket(n, [16, 32, 100]) for n in (1, 16, 17, 100, 101)] == [16, 16, 32, 100, None]


def test_pad_step():
    # two sequences: a 3-token chunk after 5 cached tokens, and a decode at position 19
    table = torch.tensor([[3, 4, 0], [7, 8, 9]], dtype=torch.int32)
    slots = torch.tensor([4 * 8 + 0, 4 * 8 + 1, 4 * 8 + 2, 9 * 8 + 3])
    step = pad_step([0, 3, 4], [8, 20], table, slots, block_size=8, num_tokens=8, num_seqs=4, width=5)
    assert step.num_actual_tokens == 4
    assert step.slot_mapping.tolist() == [32, 33, 34, 75, 0, 0, 0, 0]  # pads write to the null block
    assert step.token_seq.tolist() == [0, 0, 0, 1, 0, 0, 0, 0]
    assert step.token_pos.tolist() == [5, 6, 7, 19, 0, 0, 0, 0]
    assert step.token_valid.tolist() == [True] * 4 + [False] * 4
    assert step.kv_lens.tolist() == [8, 20, 0, 0]
    assert step.page_indices.tolist() == [[3, 4, 0, 0, 0], [7, 8, 9, 0, 0], [0] * 5, [0] * 5]
    assert step.cu_q_lens.tolist() == [0, 3, 4, 4, 4]
    assert step.num_seqs.tolist() == [2]
    assert all(t.dtype == torch.int32 for t in (step.kv_lens, step.page_indices, step.cu_q_lens, step.num_seqs))
    with pytest.raises(ValueError, match="does not fit"):
        pad_step([0, 3, 4], [8, 20], table, slots, 8, num_tokens=3, num_seqs=4, width=5)
    with pytest.raises(ValueError, match="block table width"):
        pad_step([0, 3, 4], [8, 20], table, slots, 8, num_tokens=8, num_seqs=4, width=2)


@pytest.mark.parametrize("i", range(len(conformance.DEFAULT_CASES)))
def test_reference_in_kernel_layout_matches_plain_reference(i):
    case = conformance.DEFAULT_CASES[i]
    lay, cache, step, q, ref = random_step(case, i, num_tokens=32, num_seqs=6, width=8)
    out = reference_ragged_paged_attention(lay.pad_q(q), cache, step.kv_lens, step.page_indices, step.cu_q_lens,
                                           int(step.num_seqs), case.head_size ** -0.5, case.sliding_window)
    n = step.num_actual_tokens
    assert (lay.unpad_out(out)[:n] - ref).abs().max() < 1e-12
    assert out[n:].abs().sum() == 0


@pytest.mark.parametrize("i", range(len(conformance.DEFAULT_CASES)))
def test_xla_native_attention_with_padding(i):
    case = conformance.DEFAULT_CASES[i]
    lay, cache, step, q, ref = random_step(case, 10 + i, num_tokens=32, num_seqs=6, width=8)
    out = xla_native_paged_attention(lay.pad_q(q), cache, step, case.head_size ** -0.5, lay.group,
                                     case.sliding_window)
    n = step.num_actual_tokens
    assert (lay.unpad_out(out)[:n].double() - ref).abs().max() < 1e-5
    assert torch.isfinite(out).all()  # pad tokens attend to the null slot: finite


class _TorchCpuXla(Platform):
    """The xla platform's backend on plain CPU tensors (no torch_xla): what XLA compiles, run eagerly."""
    name = "xla-backend-on-cpu"

    def attention_backend(self, num_heads, num_kv_heads, head_size, scale, sliding_window=None, softcap=None):
        return XlaPagedAttention(num_heads, num_kv_heads, head_size, scale, sliding_window, softcap)


def test_backend_passes_the_conformance_kit_on_cpu_tensors():
    rows = conformance.run(_TorchCpuXla())
    assert all(ok for *_, ok in rows), rows


def test_backend_pads_rows_and_zeroes_them():
    case = Case([4, 0], [1, 6])
    lay = KVLayout.for_model(8, 2, 64)
    backend = XlaPagedAttention(8, 2, 64, 0.125)
    assert backend.kv_cache_shape(6, 16, 2, 64) == lay.cache_shape(6, 16)
    cache = torch.zeros(backend.kv_cache_shape(6, 16, 2, 64))
    md = build_metadata(case, [[1], [2]], "cpu")
    step = pad_step(md.query_start_loc_cpu, md.seq_lens_cpu, md.block_table, md.slot_mapping, 16, 16, 4, 3)
    assert isinstance(backend.build_metadata(step), PaddedStep)
    q, k, v = torch.randn(16, 8, 64), torch.randn(16, 2, 64), torch.randn(16, 2, 64)
    out = backend.forward(q, k, v, cache, step)
    assert out.shape == (16, 8, 64) and out[7:].abs().sum() == 0
    ck, _ = lay.unpack_cache(cache)
    assert torch.equal(ck[1, 4], k[0]) and torch.equal(ck[2, :6], k[1:7])  # written at their slots
    with pytest.raises(ValueError, match="query rows"):
        backend.forward(q[:5], k[:5], v[:5], cache, step)
