"""An exception inside step() kills the engine: pending requests fail (no hang), /health says 503, new requests
get 503 bodies; none of them shows the exception. (That the process then exits: test_server_lifecycle.py.)"""
from __future__ import annotations

import threading
import time

import httpx

from live_server import MODEL, ServerThread, wait_idle


def test_engine_death(llm_engine):
    from pageport.core.async_engine import AsyncLLMEngine
    from pageport.entrypoints.openai.api_server import build_app

    engine = AsyncLLMEngine(llm_engine)
    try:
        with ServerThread(build_app(engine)) as srv:
            assert httpx.get(srv.url + "/health").status_code == 200
            results = {}

            def streaming():
                with httpx.stream("POST", srv.url + "/v1/completions", timeout=60, json={
                        "model": MODEL, "prompt": "Hello", "max_tokens": 400, "ignore_eos": True,
                        "stream": True}) as r:
                    results["stream_status"] = r.status_code
                    results["stream"] = [line for line in r.iter_lines() if line]

            def blocking():
                r = httpx.post(srv.url + "/v1/chat/completions", timeout=60, json={
                    "model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 400,
                    "ignore_eos": True})
                results["blocking"] = r

            threads = [threading.Thread(target=streaming), threading.Thread(target=blocking)]
            for t in threads:
                t.start()
            deadline = time.monotonic() + 30
            while len(llm_engine.groups) < 2 and time.monotonic() < deadline:
                time.sleep(0.01)

            def broken_step(*_, **__):
                raise RuntimeError("simulated device failure")

            llm_engine.step = broken_step
            for t in threads:
                t.join(30)
                assert not t.is_alive(), "a pending request hung after the engine died"

            assert results["stream_status"] == 200  # the stream had started
            assert results["stream"][-1] == "data: [DONE]"
            assert '"engine_dead"' in results["stream"][-2]
            assert "simulated" not in results["stream"][-2]  # the cause is for the log, not for clients
            r = results["blocking"]
            assert r.status_code == 503 and r.json()["error"]["code"] == "engine_dead"

            h = httpx.get(srv.url + "/health")
            assert h.status_code == 503 and h.json()["error"]["code"] == "engine_dead"
            assert "simulated" not in h.text  # /health is open: nothing of the exception
            r = httpx.post(srv.url + "/v1/completions", json={"model": MODEL, "prompt": "Hi", "max_tokens": 2})
            assert r.status_code == 503 and set(r.json()["error"]) == {"message", "type", "param", "code"}
            metrics = httpx.get(srv.url + "/metrics").text
            assert 'pageport:engine_dead{model_name="SmolLM2-135M-Instruct"} 1.0' in metrics
    finally:
        engine.shutdown()
        llm_engine.__dict__.pop("step", None)  # repair the shared engine for the other modules
        llm_engine.abort_request(list(llm_engine.groups))
        assert wait_idle(llm_engine, drain=True)
