import pytest
import torch

from pageport.kernels_cpu.platform import CpuPlatform


@pytest.fixture(scope="session")
def cpu_platform():
    return CpuPlatform()


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # These models are tiny (or 135M); one thread is nearly as fast as two on the 2-core CI machine
    # and does not collapse when other processes share the cores (OpenMP threads do: 5-10x slower).
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)
