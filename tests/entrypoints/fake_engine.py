"""A model-free stand-in for AsyncLLMEngine, with only what the server uses: each request yields one token ("t",
id 1) per completion every `step_time` seconds; `die()` kills it as a crashed engine loop would. Run as a script
(`python fake_engine.py PORT [serve flags]`) it is `pageport serve` over this engine, which dies when a prompt
holds DIE_TOKEN."""
from __future__ import annotations

import asyncio
import sys
from types import SimpleNamespace

from pageport.core.async_engine import EngineDeadError
from pageport.core.outputs import CompletionOutput, RequestOutput

DIE_TOKEN = 666
SECRET = "simulated device failure in /secret/path"


class FakeStream:
    def __init__(self, engine: "FakeAsyncEngine", request_id: str, prompt_ids: list[int], params):
        self.engine, self.request_id, self.prompt_ids, self.params = engine, request_id, prompt_ids, params
        self.finished = False
        self.generated = 0

    def __aiter__(self):
        return self

    async def __anext__(self) -> RequestOutput:
        if self.finished:
            raise StopAsyncIteration
        await asyncio.sleep(self.engine.step_time)
        if self.engine.dead_error is not None:
            self.finished = True
            raise EngineDeadError(f"the engine loop died: {self.engine.dead_error!r}")
        self.generated += 1
        done = self.generated >= self.params.max_tokens
        self.finished = done
        outs = [CompletionOutput(i, "t", [1], finish_reason="length" if done else None) for i in range(self.params.n)]
        return RequestOutput(self.request_id, None, self.prompt_ids, outs, done)

    def abort(self) -> None:
        self.finished = True
        self.engine.aborted.append(self.request_id)


class FakeAsyncEngine:
    def __init__(self, step_time: float = 0.02, max_model_len: int = 256):
        self.config = SimpleNamespace(model="fake", max_model_len=max_model_len, max_logprobs=20)
        self.tokenizer = None
        self.step_time = step_time
        self.snapshot = SimpleNamespace(num_running=0, num_waiting=0, kv_cache_usage=0.0, prefix_cache_queries=0,
                                        prefix_cache_hits=0, num_preemptions=0, prompt_tokens=0,
                                        generation_tokens=0, finished={})
        self.observer = None
        self.dead_error = None
        self.aborted: list[str] = []

    @property
    def errored(self) -> bool:
        return self.dead_error is not None

    def die(self, error: BaseException = RuntimeError(SECRET)) -> None:
        self.dead_error = error

    async def add_request(self, prompt, params, request_id=None, *, priority=0, arrival_time=None,
                          cache_salt=None, owner=None) -> FakeStream:
        if self.dead_error is not None:
            raise EngineDeadError(f"the engine is dead: {self.dead_error!r}")
        ids = prompt["prompt_token_ids"]
        if DIE_TOKEN in ids:
            self.die()
        return FakeStream(self, request_id, ids, params)

    def abort(self, request_id: str) -> None:
        self.aborted.append(request_id)

    def shutdown(self, timeout=None) -> None:
        pass


if __name__ == "__main__":
    from pageport.entrypoints.cli import build_parser
    from pageport.entrypoints.openai.api_server import serve

    args = build_parser().parse_args(["serve", "--host", "127.0.0.1", "--port", sys.argv[1],
                                      "--uvicorn-log-level", "warning", *sys.argv[2:]])
    sys.exit(serve(FakeAsyncEngine(), args))
