"""XpuPlatform with a mocked torch.xpu (no Intel GPU is claimed), and the shared Triton kernels
with the XPU launch tuning under the interpreter against the CUDA tests' reference."""
from __future__ import annotations

import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

from pageport.core.config import EngineConfig
from pageport.kernels_xpu import platform as xp
from pageport.kernels_xpu.platform import XPU_TUNING, XpuOps, XpuPlatform
from pageport.platforms import list_platforms, resolve_platform


@pytest.fixture
def fake_xpu(monkeypatch, tmp_path):
    """torch.xpu reporting one Data Center GPU Max 1550, and triton with an Intel backend folder."""
    props = SimpleNamespace(name="Intel(R) Data Center GPU Max 1550", total_memory=64 << 30,
                            gpu_subslice_count=64, has_subgroup_matrix_multiply_accumulate=True,
                            sub_group_sizes=[16, 32], driver_version="1.6.31294")
    fake = SimpleNamespace(is_available=lambda: True, device_count=lambda: 2,
                           get_device_properties=lambda i=0: props, get_device_name=lambda i=0: props.name,
                           mem_get_info=lambda i=0: (60 << 30, 64 << 30))
    monkeypatch.setattr(torch, "xpu", fake, raising=False)
    (tmp_path / "triton" / "backends" / "intel").mkdir(parents=True)
    monkeypatch.setattr(xp, "intel_triton_backend", lambda: tmp_path / "triton" / "backends" / "intel")
    return props


def test_identity():
    assert (XpuPlatform.name, XpuPlatform.device_type, XpuPlatform.dist_backend) == ("xpu", "xpu", "xccl")
    assert 10 < XpuPlatform.priority < 100
    assert isinstance(XpuPlatform.ops, XpuOps)


def test_unavailable_here_with_reason():
    reason = XpuPlatform.unavailable_reason()
    assert reason and ("no Intel GPU" in reason or "no torch.xpu" in reason)
    infos = {i.name: i for i in list_platforms()}
    assert "xpu" in infos and not infos["xpu"].available, "xpu entry point not registered (pip install -e .)"


def test_available_with_mocked_device(fake_xpu):
    assert XpuPlatform.unavailable_reason() is None
    p = XpuPlatform()
    d = p.describe()
    assert d["xe_cores"] == 64 and d["xmx"] == "yes" and d["subgroups"] == "16/32" and d["count"] == 2
    assert p.memory_info() == (60 << 30, 64 << 30)
    assert isinstance(resolve_platform("xpu"), XpuPlatform)
    assert isinstance(resolve_platform("auto"), XpuPlatform)  # above cpu, and cuda/rocm are unavailable


def test_stock_triton_is_not_enough(fake_xpu, monkeypatch):
    monkeypatch.setattr(xp, "intel_triton_backend", lambda: None)
    assert "no Intel backend" in XpuPlatform.unavailable_reason()


def test_probe_never_raises(monkeypatch):
    def boom():
        raise RuntimeError("level zero exploded")
    monkeypatch.setattr(torch, "xpu", SimpleNamespace(is_available=boom), raising=False)
    assert "level zero exploded" in XpuPlatform.unavailable_reason()


def test_check_config(fake_xpu):
    cfg = EngineConfig(dtype="auto")
    XpuPlatform().check_config(cfg)
    assert cfg.dtype == torch.bfloat16
    with pytest.raises(ValueError, match="multiple of 16"):
        XpuPlatform().check_config(EngineConfig(block_size=8, dtype="float16"))


def test_plugin_import_loads_nothing():
    code = ("import sys, torch; before = 'triton' in sys.modules; "
            "import pageport.kernels_xpu.plugin as p; [c] = p.pageport_platforms(); c.unavailable_reason(); "
            "assert ('triton' in sys.modules) == before, 'triton imported'; print('ok')")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and "ok" in res.stdout, res.stderr


# --- the shared kernels with the XPU tuning, under the interpreter --------------------------------
triton = pytest.importorskip("triton")
from test_cuda_attention import MIXED_CTX, MIXED_Q, make_batch, run_and_check  # noqa: E402

from pageport.kernels_cuda.attention import TritonPagedAttention  # noqa: E402
from pageport.kernels_cuda.paged_attention import default_config  # noqa: E402
from pageport.platforms import Ops  # noqa: E402


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("q_lens,ctx", [(MIXED_Q, MIXED_CTX), ([1] * 4, [70, 2, 33, 600])], ids=["mixed", "decode"])
def test_kernels_with_xpu_tuning(dtype, q_lens, ctx):
    b = make_batch(q_lens, ctx, 6, 2, 64, 16, dtype, "cpu", seed=len(q_lens))
    cfg = default_config(group=3, head_size=64, max_query_len=max(q_lens), num_seqs=len(q_lens), num_kv_heads=2,
                         max_seq_len=max(c + q for c, q in zip(ctx, q_lens)), device=torch.device("cpu"),
                         num_splits=2 if max(q_lens) == 1 else None, tuning=XPU_TUNING)
    assert cfg.num_stages == 2 and cfg.extra == ()
    run_and_check(b, 0.125, dtype, config=cfg)


def test_backend_and_ops(fake_xpu):
    be = XpuPlatform().attention_backend(8, 2, 64, 0.125)
    assert type(be) is TritonPagedAttention and be.tuning is XPU_TUNING

    # the XPU ops take the Triton path for CPU tensors under the interpreter (XPU tensors on a device)
    ops, ref, g = XpuPlatform.ops, Ops(), torch.Generator().manual_seed(0)
    assert ops.runs_triton(torch.zeros(1))
    x, r, w = torch.randn(5, 96, generator=g), torch.randn(5, 96, generator=g), torch.randn(96, generator=g)
    (a, ar), (b, br) = ops.rms_norm(x, w, 1e-6, r), ref.rms_norm(x, w, 1e-6, r)
    assert torch.allclose(a, b, atol=1e-5) and torch.equal(ar, br)
    y = torch.randn(5, 128, generator=g)
    assert torch.allclose(ops.silu_and_mul(y), ref.silu_and_mul(y), atol=1e-6)
