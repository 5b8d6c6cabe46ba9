"""The CUDA platform's identity and probes; on this CPU-only torch it must say why it can't run."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from pageport.core.config import EngineConfig
from pageport.kernels_cuda.ops import TritonOps
from pageport.kernels_cuda.platform import CudaPlatform
from pageport.platforms import Ops, list_platforms

no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only answer")


def test_identity():
    assert (CudaPlatform.name, CudaPlatform.device_type, CudaPlatform.dist_backend) == ("cuda", "cuda", "nccl")
    assert CudaPlatform.priority > 10  # above the CPU platform
    assert set(CudaPlatform.supported_dtypes) == {torch.bfloat16, torch.float16, torch.float32}
    assert isinstance(CudaPlatform.ops, TritonOps) and isinstance(CudaPlatform.ops, Ops)


@no_cuda
def test_unavailable_reason_on_cpu_torch():
    reason = CudaPlatform.unavailable_reason()
    assert isinstance(reason, str) and reason
    if torch.version.cuda is None:
        assert "CPU build" in reason
    assert not CudaPlatform.is_available()


def test_unavailable_reason_never_raises(monkeypatch):
    def boom():
        raise RuntimeError("driver exploded")
    monkeypatch.setattr(torch.version, "hip", None)
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    monkeypatch.setattr(torch.cuda, "is_available", boom)
    assert "driver exploded" in CudaPlatform.unavailable_reason()


def test_rocm_torch_is_not_cuda(monkeypatch):
    monkeypatch.setattr(torch.version, "hip", "6.4")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert "ROCm" in CudaPlatform.unavailable_reason()


@no_cuda
def test_listed_as_unavailable_with_reason():
    infos = {i.name: i for i in list_platforms()}
    assert "cuda" in infos, "the cuda entry point is not registered (reinstall: pip install -e .)"
    info = infos["cuda"]
    assert not info.available and info.reason == CudaPlatform.unavailable_reason()
    assert info.cls is CudaPlatform and info.plugin == "cuda"


def test_importing_the_plugin_loads_neither_triton_nor_cuda():
    code = ("import sys, torch; before = 'triton' in sys.modules; "
            "import pageport.kernels_cuda.plugin as p; import pageport.kernels_cuda.platform; "
            "[c] = p.pageport_platforms(); c.unavailable_reason(); "
            "assert p.PAGEPORT_PLUGIN_API == 1; "
            "assert ('triton' in sys.modules) == before, 'triton imported'; print('ok')")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and "ok" in res.stdout, res.stderr


def test_check_config_block_size_and_dtype(monkeypatch):
    monkeypatch.setattr(CudaPlatform, "capability", lambda self: (9, 0))
    p = CudaPlatform()
    for bs in (16, 32, 64):
        cfg = EngineConfig(block_size=bs, dtype="auto")
        p.check_config(cfg)
        assert cfg.dtype == torch.bfloat16
    with pytest.raises(ValueError, match="multiple of 16"):
        p.check_config(EngineConfig(block_size=8, dtype="float16"))
    monkeypatch.setattr(CudaPlatform, "capability", lambda self: (7, 5))
    with pytest.raises(ValueError, match="bfloat16"):
        p.check_config(EngineConfig(dtype="bfloat16"))
    p.check_config(EngineConfig(dtype="float16"))


def test_attention_backend():
    pytest.importorskip("triton")
    from pageport.kernels_cuda.attention import TritonPagedAttention
    be = CudaPlatform().attention_backend(32, 8, 128, 128 ** -0.5, sliding_window=4096)
    assert isinstance(be, TritonPagedAttention)
    assert be.kv_cache_shape(100, 16, 8, 128) == (2, 100, 16, 8, 128)
    with pytest.raises(ValueError):
        CudaPlatform().attention_backend(30, 8, 128, 1.0)


def test_importable_without_triton():
    """With triton absent, the plugin, platform, ops and backend modules still import; the
    platform reports itself unavailable and the ops fall back to torch."""
    code = ("import sys; sys.modules['triton'] = None; import torch; "
            "from pageport.kernels_cuda import plugin, platform, ops, attention; "
            "[c] = plugin.pageport_platforms(); r = c.unavailable_reason(); assert r, r; "
            "x = torch.randn(2, 8); assert torch.equal(c.ops.silu_and_mul(x), ops.Ops().silu_and_mul(x)); "
            "print('ok', r)")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "TRITON_INTERPRET": "0"})
    assert res.returncode == 0 and "ok" in res.stdout, res.stderr
