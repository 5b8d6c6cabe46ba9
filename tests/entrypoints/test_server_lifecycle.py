"""`pageport serve` as a process: SIGTERM drains for at most --shutdown-timeout, then ends what is left with an
error and exits 0; a dead engine makes /health answer 503 (without the exception's text) and the process exit 1."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from fake_engine import DIE_TOKEN, SECRET
from live_server import free_port

HERE = Path(__file__).parent


def start(cmd: list[str], url: str, timeout: float = 120) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"),
               PYTHONPATH=os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + timeout
    while True:
        assert proc.poll() is None, proc.stdout.read()
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        assert time.monotonic() < deadline, "the server did not come up"
        time.sleep(0.2)


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.kill()
    proc.wait(10)


class Stream(threading.Thread):
    """A streaming request in the background: its SSE data lines, and when it ended."""

    def __init__(self, url: str, path: str, body: dict):
        super().__init__(daemon=True)
        self.url, self.path, self.body = url, path, body
        self.lines: list[str] = []
        self.started = threading.Event()
        self.ended_at = None

    def run(self):
        try:
            with httpx.stream("POST", self.url + self.path, json=dict(self.body, stream=True), timeout=60) as r:
                for line in r.iter_lines():
                    if line:
                        self.lines.append(line)
                        if len(self.lines) >= 2:
                            self.started.set()
        finally:
            self.ended_at = time.monotonic()
            self.started.set()


class Post(threading.Thread):
    def __init__(self, url: str, path: str, body: dict):
        super().__init__(daemon=True)
        self.url, self.path, self.body = url, path, body
        self.response = None
        self.ended_at = None

    def run(self):
        try:
            self.response = httpx.post(self.url + self.path, json=self.body, timeout=60)
        finally:
            self.ended_at = time.monotonic()


def error_event(lines: list[str]) -> dict:
    assert lines[-1] == "data: [DONE]", lines[-3:]
    return json.loads(lines[-2][len("data: "):])["error"]


@pytest.mark.slow  # loads the default model in a fresh process (~10 s)
def test_sigterm_drains_then_ends_the_rest():
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = start([sys.executable, "-m", "pageport", "serve", "--host", "127.0.0.1", "--port", str(port), "--dtype",
                  "float32", "--max-model-len", "1024", "--kv-cache-memory-bytes", str(64 * 2 ** 20),
                  "--shutdown-timeout", "2", "--uvicorn-log-level", "warning"], url)
    try:
        long = {"prompt": "Hello", "max_tokens": 1000, "ignore_eos": True}
        streaming = Stream(url, "/v1/completions", long)
        short = Stream(url, "/v1/completions", {"prompt": "Hi", "max_tokens": 8, "ignore_eos": True})
        blocking = Post(url, "/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}],
                                                      "max_tokens": 900, "ignore_eos": True})
        for t in (streaming, blocking, short):
            t.start()
        assert streaming.started.wait(60) and short.started.wait(60)
        time.sleep(0.3)  # the blocking request is in the engine too
        sent = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        for t in (streaming, blocking, short):
            t.join(30)
            assert not t.is_alive(), "a request hung after SIGTERM"
        rc = proc.wait(20)
        exited = time.monotonic()

        # the short one finished during the drain, normally
        assert short.lines[-1] == "data: [DONE]" and '"finish_reason":"length"' in short.lines[-2]
        # the long ones ran for the whole timeout, then ended with a clear error
        err = error_event(streaming.lines)
        assert err["code"] == "server_shutting_down" and "--shutdown-timeout" in err["message"]
        assert len(streaming.lines) > 3  # it had streamed tokens before
        assert blocking.response.status_code == 503
        assert blocking.response.json()["error"]["code"] == "server_shutting_down"
        for t in (streaming, blocking):
            assert 1.5 < t.ended_at - sent < 6, t.ended_at - sent
        assert rc == 0, proc.stdout.read()
        assert exited - sent < 10
    finally:
        stop(proc)


def test_dead_engine_answers_503_then_the_process_exits_nonzero():
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = start([sys.executable, str(HERE / "fake_engine.py"), str(port)], url)
    try:
        streaming = Stream(url, "/v1/completions", {"prompt": [1, 2], "max_tokens": 250})
        blocking = Post(url, "/v1/completions", {"prompt": [1, 2], "max_tokens": 250})
        streaming.start()
        blocking.start()
        assert streaming.started.wait(30)
        time.sleep(0.2)
        died = time.monotonic()
        killer = httpx.post(url + "/v1/completions", json={"prompt": [DIE_TOKEN], "max_tokens": 5}, timeout=30)
        assert killer.status_code == 503
        streaming.join(10)
        blocking.join(10)
        assert not streaming.is_alive() and not blocking.is_alive()

        health = []  # /health while the process lives: 503, with nothing of the exception
        while proc.poll() is None and time.monotonic() - died < 10:
            try:
                health.append(httpx.get(url + "/health", timeout=1))
            except httpx.HTTPError:
                pass
            time.sleep(0.05)
        rc = proc.wait(10)
        exited = time.monotonic()
        assert rc == 1
        assert exited - died < 3, exited - died  # within about a second of the death (+ process teardown)
        assert health and all(r.status_code == 503 for r in health)
        for r in health:
            assert r.json()["error"]["code"] == "engine_dead" and "secret" not in r.text.lower()

        err = error_event(streaming.lines)
        assert err["code"] == "engine_dead" and "secret" not in err["message"].lower()
        r = blocking.response
        assert r.status_code == 503 and r.json()["error"]["code"] == "engine_dead"
        assert set(r.json()["error"]) == {"message", "type", "param", "code"} and "secret" not in r.text.lower()
        assert SECRET in proc.stdout.read()  # the operator finds the cause in the log
    finally:
        stop(proc)
