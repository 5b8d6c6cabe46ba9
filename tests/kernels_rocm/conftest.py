"""ROCm tests: detection with mocked torch facts, and the shared Triton kernels with the AMD
launch tunings under the Triton interpreter (no AMD GPU here). The float64 reference and batch
builder are the CUDA tests' own (tests/kernels_cuda/test_cuda_attention.py), imported, not copied."""
import os
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

_CUDA_TESTS = str(Path(__file__).resolve().parent.parent / "kernels_cuda")
if _CUDA_TESTS not in sys.path:
    sys.path.append(_CUDA_TESTS)

GPUS = {  # gcnArchName as torch's HIP build reports it, CUs, memory
    "MI300X": ("gfx942:sramecc+:xnack-", 304, 192),
    "MI355X": ("gfx950:sramecc+:xnack-", 256, 288),
    "MI250X": ("gfx90a:sramecc+:xnack-", 110, 64),
    "RX 7900 XTX": ("gfx1100", 48, 24),
    "MI50": ("gfx906:sramecc+:xnack-", 60, 16),
}


@pytest.fixture
def device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture
def fake_rocm(monkeypatch):
    """Make this CPU torch look like a ROCm build with `count` GPUs of one kind."""
    def install(gpu="MI300X", count=8, available=True):
        arch, cus, gib = GPUS[gpu]
        props = SimpleNamespace(name=f"AMD Instinct {gpu}", gcnArchName=arch, multi_processor_count=cus,
                                total_memory=gib << 30)
        monkeypatch.setattr(torch.version, "hip", "6.4.43484")
        monkeypatch.setattr(torch.version, "cuda", None)
        monkeypatch.setattr(torch.cuda, "is_available", lambda: available)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: count if available else 0)
        monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i=0: props)
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda i=0: props.name)
        return props
    return install
