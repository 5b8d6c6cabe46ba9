"""The server over the engine core in its own process: clients that leave at random give every block back,
and a core that dies fails the requests in flight with a clear error and turns /health to 503 at once."""
from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import threading
import time

import httpx

from live_server import MODEL, ServerThread, all_blocks_free, wait_idle


def test_random_disconnects_return_every_block(server):
    engine = server.engine.engine
    assert wait_idle(engine)
    rng = random.Random(7)
    plan = [rng.choice([None, 1, 3, 6]) for _ in range(36)]  # leave after this many chunks (None: stay)

    async def one(client, i, leave):
        body = {"model": MODEL, "prompt": f"Story {i}:", "max_tokens": 24, "stream": True, "ignore_eos": True,
                "temperature": 0.8, "seed": i}
        chunks, finish = 0, None
        async with client.stream("POST", server.url + "/v1/completions", json=body) as r:
            assert r.status_code == 200
            async for line in r.aiter_lines():
                if line == "data: [DONE]":
                    return finish
                if line.startswith("data: "):
                    chunks += 1
                    finish = json.loads(line[6:])["choices"][0]["finish_reason"] or finish
                    if leave is not None and chunks >= leave:
                        return "left"

    async def main():
        async with httpx.AsyncClient(timeout=120) as client:
            return await asyncio.gather(*[one(client, i, leave) for i, leave in enumerate(plan)])

    results = asyncio.run(main())
    stayed = [r for r, leave in zip(results, plan) if leave is None]
    assert stayed and stayed == ["length"] * len(stayed)  # those who stayed got everything
    assert wait_idle(engine, 30), "blocks were not returned after the disconnects"
    assert all_blocks_free(engine)


def test_killed_core_fails_requests_and_health_turns_503():
    from pageport.core.async_engine import AsyncLLMEngine
    from pageport.core.config import EngineConfig
    from pageport.entrypoints.openai.api_server import build_app

    engine = AsyncLLMEngine.from_config(EngineConfig(dtype="float32", max_model_len=256,
                                                     kv_cache_memory_bytes=64 * 2 ** 20))
    try:
        with ServerThread(build_app(engine)) as srv:
            assert httpx.get(srv.url + "/health").status_code == 200
            result = {}

            def streaming():
                with httpx.stream("POST", srv.url + "/v1/completions", timeout=60, json={
                        "model": MODEL, "prompt": "Hello", "max_tokens": 200, "ignore_eos": True,
                        "stream": True}) as r:
                    result["lines"] = [line for line in r.iter_lines() if line]

            t = threading.Thread(target=streaming)
            t.start()
            deadline = time.monotonic() + 30
            while not engine.engine.groups and time.monotonic() < deadline:
                time.sleep(0.01)
            time.sleep(0.3)
            os.kill(engine.engine.client.proc.pid, signal.SIGKILL)
            t0 = time.monotonic()
            while httpx.get(srv.url + "/health").status_code != 503:
                assert time.monotonic() - t0 < 1.0, "/health still 200 a second after the core died"
                time.sleep(0.02)
            t.join(30)
            assert not t.is_alive(), "a request hung after the core died"
            assert result["lines"][-1] == "data: [DONE]" and '"engine_dead"' in result["lines"][-2]
            r = httpx.post(srv.url + "/v1/completions", json={"model": MODEL, "prompt": "Hi", "max_tokens": 2})
            assert r.status_code == 503 and r.json()["error"]["code"] == "engine_dead"
    finally:
        engine.shutdown()
    assert not engine.engine.client.is_alive()
