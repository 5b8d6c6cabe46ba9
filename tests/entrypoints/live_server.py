"""Helpers for the server tests: a uvicorn thread on a free loopback port, waiting for an idle engine."""
from __future__ import annotations

import socket
import threading
import time

MODEL = "SmolLM2-135M-Instruct"
MAX_MODEL_LEN = 512


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerThread:
    """uvicorn serving `app` in a thread (its own event loop)."""

    def __init__(self, app):
        import uvicorn

        self.app = app
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning",
                                                    timeout_graceful_shutdown=2))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> "ServerThread":
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(10)


def all_blocks_free(engine) -> bool:
    """Every KV block is back in the pool, as the engine core last reported."""
    stats = engine.client.last_stats
    return stats is not None and stats.kv_free_blocks == stats.kv_usable_blocks


def wait_idle(engine, timeout: float = 10.0, drain: bool = False) -> bool:
    """Until the engine has no requests and every KV block is back in the pool. `drain`: read the core's news
    here (only when no AsyncLLMEngine thread runs this engine)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if drain:
            engine.step(timeout=0.02)
        if not engine.has_unfinished_requests() and all_blocks_free(engine):
            return True
        time.sleep(0.02)
    return False
