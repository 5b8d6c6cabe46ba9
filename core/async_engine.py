"""AsyncLLMEngine: the front end's loop on a dedicated thread, with a clean hand-off to asyncio.

Processes and threads, and what they own:

* the **engine core** (scheduler, KV cache, model runner) runs in a process of its own behind
  `LLMEngine.client`; the front end only tokenizes, detokenizes and assembles outputs.
* the **engine thread** owns the `LLMEngine` (the front end) and nothing else touches it. Its loop: take
  every pending command (add / abort / stop) from a thread-safe inbox, read the core's outputs in short
  waits while there is work, hand them to the asyncio side, publish a stats snapshot; when idle it blocks
  on the inbox, checking every 0.1 s that the core is alive.
* the **asyncio side** (one or more event loops, e.g. the HTTP server) calls `add_request` / `generate` /
  `abort`. Prompts should arrive already tokenized (`{"prompt": text, "prompt_token_ids": ids}`). Outputs
  reach each event loop in a single `loop.call_soon_threadsafe` callback per batch, so every stream wakes up
  together and the engine thread never waits for a consumer. A slow consumer gets its pending delta
  outputs merged into one.

Failure handling:

* `add_request` raises `ValueError` (invalid prompt or parameters) to its caller; nothing else is disturbed.
* a consumer that stops early (break, `aclose()`, task cancelled, client gone) aborts its own request
  (by the engine's id, never by the client's label), which returns its KV blocks to the pool.
* a failure that belongs to one request ends that stream with `RequestFailedError`; the engine goes on.
* an exception in the loop, or the core process dying, marks the engine dead (`errored`, `dead_error`):
  every pending request fails with `EngineDeadError` and new requests are refused with it; nothing hangs.
"""
from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import itertools
import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Callable, Optional

from pageport.core.client import EngineDeadError  # noqa: F401 - re-exported: the server catches it here
from pageport.core.outputs import CompletionOutput, RequestOutput
from pageport.core.sampling_params import SamplingParams

logger = logging.getLogger(__name__)


class RequestFailedError(RuntimeError):
    """This request alone failed in the engine (its parameters, its text); the engine goes on."""


@dataclass
class EngineSnapshot:
    """Engine state published by the engine thread after every step (read by /metrics without locks)."""
    num_running: int = 0
    num_waiting: int = 0
    kv_cache_usage: float = 0.0
    prefix_cache_queries: int = 0
    prefix_cache_hits: int = 0
    num_preemptions: int = 0
    prompt_tokens: int = 0
    generation_tokens: int = 0
    finished: dict = field(default_factory=dict)  # finish reason -> count
    num_steps: int = 0
    spec_decode: bool = False  # speculative decoding is configured: its counters below are published
    spec_num_drafts: int = 0
    spec_num_draft_tokens: int = 0
    spec_num_accepted_tokens: int = 0
    spec_num_emitted_tokens: int = 0
    mm_cache_queries: int = 0  # images looked up in the encoder cache
    mm_cache_hits: int = 0
    time: float = 0.0


