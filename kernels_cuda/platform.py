"""The CUDA platform: NVIDIA GPUs through torch, attention and fused ops in Triton."""
from __future__ import annotations

import importlib.util
import logging
import os
from typing import Optional

import torch

from pageport.kernels_cuda.ops import TritonOps
from pageport.platforms import Platform

logger = logging.getLogger(__name__)

MIN_CAPABILITY = (7, 5)  # what Triton's NVIDIA backend compiles for
BLOCK_SIZE_MULTIPLE = 16  # tl.dot tiles and the attention kernel's key tiles


class CudaPlatform(Platform):
    name = "cuda"
    device_type = "cuda"
    priority = 100
    dist_backend = "nccl"
    # big prefill chunks keep the GEMMs efficient (vLLM's default on H100-class GPUs, 8192)
    default_max_num_batched_tokens = 8192
    supported_dtypes = (torch.bfloat16, torch.float16, torch.float32)

    ops = TritonOps()
    min_bf16_capability: Optional[tuple[int, int]] = (8, 0)  # NVIDIA: Ampere and newer
    min_fp8_capability: Optional[tuple[int, int]] = (8, 9)  # fp8 GEMMs and casts: Ada, Hopper and newer

    def __init__(self, index: int = 0):
        self.index = index

    # identity ---------------------------------------------------------------------
    @classmethod
    def unavailable_reason(cls) -> Optional[str]:
        try:
            if getattr(torch.version, "hip", None):
                return (f"torch {torch.__version__} is a ROCm build (HIP {torch.version.hip}); "
                        "the cuda platform needs a CUDA build of torch")
            if torch.version.cuda is None:
                return f"torch {torch.__version__} is a CPU build (torch.version.cuda is None)"
            if not torch.cuda.is_available():
                return (f"torch (CUDA {torch.version.cuda}) reports no CUDA device "
                        "(no GPU, no driver, or CUDA_VISIBLE_DEVICES hides them)")
            if importlib.util.find_spec("triton") is None:
                return "triton is not installed (pip install 'pageport[cuda]')"
            cap = torch.cuda.get_device_capability(0)
            if cap < MIN_CAPABILITY:
                return (f"{torch.cuda.get_device_name(0)} has compute capability {cap[0]}.{cap[1]}; "
                        f"the Triton kernels need {MIN_CAPABILITY[0]}.{MIN_CAPABILITY[1]} or newer")
            return None
        except Exception as e:  # a probe must never raise
            return f"CUDA probe failed: {type(e).__name__}: {e}"

    # device facts -------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return torch.device("cuda", self.index)

    def device_count(self) -> int:
        return torch.cuda.device_count()

    def device_name(self) -> str:
        return torch.cuda.get_device_name(self.index)

    def capability(self) -> tuple[int, int]:
        return torch.cuda.get_device_capability(self.index)

    def memory_info(self) -> tuple[int, int]:
        return torch.cuda.mem_get_info(self.index)

    def describe(self) -> dict:
        cap = self.capability()
        total = torch.cuda.get_device_properties(self.index).total_memory
        try:
            import triton
            triton_version = triton.__version__
        except ImportError:
            triton_version = "-"
        return {"device": self.device_name(), "capability": f"{cap[0]}.{cap[1]}",
                "memory": f"{total / 2**30:.0f} GiB", "count": self.device_count(),
                "cuda": torch.version.cuda, "triton": triton_version}

    # runtime --------------------------------------------------------------------------
    def set_device(self, index: int = 0) -> None:
        self.index = index
        torch.cuda.set_device(index)

    def synchronize(self) -> None:
        torch.cuda.synchronize(self.index)

    def seed(self, seed: int) -> None:
        torch.manual_seed(seed)
        torch.cuda.manual_seed_all(seed)

    def empty_cache(self) -> None:
        torch.cuda.empty_cache()

    # configuration ------------------------------------------------------------------------
    def check_config(self, config) -> None:
        config.resolve_dtype(self.supported_dtypes)
        super().check_config(config)
        if config.block_size % BLOCK_SIZE_MULTIPLE:
            raise ValueError(f"{self.name}: block_size must be a multiple of {BLOCK_SIZE_MULTIPLE} "
                             f"(16, 32, 64...), got {config.block_size}")
        cap = self.capability() if config.dtype == torch.bfloat16 and self.min_bf16_capability else None
        if cap is not None and cap < self.min_bf16_capability:
            raise ValueError(f"{self.name}: compute capability {cap[0]}.{cap[1]} has no bfloat16 (needs 8.0); "
                             "use --dtype float16")
        fp8 = getattr(config, "kv_cache_dtype", "auto") != "auto" or getattr(config, "quantization", None) == "fp8"
        cap = self.capability() if fp8 and self.min_fp8_capability else None
        if cap is not None and cap < self.min_fp8_capability:
            raise ValueError(f"{self.name}: compute capability {cap[0]}.{cap[1]} has no fp8 (needs 8.9) for "
                             f"--kv-cache-dtype / --quantization fp8")

    def profile_peak_bytes(self, run) -> int:
        """Peak memory one worst-case step allocates beyond what is already held (weights)."""
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(self.index)
        base = torch.cuda.memory_allocated(self.index)
        run()
        self.synchronize()
        peak = torch.cuda.max_memory_allocated(self.index) - base
        torch.cuda.empty_cache()
        return peak

    def graph_runner(self, model, kv_caches, config):
        from pageport.kernels_cuda.graphs import CudaGraphRunner
        if os.environ.get("PAGEPORT_FUSED_MOE") == "torch" and _has_experts(model):
            logger.warning("PAGEPORT_FUSED_MOE=torch: the per-expert loop reads expert counts on the host, which "
                           "a CUDA graph cannot capture; running eagerly")
            return None
        return CudaGraphRunner(model, kv_caches, config)

    def attention_backend(self, num_heads, num_kv_heads, head_size, scale, sliding_window=None, softcap=None):
        from pageport.kernels_cuda.attention import TritonPagedAttention
        return TritonPagedAttention(num_heads, num_kv_heads, head_size, scale, sliding_window, softcap)


def _has_experts(model) -> bool:
    """A Mixture-of-Experts model: one of its modules holds stacked expert weights (models/moe.py)."""
    return any(hasattr(m, "w13_weight") for m in model.modules())
