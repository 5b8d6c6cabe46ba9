"""Hostile-client cases, live on loopback: lone surrogates, huge prompts (off the event loop and bounded), stalled
bodies, fan-out caps, one finish_reason per streamed choice."""
from __future__ import annotations

import json
import socket
import threading
import time

import httpx
import pytest

from live_server import MAX_MODEL_LEN, MODEL, ServerThread, wait_idle
from test_server_errors import check_error

CHAT = [{"role": "user", "content": "Hello"}]


def raw_post(client: httpx.Client, path: str, body: str) -> httpx.Response:
    """`body` is JSON text as a client wrote it (escapes like \\ud800 stay escapes)."""
    return client.post(path, content=body.encode(), headers={"content-type": "application/json"})


SURROGATES = [
    ("/v1/completions", '{"model": "%s", "prompt": "a\\ud800b", "max_tokens": 2}' % MODEL, "prompt"),
    ("/v1/completions", '{"model": "%s", "prompt": ["ok", "\\udfff"], "max_tokens": 2}' % MODEL, "prompt"),
    ("/v1/completions", '{"model": "\\ud800", "prompt": "hi"}', "model"),
    ("/v1/completions", '{"model": "%s", "prompt": "hi", "stop": ["\\ud800"]}' % MODEL, "stop"),
    ("/v1/completions", '{"model": "%s", "prompt": "hi", "\\ud800": 1}' % MODEL, None),
    ("/v1/chat/completions", '{"model": "%s", "messages": [{"role": "user", "content": "\\ud800"}]}' % MODEL,
     "messages"),
    ("/v1/chat/completions", '{"model": "%s", "messages": [{"role": "user", "content": '
                             '[{"type": "text", "text": "x\\udc00"}]}]}' % MODEL, "messages"),
    ("/v1/chat/completions", '{"model": "\\udbff", "messages": [{"role": "user", "content": "hi"}]}', "model"),
    ("/tokenize", '{"model": "%s", "prompt": "\\ud800"}' % MODEL, "prompt"),
    ("/tokenize", '{"model": "%s", "messages": [{"role": "user", "content": "\\ud800"}]}' % MODEL, "messages"),
    ("/tokenize", '{"model": "\\ud800", "prompt": "hi"}', "model"),
    ("/detokenize", '{"model": "\\ud800", "tokens": [1]}', "model"),
]


def test_lone_surrogates_are_a_400_and_keep_the_connection(server):
    with httpx.Client(base_url=server.url, timeout=30) as client:
        for path, body, param in SURROGATES:
            err = check_error(raw_post(client, path, body), 400, contains="surrogate")
            if param is not None:
                assert err["param"] == param, (body, err)
        # a valid surrogate *pair* is an ordinary character (U+1F600), on the same connection
        r = raw_post(client, "/tokenize", '{"model": "%s", "prompt": "\\ud83d\\ude00"}' % MODEL)
        assert r.status_code == 200 and r.json()["count"] >= 1
        r = raw_post(client, "/v1/completions", '{"model": "%s", "prompt": "\\ud83d\\ude00", "max_tokens": 1}'
                     % MODEL)
        assert r.status_code == 200, r.text
    assert wait_idle(server.engine.engine)


