"""The JAX / Pallas attention pieces on JAX's CPU backend, fed from our layout, against float64 torch.

- the ragged paged attention contract (what torch-xla's Pallas kernel receives on a TPU): JAX's own
  input validation and its reference ``ref_ragged_paged_attention`` (eager) on our padded step;
  the kernel itself does not run in any interpret mode on CPU (reference/environment.md);
- the TPU decode ``paged_attention`` under ``pltpu.force_tpu_interpret_mode()`` (it casts K/V to bf16);
- the GPU-Pallas ``paged_attention(interpret=True)`` (applies no softmax scale: q is pre-scaled).
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from pageport.plugins.conformance import DEFAULT_CASES, Case

from .helpers import random_step

jax = pytest.importorskip("jax", reason="jax is the tpu extra: pip install -e '.[tpu]'")
jnp = pytest.importorskip("jax.numpy")


def _j(t: torch.Tensor):
    return jnp.asarray(t.numpy())


@pytest.fixture(autouse=True)
def _cpu_only():
    if jax.default_backend() != "cpu":
        pytest.skip("these tests drive the interpreters on JAX's CPU backend")


@pytest.mark.parametrize("i", range(len(DEFAULT_CASES)))
def test_jax_ragged_reference_reads_our_step(i):
    from jax.experimental.pallas.ops.tpu import ragged_paged_attention as rpa

    case = DEFAULT_CASES[i]
    lay, cache, step, q, ref = random_step(case, 100 + i, num_tokens=32, num_seqs=8, width=8)
    qp = lay.pad_q(q)
    args = (_j(qp), _j(cache), _j(step.kv_lens), _j(step.page_indices), _j(step.cu_q_lens), _j(step.num_seqs))
    scale = case.head_size ** -0.5
    # the kernel's own checks, with explicit block sizes (the tuned ones ask for a TPU)
    rpa.dynamic_validate_inputs(*args, sm_scale=scale, sliding_window=case.sliding_window,
                                num_kv_pages_per_block=4, num_queries_per_block=16)
    for dtype in (jnp.float32, jnp.bfloat16):  # our padded heads tile in every dtype the kernel packs
        rpa.kernel.get_min_heads_per_blk(lay.num_heads_padded, lay.combined_heads, dtype, dtype)
    out = rpa.ref_ragged_paged_attention(*args, sm_scale=scale, sliding_window=case.sliding_window)
    out = torch.from_numpy(np.array(out))
    n = step.num_actual_tokens
    assert out.shape[0] == n  # it stops at cu_q_lens[num_seqs]: padded rows are not computed
    assert (lay.unpad_out(out).double() - ref).abs().max() < 1e-5


def test_unpadded_heads_would_not_tile():
    from jax.experimental.pallas.ops.tpu import ragged_paged_attention as rpa

    with pytest.raises(ValueError, match="fully tiled"):  # SmolLM2's 3 KV heads, unpadded
        rpa.kernel.get_min_heads_per_blk(9, 6, jnp.float32, jnp.float32)


def _decode_case(seed: int):
    case = Case([37, 5, 60], [1, 1, 1], num_heads=8, num_kv_heads=2, head_size=128, block_size=16)
    lay, cache, step, q, ref = random_step(case, seed, num_tokens=3, num_seqs=3, width=4)
    k_pages, v_pages = lay.heads_major(cache)
    return case, step, q, ref, k_pages, v_pages


def test_tpu_paged_attention_in_interpret_mode():
    from jax.experimental.pallas import tpu as pltpu
    from jax.experimental.pallas.ops.tpu.paged_attention import paged_attention

    case, step, q, ref, k_pages, v_pages = _decode_case(1)
    with pltpu.force_tpu_interpret_mode():
        out = paged_attention(_j(q * case.head_size ** -0.5), _j(k_pages), _j(v_pages), _j(step.kv_lens),
                              _j(step.page_indices), pages_per_compute_block=2)
    err = (torch.from_numpy(np.array(out)).double() - ref).abs().max().item()
    assert err < 2e-2, err  # K/V go through bfloat16 inside the kernel


def test_gpu_pallas_paged_attention_interpret():
    from jax.experimental.pallas.ops.gpu.paged_attention import paged_attention

    case, step, q, ref, k_pages, v_pages = _decode_case(2)
    out = paged_attention(_j(q * case.head_size ** -0.5), _j(k_pages), _j(v_pages), _j(step.page_indices),
                          _j(step.kv_lens), block_h=16, pages_per_compute_block=2, k_splits=2, interpret=True)
    err = (torch.from_numpy(np.array(out)).double() - ref).abs().max().item()
    assert err < 1e-5, err
