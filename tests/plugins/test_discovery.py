"""Plugin discovery through real entry points (the example vendor package must be installed)."""
import subprocess
import sys
import textwrap

import pytest
import torch

from pageport.plugins import conformance, manager
from pageport.platforms import UnknownDeviceError, list_platforms, platforms_table, resolve_platform


@pytest.fixture
def fake_plugins(tmp_path, monkeypatch):
    """Put a dist-info with entry points on sys.path; returns a function to add plugin modules."""
    def add(name: str, module_source: str):
        (tmp_path / f"{name}.py").write_text(textwrap.dedent(module_source))
        dist = tmp_path / f"{name}-0.0.dist-info"
        dist.mkdir()
        (dist / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 0.0\n")
        (dist / "entry_points.txt").write_text(f"[pageport]\n{name} = {name}\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    manager.reset()
    yield add
    manager.reset()


def test_builtin_cpu_and_vendor_platform_are_discovered():
    infos = {i.name: i for i in list_platforms()}
    assert infos["cpu"].available and infos["cpu"].plugin == "cpu"
    assert infos["refcpu"].available and infos["refcpu"].plugin == "refcpu"
    assert type(resolve_platform("refcpu")).__module__ == "pageport_example_vendor.platform"


def test_auto_picks_highest_priority_available(monkeypatch):
    monkeypatch.delenv("PAGEPORT_DEVICE", raising=False)
    best = max((i for i in list_platforms() if i.available), key=lambda i: i.priority)
    assert resolve_platform("auto").name == best.name
    monkeypatch.setenv("PAGEPORT_DEVICE", "refcpu")
    assert resolve_platform(None).name == "refcpu"


def test_unknown_device_lists_every_platform_and_why():
    with pytest.raises(UnknownDeviceError) as e:
        resolve_platform("warp-drive")
    msg = str(e.value)
    assert "unknown device 'warp-drive'" in msg
    for info in list_platforms():
        assert info.name in msg
        if not info.available:
            assert info.reason in msg


def test_broken_plugin_is_reported_not_fatal(fake_plugins):
    fake_plugins("broken_vendor", "raise ImportError('libvendor.so: cannot open shared object file')\n")
    infos = {i.name: i for i in list_platforms()}
    assert not infos["broken_vendor"].available
    assert "libvendor.so" in infos["broken_vendor"].reason
    assert resolve_platform("cpu").name == "cpu"  # everything else still works
    assert "broken_vendor" in platforms_table()


def test_plugin_api_mismatch_and_raising_probe_are_reported(fake_plugins):
    fake_plugins("future_vendor", """
        PAGEPORT_PLUGIN_API = 99
        from pageport.plugins import hookimpl
        @hookimpl
        def pageport_platforms():
            return []
    """)
    fake_plugins("flaky_vendor", """
        from pageport.plugins import hookimpl
        from pageport.platforms import Platform
        class Flaky(Platform):
            name = "flaky"
            @classmethod
            def unavailable_reason(cls):
                raise RuntimeError("driver crashed")
        @hookimpl
        def pageport_platforms():
            return [Flaky]
    """)
    infos = {i.name: i for i in list_platforms()}
    assert "plugin API 99" in infos["future_vendor"].reason
    assert not infos["flaky"].available and "driver crashed" in infos["flaky"].reason
    with pytest.raises(UnknownDeviceError, match="not available"):
        resolve_platform("flaky")


@pytest.mark.parametrize("device", ["cpu", "refcpu"])
def test_conformance_kit_passes_for_cpu_platforms(device):
    rows = conformance.run(resolve_platform(device), torch.float32, tol=1e-4)
    assert all(ok for *_, ok in rows), rows


def test_conformance_kit_catches_a_wrong_backend():
    platform = resolve_platform("cpu")
    real = platform.attention_backend

    def off_by_scale(*args, **kw):
        backend = real(*args, **kw)
        backend.scale *= 1.01
        return backend
    platform.attention_backend = off_by_scale
    assert conformance.check_attention(platform, conformance.DEFAULT_CASES[0]) > 1e-4


def test_platforms_command_prints_the_table():
    out = subprocess.run([sys.executable, "-m", "pageport", "platforms"], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0
    assert "cpu" in out.stdout and "refcpu" in out.stdout and "AVAILABLE" in out.stdout


def test_unknown_device_on_the_cli_is_one_clear_error():
    out = subprocess.run([sys.executable, "-m", "pageport", "generate", "hi", "--device", "nope"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    assert "unknown device 'nope'" in out.stderr and "Traceback" not in out.stderr
