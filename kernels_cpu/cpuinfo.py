"""What the CPU is and which of its instruction sets matter for inference."""
from __future__ import annotations

import platform
from dataclasses import dataclass, field
from pathlib import Path

# /proc/cpuinfo flag -> the name users know
_X86_FLAGS = {"avx2": "AVX2", "avx512f": "AVX-512", "avx512_bf16": "AVX-512-BF16",
              "avx512_fp16": "AVX-512-FP16", "avx512_vnni": "AVX-512-VNNI",
              "amx_bf16": "AMX-BF16", "amx_int8": "AMX-INT8"}
_ARM_FLAGS = {"asimd": "NEON", "asimdhp": "FP16", "asimddp": "DOTPROD", "sve": "SVE", "sve2": "SVE2",
              "bf16": "BF16", "svebf16": "SVE-BF16", "i8mm": "I8MM", "sme": "SME"}
# /proc/cpuinfo on ARM servers has no model name: "CPU implementer" + "CPU part" name the core.
_ARM_PARTS = {("0x41", "0xd0c"): "Neoverse-N1", ("0x41", "0xd40"): "Neoverse-V1", ("0x41", "0xd49"): "Neoverse-N2",
              ("0x41", "0xd4f"): "Neoverse-V2", ("0x41", "0xd8e"): "Neoverse-N3", ("0x41", "0xd84"): "Neoverse-V3",
              ("0x41", "0xd08"): "Cortex-A72", ("0x41", "0xd0b"): "Cortex-A76",
              ("0xc0", "0xac3"): "Ampere-1", ("0x61", "0x022"): "Apple M1 (Icestorm)",
              ("0x61", "0x023"): "Apple M1 (Firestorm)", ("0x61", "0x032"): "Apple M2 (Blizzard)",
              ("0x61", "0x033"): "Apple M2 (Avalanche)"}
_ARM_IMPLEMENTERS = {"0x41": "Arm", "0x61": "Apple", "0xc0": "Ampere", "0x48": "HiSilicon", "0x51": "Qualcomm"}


@dataclass(frozen=True)
class CpuInfo:
    arch: str  # x86-64 | aarch64 | ppc64le | other machine string
    model: str
    isa: tuple[str, ...] = field(default_factory=tuple)

    @property
    def native_bf16(self) -> bool:
        """bf16 matmuls run in hardware rather than by conversion to float32."""
        return bool({"AVX-512-BF16", "AMX-BF16", "BF16", "MMA"} & set(self.isa))

    @property
    def native_fp16(self) -> bool:
        """fp16 arithmetic in hardware (AVX-512-FP16, ARMv8.2 FP16)."""
        return bool({"AVX-512-FP16", "FP16"} & set(self.isa))

    @property
    def vector_isa(self) -> str:
        """The widest SIMD extension the kernels can use: AMX > AVX-512 > AVX2 (x86),
        SVE2 > SVE > NEON (ARM), VSX (POWER7+), or '-'."""
        for name in ("AMX-BF16", "AVX-512", "AVX2", "SVE2", "SVE", "NEON", "VSX"):
            if name in self.isa:
                return name.removesuffix("-BF16")
        return "-"


def parse_cpuinfo(machine: str, text: str) -> CpuInfo:
    """Facts from `platform.machine()` and the text of /proc/cpuinfo (pure: tests feed mocked text)."""
    fields: dict[str, str] = {}
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip() not in fields:
            fields[key.strip()] = value.strip()
    machine = machine.lower()
    if machine in ("x86_64", "amd64"):
        flags = set(fields.get("flags", "").split())
        isa = tuple(name for flag, name in _X86_FLAGS.items() if flag in flags)
        return CpuInfo("x86-64", fields.get("model name", "x86-64 CPU"), isa)
    if machine in ("aarch64", "arm64"):
        feats = set(fields.get("Features", "").split())
        isa = tuple(name for flag, name in _ARM_FLAGS.items() if flag in feats)
        impl, part = fields.get("CPU implementer", "").lower(), fields.get("CPU part", "").lower()
        model = (fields.get("model name") or _ARM_PARTS.get((impl, part))
                 or f"{_ARM_IMPLEMENTERS.get(impl, 'ARM')} CPU part {part or '?'}")
        return CpuInfo("aarch64", model, isa)
    if machine.startswith("ppc64"):
        model = fields.get("cpu", "POWER CPU")
        gen = "".join(ch for ch in model.split(",")[0] if ch.isdigit())
        isa = ["VSX"] if gen and int(gen) >= 7 else []
        if gen and int(gen) >= 10:
            isa.append("MMA")  # POWER10 matrix-multiply assist: native bf16 GEMM
        return CpuInfo("ppc64le", model, tuple(isa))
    return CpuInfo(machine, fields.get("model name", machine))


def detect() -> CpuInfo:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        text = ""
    return parse_cpuinfo(platform.machine(), text)
