"""`pageport serve` and `pageport bench serve` from the command line."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import httpx
import pytest

from live_server import free_port

from pageport.entrypoints.cli import build_parser


def test_serve_flags_come_from_engine_config():
    args = build_parser().parse_args(
        ["serve", "some/model", "--port", "9001", "--api-key", "k", "--served-model-name", "a", "b",
         "--max-model-len", "256", "--max-num-seqs", "8", "--max-num-batched-tokens", "64",
         "--gpu-memory-utilization", "0.5", "--no-enable-prefix-caching", "--dtype", "bfloat16",
         "--load-format", "dummy", "--seed", "3", "--device", "cpu"])
    assert args.model == "some/model" and args.port == 9001 and args.served_model_name == ["a", "b"]
    from pageport.core.config import EngineConfig
    cfg = EngineConfig.from_cli_args(args)
    assert (cfg.max_model_len, cfg.max_num_seqs, cfg.max_num_batched_tokens, cfg.enable_prefix_caching,
            cfg.dtype, cfg.load_format, cfg.seed, cfg.device, cfg.gpu_memory_utilization) == (
        256, 8, 64, False, "bfloat16", "dummy", 3, "cpu", 0.5)
    assert build_parser().parse_args(["serve"]).model is None  # the default model


def test_bench_serve_in_process(server, tmp_path):
    from pageport.entrypoints.bench import random_token_prompts

    out = tmp_path / "res.json"
    args = build_parser().parse_args(
        ["bench", "serve", "--base-url", server.url, "--num-prompts", "6", "--random-input-len", "12",
         "--random-output-len", "5", "--max-concurrency", "3", "--request-rate", "50", "--output-json", str(out)])
    assert args.func(args) == 0
    res = json.loads(out.read_text())
    assert res["completed"] == 6 and res["failed"] == 0
    assert res["total_input_tokens"] == 72 and res["total_output_tokens"] == 30
    assert res["mean_ttft_ms"] > 0 and res["mean_tpot_ms"] > 0 and res["p99_itl_ms"] > 0
    assert random_token_prompts(2, 4, seed=1) == random_token_prompts(2, 4, seed=1)

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("\n".join(json.dumps({"prompt": p, "max_tokens": 3}) for p in ["Hi", "Tell me a joke"]))
    args = build_parser().parse_args(
        ["bench", "serve", "--base-url", server.url, "--endpoint", "/v1/chat/completions", "--dataset", str(prompts),
         "--num-prompts", "4", "--output-json", str(out)])
    assert args.func(args) == 0
    assert json.loads(out.read_text())["completed"] == 4


@pytest.mark.slow
def test_pageport_serve_subprocess(tmp_path):
    port = free_port()
    env = dict(os.environ, PAGEPORT_API_KEY="secret", OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "2"))
    cmd = [sys.executable, "-m", "pageport", "serve", "--host", "127.0.0.1", "--port", str(port), "--dtype",
           "float32", "--max-model-len", "256", "--kv-cache-memory-bytes", str(64 * 2 ** 20),
           "--served-model-name", "tiny", "--uvicorn-log-level", "warning"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, proc.stdout.read()
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "pageport serve did not come up"
            time.sleep(0.3)
        assert httpx.get(url + "/v1/models").status_code == 401  # the key from $PAGEPORT_API_KEY
        models = httpx.get(url + "/v1/models", headers={"Authorization": "Bearer secret"}).json()
        assert [m["id"] for m in models["data"]] == ["tiny"]
        out = tmp_path / "bench.json"
        r = subprocess.run([sys.executable, "-m", "pageport", "bench", "serve", "--port", str(port),
                            "--num-prompts", "4", "--random-input-len", "8", "--random-output-len", "4",
                            "--output-json", str(out)], env=env, capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr
        assert "Serving Benchmark Result" in r.stdout and "Successful requests:" in r.stdout
        for label in ("Failed requests", "Benchmark duration (s)", "Request throughput (req/s)",
                      "Output token throughput (tok/s)", "Total Token throughput (tok/s)", "Mean TTFT (ms)",
                      "Median TTFT (ms)", "P99 TTFT (ms)", "Mean TPOT (ms)", "Median TPOT (ms)", "P99 TPOT (ms)",
                      "Mean ITL (ms)", "Median ITL (ms)", "P99 ITL (ms)"):
            assert label + ":" in r.stdout, label
        res = json.loads(out.read_text())
        assert res["completed"] == 4 and res["model_id"] == "tiny"
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
