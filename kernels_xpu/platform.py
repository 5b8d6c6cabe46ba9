"""The XPU platform: Intel GPUs (Data Center GPU Max / Ponte Vecchio, Arc A/B-series, Lunar Lake
and later iGPUs) through torch's native "xpu" device (torch >= 2.5 built with XPU support).

Kernels: the CUDA platform's Triton kernels, unchanged, compiled by Intel's Triton backend
(the `pytorch-triton-xpu` package that torch's XPU wheels depend on; it installs as `triton`
with a `triton/backends/intel` backend). Distributed: the "xccl" backend (oneCCL, torch >= 2.8).
No graph capture: torch's XPU graph API is newer than what this platform targets; steps run eager.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Optional

import torch

from pageport.kernels_cuda.ops import TritonOps, _triton_runs
from pageport.kernels_cuda.launch import LaunchTuning
from pageport.platforms import Platform

BLOCK_SIZE_MULTIPLE = 16

# Launch tuning for Intel's Triton backend (not yet measured on Intel hardware). Warps are
# sub-groups: 32 work-items by default, 16 where the backend lowers tl.dot to DPAS (it picks
# that itself). Xe cores have 64 KiB of SLM and a 128-register GRF per thread in the default
# mode, so the unified launch keeps the CUDA shapes and 2 pipeline stages. No backend-specific
# options are passed: their names (threads_per_warp -> warp_size, grf_mode values) have
# changed between backend releases, and the NVIDIA-style kwargs are the portable subset.
XPU_TUNING = LaunchTuning(
    name="xpu", warp_size=32, target_programs_per_sm=2,
    decode_tile_n=64, decode_num_warps=4, decode_num_stages=2, decode_extra=(),
    prefill_max_block_m=64, prefill_tile_n=32, prefill_num_warps=4, prefill_wide_num_warps=8,
    prefill_wide_elems=64 * 128, prefill_num_stages=2, prefill_extra=(),
)


def intel_triton_backend() -> Optional[Path]:
    """Where triton's Intel backend is installed, found without importing triton."""
    spec = importlib.util.find_spec("triton")
    if spec is None or not spec.submodule_search_locations:
        return None
    for loc in spec.submodule_search_locations:
        path = Path(loc) / "backends" / "intel"
        if path.is_dir():
            return path
    return None


class XpuOps(TritonOps):
    """The Triton ops on XPU tensors (and on CPU tensors under the interpreter)."""

    def runs_triton(self, x: torch.Tensor) -> bool:
        return x.device.type == "xpu" or _triton_runs(x) and not x.is_cuda


class XpuPlatform(Platform):
    name = "xpu"
    device_type = "xpu"
    priority = 90  # below cuda/rocm (a machine with both kinds of GPU defaults to the NVIDIA/AMD one)
    dist_backend = "xccl"
    supported_dtypes = (torch.bfloat16, torch.float16, torch.float32)

    ops = XpuOps()

    def __init__(self, index: int = 0):
        self.index = index

    # identity ---------------------------------------------------------------------
    @classmethod
    def unavailable_reason(cls) -> Optional[str]:
        try:
            xpu = getattr(torch, "xpu", None)
            if xpu is None:
                return f"torch {torch.__version__} has no torch.xpu (needs torch >= 2.5 built with XPU support)"
            if not xpu.is_available():
                return (f"torch {torch.__version__} reports no Intel GPU (not an XPU build of torch, no GPU, "
                        "no Level Zero driver, or ZE_AFFINITY_MASK hides them)")
            if importlib.util.find_spec("triton") is None:
                return "triton is not installed (pip install 'pageport[xpu]': pytorch-triton-xpu)"
            if intel_triton_backend() is None:
                return "the installed triton has no Intel backend (install pytorch-triton-xpu, not the PyPI triton)"
            return None
        except Exception as e:  # a probe must never raise
            return f"XPU probe failed: {type(e).__name__}: {e}"

    # device facts -------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return torch.device("xpu", self.index)

    def _props(self):
        return torch.xpu.get_device_properties(self.index)

    def device_count(self) -> int:
        return torch.xpu.device_count()

    def device_name(self) -> str:
        return torch.xpu.get_device_name(self.index)

    def has_matrix_engine(self) -> bool:
        """XMX / DPAS (Max series, Arc, Lunar Lake+): tl.dot runs on the systolic arrays."""
        return bool(getattr(self._props(), "has_subgroup_matrix_multiply_accumulate", False))

    def memory_info(self) -> tuple[int, int]:
        if hasattr(torch.xpu, "mem_get_info"):
            return torch.xpu.mem_get_info(self.index)
        total = self._props().total_memory
        return total - torch.xpu.memory_reserved(self.index), total

    def describe(self) -> dict:
        p = self._props()
        return {"device": self.device_name(), "xe_cores": getattr(p, "gpu_subslice_count", "?"),
                "memory": f"{p.total_memory / 2**30:.0f} GiB", "count": self.device_count(),
                "xmx": "yes" if self.has_matrix_engine() else "no",
                "subgroups": "/".join(str(s) for s in getattr(p, "sub_group_sizes", []) or []) or "?",
                "driver": getattr(p, "driver_version", "?"), "tuning": XPU_TUNING.name}

    # runtime --------------------------------------------------------------------------
    def set_device(self, index: int = 0) -> None:
        self.index = index
        torch.xpu.set_device(index)

    def synchronize(self) -> None:
        torch.xpu.synchronize(self.index)

    def seed(self, seed: int) -> None:
        torch.manual_seed(seed)
        torch.xpu.manual_seed_all(seed)

    def empty_cache(self) -> None:
        torch.xpu.empty_cache()

    # configuration ------------------------------------------------------------------------
    def check_config(self, config) -> None:
        config.resolve_dtype(self.supported_dtypes)
        super().check_config(config)
        if config.block_size % BLOCK_SIZE_MULTIPLE:
            raise ValueError(f"xpu: block_size must be a multiple of {BLOCK_SIZE_MULTIPLE} "
                             f"(16, 32, 64...), got {config.block_size}")

    def profile_peak_bytes(self, run) -> int:
        torch.xpu.empty_cache()
        torch.xpu.reset_peak_memory_stats(self.index)
        base = torch.xpu.memory_allocated(self.index)
        run()
        self.synchronize()
        peak = torch.xpu.max_memory_allocated(self.index) - base
        torch.xpu.empty_cache()
        return peak

    def attention_backend(self, num_heads, num_kv_heads, head_size, scale, sliding_window=None, softcap=None):
        from pageport.kernels_cuda.attention import TritonPagedAttention
        return TritonPagedAttention(num_heads, num_kv_heads, head_size, scale, sliding_window, softcap,
                                    tuning=XPU_TUNING)
