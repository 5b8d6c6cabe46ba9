"""The step's token budget defaults to the platform's (GPUs take bigger prefill chunks than the CPU)."""
import pytest

from pageport.core.config import EngineConfig
from pageport.core.engine_core import EngineCore
from pageport.kernels_cpu.platform import CpuPlatform


@pytest.mark.parametrize("chunked, max_len, want", [(True, 512, 96), (False, 512, 512), (False, 64, 96)])
def test_budget_is_the_platforms_unless_given(monkeypatch, chunked, max_len, want):
    monkeypatch.setattr(CpuPlatform, "default_max_num_batched_tokens", 96)
    core = EngineCore(EngineConfig(max_model_len=max_len, enable_chunked_prefill=chunked, device="cpu"))
    assert core.config.max_num_batched_tokens == want


def test_a_given_budget_is_kept(monkeypatch):
    monkeypatch.setattr(CpuPlatform, "default_max_num_batched_tokens", 96)
    core = EngineCore(EngineConfig(max_model_len=256, max_num_batched_tokens=200, device="cpu"))
    assert core.config.max_num_batched_tokens == 200
