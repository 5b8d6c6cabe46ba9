"""CPU facts per architecture from mocked /proc/cpuinfo texts (Graviton3, an Apple-like
NEON-only core, POWER9, POWER10, this x86 host's kind), and what the CPU platform picks for each."""
from __future__ import annotations

import pytest
import torch

from pageport.kernels_cpu import cpuinfo, native
from pageport.kernels_cpu.platform import CpuPlatform

GRAVITON3 = """processor\t: 0
BogoMIPS\t: 2100.00
Features\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm jscvt fcma lrcpc dcpop \
sha3 sm3 sm4 asimddp sha512 sve asimdfhm dit uscat ilrcpc flagm ssbs paca pacg dcpodp svei8mm svebf16 i8mm bf16 dgh rng
CPU implementer\t: 0x41
CPU architecture: 8
CPU variant\t: 0x1
CPU part\t: 0xd40
CPU revision\t: 1
"""
APPLE_M1 = """processor\t: 0
BogoMIPS\t: 48.00
Features\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm jscvt fcma lrcpc dcpop \
sha3 asimddp sha512 asimdfhm dit uscat ilrcpc flagm ssbs sb paca pacg dcpodp flagm2 frint
CPU implementer\t: 0x61
CPU architecture: 8
CPU variant\t: 0x1
CPU part\t: 0x023
CPU revision\t: 1
"""
POWER9 = """processor\t: 0
cpu\t\t: POWER9, altivec supported
clock\t\t: 3800.000000MHz
revision\t: 2.2 (pvr 004e 1202)

timebase\t: 512000000
platform\t: PowerNV
model\t\t: 9006-22P
machine\t\t: PowerNV 9006-22P
"""
POWER10 = """processor\t: 0
cpu\t\t: POWER10 (architected), altivec supported
clock\t\t: 2750.000000MHz
revision\t: 2.0 (pvr 0080 0200)

timebase\t: 512000000
platform\t: pSeries
model\t\t: IBM,9080-HEX
"""
ZEN4 = """processor\t: 0
vendor_id\t: AuthenticAMD
model name\t: AMD EPYC 9R14
flags\t\t: fpu sse sse2 avx avx2 fma avx512f avx512dq avx512bw avx512vl avx512_bf16 avx512_vnni
"""
SKYLAKE = """processor\t: 0
model name\t: Intel(R) Xeon(R) Platinum 8175M CPU
flags\t\t: fpu sse sse2 avx avx2 fma avx512f avx512dq avx512bw avx512vl
"""

CASES = {
    # name: (machine, text, arch, model, vector, native bf16, default dtype)
    "graviton3": ("aarch64", GRAVITON3, "aarch64", "Neoverse-V1", "SVE", True, torch.bfloat16),
    "apple-m1": ("aarch64", APPLE_M1, "aarch64", "Apple M1 (Firestorm)", "NEON", False, torch.float32),
    "power9": ("ppc64le", POWER9, "ppc64le", "POWER9, altivec supported", "VSX", False, torch.float32),
    "power10": ("ppc64le", POWER10, "ppc64le", "POWER10 (architected), altivec supported", "VSX", True,
                torch.bfloat16),
    "zen4": ("x86_64", ZEN4, "x86-64", "AMD EPYC 9R14", "AVX-512", True, torch.bfloat16),
    "skylake": ("x86_64", SKYLAKE, "x86-64", "Intel(R) Xeon(R) Platinum 8175M CPU", "AVX-512", False, torch.float32),
}


@pytest.mark.parametrize("name", list(CASES))
def test_facts_and_choices(name, monkeypatch):
    monkeypatch.delenv("PAGEPORT_CPU_ATTENTION", raising=False)
    machine, text, arch, model, vector, bf16, dtype = CASES[name]
    info = cpuinfo.parse_cpuinfo(machine, text)
    assert (info.arch, info.model, info.vector_isa, info.native_bf16) == (arch, model, vector, bf16)
    p = CpuPlatform(info)
    assert p.default_dtype == dtype
    d = p.describe()
    assert d["arch"] == arch and d["vector"] == vector and d["bf16"] == ("native" if bf16 else "emulated")
    if arch != "x86-64":  # IPEX is x86-only: ARM and POWER get the C++ kernels where they build, else torch
        assert p.attention_kernel() == ("cpu-native", f"IPEX is x86-64 only ({arch})")
        assert d["attention"] == "cpu-native"
        monkeypatch.setattr(native, "native_status", lambda: "no C++ compiler (c++) to build the CPU kernels")
        assert p.attention_kernel() == ("torch-sdpa", f"IPEX is x86-64 only ({arch}); no C++ compiler (c++) "
                                                      "to build the CPU kernels")


