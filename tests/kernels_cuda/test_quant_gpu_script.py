"""scripts/quant_gpu_check.sh and benchmarks/quant_gpu.py on the CPU, as far as they run without a GPU: the shell
script parses, every `pageport bench` command it runs parses with the real CLI (so a renamed flag fails here, not
on the GPU machine), its summary reads the keys `pageport bench` writes and computes the two ratios, and the GPU
benchmark imports and calls the kernels with their current signatures."""
from __future__ import annotations

import inspect
import json
import re
import subprocess
import sys
from pathlib import Path

from tests.conftest import load_benchmark_script

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "quant_gpu_check.sh"


def test_shell_script_parses():
    assert subprocess.run(["bash", "-n", str(SCRIPT)], capture_output=True).returncode == 0


def _bench_commands() -> list[list[str]]:
    text = SCRIPT.read_text()
    macros = dict(re.findall(r'^(TP|LAT)="([^"]+)"', text, re.M))
    cmds = []
    for line in re.findall(r"^run \w+ (.+)$", text, re.M):
        for name, value in macros.items():
            line = line.replace(f"${name}", value)
        cmds.append(line.split() + ["--output-json", "x.json"])
    return cmds


def test_bench_commands_parse_with_the_cli():
    from pageport.entrypoints.cli import build_parser
    cmds = _bench_commands()
    assert len(cmds) == 5
    parser = build_parser()
    for cmd in cmds:
        args = parser.parse_args(["bench", *cmd])
        assert args.model == "/tmp/llama8b" and args.dtype == "bfloat16", cmd
    quant = [parser.parse_args(["bench", *c]).quantization for c in cmds]
    assert quant == [None, "fp8", None, "w4a16", "w4a16"]
    assert parser.parse_args(["bench", *cmds[-1]]).kv_cache_dtype == "fp8"


def test_summary_reads_the_bench_keys(tmp_path):
    """The keys the summary reads are the ones `pageport bench throughput / latency` write (entrypoints/
    bench_offline.py), fed here with made-up numbers."""
    src = (ROOT / "entrypoints" / "bench_offline.py").read_text()
    assert '"tokens_per_second"' in src and '"avg_latency"' in src
    for name, body in {"tp_bf16": {"tokens_per_second": 1000.0}, "tp_fp8": {"tokens_per_second": 1600.0},
                       "lat_bf16": {"avg_latency": 2.0}, "lat_w4a16": {"avg_latency": 0.8}}.items():
        (tmp_path / f"{name}.json").write_text(json.dumps(body))
    summary = SCRIPT.read_text().split("<<'PY'\n", 1)[1].split("\nPY\n", 1)[0]
    r = subprocess.run([sys.executable, "-", str(tmp_path)], input=summary, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    res = json.loads((tmp_path / "quant_e2e.json").read_text())
    assert abs(res["fp8_throughput_ratio"] - 1.6) < 1e-9 and res["goal_fp8_ge_1.5x"] is True
    assert abs(res["w4a16_decode_ratio"] - 2.5) < 1e-9 and res["goal_w4a16_ge_2x"] is True


def test_gpu_benchmark_calls_current_signatures():
    load_benchmark_script("quant_gpu")  # imports without a GPU
    from pageport.kernels_cuda.paged_attention import paged_attention
    from pageport.kernels_cuda.quant_gemm import scaled_linear, wna16_linear, wna16_prepare
    assert list(inspect.signature(scaled_linear).parameters)[:3] == ["x", "weight", "weight_scale"]
    assert list(inspect.signature(wna16_prepare).parameters)[:4] == ["qweight", "scales", "zeros", "group_size"]
    assert list(inspect.signature(wna16_linear).parameters)[:2] == ["x", "w"]
    params = inspect.signature(paged_attention).parameters
    assert list(params)[:7] == ["q", "k_cache", "v_cache", "out", "query_start_loc", "seq_lens", "block_table"]
    assert {"max_query_len", "max_seq_len", "scale"} <= set(params)
