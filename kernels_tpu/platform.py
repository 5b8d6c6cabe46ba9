"""The TPU platform through torch-xla / PJRT, and the same path on any PJRT device ("xla").

Two platforms, one implementation:

- ``tpu`` (priority 90): a TPU VM with torch-xla; attention is the Pallas ragged paged attention kernel.
- ``xla`` (priority 5, never chosen by ``--device auto`` over the CPU platform): whatever PJRT device
  ``PJRT_DEVICE`` names (CPU, CUDA, TPU). On anything but a TPU the attention runs as XLA-native ops
  in the kernel's layout. ``PJRT_DEVICE=CPU pageport generate --device xla ...`` runs the TPU
  code path - static shape buckets, compiled at start-up, same KV layout - on this machine.

Both import torch_xla lazily: detection on a machine without it costs a ``find_spec`` and never raises.
"""
from __future__ import annotations

import functools
import glob
import importlib.metadata
import importlib.util
import logging
import os
from pathlib import Path
from typing import Optional

import torch

from pageport.platforms import Platform

logger = logging.getLogger(__name__)

CACHE_ENV = "PAGEPORT_XLA_CACHE_DIR"  # persistent compilation cache directory; "" disables it
DEFAULT_CACHE_DIR = Path.home() / ".cache" / "pageport" / "xla"
DEFAULT_XLA_KV_BYTES = 1 << 30  # non-TPU PJRT devices: a fixed budget (the CPU platform uses 4 GiB)


def _torch_xla_problem() -> Optional[str]:
    """Why torch_xla cannot be used here (without importing it), or None."""
    if importlib.util.find_spec("torch_xla") is None:
        return "torch_xla is not installed (pip install torch-xla, matching torch's version)"
    try:
        xla_version = importlib.metadata.version("torch_xla")
    except importlib.metadata.PackageNotFoundError:
        xla_version = None
    if xla_version:
        want = tuple(xla_version.split("+")[0].split(".")[:2])
        have = tuple(torch.__version__.split("+")[0].split(".")[:2])
        if want != have:
            return (f"torch_xla {xla_version} needs torch {'.'.join(want)}, "
                    f"this is torch {torch.__version__}")
    return None


@functools.cache
def _import_torch_xla() -> Optional[str]:
    try:
        import torch_xla  # noqa: F401
        import torch_xla.runtime  # noqa: F401
    except Exception as e:  # a broken install must not break platform selection
        return f"torch_xla failed to import: {type(e).__name__}: {e}"
    return None


def _tpu_present() -> bool:
    """A TPU VM exposes /dev/accel* (v2-v5e) or /dev/vfio/<n> (v5p, v6e) and has libtpu."""
    devices = glob.glob("/dev/accel*") or [p for p in glob.glob("/dev/vfio/*") if p.rsplit("/", 1)[1].isdigit()]
    return bool(devices) and importlib.util.find_spec("libtpu") is not None


def _init_cache(path: str) -> Optional[str]:
    """torch-xla's persistent compilation cache at `path`; returns the path in use or None."""
    import torch_xla
    import torch_xla.runtime as xr
    if torch_xla._XLAC._xla_computation_cache_is_initialized():
        return None  # a second engine in this process: the first one's cache (or none) stays
    try:
        os.makedirs(path, exist_ok=True)
        xr.initialize_cache(path, readonly=False)
        return path
    except Exception as e:
        logger.warning("XLA persistent compilation cache not enabled at %s: %s", path, e)
        return None