class RequestStream:
    """One request's outputs on the asyncio side. Async-iterate it for RequestOutputs; `abort()` stops it.

    Created by `AsyncLLMEngine.add_request`. All methods run on the stream's event loop, except the
    engine thread's hand-off which goes through `loop.call_soon_threadsafe`.
    """

    def __init__(self, engine: "AsyncLLMEngine", request_id: str, params: SamplingParams,
                 loop: asyncio.AbstractEventLoop):
        self.engine = engine
        self.request_id = request_id  # the client's label
        self.engine_id: Optional[str] = None  # the engine's id, set when the engine takes the request
        self.cancelled = False
        self.params = params
        self.loop = loop
        self.finished = False  # the final output was taken by the consumer (or the stream failed)
        self._final_seen = False  # the final output arrived
        self._items: collections.deque = collections.deque()
        self._waiter: Optional[asyncio.Future] = None
        self._accepted: asyncio.Future = loop.create_future()
        # timing, engine clock (time.monotonic): per-completion time of the last token, inter-token latencies
        self._last_token_time: dict[int, float] = {}
        self.itls: list[float] = []

    # engine thread -> loop ------------------------------------------------------------------
    def _put(self, item: Any) -> None:  # RequestOutput or BaseException
        self._items.append(item)
        w = self._waiter
        if w is not None and not w.done():
            w.set_result(None)

    fail = _put  # end the stream with an error (on its loop): the consumer's next read raises it

    def _record(self, out: RequestOutput, t: float) -> None:
        if not isinstance(out, RequestOutput):
            return  # a pooling output: no tokens, no inter-token latencies
        for c in out.outputs:
            if not c.token_ids:
                continue
            prev = self._last_token_time.get(c.index)
            if prev is not None and self.params.output_kind == "delta":
                gap = (t - prev) / len(c.token_ids)
                self.itls.extend([gap] * len(c.token_ids))
            self._last_token_time[c.index] = t

    # consumer ---------------------------------------------------------------------------------
    def __aiter__(self) -> "RequestStream":
        return self

    async def __anext__(self) -> RequestOutput:
        if self.finished:
            raise StopAsyncIteration
        while not self._items:
            self._waiter = self.loop.create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        item = self._items.popleft()
        if isinstance(item, BaseException):
            self.finished = True
            raise item
        if self._items and self.params.output_kind == "delta":
            item = self._merge(item)
        elif self.params.output_kind != "delta":
            while self._items and not isinstance(self._items[0], BaseException):
                item = self._items.popleft()  # cumulative: the newest holds everything
        if item.finished:
            self.finished = True
        return item

    def _merge(self, first: RequestOutput) -> RequestOutput:
        """Fold the queued delta outputs (not errors) into one."""
        parts = [first]
        while self._items and not isinstance(self._items[0], BaseException):
            parts.append(self._items.popleft())
        if len(parts) == 1:
            return first
        last = parts[-1]
        merged: dict[int, CompletionOutput] = {}
        for p in parts:
            for c in p.outputs:
                m = merged.get(c.index)
                if m is None:
                    merged[c.index] = CompletionOutput(
                        c.index, c.text, list(c.token_ids), c.cumulative_logprob,
                        list(c.logprobs) if c.logprobs is not None else None, c.finish_reason, c.stop_reason)
                    continue
                m.text += c.text
                m.token_ids.extend(c.token_ids)
                if c.logprobs is not None:
                    m.logprobs = (m.logprobs or []) + list(c.logprobs)
                m.cumulative_logprob = c.cumulative_logprob
                m.finish_reason, m.stop_reason = c.finish_reason, c.stop_reason
        return RequestOutput(last.request_id, last.prompt, last.prompt_token_ids,
                             [merged[i] for i in sorted(merged)], last.finished,
                             prompt_logprobs=last.prompt_logprobs, num_cached_tokens=last.num_cached_tokens,
                             metrics=last.metrics)

    def abort(self) -> None:
        """Stop this request (idempotent); its KV blocks go back to the pool."""
        if not self._final_seen:
            self.engine._abort_stream(self)
        self.finished = True


_STOP = object()


