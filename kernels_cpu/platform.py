from __future__ import annotations

import functools
import os
from typing import Optional

import torch

from pageport.kernels_cpu import cpuinfo
from pageport.kernels_cpu.ops import CpuOps
from pageport.platforms import Platform
from pageport.platforms.ops import Ops

ATTENTION_ENV = "PAGEPORT_CPU_ATTENTION"  # auto (default) | ipex | native | torch


@functools.cache
def _cpu() -> cpuinfo.CpuInfo:
    return cpuinfo.detect()


class CpuPlatform(Platform):
    name = "cpu"
    device_type = "cpu"
    priority = 10
    dist_backend = "gloo"
    ops = CpuOps()

    def __init__(self, info: Optional[cpuinfo.CpuInfo] = None, attention: Optional[str] = None):
        """attention: "auto" (IPEX where usable, else the C++ kernels where they build, else torch), "ipex",
        "native" or "torch"; default from the PAGEPORT_CPU_ATTENTION environment variable, else auto."""
        self.info = info or _cpu()
        self.attention = (attention or os.environ.get(ATTENTION_ENV) or "auto").lower()
        if self.attention not in ("auto", "ipex", "native", "torch"):
            raise ValueError(f"{ATTENTION_ENV}={self.attention!r}: choose auto, ipex, native or torch")
        self.model_dtype: Optional[torch.dtype] = None  # set by check_config
        self.compiling = False  # set by check_config (EngineConfig.compile)

    def attention_kernel(self) -> tuple[str, str]:
        """(backend name, why): which paged-attention kernel this CPU gets. Cheap: nothing is built."""
        if self.attention == "torch":
            return "torch-sdpa", f"{ATTENTION_ENV}=torch"
        from pageport.kernels_cpu.native import native_status
        if self.attention == "native":
            why_not = native_status()
            if why_not is not None:
                raise RuntimeError(f"{ATTENTION_ENV}=native but {why_not}")
            return "cpu-native", f"{ATTENTION_ENV}=native"
        from pageport.kernels_cpu.ipex_attention import IPEX_DTYPES, ipex_status
        why_not = ipex_status() if self.info.arch == "x86-64" else f"IPEX is x86-64 only ({self.info.arch})"
        if why_not is None and self.model_dtype is not None and self.model_dtype not in IPEX_DTYPES:
            why_not = f"IPEX paged attention has no {str(self.model_dtype).removeprefix('torch.')} kernels"
        if why_not is None:
            return "ipex-paged", "intel-extension-for-pytorch"
        if self.attention == "ipex":
            raise RuntimeError(f"{ATTENTION_ENV}=ipex but {why_not}")
        native_why_not = native_status()
        if native_why_not is None:
            return "cpu-native", why_not
        return "torch-sdpa", f"{why_not}; {native_why_not}"

    @property
    def supported_dtypes(self):
        # bf16 first where the CPU computes it natively; float32 otherwise.
        if self.info.native_bf16:
            return (torch.bfloat16, torch.float32, torch.float16)
        return (torch.float32, torch.bfloat16, torch.float16)

    def device_count(self) -> int:
        return 1

    def device_name(self) -> str:
        return self.info.model

    def describe(self) -> dict:
        try:
            kernel = self.attention_kernel()[0]
        except RuntimeError as e:
            kernel = f"error: {e}"
        return {"arch": self.info.arch, "isa": "+".join(self.info.isa) or "-", "vector": self.info.vector_isa,
                "bf16": "native" if self.info.native_bf16 else "emulated",
                "dtype": str(self.default_dtype).removeprefix("torch."), "attention": kernel,
                "threads": torch.get_num_threads(), "cpu": self.info.model}

    def check_config(self, config) -> None:
        super().check_config(config)
        self.model_dtype = config.dtype
        self.compiling = bool(getattr(config, "compile", False))
        # compiled code fuses the plain reference ops itself; eager runs want the hand-fused ones
        self.ops = Ops() if self.compiling else CpuOps()
        if config.num_threads:
            torch.set_num_threads(config.num_threads)
        elif "OMP_NUM_THREADS" not in os.environ:
            torch.set_num_threads(len(os.sched_getaffinity(0)))
        quantization = getattr(config, "quantization", None)
        if quantization:
            from pageport.kernels_cpu.quant import QUANTIZATIONS
            # the weight-only speed mode; checkpoint formats and in-run fp8/w8a8/w4a16 take any dtype
            if quantization in QUANTIZATIONS and config.dtype != torch.bfloat16:  # fast only with bf16
                raise ValueError(f"quantization={quantization} on the CPU needs dtype bfloat16, got "
                                 f"{str(config.dtype).removeprefix('torch.')}")
        if config.kv_cache_memory_bytes is None:
            # CPU: a fixed budget in GiB, like vLLM's VLLM_CPU_KVCACHE_SPACE (default 4)
            config.kv_cache_memory_bytes = int(float(os.environ.get("PAGEPORT_CPU_KVCACHE_SPACE", "4")) * (1 << 30))

    def compile(self, fn):
        """torch.compile (inductor: fused, vectorized C++ for the norms, rotary and activations around the
        matmuls) with the token count dynamic, when EngineConfig.compile is on."""
        return torch.compile(fn, dynamic=True) if self.compiling else fn

    def attention_backend(self, num_heads, num_kv_heads, head_size, scale, sliding_window=None, softcap=None):
        kernel, _ = self.attention_kernel()
        args = (num_heads, num_kv_heads, head_size, scale, sliding_window, softcap)
        if kernel == "ipex-paged":
            from pageport.kernels_cpu.ipex_attention import IpexPagedAttention
            return IpexPagedAttention(*args)
        from pageport.kernels_cpu import attention
        if kernel == "cpu-native":
            from pageport.kernels_cpu import native
            why_not = native.load()
            if why_not is None:
                return attention.NativePagedAttention(*args)
            if self.attention == "native":
                raise RuntimeError(f"{ATTENTION_ENV}=native but {why_not}")
        return attention.TorchPagedAttention(*args)

    def linear_method(self, quantization: str):
        """Weight-only int4/int8 matmuls (torch's CPU kernels), used for steps of at most 16 rows."""
        from pageport.kernels_cpu.quant import WeightOnlyLinearMethod
        return WeightOnlyLinearMethod(quantization)
