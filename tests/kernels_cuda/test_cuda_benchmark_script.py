"""benchmarks/kernel_attention.py imports and parses on the CPU, and every launch it sweeps
computes the right answer (run here through the Triton interpreter at a tiny shape)."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "kernel_attention.py"


def load():
    spec = importlib.util.spec_from_file_location("kernel_attention_bench", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_imports_and_parses():
    bench = load()
    args = bench.parse_args(["--out", "x.json"])
    assert (args.batch, args.context_list, args.num_heads, args.num_kv_heads, args.head_size, args.block_size) == (
        64, [1024, 4096, 8192], 32, 8, 128, 16)
    assert args.torch_dtype == torch.bfloat16


def test_sweep_configs_are_distinct_and_start_with_default():
    pytest.importorskip("triton")
    bench = load()
    args = bench.parse_args(["--out", "x.json"])
    default = bench.default_launch(args, 4096, "cpu")
    configs = bench.sweep_configs(default)
    assert configs[0] == default and len(set(configs)) == len(configs) >= 20
    assert {c.num_splits for c in configs} >= {1, 2, 4, 8, 16}


def test_check_only_runs_every_launch(tmp_path, device):
    pytest.importorskip("triton")
    if device == "cuda":
        pytest.skip("on a GPU the benchmark itself checks every launch before timing it")
    bench = load()
    out = tmp_path / "r.json"
    res = bench.main(["--out", str(out), "--check-only", "--device", device, "--batch", "3", "--contexts", "45",
                      "--num-heads", "8", "--num-kv-heads", "2", "--head-size", "64", "--dtype", "float32"])
    rows = res["contexts"]["45"]["sweep"]
    assert len(rows) >= 20
    assert all(r["correct"] for r in rows), [r for r in rows if not r["correct"]]
    assert json.loads(out.read_text())["contexts"]["45"]["default_config"]["decode"] is True