def test_prompt_characters_are_bounded_before_tokenizing(server):
    limit = server.app.state.serving.max_prompt_chars
    assert limit >= 8 * MAX_MODEL_LEN  # derived from max_model_len by default
    big = "a" * (limit + 1)
    err = check_error(httpx.post(server.url + "/v1/completions", timeout=30,
                                 json={"model": MODEL, "prompt": big}), 400, param="prompt", contains=str(limit))
    assert "--max-prompt-chars" in err["message"] and err["code"] == "prompt_too_long"
    check_error(httpx.post(server.url + "/v1/completions", timeout=30, json={"model": MODEL, "prompt": ["hi", big]}),
                400, param="prompt", contains="--max-prompt-chars")
    # chat: the messages' text counts together
    half = "b" * (limit // 2 + 1)
    check_error(httpx.post(server.url + "/v1/chat/completions", timeout=30, json={
        "model": MODEL, "messages": [{"role": "user", "content": half}, {"role": "assistant", "content": half}]}),
        400, param="messages", contains="--max-prompt-chars")
    check_error(httpx.post(server.url + "/tokenize", timeout=30, json={"model": MODEL, "prompt": big}), 400,
                param="prompt", contains="--max-prompt-chars")
    # just under the bound is tokenized, and is then too long for the model: the usual context error
    err = check_error(httpx.post(server.url + "/v1/completions", timeout=30,
                                 json={"model": MODEL, "prompt": "hello " * (limit // 6)}), 400)
    assert err["code"] == "context_length_exceeded"


def test_huge_prompt_does_not_freeze_other_routes(async_engine):
    """A multi-megabyte prompt is tokenized off the event loop: /health keeps answering meanwhile."""
    from pageport.entrypoints.openai.api_server import build_app
    from pageport.entrypoints.openai.limits import ServerLimits

    prompt = "word " * 400_000  # 2 MB: seconds of tokenization on one core
    app = build_app(async_engine, limits=ServerLimits(max_prompt_chars=len(prompt)))
    with ServerThread(app) as srv:
        done = {}

        def huge():
            t0 = time.monotonic()
            done["r"] = httpx.post(srv.url + "/v1/completions", timeout=120, json={"model": MODEL, "prompt": prompt})
            done["seconds"] = time.monotonic() - t0

        t = threading.Thread(target=huge)
        t.start()
        latencies = []
        with httpx.Client(base_url=srv.url, timeout=30) as client:
            time.sleep(0.2)  # the body is sent and the tokenizer is busy
            while t.is_alive():
                t0 = time.monotonic()
                assert client.get("/health").status_code == 200
                latencies.append(time.monotonic() - t0)
                time.sleep(0.05)
        t.join()
        check_error(done["r"], 400)  # far longer than the model's context
        assert done["r"].json()["error"]["code"] == "context_length_exceeded"
        assert done["seconds"] > 0.5 and len(latencies) >= 3, (done["seconds"], latencies)  # it overlapped
        assert max(latencies) < 0.3, latencies


def _raw_request(port: int, head: bytes, body: bytes, wait: float) -> tuple[bytes, float]:
    """Send a request whose body is cut short; what the server answers, and after how long it closed."""
    with socket.create_connection(("127.0.0.1", port), timeout=wait) as s:
        s.sendall(head + body)
        t0 = time.monotonic()
        data = b""
        while True:
            try:
                chunk = s.recv(65536)
            except socket.timeout:
                break
            if not chunk:
                break  # closed by the server
            data += chunk
        return data, time.monotonic() - t0


def test_stalled_body_gets_408_and_the_connection_closes(async_engine):
    from pageport.entrypoints.openai.api_server import build_app
    from pageport.entrypoints.openai.limits import ServerLimits

    with ServerThread(build_app(async_engine, limits=ServerLimits(request_body_timeout=1.0))) as srv:
        head = (b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                b"Content-Length: 1000\r\n\r\n")
        data, seconds = _raw_request(srv.port, head, b'{"model": "x", "prompt": "abc', wait=10)
        assert data.startswith(b"HTTP/1.1 408"), data
        assert seconds < 5, seconds  # answered and closed, not held until the 10 s client timeout
        body = json.loads(data.split(b"\r\n\r\n", 1)[1])
        assert set(body["error"]) == {"message", "type", "param", "code"}
        assert body["error"]["code"] == "request_timeout" and "1" in body["error"]["message"]
        # a body that arrives in time, in pieces, is served as usual
        with socket.create_connection(("127.0.0.1", srv.port), timeout=30) as s:
            payload = json.dumps({"model": MODEL, "prompt": [1, 2, 3], "max_tokens": 1}).encode()
            s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                      b"Connection: close\r\nContent-Length: %d\r\n\r\n" % len(payload) + payload[:10])
            time.sleep(0.3)
            s.sendall(payload[10:])
            data = b""
            while chunk := s.recv(65536):
                data += chunk
        assert data.startswith(b"HTTP/1.1 200"), data


def test_sequences_per_request_are_capped(async_engine):
    from pageport.entrypoints.openai.api_server import build_app
    from pageport.entrypoints.openai.limits import ServerLimits

    assert ServerLimits().max_seqs_per_request == 256
    with ServerThread(build_app(async_engine, limits=ServerLimits(max_seqs_per_request=8))) as srv:
        def post(path, body):
            return httpx.post(srv.url + path, json=dict(body, model=MODEL), timeout=60)

        for body in ({"prompt": ["hi"] * 3, "n": 3}, {"prompt": [[1, 2]] * 9}, {"prompt": "hi", "n": 9}):
            err = check_error(post("/v1/completions", dict(body, max_tokens=1)), 400,
                              param="n" if body.get("n") else "prompt", contains="--max-seqs-per-request")
            assert "allows 8" in err["message"]
        check_error(post("/v1/chat/completions", {"messages": CHAT, "n": 9, "max_tokens": 1}), 400, param="n",
                    contains="--max-seqs-per-request")
        r = post("/v1/completions", {"prompt": ["hi"] * 4, "n": 2, "max_tokens": 1})  # 8: at the cap
        assert r.status_code == 200 and len(r.json()["choices"]) == 8
    assert wait_idle(async_engine.engine)


def _stream_choices(server, path: str, body: dict) -> list[dict]:
    with httpx.stream("POST", server.url + path, json=body, timeout=120) as r:
        assert r.status_code == 200
        events = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
    return [c for e in events for c in e["choices"]]


@pytest.mark.parametrize("path,extra", [("/v1/completions", {"prompt": "Once upon a time"}),
                                        ("/v1/chat/completions", {"messages": CHAT})])
def test_one_finish_reason_per_streamed_choice(server, path, extra):
    n = 4
    staggered = False  # at least one choice must finish before the others, or the test proves nothing
    for seed in range(4):
        choices = _stream_choices(server, path, dict(extra, model=MODEL, n=n, max_tokens=24, temperature=1.0,
                                                     seed=seed, stop=[" "], stream=True))
        finished_at = {}
        for pos, c in enumerate(choices):
            assert c["index"] not in finished_at, f"choice {c['index']} continued after its finish_reason: {c}"
            if c["finish_reason"] is not None:
                finished_at[c["index"]] = pos
        assert sorted(finished_at) == list(range(n))
        staggered |= max(finished_at.values()) - min(finished_at.values()) >= n
        if staggered:
            break
    assert staggered
    assert wait_idle(server.engine.engine)


def test_seed_range_is_checked_before_the_engine(server):
    """n=2 seeds its children seed, seed + 1: a seed past int64 would overflow inside the engine."""
    for seed in (2 ** 64 - 1, 2 ** 63, -(2 ** 63) - 1):
        check_error(httpx.post(server.url + "/v1/completions", timeout=30, json={
            "model": MODEL, "prompt": "x", "max_tokens": 2, "n": 2, "seed": seed}), 400, param="seed")
    r = httpx.post(server.url + "/v1/completions", timeout=30, json={
        "model": MODEL, "prompt": "x", "max_tokens": 2, "n": 2, "seed": 2 ** 63 - 1})
    assert r.status_code == 200 and len(r.json()["choices"]) == 2
    assert httpx.get(server.url + "/health").status_code == 200
