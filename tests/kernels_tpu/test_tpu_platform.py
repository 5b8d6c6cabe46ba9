"""The tpu / xla platforms' identity and probes: where torch_xla or a TPU is absent they say why, never raise."""
from __future__ import annotations

import importlib.util
import subprocess
import sys

import pytest
import torch

from pageport.kernels_tpu import platform as tpu_platform
from pageport.kernels_tpu.platform import TpuPlatform, XlaPlatform
from pageport.platforms import list_platforms

HAVE_TORCH_XLA = importlib.util.find_spec("torch_xla") is not None


def test_identity():
    assert (TpuPlatform.name, TpuPlatform.device_type, TpuPlatform.dist_backend) == ("tpu", "xla", "xla")
    assert (XlaPlatform.name, XlaPlatform.device_type) == ("xla", "xla")
    assert TpuPlatform.priority > 10 > XlaPlatform.priority  # auto: TPU over CPU, CPU over XLA-on-CPU
    assert TpuPlatform.supported_dtypes[0] == torch.bfloat16
    assert XlaPlatform.supported_dtypes[0] == torch.float32


@pytest.mark.skipif(HAVE_TORCH_XLA, reason="checks the answer without torch_xla")
def test_without_torch_xla_both_say_so():
    for cls in (TpuPlatform, XlaPlatform):
        reason = cls.unavailable_reason()
        assert reason and "torch_xla is not installed" in reason
        assert not cls.is_available()
    infos = {i.name: i for i in list_platforms()}
    assert "tpu" in infos and "xla" in infos, "the tpu entry point is not registered (pip install -e .)"
    assert infos["tpu"].plugin == "tpu" and not infos["tpu"].available
    assert infos["tpu"].reason == TpuPlatform.unavailable_reason()


def _fake_torch_xla(monkeypatch, version="2.9.0"):
    real = importlib.util.find_spec
    monkeypatch.setattr(tpu_platform.importlib.util, "find_spec",
                        lambda name, *a: object() if name == "torch_xla" else real(name, *a))
    monkeypatch.setattr(tpu_platform.importlib.metadata, "version", lambda name: version)


def test_version_mismatch_is_named(monkeypatch):
    _fake_torch_xla(monkeypatch, "2.1.0")
    reason = XlaPlatform.unavailable_reason()
    assert "torch_xla 2.1.0 needs torch 2.1" in reason and torch.__version__ in reason


def test_pjrt_device_decides(monkeypatch):
    _fake_torch_xla(monkeypatch, torch.__version__.split("+")[0])
    monkeypatch.setattr(tpu_platform, "_import_torch_xla", lambda: None)
    monkeypatch.delenv("PJRT_DEVICE", raising=False)
    assert "PJRT_DEVICE is not set" in XlaPlatform.unavailable_reason()
    monkeypatch.setattr(tpu_platform, "_tpu_present", lambda: False)
    assert "no TPU found" in TpuPlatform.unavailable_reason()
    monkeypatch.setenv("PJRT_DEVICE", "CPU")
    assert XlaPlatform.unavailable_reason() is None
    assert TpuPlatform.unavailable_reason() == "PJRT_DEVICE=CPU is not TPU (the xla platform runs the same path there)"
    monkeypatch.setenv("PJRT_DEVICE", "TPU")
    assert "no TPU found" in TpuPlatform.unavailable_reason()
    monkeypatch.setattr(tpu_platform, "_tpu_present", lambda: True)
    assert TpuPlatform.unavailable_reason() is None


def test_probes_never_raise(monkeypatch):
    def boom(*a, **k):
        raise RuntimeError("metadata exploded")
    monkeypatch.setattr(tpu_platform.importlib.util, "find_spec", boom)
    assert "metadata exploded" in TpuPlatform.unavailable_reason()
    assert "metadata exploded" in XlaPlatform.unavailable_reason()


def test_importing_the_plugin_loads_neither_torch_xla_nor_jax():
    code = ("import sys; import pageport.kernels_tpu.plugin as p; classes = p.pageport_platforms(); "
            "[c.unavailable_reason() for c in classes]; "
            "print(sorted(m for m in ('torch_xla', 'jax') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={"PATH": "/usr/bin:/bin"})
    assert out.stdout.strip() == "[]"


def test_enforce_eager_is_refused_with_a_reason():
    from pageport.core.config import EngineConfig
    with pytest.raises(ValueError, match="enforce_eager is not supported"):
        XlaPlatform().check_config(EngineConfig(enforce_eager=True, dtype="float32"))
