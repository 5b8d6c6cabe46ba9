"""Triton kernels run on the CPU under the Triton interpreter when there is no CUDA device.

TRITON_INTERPRET must be set before any @triton.jit decorator runs, so it is set here, at
collection time. Only triton reads it; other test folders don't use triton. On a GPU machine
it is left alone and the same tests run natively on the GPU (plus the `gpu`-marked ones).
"""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture
def device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"