class AsyncLLMEngine:
    """Wraps an `LLMEngine`; see the module docstring. `AsyncLLMEngine.from_config(config)` builds both."""

    def __init__(self, engine, *, start: bool = True,
                 observer: Optional[Callable[[RequestOutput, list[float]], None]] = None):
        self.engine = engine
        self.tokenizer = engine.tokenizer
        self.config = engine.config
        self.observer = observer  # called on the consumer's loop with every finished output + its ITLs
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._lock = threading.Lock()  # orders "is the engine dead?" against putting into the inbox
        self._streams: dict[str, RequestStream] = {}  # engine thread only
        self._dead: Optional[BaseException] = None
        self._stopped = False
        self._owns_engine = False
        self._ids = itertools.count()
        self.snapshot = EngineSnapshot()
        self._thread: Optional[threading.Thread] = None
        self._publish(0)
        if start:
            self.start()

    @classmethod
    def from_config(cls, config, **kwargs) -> "AsyncLLMEngine":
        from pageport.core.engine import LLMEngine
        engine = cls(LLMEngine(config), start=False, **kwargs)
        engine._owns_engine = True  # its shutdown stops the engine core too
        engine.start()
        return engine

    # lifecycle ------------------------------------------------------------------------------------
    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="pageport-engine", daemon=True)
            self._thread.start()

    def shutdown(self, timeout: Optional[float] = 30.0) -> None:
        """Stop the engine thread (pending requests are aborted and their streams fail)."""
        with self._lock:
            self._stopped = True
            self._inbox.put((_STOP,))
        self._wake()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout)

    @property
    def is_running(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and not self.errored

    @property
    def errored(self) -> bool:
        return self._dead is not None or not self._core_alive()

    def _core_alive(self) -> bool:
        client = getattr(self.engine, "client", None)
        return client is None or self._stopped or client.is_alive()

    @property
    def dead_error(self) -> Optional[BaseException]:
        return self._dead

    # requests ------------------------------------------------------------------------------------
    def _send(self, cmd: tuple) -> None:
        with self._lock:
            if self._dead is not None:
                raise EngineDeadError(f"the engine is dead: {self._dead!r}")
            if self._stopped:
                raise EngineDeadError("the engine is shut down")
            self._inbox.put(cmd)
        self._wake()

    def _wake(self) -> None:  # the engine thread may be waiting for the core's outputs: let it take the command
        wake = getattr(getattr(self.engine, "client", None), "wake", None)
        if wake is not None:
            wake()

    async def add_request(self, prompt, params: SamplingParams, request_id: Optional[str] = None, *,
                          priority: int = 0, arrival_time: Optional[float] = None,
                          cache_salt: Optional[str] = None, owner: Optional[str] = None,
                          lora_request=None) -> RequestStream:
        """Queue a request and wait until the engine took it. Raises ValueError for an invalid request,
        EngineDeadError once the engine is dead. Iterate the returned stream for its outputs; the caller
        must iterate it to the end or call `stream.abort()` (see `generate`, which does both)."""
        request_id = f"req-{next(self._ids)}" if request_id is None else str(request_id)
        arrival_time = time.monotonic() if arrival_time is None else arrival_time
        stream = RequestStream(self, request_id, params, asyncio.get_running_loop())
        self._send(("add", stream, prompt, params, priority, arrival_time, cache_salt, owner, lora_request))
        try:
            await stream._accepted
        except asyncio.CancelledError:
            self._abort_stream(stream)  # it may be accepted after all
            raise
        return stream

    async def generate(self, prompt, params: SamplingParams, request_id: Optional[str] = None, *,
                       priority: int = 0, arrival_time: Optional[float] = None,
                       cache_salt: Optional[str] = None, lora_request=None) -> AsyncIterator[RequestOutput]:
        """Outputs of one request as they come (params.output_kind="delta" for streaming). Stopping early
        (break, aclose, cancellation) aborts the request."""
        stream = await self.add_request(prompt, params, request_id, priority=priority,
                                        arrival_time=arrival_time, cache_salt=cache_salt,
                                        lora_request=lora_request)
        try:
            async for out in stream:
                yield out
        finally:
            if not stream.finished:
                stream.abort()

    async def encode(self, prompt, pooling_params, request_id: Optional[str] = None, *, priority: int = 0,
                     arrival_time: Optional[float] = None) -> AsyncIterator:
        """A pooling request (vLLM's AsyncLLM.encode): yields its one PoolingRequestOutput."""
        async for out in self.generate(prompt, pooling_params, request_id, priority=priority,
                                       arrival_time=arrival_time):
            yield out

    # LoRA adapters, run on the engine thread (it owns the engine) -------------------------------------------
    def run_in_engine(self, fn, *args) -> concurrent.futures.Future:
        """`fn(engine, *args)` on the engine thread, between steps; its result (or exception) in the future."""
        fut: concurrent.futures.Future = concurrent.futures.Future()
        self._send(("run", fut, fn, args))
        return fut

    async def add_lora(self, lora_request) -> bool:
        """Check an adapter and keep it read in the core (ValueError if it is bad)."""
        return await asyncio.wrap_future(self.run_in_engine(lambda e, r: e.add_lora(r), lora_request))

    async def remove_lora(self, lora_id: int) -> bool:
        return await asyncio.wrap_future(self.run_in_engine(lambda e, i: e.remove_lora(i), lora_id))

    def abort(self, request_id: str) -> None:
        """Abort every request carrying this client id (thread-safe, never blocks, no-op once they finished
        or the engine is dead). A stream's own `abort()` touches that request alone."""
        try:
            self._send(("abort", request_id))
        except EngineDeadError:
            pass

    def _abort_stream(self, stream: RequestStream) -> None:
        try:
            self._send(("abort_stream", stream))
        except EngineDeadError:
            pass

    # engine thread ----------------------------------------------------------------------------------
    def _run(self) -> None:
        engine = self.engine
        steps = 0
        try:
            while True:
                busy = engine.has_unfinished_requests()
                cmds = []
                while not busy:  # idle: sleep until there is something to do, watching the core
                    try:
                        cmds.append(self._inbox.get(timeout=0.1))
                        break
                    except queue.Empty:
                        if not self._core_alive():
                            raise EngineDeadError("the engine core process exited")
                        if hasattr(engine, "client"):
                            engine.step(timeout=0)  # take the core's late news (blocks freed by aborts)
                            self._publish(steps)
                while True:
                    try:
                        cmds.append(self._inbox.get_nowait())
                    except queue.Empty:
                        break
                aborted = False
                for i, cmd in enumerate(cmds):
                    kind = cmd[0]
                    if kind is _STOP:
                        self._stop(cmds[i + 1:])
                        return
                    if kind == "add":
                        self._add(*cmd[1:])
                    elif kind == "abort":
                        engine.abort_request(cmd[1])
                        aborted = True
                    elif kind == "run":
                        fut, fn, args = cmd[1:]
                        try:
                            fut.set_result(fn(engine, *args))
                        except EngineDeadError:
                            raise
                        except Exception as e:  # noqa: BLE001 - the caller's to handle
                            fut.set_exception(e)
                    elif kind == "abort_stream":
                        stream = cmd[1]
                        stream.cancelled = True
                        if stream.engine_id is not None:
                            engine.abort_request(stream.engine_id)
                            aborted = True
                if engine.has_unfinished_requests() or aborted:
                    # a new command ends the wait early (client.wake), so it is taken promptly
                    outputs = engine.step(timeout=0.1)  # an aborted group is reported once by step()
                    steps += 1
                    t = time.monotonic()
                    if outputs:
                        self._dispatch(outputs, t)
                    self._publish(steps)
        except BaseException as e:  # noqa: BLE001 - whatever killed the loop kills the engine
            logger.exception("the engine loop died")
            self._die(e)

    def _add(self, stream: RequestStream, prompt, params, priority, arrival_time, cache_salt, owner,
             lora_request) -> None:
        if stream.cancelled:
            return
        try:
            stream.engine_id = self.engine.add_request(stream.request_id, prompt, params, priority=priority,
                                                       arrival_time=arrival_time, cache_salt=cache_salt,
                                                       owner=owner, **({"lora_request": lora_request}
                                                                       if lora_request is not None else {}))
        except EngineDeadError:
            raise
        except Exception as e:  # invalid request: only its caller hears of it
            self._call(stream.loop, _resolve, stream._accepted, e)
            return
        self._streams[stream.engine_id] = stream
        self._call(stream.loop, _resolve, stream._accepted, None)

    def _dispatch(self, outputs: list[RequestOutput], t: float) -> None:
        by_loop: dict[asyncio.AbstractEventLoop, list] = {}
        for out in outputs:
            stream = self._streams.get(out.engine_request_id)
            if stream is None:
                continue
            if out.finished:
                del self._streams[out.engine_request_id]
            by_loop.setdefault(stream.loop, []).append((stream, out))
        for loop, items in by_loop.items():
            if not self._call(loop, self._deliver, items, t):
                self.engine.abort_request([s.request_id for s, _ in items])  # that loop is gone

    def _deliver(self, items: list, t: float) -> None:  # on the consumer's loop
        for stream, out in items:
            stream._record(out, t)
            stream._put(out if out.error is None else RequestFailedError(out.error))
            if out.finished:
                stream._final_seen = True
                if self.observer is not None:
                    try:
                        self.observer(out, stream.itls)
                    except Exception:  # metrics must never break a request
                        logger.exception("the output observer failed")

    @staticmethod
    def _call(loop: asyncio.AbstractEventLoop, fn, *args) -> bool:
        try:
            loop.call_soon_threadsafe(fn, *args)
            return True
        except RuntimeError:  # the loop is closed
            return False

    def _publish(self, steps: int) -> None:
        e = self.engine
        core = getattr(getattr(e, "client", None), "last_stats", None)
        if core is None:  # an engine without a core (tests' fakes)
            return
        self.snapshot = EngineSnapshot(
            num_running=core.num_running, num_waiting=core.num_waiting, kv_cache_usage=core.kv_cache_usage,
            prefix_cache_queries=core.prefix_cache_queries, prefix_cache_hits=core.prefix_cache_hits,
            num_preemptions=core.num_preemptions, prompt_tokens=core.prompt_tokens,
            generation_tokens=core.generation_tokens, finished=dict(e.stats.finished), num_steps=core.num_steps,
            time=time.monotonic(),
            spec_decode=getattr(getattr(e, "config", None), "speculative_config", None) is not None,
            spec_num_drafts=core.spec_num_drafts, spec_num_draft_tokens=core.spec_num_draft_tokens,
            spec_num_accepted_tokens=core.spec_num_accepted_tokens,
            spec_num_emitted_tokens=core.spec_num_emitted_tokens,
            mm_cache_queries=core.mm_cache_queries, mm_cache_hits=core.mm_cache_hits)

    def _stop(self, leftover: list) -> None:
        """Shut down: abort what is in flight (its blocks go back), fail every waiting caller."""
        error = EngineDeadError("the engine was shut down")
        for cmd in leftover:
            _fail_command(self, cmd, error)
        if self._streams:
            try:
                self.engine.abort_request(list(self._streams))
                self.engine.step(timeout=0)  # reports the aborted groups and forgets them
            except EngineDeadError:
                pass
        self._fail_all(error)
        self._publish(self.snapshot.num_steps)
        if self._owns_engine:
            self.engine.shutdown()

    def _fail_all(self, error: BaseException) -> None:
        streams, self._streams = self._streams, {}
        while True:  # commands that raced in: fail their adds
            try:
                cmd = self._inbox.get_nowait()
            except queue.Empty:
                break
            _fail_command(self, cmd, error)
        for stream in streams.values():
            self._call(stream.loop, stream._put, error)

    def _die(self, exc: BaseException) -> None:
        with self._lock:
            self._dead = exc
            self._fail_all(EngineDeadError(f"the engine loop died: {exc!r}"))


def _fail_command(engine: AsyncLLMEngine, cmd: tuple, error: BaseException) -> None:
    """A command the engine thread will never take: its caller hears why."""
    if cmd[0] == "add":
        engine._call(cmd[1].loop, _resolve, cmd[1]._accepted, error)
    elif cmd[0] == "run" and not cmd[1].done():
        cmd[1].set_exception(error)


def _resolve(fut: asyncio.Future, error: Optional[BaseException]) -> None:
    if fut.done():
        return
    if error is None:
        fut.set_result(None)
    else:
        fut.set_exception(error)
