"""XPU tests: detection with a mocked torch.xpu; the shared Triton kernels with the XPU tuning
under the Triton interpreter (no Intel GPU here, and no Intel Triton backend installed)."""
import os
import sys
from pathlib import Path

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

_CUDA_TESTS = str(Path(__file__).resolve().parent.parent / "kernels_cuda")
if _CUDA_TESTS not in sys.path:
    sys.path.append(_CUDA_TESTS)
