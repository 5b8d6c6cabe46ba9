"""The CUDA platform's Triton kernels with each AMD launch tuning, under the Triton interpreter,
against the CUDA tests' float64 reference. The interpreter checks the tiling (block_m, tile_n,
splits, decode/unified) each tuning picks; it ignores num_warps, num_stages and the AMD-only
options (waves_per_eu, matrix_instr_nonkdim), which are checked against Triton's AMD compiler
(test_amd_options_*) instead."""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from test_cuda_attention import MIXED_CTX, MIXED_Q, make_batch, run_and_check  # noqa: E402  (CUDA tests' reference)

from pageport.kernels_cuda import paged_attention as pa  # noqa: E402
from pageport.kernels_cuda.attention import TritonPagedAttention  # noqa: E402
from pageport.kernels_rocm.tuning import CDNA_TUNING, RDNA_TUNING  # noqa: E402
from pageport.plugins.conformance import Case, check_attention  # noqa: E402

TUNINGS = [CDNA_TUNING, RDNA_TUNING]
IDS = [t.name for t in TUNINGS]


def _config(t, b, group, head_size, num_kv_heads, splits=None):
    q_lens = [b["qsl"][i + 1] - b["qsl"][i] for i in range(len(b["seq_lens"]))]
    return pa.default_config(group=group, head_size=head_size, max_query_len=max(q_lens),
                             num_seqs=len(q_lens), num_kv_heads=num_kv_heads, max_seq_len=max(b["seq_lens"]),
                             device=torch.device("cpu"), num_splits=splits, tuning=t)


@pytest.mark.parametrize("tuning", TUNINGS, ids=IDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("heads,head_size,block_size", [((6, 2), 64, 16), ((8, 8), 128, 32)], ids=["gqa3", "mha"])
def test_unified_mixed_batch(device, tuning, dtype, heads, head_size, block_size):
    b = make_batch(MIXED_Q, MIXED_CTX, *heads, head_size, block_size, dtype, device, seed=head_size + heads[0])
    cfg = _config(tuning, b, heads[0] // heads[1], head_size, heads[1])
    assert not cfg.decode and cfg.extra == tuning.prefill_extra
    run_and_check(b, head_size ** -0.5, dtype, config=cfg)


@pytest.mark.parametrize("tuning", TUNINGS, ids=IDS)
@pytest.mark.parametrize("splits", [1, 4])
def test_decode_split_kv(device, tuning, splits):
    b = make_batch([1] * 4, [70, 2, 33, 200], 8, 2, 64, 16, torch.float16, device, seed=splits)
    cfg = _config(tuning, b, 4, 64, 2, splits=splits)
    assert cfg.decode and cfg.num_splits == splits and cfg.tile_n == tuning.decode_tile_n
    assert cfg.extra == tuning.decode_extra
    run_and_check(b, 0.125, torch.float16, config=cfg)


@pytest.mark.parametrize("tuning", TUNINGS, ids=IDS)
def test_head_256_and_sliding_window(device, tuning):
    b = make_batch([1, 9, 1], [40, 5, 0], 4, 2, 256, 16, torch.float32, device, seed=3)
    cfg = _config(tuning, b, 2, 256, 2)
    assert cfg.tile_n == max(16, tuning.prefill_tile_n // 2)
    run_and_check(b, 256 ** -0.5, torch.float32, config=cfg, window=12)


def test_cdna_launches_carry_amd_options(device, monkeypatch):
    """Through the backend: the CDNA launch passes waves_per_eu / matrix_instr_nonkdim and
    wave64 warp counts to the kernel launch (the interpreter then ignores them)."""
    seen = []
    kernel = pa._paged_attention_kernel

    class Spy:
        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                seen.append({k: kwargs[k] for k in ("num_warps", "num_stages", "waves_per_eu",
                                                    "matrix_instr_nonkdim") if k in kwargs})
                return kernel[grid](*args, **kwargs)
            return launch
    monkeypatch.setattr(pa, "_paged_attention_kernel", Spy())
    plat = _Platform(CDNA_TUNING)  # a mixed step, then a decode step, through the backend's write + forward
    assert check_attention(plat, Case([0, 5, 40], [7, 1, 1])) < 1e-4
    assert check_attention(plat, Case([3, 20], [1, 1])) < 1e-4
    assert seen and all(s == {"num_warps": 4, "num_stages": 2, "waves_per_eu": 2, "matrix_instr_nonkdim": 16}
                        for s in seen), seen  # head 64: prefill and decode launches alike


class _Platform:
    """Just enough of a Platform for the conformance checker: CPU tensors, a given backend."""
    device = torch.device("cpu")

    def __init__(self, tuning):
        self.tuning = tuning

    def attention_backend(self, num_heads, num_kv_heads, head_size, scale, sliding_window=None, softcap=None):
        return TritonPagedAttention(num_heads, num_kv_heads, head_size, scale, sliding_window, tuning=self.tuning)


@pytest.mark.parametrize("arch,warp,tuning", [("gfx942", 64, CDNA_TUNING), ("gfx90a", 64, CDNA_TUNING),
                                              ("gfx1100", 32, RDNA_TUNING)])
def test_amd_options_are_known_to_tritons_amd_backend(arch, warp, tuning):
    """Triton's AMD compiler (shipped in the triton wheel) parses every option each tuning passes."""
    from triton.backends.amd.compiler import HIPBackend
    from triton.backends.compiler import GPUTarget
    backend = HIPBackend(GPUTarget("hip", arch, warp))
    for stage in ("decode", "prefill"):
        opts = dict(num_warps=getattr(tuning, f"{stage}_num_warps"), num_stages=getattr(tuning, f"{stage}_num_stages"),
                    **dict(getattr(tuning, f"{stage}_extra")))
        parsed = backend.parse_options(opts)
        for k, v in opts.items():
            assert getattr(parsed, k) == v, (stage, k)
        assert parsed.warp_size == warp if hasattr(parsed, "warp_size") else True
