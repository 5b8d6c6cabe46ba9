"""The ROCm platform: AMD GPUs through torch's HIP build.

torch's ROCm build answers through the torch.cuda API (device "cuda", torch.cuda.* calls,
torch.cuda.graph for HIP graphs, the "nccl" process-group backend backed by RCCL), so this
platform differs from the CUDA one in its probe, its device facts (gcnArchName, wavefront
size, fp8 flavour) and the launch tuning it gives the same Triton kernels.
"""
from __future__ import annotations

import importlib.util
from typing import Optional

import torch

from pageport.kernels_cuda.platform import CudaPlatform
from pageport.kernels_rocm import tuning as _tuning


def _arch(index: int = 0) -> str:
    props = torch.cuda.get_device_properties(index)
    return getattr(props, "gcnArchName", "") or ""


class RocmPlatform(CudaPlatform):
    """CudaPlatform's runtime, memory profiling, checks and graphs; its own probe, facts and tuning."""

    name = "rocm"
    device_type = "cuda"  # torch's HIP build names AMD GPUs "cuda"
    priority = 100  # a torch build is either CUDA or ROCm: at most one of the two is available
    dist_backend = "nccl"  # RCCL behind torch's nccl backend
    min_bf16_capability = None  # every GPU Triton's AMD backend targets has bf16

    # identity ---------------------------------------------------------------------
    @classmethod
    def unavailable_reason(cls) -> Optional[str]:
        try:
            hip = getattr(torch.version, "hip", None)
            if not hip:
                kind = f"CUDA {torch.version.cuda}" if torch.version.cuda else "CPU"
                return f"torch {torch.__version__} is a {kind} build, not ROCm (torch.version.hip is None)"
            if not torch.cuda.is_available():
                return (f"torch (HIP {hip}) reports no AMD GPU (no GPU, no amdgpu driver, or "
                        "HIP_VISIBLE_DEVICES / ROCR_VISIBLE_DEVICES hides them)")
            if importlib.util.find_spec("triton") is None:
                return "triton is not installed (pip install 'pageport[rocm]'; ROCm wheels ship it as pytorch-triton-rocm)"
            arch = _arch(0)
            if _tuning.family(arch) is None:
                return (f"{torch.cuda.get_device_name(0)} is {arch or 'an unknown gfx arch'}; Triton's AMD backend "
                        "targets CDNA2+ (gfx90a, gfx942, gfx950) and RDNA3+ (gfx11xx, gfx12xx)")
            return None
        except Exception as e:  # a probe must never raise
            return f"ROCm probe failed: {type(e).__name__}: {e}"

    # device facts -------------------------------------------------------------------
    def arch(self) -> str:
        """Base gfx architecture, e.g. 'gfx942' (MI300X/A), 'gfx90a' (MI250X), 'gfx1100' (RX 7900)."""
        return _tuning.base_arch(_arch(self.index))

    def warp_size(self) -> int:
        return _tuning.warp_size(self.arch())

    def tuning(self):
        return _tuning.tuning_for(self.arch())

    def fp8_dtype(self) -> Optional[torch.dtype]:
        """The fp8 e4m3 dtype this GPU computes natively: float8_e4m3fnuz on MI300 (gfx942),
        float8_e4m3fn on gfx950 / RDNA4, None where there is none."""
        kind = _tuning.fp8_kind(self.arch())
        return getattr(torch, kind, None) if kind else None

    @property
    def supported_kv_cache_dtypes(self) -> tuple[torch.dtype, ...]:
        """Model dtypes, plus the device's own fp8 flavour (a device fact for an fp8 KV cache;
        the attention kernel does not read fp8 caches yet)."""
        fp8 = self.fp8_dtype()
        return self.supported_dtypes + ((fp8,) if fp8 is not None else ())

    def describe(self) -> dict:
        props = torch.cuda.get_device_properties(self.index)
        fp8 = self.fp8_dtype()
        try:
            import triton
            triton_version = triton.__version__
        except ImportError:
            triton_version = "-"
        return {"device": self.device_name(), "arch": self.arch(), "wavefront": self.warp_size(),
                "cus": props.multi_processor_count, "memory": f"{props.total_memory / 2**30:.0f} GiB",
                "count": self.device_count(), "hip": torch.version.hip, "triton": triton_version,
                "tuning": self.tuning().name, "fp8": str(fp8).removeprefix("torch.") if fp8 else "-"}

    def attention_backend(self, num_heads, num_kv_heads, head_size, scale, sliding_window=None, softcap=None):
        from pageport.kernels_cuda.attention import TritonPagedAttention
        return TritonPagedAttention(num_heads, num_kv_heads, head_size, scale, sliding_window, softcap,
                                    tuning=self.tuning())
