"""benchmarks/kernel_attention.py imports and parses on the CPU, and every launch it sweeps
computes the right answer (run here through the Triton interpreter at a tiny shape)."""
from __future__ import annotations

import json

import pytest
import torch

from tests.conftest import load_benchmark_script


def load():
    return load_benchmark_script("kernel_attention")


def test_imports_and_parses():
    bench = load()
    args = bench.parse_args(["--out", "x.json"])
    assert (args.batch_list, args.context_list, args.num_heads, args.num_kv_heads, args.head_size, args.block_size) == (
        [64], [1024, 4096, 8192], 32, 8, 128, 16)
    assert args.torch_dtype == torch.bfloat16


def test_sweep_configs_are_distinct_and_start_with_default():
    pytest.importorskip("triton")
    bench = load()
    args = bench.parse_args(["--out", "x.json"])
    default = bench.default_launch(args, 64, 4096, "cpu")
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
    [run] = res["runs"]
    rows = run["sweep"]
    assert (run["batch"], run["context"]) == (3, 45)
    assert len(rows) >= 20
    assert all(r["correct"] for r in rows), [r for r in rows if not r["correct"]]
    assert json.loads(out.read_text())["runs"][0]["default_config"]["decode"] is True


def test_timed_path_with_a_fake_clock(tmp_path, device, monkeypatch):
    """The GPU-only part (timing, peers, %copy, table) with do_bench and the copy probe faked."""
    pytest.importorskip("triton")
    if device == "cuda":
        pytest.skip("the real benchmark covers this on a GPU")
    bench = load()
    monkeypatch.setattr(bench, "bench_ms", lambda fn: (fn(), 0.5)[1])
    monkeypatch.setattr(bench, "copy_bandwidth", lambda mib, dev: 2e12)
    res = bench.main(["--out", str(tmp_path / "r.json"), "--device", device, "--batch", "2", "--contexts", "40",
                      "--num-heads", "4", "--num-kv-heads", "2", "--head-size", "64", "--dtype", "float32",
                      "--no-sweep", "--no-flex"])
    [run] = res["runs"]
    assert run["paged"]["correct"] and run["best"]["ms"] == 0.5
    assert run["peers"]["sdpa"]["ms"] == 0.5 and "error" not in run["peers"]["gather+sdpa"]
    nbytes = 2 * (2 * 40) * 2 * 64 * 4 + 2 * 2 * 4 * 64 * 4  # K+V of 2 x 40 tokens, 2 KV heads; q + out
    assert run["bytes"] == nbytes
    assert run["paged"]["frac_of_copy"] == pytest.approx(nbytes / 0.5e-3 / 2e12)