class XlaPlatform(Platform):
    name = "xla"
    device_type = "xla"
    priority = 5
    dist_backend = "xla"
    supported_dtypes = (torch.float32, torch.bfloat16)

    cache_dir: Optional[str] = None  # the persistent compilation cache, once check_config set it up

    @classmethod
    def unavailable_reason(cls) -> Optional[str]:
        try:
            problem = _torch_xla_problem()
            if problem:
                return problem
            pjrt = os.environ.get("PJRT_DEVICE")
            if not pjrt:
                return ("PJRT_DEVICE is not set (PJRT_DEVICE=CPU runs the XLA path on the CPU, "
                        "PJRT_DEVICE=TPU on a TPU VM)")
            return _import_torch_xla()
        except Exception as e:  # a probe must never raise
            return f"XLA probe failed: {type(e).__name__}: {e}"

    # device facts -------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        import torch_xla
        return torch_xla.device()

    def pjrt_device(self) -> str:
        import torch_xla.runtime as xr
        return xr.device_type() or os.environ.get("PJRT_DEVICE", "?")

    @property
    def on_tpu(self) -> bool:
        return self.pjrt_device() == "TPU"

    def device_count(self) -> int:
        import torch_xla.runtime as xr
        return xr.global_runtime_device_count()

    def device_name(self) -> str:
        if self.on_tpu:
            try:
                from torch_xla._internal import tpu
                return str(tpu.get_tpu_type())
            except Exception:
                return "TPU"
        return f"XLA on PJRT {self.pjrt_device()}"

    def memory_info(self) -> tuple[int, int]:
        if not self.on_tpu:
            return super().memory_info()
        import torch_xla.core.xla_model as xm
        info = xm.get_memory_info(self.device)
        total = int(info.get("bytes_limit", 0))
        return total - int(info.get("bytes_used", 0)), total

    def describe(self) -> dict:
        import torch_xla
        return {"device": self.device_name(), "pjrt": self.pjrt_device(), "count": self.device_count(),
                "torch_xla": torch_xla.__version__, "compile_cache": XlaPlatform.cache_dir or "-",
                "attention": "pallas ragged_paged_attention" if self.on_tpu else "xla-native (kernel layout)"}

    # runtime -----------------------------------------------------------------------------------
    def synchronize(self) -> None:
        import torch_xla
        import torch_xla.core.xla_model as xm
        torch_xla.sync()
        xm.wait_device_ops()

    def seed(self, seed: int) -> None:
        import torch_xla.core.xla_model as xm
        torch.manual_seed(seed)
        xm.set_rng_state(seed)

    # configuration ---------------------------------------------------------------------------------
    def check_config(self, config) -> None:
        config.resolve_dtype(self.supported_dtypes)
        super().check_config(config)
        if config.enforce_eager:
            # the model runner's eager step runs under torch.inference_mode, which torch-xla 2.9 cannot
            # trace ("Cannot set version_counter for inference tensor"); and eager XLA recompiles every shape
            raise ValueError(f"{self.name}: enforce_eager is not supported; steps always run as compiled "
                             "shape buckets (XlaGraphRunner)")
        if config.kv_cache_memory_bytes is None and not self.on_tpu:
            config.kv_cache_memory_bytes = DEFAULT_XLA_KV_BYTES
        # before any tensor is created: the cache must exist before the first compilation. On by default
        # where PJRT can load compiled executables back (TPU, CUDA); the CPU client cannot ("Deserializing
        # serialized executable not supported"), so there it is used only when PAGEPORT_XLA_CACHE_DIR asks.
        path = os.environ.get(CACHE_ENV)
        if path is None and self.pjrt_device() in ("TPU", "CUDA", "GPU"):
            path = str(DEFAULT_CACHE_DIR)
        if path:
            used = _init_cache(path)
            if used:
                XlaPlatform.cache_dir = used
                logger.info("XLA persistent compilation cache: %s", used)

    def kv_cache_bytes(self, config, model_bytes: int, peak_activation_bytes: int) -> int:
        if config.kv_cache_memory_bytes:
            return config.kv_cache_memory_bytes
        # TPU: the compiled step's activations are not known before compilation; keep a 10% margin
        free, total = self.memory_info()
        return max(0, int(total * (config.gpu_memory_utilization - 0.1)) - (total - free))

    def attention_backend(self, num_heads, num_kv_heads, head_size, scale, sliding_window=None, softcap=None):
        from pageport.kernels_tpu.attention import XlaPagedAttention
        return XlaPagedAttention(num_heads, num_kv_heads, head_size, scale, sliding_window, softcap,
                                 use_kernel=self.on_tpu)

    def graph_runner(self, model, kv_caches, config):
        from pageport.kernels_tpu.runner import XlaGraphRunner
        return XlaGraphRunner(self, model, kv_caches, config)


class TpuPlatform(XlaPlatform):
    name = "tpu"
    priority = 90
    supported_dtypes = (torch.bfloat16, torch.float32)

    @classmethod
    def unavailable_reason(cls) -> Optional[str]:
        try:
            problem = _torch_xla_problem()
            if problem:
                return problem
            pjrt = os.environ.get("PJRT_DEVICE")
            if pjrt and pjrt.upper() != "TPU":
                return f"PJRT_DEVICE={pjrt} is not TPU (the xla platform runs the same path there)"
            if not _tpu_present():
                return "no TPU found (no /dev/accel* or /dev/vfio device with libtpu installed)"
            return _import_torch_xla()
        except Exception as e:
            return f"TPU probe failed: {type(e).__name__}: {e}"

    @property
    def on_tpu(self) -> bool:
        return True

    def check_config(self, config) -> None:
        super().check_config(config)
        if config.block_size % 8:
            raise ValueError(f"tpu: block_size must be a multiple of 8 (16, 32, 64, 128), got {config.block_size}")
