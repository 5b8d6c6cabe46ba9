"""RocmPlatform detection, device facts and selection with mocked torch facts. No real AMD GPU
is claimed: every "available" here is a monkeypatched torch.version.hip / torch.cuda."""
from __future__ import annotations

import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

from pageport.core.config import EngineConfig
from pageport.kernels_cuda.graphs import CudaGraphRunner
from pageport.kernels_cuda.ops import TritonOps
from pageport.kernels_cuda.platform import CudaPlatform
from pageport.kernels_rocm import tuning
from pageport.kernels_rocm.platform import RocmPlatform
from pageport.platforms import list_platforms, resolve_platform
from pageport.platforms.selection import platforms_table


def test_identity():
    assert (RocmPlatform.name, RocmPlatform.device_type, RocmPlatform.dist_backend) == ("rocm", "cuda", "nccl")
    assert RocmPlatform.priority > 10
    assert isinstance(RocmPlatform.ops, TritonOps)


@pytest.mark.skipif(bool(getattr(torch.version, "hip", None)), reason="checks the non-ROCm answer")
def test_unavailable_on_this_torch():
    reason = RocmPlatform.unavailable_reason()
    assert reason and "not ROCm" in reason and "torch.version.hip is None" in reason
    infos = {i.name: i for i in list_platforms()}
    assert "rocm" in infos, "the rocm entry point is not registered (reinstall: pip install -e .)"
    assert not infos["rocm"].available and infos["rocm"].reason == reason


def test_available_with_mocked_mi300(fake_rocm):
    fake_rocm("MI300X")
    assert RocmPlatform.unavailable_reason() is None
    assert "ROCm" in CudaPlatform.unavailable_reason()  # a HIP torch is never the cuda platform
    p = RocmPlatform()
    d = p.describe()
    assert d["arch"] == "gfx942" and d["wavefront"] == 64 and d["cus"] == 304 and d["count"] == 8
    assert d["fp8"] == "float8_e4m3fnuz" and d["tuning"] == "rocm-cdna" and d["hip"] == "6.4.43484"
    assert p.fp8_dtype() is torch.float8_e4m3fnuz
    assert p.supported_kv_cache_dtypes[-1] is torch.float8_e4m3fnuz


@pytest.mark.parametrize("gpu,arch,wave,fp8,tune", [
    ("MI355X", "gfx950", 64, torch.float8_e4m3fn, "rocm-cdna"),
    ("MI250X", "gfx90a", 64, None, "rocm-cdna"),
    ("RX 7900 XTX", "gfx1100", 32, None, "rocm-rdna"),
])
def test_device_facts_per_family(fake_rocm, gpu, arch, wave, fp8, tune):
    fake_rocm(gpu)
    p = RocmPlatform()
    assert (p.arch(), p.warp_size(), p.fp8_dtype(), p.tuning().name) == (arch, wave, fp8, tune)
    assert p.tuning().warp_size == wave


def test_unsupported_arch_says_why(fake_rocm):
    fake_rocm("MI50")
    reason = RocmPlatform.unavailable_reason()
    assert "gfx906" in reason and "CDNA2+" in reason


def test_no_gpu_says_why(fake_rocm):
    fake_rocm(available=False)
    assert "reports no AMD GPU" in RocmPlatform.unavailable_reason()


def test_probe_never_raises(fake_rocm, monkeypatch):
    fake_rocm("MI300X")

    def boom(i=0):
        raise RuntimeError("hipErrorNoBinaryForGpu")
    monkeypatch.setattr(torch.cuda, "get_device_properties", boom)
    assert "hipErrorNoBinaryForGpu" in RocmPlatform.unavailable_reason()


def test_selection_auto_and_by_name(fake_rocm):
    fake_rocm("MI300X")
    assert isinstance(resolve_platform("auto"), RocmPlatform)
    assert isinstance(resolve_platform("rocm"), RocmPlatform)
    table = platforms_table()
    assert "rocm" in table and "gfx942" in table and "float8_e4m3fnuz" in table


def test_check_config(fake_rocm):
    fake_rocm("MI300X")
    p = RocmPlatform()
    cfg = EngineConfig(dtype="auto")
    p.check_config(cfg)
    assert cfg.dtype == torch.bfloat16
    with pytest.raises(ValueError, match="multiple of 16"):
        p.check_config(EngineConfig(block_size=8, dtype="float16"))


def test_backend_and_graphs_reuse_cuda_code(fake_rocm):
    pytest.importorskip("triton")
    from pageport.kernels_cuda.attention import TritonPagedAttention
    fake_rocm("MI300X")
    p = RocmPlatform()
    be = p.attention_backend(32, 8, 128, 128 ** -0.5)
    assert type(be) is TritonPagedAttention and be.tuning is tuning.CDNA_TUNING
    cfg = SimpleNamespace(max_num_seqs=4, block_size=16, max_model_len=64)
    runner = p.graph_runner(None, [torch.zeros(2, 4, 16, 1, 8)], cfg)  # HIP graphs: torch.cuda.graph
    assert type(runner) is CudaGraphRunner and runner.sizes == [1, 2, 4]


def test_plugin_import_loads_nothing():
    code = ("import sys, torch; before = 'triton' in sys.modules; "
            "import pageport.kernels_rocm.plugin as p; [c] = p.pageport_platforms(); c.unavailable_reason(); "
            "assert ('triton' in sys.modules) == before, 'triton imported'; print('ok')")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and "ok" in res.stdout, res.stderr
