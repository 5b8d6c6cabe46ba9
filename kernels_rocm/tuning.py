"""AMD launch tuning for the shared Triton kernels (kernels_cuda/paged_attention.py).

No kernel code lives here: only the numbers default_config reads (a LaunchTuning), one set per
GPU family, chosen from the device's gcnArchName. Pure Python, no triton import.

Rules behind the numbers (not measured on AMD hardware: none is reachable; see README "What
runs where"). The CDNA numbers come from compiling the kernel for gfx942 here, ahead of time
(kernels_rocm/aot.py, benchmarks/results/rocm_aot_compile.json), and reading its register use:
- CDNA (MI200 gfx90a, MI300 gfx942, MI350 gfx950) runs 64-wide wavefronts; num_warps counts
  wave64s. With CUDA's thread counts (2 waves) the fp32 accumulator plus the Q tile need >256
  VGPRs at head 128: the compiler spills or moves them to AGPRs. 4 waves (8 for the 64x256
  accumulator) keep every head size 64-256 at <=256 VGPRs with no spills.
- waves_per_eu=2 caps VGPRs at 256 per lane (2 waves per SIMD); 4 (128 VGPRs) spills 50-365
  registers at head 128-256, so it is not used.
- matrix_instr_nonkdim=16 picks 16x16 MFMA tiles: the kernel's M is 16-64 rows.
- num_stages 2: the AMD stream pipeliner keeps one tile in flight through LDS (64 KiB per CU);
  the compiled launches use 8-32 KiB.
- RDNA3/4 (gfx11xx/gfx12xx, Radeon) runs wave32 with WMMA, no MFMA option. Compiled for gfx1100
  here, every warp count / waves_per_eu tried spills VGPRs at head >= 128 (fewest with 8 waves:
  ~35-50 at head 128); 8 waves are used. Head 64 compiles without spills.
"""
from __future__ import annotations

from typing import Optional

from pageport.kernels_cuda.launch import LaunchTuning

CDNA_TUNING = LaunchTuning(
    name="rocm-cdna", warp_size=64, target_programs_per_sm=2,
    decode_tile_n=64, decode_num_warps=4, decode_num_stages=2,
    decode_extra=(("waves_per_eu", 2), ("matrix_instr_nonkdim", 16)),
    prefill_max_block_m=64, prefill_tile_n=32, prefill_num_warps=4, prefill_wide_num_warps=8,
    prefill_wide_elems=64 * 128, prefill_num_stages=2,
    prefill_extra=(("waves_per_eu", 2), ("matrix_instr_nonkdim", 16)),
)

RDNA_TUNING = LaunchTuning(
    name="rocm-rdna", warp_size=32, target_programs_per_sm=2,
    decode_tile_n=32, decode_num_warps=8, decode_num_stages=2, decode_extra=(),
    prefill_max_block_m=32, prefill_tile_n=32, prefill_num_warps=8, prefill_wide_num_warps=8,
    prefill_wide_elems=32 * 128, prefill_num_stages=2, prefill_extra=(),
)

TUNINGS = {t.name: t for t in (CDNA_TUNING, RDNA_TUNING)}

# Families Triton's AMD backend targets. Older GCN/CDNA1 (gfx906 MI50, gfx908 MI100) and RDNA1/2
# are not supported by current Triton.
_CDNA = ("gfx90a", "gfx942", "gfx950")
_RDNA_PREFIXES = ("gfx11", "gfx12")


def base_arch(gcn_arch_name: str) -> str:
    """'gfx942:sramecc+:xnack-' -> 'gfx942'."""
    return (gcn_arch_name or "").split(":")[0].strip().lower()


def family(arch: str) -> Optional[str]:
    """'cdna' | 'rdna' | None (not a Triton target)."""
    arch = base_arch(arch)
    if arch in _CDNA:
        return "cdna"
    if arch.startswith(_RDNA_PREFIXES):
        return "rdna"
    return None


def tuning_for(arch: str) -> LaunchTuning:
    return RDNA_TUNING if family(arch) == "rdna" else CDNA_TUNING


def warp_size(arch: str) -> int:
    return 32 if family(arch) == "rdna" else 64


def fp8_kind(arch: str) -> Optional[str]:
    """Which 8-bit float (e4m3) the matrix cores compute natively.

    MI300 (gfx942, CDNA3) uses the FNUZ variants (no negative zero, NaN = 0x80, exponent bias 8:
    torch.float8_e4m3fnuz); CDNA4 (gfx950) and RDNA4 (gfx12xx) use OCP e4m3fn like NVIDIA;
    MI200 (gfx90a) and RDNA3 have no fp8 matrix instructions."""
    arch = base_arch(arch)
    if arch == "gfx942":
        return "float8_e4m3fnuz"
    if arch == "gfx950" or arch.startswith("gfx12"):
        return "float8_e4m3fn"
    return None
