"""The front end's end of the link to the engine core.

`MPClient` (the default) starts the core in a process of its own and talks to it over two ZMQ sockets
(inputs PUSH -> core, outputs core -> PULL); `InprocClient` (`PAGEPORT_ENGINE_INPROC=1`, for debugging)
drives an `EngineCore` in this process. Both answer the same calls.

If the core process dies, the next call raises `EngineDeadError`; the process is never left behind (it
exits when its parent does, and `shutdown` terminates it).
"""
from __future__ import annotations

import collections
import itertools
import logging
import os
import pickle
import shutil
import subprocess
import threading
import time
import weakref
from typing import Any, Optional

import msgspec

from pageport.core.config import EngineConfig
from pageport.core.engine_core import (AbortRequests, AddRequests, CoreOutputs, CoreRequest, EngineCore,
                                       Shutdown, Utility)

logger = logging.getLogger(__name__)


class EngineDeadError(RuntimeError):
    """The engine core is gone; every request in flight failed with this."""


def make_client(config: EngineConfig, multiprocess: Optional[bool] = None, wait: bool = True):
    """The client for `config`; `wait=False`: a core process may still be starting (`wait_ready` waits)."""
    if multiprocess is None:
        multiprocess = os.environ.get("PAGEPORT_ENGINE_INPROC", "0") in ("", "0", "false")
    if config.data_parallel_size > 1:
        if not multiprocess:
            raise ValueError(f"data_parallel_size {config.data_parallel_size} runs one engine-core process per "
                             "rank: it has no in-process mode (unset PAGEPORT_ENGINE_INPROC)")
        from pageport.core.dp_client import DPClient
        return DPClient(config)
    return MPClient(config, wait=wait) if multiprocess else InprocClient(config)


class InprocClient:
    multiprocess = False

    def __init__(self, config: EngineConfig):
        from pageport.core.pooling_core import make_engine_core  # generation or pooling, by the model
        self.core = make_engine_core(config)
        self.info = self.core.info()
        self.last_stats = self.core.stats()

    def add(self, requests: list[CoreRequest]) -> None:
        for r in requests:
            self.core.add_request(r)

    def abort(self, request_ids: list[str]) -> None:
        self.core.abort(request_ids)

    def get_outputs(self, timeout: Optional[float] = None) -> CoreOutputs:
        outputs = self.core.step() if self.core.has_work() else []
        self.last_stats = self.core.stats()
        return CoreOutputs(outputs, self.last_stats)

    def call(self, name: str, *args) -> Any:
        return getattr(self.core, name)(*args)

    def wake(self) -> None:  # get_outputs never blocks here
        pass

    def is_alive(self) -> bool:
        return True

    def shutdown(self) -> None:
        self.core.shutdown()  # tensor-parallel workers, if any