def test_arm_isa_details():
    g3 = cpuinfo.parse_cpuinfo("aarch64", GRAVITON3)
    assert {"NEON", "FP16", "DOTPROD", "SVE", "BF16", "SVE-BF16", "I8MM"} <= set(g3.isa) and "SVE2" not in g3.isa
    m1 = cpuinfo.parse_cpuinfo("aarch64", APPLE_M1)
    assert {"NEON", "FP16"} <= set(m1.isa) and not {"SVE", "BF16"} & set(m1.isa)
    assert m1.native_fp16 and not m1.native_bf16
    assert "MMA" in cpuinfo.parse_cpuinfo("ppc64le", POWER10).isa
    assert "MMA" not in cpuinfo.parse_cpuinfo("ppc64le", POWER9).isa
    unknown = cpuinfo.parse_cpuinfo("aarch64", "Features\t: fp asimd\nCPU implementer\t: 0x48\nCPU part\t: 0xd01\n")
    assert unknown.model == "HiSilicon CPU part 0xd01" and unknown.vector_isa == "NEON"


def test_attention_switch(monkeypatch):
    info = cpuinfo.parse_cpuinfo("x86_64", ZEN4)
    assert CpuPlatform(info, attention="torch").attention_kernel() == ("torch-sdpa", "PAGEPORT_CPU_ATTENTION=torch")
    monkeypatch.setenv("PAGEPORT_CPU_ATTENTION", "torch")
    assert CpuPlatform(info).attention_kernel()[0] == "torch-sdpa"
    assert CpuPlatform(info, attention="native").attention_kernel() == ("cpu-native", "PAGEPORT_CPU_ATTENTION=native")
    assert CpuPlatform(info, attention="native").attention_backend(8, 2, 64, 0.125).name == "cpu-native"
    monkeypatch.setattr(native, "native_status", lambda: "ninja is not installed")
    with pytest.raises(RuntimeError, match="=native but ninja is not installed"):
        CpuPlatform(info, attention="native").attention_kernel()
    with pytest.raises(ValueError, match="choose auto, ipex, native or torch"):
        CpuPlatform(info, attention="onednn")


def test_ipex_missing_or_mismatched_falls_back(monkeypatch):
    """In this venv (torch 2.13) IPEX is absent, or pinned to another torch: auto takes torch
    and says why; asking for ipex explicitly fails with that reason."""
    from pageport.kernels_cpu import ipex_attention
    monkeypatch.delenv("PAGEPORT_CPU_ATTENTION", raising=False)
    monkeypatch.setattr(ipex_attention, "ipex_status", lambda: "intel-extension-for-pytorch 2.8.0 needs torch 2.8.x")
    info = cpuinfo.parse_cpuinfo("x86_64", ZEN4)
    assert CpuPlatform(info).attention_kernel() == ("cpu-native", "intel-extension-for-pytorch 2.8.0 needs torch 2.8.x")
    with pytest.raises(RuntimeError, match="needs torch 2.8"):
        CpuPlatform(info, attention="ipex").attention_kernel()
    assert CpuPlatform(info).attention_backend(8, 2, 64, 0.125).name == "cpu-native"
    monkeypatch.setattr(native, "load", lambda: "building the C++ kernels failed: no space left")
    assert CpuPlatform(info).attention_backend(8, 2, 64, 0.125).name == "torch-sdpa"  # auto falls back
    with pytest.raises(RuntimeError, match="no space left"):
        CpuPlatform(info, attention="native").attention_backend(8, 2, 64, 0.125)


def test_ipex_version_pairing(monkeypatch):
    from pageport.kernels_cpu import ipex_attention as ia
    monkeypatch.setattr(ia.importlib.util, "find_spec", lambda name: object())
    monkeypatch.setattr(ia.importlib.metadata, "version", lambda name: "2.8.0+cpu")
    monkeypatch.setattr(ia.torch, "__version__", "2.13.0+cpu")
    monkeypatch.setattr(ia._pyplatform, "machine", lambda: "x86_64")
    assert "needs torch 2.8.x" in ia.ipex_status()
    monkeypatch.setattr(ia.torch, "__version__", "2.8.0+cu128")
    assert ia.ipex_status() is None
    monkeypatch.setattr(ia._pyplatform, "machine", lambda: "aarch64")
    assert "x86-64 only" in ia.ipex_status()
