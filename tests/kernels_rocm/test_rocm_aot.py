"""The attention kernel compiled ahead of time for AMD targets with each tuning's launch options,
through the AMD compiler inside the triton wheel (no GPU: nothing runs). Checks that the tunings
compile and keep registers in the register file (no VGPR spills to scratch) and LDS within 64 KiB.
Runs in a subprocess: this folder's tests run the kernels under TRITON_INTERPRET=1, which
replaces the compiler."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton.backends.amd.compiler")


@pytest.mark.parametrize("arch,head_sizes", [("gfx942", ["128", "256"]), ("gfx90a", ["128"]), ("gfx1100", ["64"])])
def test_compiles_without_spills(tmp_path, arch, head_sizes):
    out = tmp_path / "aot.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run([sys.executable, "-m", "pageport.kernels_rocm.aot", "--arch", arch, "--head-size",
                          *head_sizes, "--out", str(out)], capture_output=True, text=True, timeout=600, env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    runs = json.loads(out.read_text())["runs"]
    assert len(runs) == 2 * len(head_sizes)  # decode and unified launches
    for r in runs:
        assert r["vgpr_spill"] == 0 and r["scratch_bytes"] == 0, r
        assert r["lds_bytes"] <= 64 << 10, r
        if arch != "gfx1100":
            assert r["config"]["waves_per_eu"] == 2 and r["config"]["matrix_instr_nonkdim"] == 16
