"""A live OpenAI-compatible server on loopback: one LLMEngine (the default model, float32, small limits) per
session; each test module gets its own AsyncLLMEngine + uvicorn thread on a free port."""
from __future__ import annotations

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("openai")

from live_server import MAX_MODEL_LEN, ServerThread


@pytest.fixture(scope="session")
def llm_engine():
    from pageport.core.config import EngineConfig
    from pageport.core.engine import LLMEngine

    try:
        return LLMEngine(EngineConfig(dtype="float32", max_model_len=MAX_MODEL_LEN, max_num_seqs=64,
                                      kv_cache_memory_bytes=256 * 2 ** 20))
    except FileNotFoundError as e:  # the default model is not installed
        pytest.skip(str(e))


@pytest.fixture(scope="module")
def async_engine(llm_engine):
    from pageport.core.async_engine import AsyncLLMEngine

    engine = AsyncLLMEngine(llm_engine)
    yield engine
    engine.shutdown()


@pytest.fixture(scope="module")
def server(async_engine):
    from pageport.entrypoints.openai.api_server import build_app

    with ServerThread(build_app(async_engine)) as srv:
        srv.engine = async_engine
        yield srv


@pytest.fixture(scope="module")
def client(server):
    import openai

    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)
