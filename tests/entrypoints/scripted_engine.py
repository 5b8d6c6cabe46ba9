"""An engine stand-in that answers every request with a scripted text, a few characters per output, and records
the prompts and sampling params it was given: for the server's tool-calling, reasoning and structured-output
plumbing, which does not depend on what a model would write."""
from __future__ import annotations

import asyncio
from types import SimpleNamespace

from pageport.core.outputs import CompletionOutput, RequestOutput


class ScriptedStream:
    def __init__(self, engine: "ScriptedEngine", request_id: str, prompt: dict, params):
        self.engine, self.request_id, self.prompt, self.params = engine, request_id, prompt, params
        self.finished = False
        self.pos = 0

    def __aiter__(self):
        return self

    async def __anext__(self) -> RequestOutput:
        if self.finished:
            raise StopAsyncIteration
        await asyncio.sleep(0)
        text = self.engine.reply
        piece = text[self.pos:self.pos + self.engine.chunk]
        self.pos += len(piece)
        done = self.pos >= len(text)
        self.finished = done
        reason = self.engine.finish_reason if done else None
        outs = [CompletionOutput(i, piece, [1] * max(1, len(piece) // 3), finish_reason=reason)
                for i in range(self.params.n)]
        return RequestOutput(self.request_id, self.prompt.get("prompt"), self.prompt["prompt_token_ids"], outs, done)

    def abort(self) -> None:
        self.finished = True


class ScriptedEngine:
    def __init__(self, tokenizer, max_model_len: int = 2048):
        self.config = SimpleNamespace(model="scripted", max_model_len=max_model_len, max_logprobs=20)
        self.tokenizer = tokenizer
        self.snapshot = SimpleNamespace(num_running=0, num_waiting=0, kv_cache_usage=0.0, prefix_cache_queries=0,
                                        prefix_cache_hits=0, num_preemptions=0, prompt_tokens=0,
                                        generation_tokens=0, finished={})
        self.observer = None
        self.dead_error = None
        self.errored = False
        self.reply = "ok"
        self.chunk = 3
        self.finish_reason = "stop"
        self.requests: list[tuple[dict, object]] = []  # (prompt, params) as received
        self.sampling_features = {"structured_outputs", "bad_words", "allowed_token_ids"}  # passed on as given

    @property
    def last_prompt(self) -> str:
        return self.requests[-1][0]["prompt"]

    @property
    def last_params(self):
        return self.requests[-1][1]

    async def add_request(self, prompt, params, request_id=None, **kwargs) -> ScriptedStream:
        self.requests.append((prompt, params))
        return ScriptedStream(self, request_id, prompt, params)

    def abort(self, request_id: str) -> None:
        pass

    def shutdown(self, timeout=None) -> None:
        pass
