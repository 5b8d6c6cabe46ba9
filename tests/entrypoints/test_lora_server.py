"""LoRA adapters through the OpenAI server (tiny random Llama, PEFT adapters, openai client on loopback): the
adapters of --lora-modules are models of their own in /v1/models, a request's `model` picks one and gets PEFT's
greedy tokens, loading and unloading at run time work while other requests stream, and a bad adapter or an
unknown one is a 400 / 404 in OpenAI's error shape."""
from __future__ import annotations

import asyncio

import pytest

openai = pytest.importorskip("openai")
pytest.importorskip("peft")
httpx = pytest.importorskip("httpx")

from live_server import ServerThread  # noqa: E402

from tests.models.tiny_lora import greedy, make_adapter, make_tiny_llama  # noqa: E402

NAME = "tiny"
N = 12
PROMPT = [5, 17, 33, 2, 90, 64]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    base = tmp_path_factory.mktemp("base")
    refs = {None: make_tiny_llama(base)}
    folders = {}
    for i, name in enumerate(("sql", "chat", "late"), 1):
        folders[name] = tmp_path_factory.mktemp(name)
        refs[name] = make_adapter(base, folders[name], 4 * i if i < 3 else 8, seed=i)
    return base, refs, folders


@pytest.fixture(scope="module")
def server(tiny):
    from pageport.core.async_engine import AsyncLLMEngine
    from pageport.core.config import EngineConfig
    from pageport.core.engine import LLMEngine
    from pageport.entrypoints.openai.api_server import build_app

    base, _, folders = tiny
    config = EngineConfig(model=str(base), dtype="float32", max_num_seqs=8, kv_cache_memory_bytes=1 << 22,
                          block_size=8, num_threads=1, enable_lora=True, max_loras=2, max_lora_rank=8)
    engine = AsyncLLMEngine(LLMEngine(config))
    app = build_app(engine, served_model_names=[NAME], lora_modules=[("sql", str(folders["sql"]), None),
                                                                      ("chat", str(folders["chat"]), None)],
                    allow_lora_updates=True)
    with ServerThread(app) as srv:
        srv.client = openai.OpenAI(base_url=srv.url + "/v1", api_key="x", max_retries=0)
        srv.aclient = openai.AsyncOpenAI(base_url=srv.url + "/v1", api_key="x", max_retries=0)
        yield srv
    engine.shutdown()
    engine.engine.shutdown()


def _complete(client, model, n=N):
    r = client.completions.create(model=model, prompt=PROMPT, max_tokens=n, temperature=0.0,
                                  extra_body={"ignore_eos": True, "return_token_ids": True})
    return r.choices[0].token_ids


def test_models_lists_adapters(server):
    models = {m.id: m for m in server.client.models.list().data}
    assert set(models) == {NAME, "sql", "chat"}
    assert models["sql"].parent == NAME and models[NAME].parent is None
    assert models["sql"].root.endswith("sql") or "sql" in models["sql"].root


def test_model_field_picks_the_adapter(server, tiny):
    _, refs, _ = tiny
    for model, ref in ((NAME, None), ("sql", "sql"), ("chat", "chat")):
        assert _complete(server.client, model) == greedy(refs[ref], PROMPT, N), model
    assert len({tuple(greedy(refs[k], PROMPT, N)) for k in (None, "sql", "chat")}) == 3


def test_unknown_and_bad_adapters(server, tmp_path):
    with pytest.raises(openai.NotFoundError) as e:
        _complete(server.client, "nope")
    assert e.value.body["code"] == "model_not_found"
    r = httpx.post(server.url + "/v1/load_lora_adapter", json={"lora_name": "bad", "lora_path": str(tmp_path)})
    assert r.status_code == 400 and "adapter_config.json" in r.json()["error"]["message"]
    r = httpx.post(server.url + "/v1/load_lora_adapter", json={"lora_name": "sql", "lora_path": str(tmp_path)})
    assert r.status_code == 400 and "taken" in r.json()["error"]["message"]
    r = httpx.post(server.url + "/v1/unload_lora_adapter", json={"lora_name": "never"})
    assert r.status_code == 404
    assert _complete(server.client, "sql", 2)  # the server goes on


def test_load_unload_reload_while_streaming(server, tiny):
    _, refs, folders = tiny

    async def run():
        async def stream(model):
            s = await server.aclient.completions.create(model=model, prompt=PROMPT, max_tokens=N, temperature=0.0,
                                                        stream=True, extra_body={"ignore_eos": True,
                                                                                 "return_token_ids": True})
            toks = []
            async for chunk in s:
                toks += chunk.choices[0].token_ids or []
            return toks

        async with httpx.AsyncClient(base_url=server.url) as http:
            streams = [asyncio.ensure_future(stream(m)) for m in (NAME, "sql", "chat", "sql")]
            r = await http.post("/v1/load_lora_adapter", json={"lora_name": "late", "lora_path": str(folders["late"])})
            assert r.status_code == 200, r.text
            late = await stream("late")
            r = await http.post("/v1/unload_lora_adapter", json={"lora_name": "chat"})
            assert r.status_code == 200, r.text
            done = await asyncio.gather(*streams)
            gone = await http.post("/v1/completions", json={"model": "chat", "prompt": PROMPT, "max_tokens": 2})
            r = await http.post("/v1/load_lora_adapter", json={"lora_name": "chat", "lora_path": str(folders["chat"])})
            assert r.status_code == 200, r.text
            again = await stream("chat")
        return late, done, gone, again

    late, done, gone, again = asyncio.run(run())
    assert late == greedy(refs["late"], PROMPT, N)
    for model, toks in zip((None, "sql", "chat", "sql"), done):
        assert toks == greedy(refs[model], PROMPT, N), model
    assert gone.status_code == 404
    assert again == greedy(refs["chat"], PROMPT, N)
    assert {m.id for m in server.client.models.list().data} == {NAME, "sql", "chat", "late"}
