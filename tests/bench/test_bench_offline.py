"""`pageport bench throughput` runs every backend on the same prompts and writes vLLM-worded results."""
from __future__ import annotations

import builtins
import json

import pytest

from pageport.entrypoints import bench_offline
from pageport.entrypoints.cli import main

ARGS = ["--num-prompts", "3", "--input-len", "8", "--output-len", "5", "--max-model-len", "64"]


@pytest.mark.parametrize("backend", ["pageport", "hf", "hf-cb"])
def test_throughput_backends_write_their_result(backend, tmp_path, capsys):
    out = tmp_path / "r.json"
    assert main(["bench", "throughput", "--backend", backend, *ARGS, "--output-json", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["backend"] == backend and res["num_requests"] == 3
    assert res["num_output_tokens"] == 15 and res["total_num_tokens"] == 3 * 8 + 15  # --ignore-eos by default
    assert res["output_tokens_per_second"] == pytest.approx(15 / res["elapsed_time"])
    assert "output tokens/s" in capsys.readouterr().out


def test_pageport_backend_runs_each_repeat_without_the_prefix_cache():
    from pageport.core.config import EngineConfig
    backend = bench_offline.PageportBackend(EngineConfig(max_model_len=64))
    prompts = [[100 + i for i in range(40)], [200 + i for i in range(40)]]
    assert backend(prompts, 3) == [3, 3]
    assert backend(prompts, 3) == [3, 3]
    assert backend.llm.engine.core_stats().prefix_cache_hits == 0  # the second call found nothing cached


def test_llama_cpp_backend_says_how_to_install_it(monkeypatch, capsys):
    real_import = builtins.__import__

    def no_llama_cpp(name, *a, **k):
        if name == "llama_cpp":
            raise ImportError("No module named 'llama_cpp'")
        return real_import(name, *a, **k)
    monkeypatch.setattr(builtins, "__import__", no_llama_cpp)
    with pytest.raises(SystemExit, match="llama-cpp: llama-cpp-python is not installed.*builds it"):
        main(["bench", "throughput", "--backend", "llama-cpp", *ARGS])
