"""benchmarks/concurrency_sweep.py parses and draws its plot from a result file."""
from __future__ import annotations

import json

import pytest

from tests.conftest import load_benchmark_script


def load():
    return load_benchmark_script("concurrency_sweep")


def test_parses_with_every_backend_by_default():
    args = load().parse_args(["--out", "x.json"])
    assert args.backends == ["pageport", "pageport-int4", "hf", "hf-cb", "llama-cpp"]
    assert args.concurrency == [1, 4, 16, 64] and (args.input_len, args.output_len) == (128, 128)


def test_plot_only_draws_a_png(tmp_path):
    pytest.importorskip("matplotlib")
    runs = lambda v: {"median_output_tokens_per_s": v, "median_total_tokens_per_s": 2 * v,  # noqa: E731
                      "runs": [{"output_tokens_per_s": v * f} for f in (0.9, 1.0, 1.1)]}
    res = {"machine": "x86_64 CPU, 2 cores", "cpu_model": "test CPU", "threads": 1, "input_len": 128,
           "output_len": 128, "repeats": 3, "concurrency": [1, 4],
           "backends": {"pageport": {"dtype": "bfloat16"}, "hf": {"dtype": "bfloat16"}},
           "results": {"pageport": {"1": runs(40.0), "4": runs(100.0)}, "hf": {"1": runs(15.0)}}}
    out, png = tmp_path / "r.json", tmp_path / "r.png"
    out.write_text(json.dumps(res))
    assert load().main(["--plot-only", "--out", str(out), "--png", str(png)]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
