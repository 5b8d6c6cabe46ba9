from __future__ import annotations

import functools
import os
from typing import Optional

import torch

from pageport.kernels_cpu import cpuinfo
from pageport.platforms import Platform


@functools.cache
def _cpu() -> cpuinfo.CpuInfo:
    return cpuinfo.detect()


class CpuPlatform(Platform):
    name = "cpu"
    device_type = "cpu"
    priority = 10
    dist_backend = "gloo"

    def __init__(self, info: Optional[cpuinfo.CpuInfo] = None):
        self.info = info or _cpu()

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
        return {"arch": self.info.arch, "isa": "+".join(self.info.isa) or "-",
                "dtype": str(self.default_dtype).removeprefix("torch."), "threads": torch.get_num_threads(),
                "cpu": self.info.model}

    def check_config(self, config) -> None:
        super().check_config(config)
        if config.num_threads:
            torch.set_num_threads(config.num_threads)
        elif "OMP_NUM_THREADS" not in os.environ:
            torch.set_num_threads(len(os.sched_getaffinity(0)))
        if config.kv_cache_memory_bytes is None:
            config.kv_cache_memory_bytes = 4 << 30  # CPU: a fixed budget, like vLLM's VLLM_CPU_KVCACHE_SPACE

    def attention_backend(self, num_heads, num_kv_heads, head_size, scale, sliding_window=None, softcap=None):
        from pageport.kernels_cpu.attention import TorchPagedAttention
        return TorchPagedAttention(num_heads, num_kv_heads, head_size, scale, sliding_window, softcap)
