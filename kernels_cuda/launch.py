"""Launch choices for the Triton kernels, as plain data (importing this loads no triton).

LaunchConfig is one launch of the paged-attention kernel; LaunchTuning is a platform's rules for
choosing one (paged_attention.default_config reads it). CUDA, ROCm and XPU run the same kernels
with different LaunchTunings.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class LaunchConfig:
    """One launch of the attention kernel. decode: the grid walks sequences (every sequence
    has <= block_q query tokens); num_splits > 1: split-KV plus the merge kernel.
    extra: backend-specific compile options passed with the launch, e.g. (("waves_per_eu", 2),)
    for AMD; empty for NVIDIA, whose Triton backend rejects options it does not know."""
    decode: bool
    block_m: int
    tile_n: int
    num_splits: int
    num_warps: int
    num_stages: int
    extra: tuple = ()

    def __post_init__(self):
        assert self.block_m >= 16 and self.tile_n >= 16, "tl.dot needs M, N >= 16"
        assert self.num_splits >= 1


@dataclass(frozen=True)
class LaunchTuning:
    """How one platform (or GPU family) launches the shared kernels: every number that
    default_config uses. The kernels are the same everywhere; only these differ.

    warp_size: threads per warp/wavefront of the target (NVIDIA 32, AMD CDNA 64, RDNA 32);
    num_warps counts warps of that size. *_extra: compile options for that backend only."""
    name: str = "cuda"
    warp_size: int = 32
    target_programs_per_sm: int = 2  # split-KV fills the GPU to this many programs per SM/CU
    # decode launch
    decode_tile_n: int = 64  # keys per tile for head_pad <= 128 (halved above)
    decode_fp8_tile_n: int = 128  # the same over an fp8 cache (H200 sweep: 0.25 ms vs 0.30 ms at 64, 8k context)
    decode_num_warps: int = 4
    decode_num_stages: int = 3
    decode_extra: tuple = ()
    # unified (prefill / mixed) launch
    prefill_max_block_m: int = 64
    prefill_tile_n: int = 32  # for head_pad <= 128 (halved above)
    prefill_wide_num_warps: int = 8  # when block_m * head_pad > prefill_wide_elems
    prefill_num_warps: int = 4
    prefill_wide_elems: int = 64 * 128  # the fp32 accumulator lives in registers
    prefill_num_stages: int = 2
    prefill_extra: tuple = ()


CUDA_TUNING = LaunchTuning()
