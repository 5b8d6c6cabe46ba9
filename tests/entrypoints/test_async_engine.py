"""AsyncLLMEngine's hand-off, aborts and failure handling, on a fake LLMEngine (fast, no model)."""
from __future__ import annotations

import asyncio
import threading
import time
from types import SimpleNamespace

import pytest

from pageport.core.async_engine import AsyncLLMEngine, EngineDeadError
from pageport.core.outputs import CompletionOutput, RequestOutput
from pageport.core.sampling_params import SamplingParams


class FakeEngine:
    """One token ("t") per request per step, steps of `step_time` seconds; records aborts."""

    def __init__(self, step_time: float = 0.002):
        self.config = SimpleNamespace(max_model_len=1000, max_logprobs=20)
        self.tokenizer = None
        self.step_time = step_time
        self.live: dict[str, list] = {}  # id -> [generated, max_tokens, aborted]
        self.aborted: list[str] = []
        self.threads: set = set()
        self.fail = False

    def add_request(self, rid, prompt, params, priority=0, arrival_time=None, cache_salt=None, owner=None):
        self.threads.add(threading.current_thread().name)
        ids = prompt["prompt_token_ids"] if isinstance(prompt, dict) else prompt
        if not ids:
            raise ValueError("the prompt is empty")
        if rid in self.live:
            raise ValueError("duplicate id")
        self.live[rid] = [0, params.max_tokens, False]
        return rid  # the engine's id (here the label itself: this fake refuses duplicates)

    def abort_request(self, ids):
        for rid in [ids] if isinstance(ids, str) else ids:
            if rid in self.live and not self.live[rid][2]:
                self.live[rid][2] = True
                self.aborted.append(rid)

    def has_unfinished_requests(self):
        return bool(self.live)

    def step(self, timeout=None):
        self.threads.add(threading.current_thread().name)
        if self.fail:
            raise RuntimeError("boom")
        time.sleep(self.step_time)
        outs = []
        for rid, st in list(self.live.items()):
            if st[2]:
                c = CompletionOutput(0, "", [], finish_reason="abort")
            else:
                st[0] += 1
                done = st[0] >= st[1]
                c = CompletionOutput(0, "t", [st[0]], finish_reason="length" if done else None)
            finished = c.finish_reason is not None
            outs.append(RequestOutput(rid, None, [1], [c], finished,
                                      metrics={"arrival_time": 0.0} if finished else {}, engine_request_id=rid))
            if finished:
                del self.live[rid]
        return outs


@pytest.fixture
def fake():
    eng = FakeEngine()
    aeng = AsyncLLMEngine(eng)
    yield eng, aeng
    aeng.shutdown()


def params(n_tokens=5):
    return SamplingParams(max_tokens=n_tokens, output_kind="delta")


async def collect(aeng, rid, n_tokens=5, prompt=(1, 2)):
    text, ids = "", []
    async for out in aeng.generate({"prompt_token_ids": list(prompt)}, params(n_tokens), rid):
        text += out.outputs[0].text
        ids += out.outputs[0].token_ids
        last = out
    return text, ids, last


def test_many_concurrent_requests_complete(fake):
    eng, aeng = fake

    async def main():
        return await asyncio.gather(*[collect(aeng, f"r{i}", 10 + i % 5) for i in range(50)])

    results = asyncio.run(main())
    for i, (text, ids, last) in enumerate(results):
        assert text == "t" * (10 + i % 5) and ids == list(range(1, 11 + i % 5))  # nothing lost when merged
        assert last.finished and last.outputs[0].finish_reason == "length"
    assert eng.threads == {"pageport-engine"}  # the engine is touched by its own thread only
    assert not eng.live


def test_invalid_request_raises_and_does_not_disturb(fake):
    eng, aeng = fake

    async def main():
        good = asyncio.ensure_future(collect(aeng, "good", 30))
        with pytest.raises(ValueError, match="empty"):
            await collect(aeng, "bad", prompt=())
        return await good

    text, _, _ = asyncio.run(main())
    assert text == "t" * 30 and eng.aborted == []


def test_early_break_and_cancel_abort(fake):
    eng, aeng = fake

    async def main():
        async for out in aeng.generate({"prompt_token_ids": [1]}, params(1000), "brk"):
            break  # aclose() -> GeneratorExit -> abort

        async def consume():
            async for _ in aeng.generate({"prompt_token_ids": [1]}, params(1000), "cxl"):
                pass

        t = asyncio.ensure_future(consume())
        await asyncio.sleep(0.05)
        t.cancel()
        with pytest.raises(asyncio.CancelledError):
            await t
        for _ in range(200):
            if not eng.live:
                break
            await asyncio.sleep(0.01)

    asyncio.run(main())
    assert sorted(eng.aborted) == ["brk", "cxl"] and not eng.live


def test_step_exception_kills_engine_and_fails_pending(fake):
    eng, aeng = fake

    async def main():
        pending = asyncio.ensure_future(collect(aeng, "p", 10 ** 6))
        await asyncio.sleep(0.05)
        eng.fail = True
        with pytest.raises(EngineDeadError, match="boom"):
            await asyncio.wait_for(pending, 10)
        with pytest.raises(EngineDeadError):
            await collect(aeng, "late")

    asyncio.run(main())
    assert aeng.errored and not aeng.is_running and "boom" in repr(aeng.dead_error)
    aeng.abort("p")  # harmless once dead


def test_shutdown_fails_pending_and_aborts(fake):
    eng, aeng = fake

    async def main():
        pending = asyncio.ensure_future(collect(aeng, "p", 10 ** 6))
        await asyncio.sleep(0.05)
        await asyncio.get_running_loop().run_in_executor(None, aeng.shutdown)
        with pytest.raises(EngineDeadError):
            await asyncio.wait_for(pending, 10)

    asyncio.run(main())
    assert eng.aborted == ["p"] and not eng.live


def test_two_event_loops_share_one_engine(fake):
    """Outputs reach the loop that asked (e.g. two servers on one engine)."""
    eng, aeng = fake
    results = {}

    def run(name):
        results[name] = asyncio.run(collect(aeng, name, 20))[0]

    threads = [threading.Thread(target=run, args=(f"loop{i}",)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert results == {f"loop{i}": "t" * 20 for i in range(3)}