class MPClient:
    multiprocess = True

    def __init__(self, config: EngineConfig, wait: bool = True):
        """Start the core process; `wait=False` returns at once (several cores start side by side), and
        `wait_ready` then waits for it to load."""
        import zmq

        from pageport.core import core_process

        # the CLI may have started it already (core_process.start_early); else it starts now, before anything else
        core = core_process.take(config) or core_process.CoreProcess(config)
        self.proc, self._dir = core.proc, core.dir
        in_addr, out_addr = core.in_addr, core.out_addr
        self._ctx = zmq.Context()
        self._input = self._ctx.socket(zmq.PUSH)
        self._input.setsockopt(zmq.LINGER, 0)
        self._input.bind(in_addr)
        self._output = self._ctx.socket(zmq.PULL)
        self._output.setsockopt(zmq.LINGER, 0)
        self._output.bind(out_addr)
        # a wait for outputs also ends when another thread has news for the waiter (wake): no polling loop
        self._wakeup = _Wakeup()
        self._outputs_only = zmq.Poller()
        self._outputs_only.register(self._output, zmq.POLLIN)
        self._outputs_or_wake = zmq.Poller()
        self._outputs_or_wake.register(self._output, zmq.POLLIN)
        self._outputs_or_wake.register(self._wakeup.fd, zmq.POLLIN)
        self._encoder = msgspec.msgpack.Encoder()
        self._decoder = msgspec.msgpack.Decoder(CoreOutputs)
        self._calls = itertools.count()
        self._backlog: collections.deque = collections.deque()  # outputs that arrived during a utility call
        self._dead: Optional[str] = None
        self.last_stats = None

        self._finalizer = weakref.finalize(self, _stop, self.proc, self._input, self._output, self._ctx, self._dir,
                                           self._wakeup)
        self.info = None
        if wait:
            self.wait_ready()

    def wait_ready(self) -> None:
        """Wait for the core's first message: its info, or the exception its start-up raised."""
        msg = self._recv(None)
        self.last_stats = msg.stats
        status, *rest = pickle.loads(msg.ready)
        if status != "ok":
            self.shutdown()
            error, tb = rest
            logger.debug("the engine core failed to start:\n%s", tb)
            raise pickle.loads(error)  # the same exception as in-process (a bad option is a ValueError)
        self.info = rest[0]

    # transport -------------------------------------------------------------------------------------------
    def _send(self, msg) -> None:
        self._check()
        self._input.send(self._encoder.encode(msg), copy=False)

    def _check(self) -> None:
        if self._dead is None and self.proc.poll() is not None:
            self._dead = f"the engine core process exited (code {self.proc.returncode})"
        if self._dead is not None:
            raise EngineDeadError(self._dead)

    def _recv(self, timeout: Optional[float]) -> Optional[CoreOutputs]:
        """The next message; None after `timeout` seconds or on `wake()` (None: wait for ever, watching the
        process, deaf to wakes)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        poller = self._outputs_only if timeout is None else self._outputs_or_wake
        while True:
            wait = 100 if deadline is None else max(0, min(100, int((deadline - time.monotonic()) * 1000)))
            events = dict(poller.poll(wait))
            if self._output in events:
                return self._decoder.decode(self._output.recv(copy=False).buffer)
            if self._wakeup.fd in events:
                self._wakeup.clear()
                return None
            if self.proc.poll() is not None:
                self._check()
            if deadline is not None and time.monotonic() >= deadline:
                return None

    def take_nowait(self) -> Optional[CoreOutputs]:
        """An output message that is already here, or None (never waits)."""
        if self._backlog:
            msg = self._backlog.popleft()
        elif self._output.poll(0):
            msg = self._decoder.decode(self._output.recv(copy=False).buffer)
        else:
            self._check()
            return None
        if msg.stats is not None:
            self.last_stats = msg.stats
        return msg

    def wake(self) -> None:
        """End a `get_outputs` wait in progress (or the next one) early; callable from any thread."""
        self._wakeup.set()

    # calls ---------------------------------------------------------------------------------------------------
    def add(self, requests: list[CoreRequest]) -> None:
        self._send(AddRequests(requests))

    def abort(self, request_ids: list[str]) -> None:
        if request_ids and self.is_alive():
            self._send(AbortRequests(list(request_ids)))

    def get_outputs(self, timeout: Optional[float] = None) -> CoreOutputs:
        """The core's next outputs (an empty CoreOutputs after `timeout` seconds without any)."""
        msg = self._backlog.popleft() if self._backlog else self._recv(timeout)
        if msg is None:
            return CoreOutputs()
        if msg.stats is not None:
            self.last_stats = msg.stats
        return msg

    def call(self, name: str, *args) -> Any:
        """Run a core utility (in order with the requests sent before it) and wait for its answer."""
        call_id = next(self._calls)
        self._send(Utility(call_id, name, list(args)))
        while True:
            msg = self._recv(None)
            if msg.call_id == call_id:
                if msg.stats is not None:
                    self.last_stats = msg.stats
                return msg.result
            self._backlog.append(msg)

    def is_alive(self) -> bool:
        return self._dead is None and self.proc.poll() is None

    def shutdown(self) -> None:
        self._finalizer()


class _Wakeup:
    """A pipe that a poller watches: `set` from any thread, `clear` by the waiter. Closed under its lock, so a late
    `set` never writes to a file descriptor number that the process has since reused."""

    def __init__(self):
        self.fd, self._w = os.pipe()
        os.set_blocking(self.fd, False)
        os.set_blocking(self._w, False)
        self._lock = threading.Lock()
        self._closed = False

    def set(self) -> None:
        with self._lock:
            if not self._closed:
                try:
                    os.write(self._w, b"\0")
                except BlockingIOError:  # the pipe is full: a wake is pending anyway
                    pass

    def clear(self) -> None:
        try:
            while os.read(self.fd, 4096):
                pass
        except BlockingIOError:
            pass

    def close(self) -> None:
        with self._lock:
            if not self._closed:
                self._closed = True
                os.close(self.fd)
                os.close(self._w)


def _stop(proc: subprocess.Popen, input_sock, output_sock, ctx, tmpdir, wakeup: _Wakeup) -> None:
    try:
        if proc.poll() is None:
            try:
                input_sock.send(msgspec.msgpack.encode(Shutdown()), flags=1)  # NOBLOCK
                proc.wait(5)
            except Exception:  # noqa: BLE001
                proc.terminate()
                try:
                    proc.wait(5)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(1)
    finally:
        # close our own sockets, then end the context: destroy() can block when run from the garbage collector
        input_sock.close(linger=0)
        output_sock.close(linger=0)
        ctx.term()
        wakeup.close()
        shutil.rmtree(tmpdir, ignore_errors=True)
