"""Data parallelism: `data_parallel_size` engine cores behind one front end.

Each core is a process of its own (`MPClient`) with a full copy of the model on its own devices (core d's
tensor-parallel rank r on device d * tensor_parallel_size + r; on the CPU the cores share the host's threads),
its own scheduler and KV cache. `DPClient` answers the front end's calls as one client does:

- a new request goes to the core that holds its prompt's first block (the prefix cache pays there) unless that
  core is busier than the least loaded one by more than `slack` requests; otherwise to the least loaded core. The
  load is counted here, as requests are sent and finish, so it is never stale. A child of an `n > 1` request goes
  where its sibling went (it waits for the sibling's prompt blocks);
- outputs are read from all cores as they come; stats are summed over the cores;
- utilities reach every core (an adapter, a prefix-cache reset) and their answers are combined.

A core that dies is the engine's death, as with one core: the next call raises `EngineDeadError` and the front
end fails every request in flight; `shutdown` stops every core.
"""
from __future__ import annotations

import collections
import copy
import logging
import time
from typing import Any, Optional

import msgspec
import zmq

from pageport.core.client import EngineDeadError, MPClient, _Wakeup
from pageport.core.config import EngineConfig
from pageport.core.engine_core import CoreOutputs, CoreRequest, CoreStats

logger = logging.getLogger(__name__)

_AFFINITY_KEYS = 65536  # prompt prefixes remembered (least recently used forgotten first)


class Router:
    """Which core a request goes to: the one that holds its prompt's first block, unless that core has more than
    `slack` requests more in flight than the least loaded one, which gets it then."""

    def __init__(self, size: int, block_size: int, slack: int):
        self.size, self.block_size, self.slack = size, block_size, slack
        self.load = [0] * size  # requests in flight on each core
        self.owner: dict[str, int] = {}  # request id -> its core, while it runs
        self._affinity: collections.OrderedDict = collections.OrderedDict()  # prefix key -> core

    def _prefix_key(self, r: CoreRequest) -> Optional[tuple]:
        """What decides where the prefix cache can serve `r`: its first full block (with what salts the cache
        key: the cache salt, the adapter), or None for a prompt shorter than a block (nothing to reuse)."""
        if len(r.prompt_token_ids) < self.block_size:
            return None
        lora = r.lora[1] if r.lora else None
        return (r.cache_salt, lora, *r.prompt_token_ids[:self.block_size])

    def route(self, r: CoreRequest) -> int:
        if r.gate is not None and r.gate in self.owner:  # n > 1: waits for its sibling's prompt blocks
            rank = self.owner[r.gate]
        else:
            rank = min(range(self.size), key=self.load.__getitem__)
            key = self._prefix_key(r)
            if key is not None:
                home = self._affinity.pop(key, None)
                if home is not None and self.load[home] <= self.load[rank] + self.slack:
                    rank = home
                self._affinity[key] = rank
                if len(self._affinity) > _AFFINITY_KEYS:
                    self._affinity.popitem(last=False)
        self.owner[r.request_id] = rank
        self.load[rank] += 1
        return rank

    def done(self, request_id: str) -> Optional[int]:
        """The request finished (or was aborted): its core, or None if it was not in flight."""
        rank = self.owner.pop(request_id, None)
        if rank is not None:
            self.load[rank] -= 1
        return rank


class DPClient:
    multiprocess = True

    def __init__(self, config: EngineConfig):
        self.size = config.data_parallel_size
        self.clients: list[MPClient] = []
        self._wakeup = _Wakeup()
        try:
            for rank in range(self.size):  # all start side by side, then each is waited for
                rank_config = copy.copy(config)
                rank_config.data_parallel_rank = rank
                self.clients.append(MPClient(rank_config, wait=False))
            for c in self.clients:
                c.wait_ready()
        except BaseException:
            self.shutdown()
            raise
        logger.info("data parallelism: %d engine cores (pids %s), %d tensor-parallel rank(s) each", self.size,
                    ", ".join(str(c.proc.pid) for c in self.clients), config.tensor_parallel_size)
        self.info = dict(self.clients[0].info)
        self.info["data_parallel_size"] = self.size
        self._poller = zmq.Poller()
        for c in self.clients:
            self._poller.register(c._output, zmq.POLLIN)
        self._poller.register(self._wakeup.fd, zmq.POLLIN)
        self.router = Router(self.size, config.block_size, max(2, config.max_num_seqs // 8))
        self.last_stats = self._sum([c.last_stats for c in self.clients])

    def add(self, requests: list[CoreRequest]) -> None:
        batches: dict[int, list[CoreRequest]] = {}
        for r in requests:
            batches.setdefault(self.router.route(r), []).append(r)
        for rank, batch in batches.items():
            self.clients[rank].add(batch)

    def abort(self, request_ids: list[str]) -> None:
        batches: dict[int, list[str]] = {}
        for rid in request_ids:
            rank = self.router.done(rid)  # the core sends nothing for an aborted request: its seat is free now
            if rank is not None:
                batches.setdefault(rank, []).append(rid)
        for rank, ids in batches.items():
            self.clients[rank].abort(ids)

    # outputs -----------------------------------------------------------------------------------------------
    def _take(self) -> Optional[CoreOutputs]:
        msgs = [m for m in (c.take_nowait() for c in self.clients) if m is not None]
        if not msgs:
            return None
        outputs = [o for m in msgs for o in m.outputs]
        for o in outputs:
            if o.finish_reason is not None:
                self.router.done(o.request_id)
        self.last_stats = self._sum([c.last_stats for c in self.clients])
        return CoreOutputs(outputs, self.last_stats)

    def get_outputs(self, timeout: Optional[float] = None) -> CoreOutputs:
        """Whatever the cores have sent, as one message (an empty one after `timeout` seconds, or on `wake`;
        None: wait until one sends, deaf to wakes)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            msg = self._take()  # also raises EngineDeadError for a core that died
            if msg is not None:
                return msg
            wait = 100 if deadline is None else max(0, min(100, int((deadline - time.monotonic()) * 1000)))
            events = dict(self._poller.poll(wait))
            if self._wakeup.fd in events:
                self._wakeup.clear()
                if deadline is not None:
                    return self._take() or CoreOutputs()
            if deadline is not None and time.monotonic() >= deadline and not events:
                return CoreOutputs()

    def wake(self) -> None:
        self._wakeup.set()

    # utilities ---------------------------------------------------------------------------------------------
    def call(self, name: str, *args) -> Any:
        """Run a core utility on every core (in order with what each was sent before), combining the answers."""
        results = [c.call(name, *args) for c in self.clients]
        self.last_stats = self._sum([c.last_stats for c in self.clients])
        if name == "stats":
            return self._sum([r if isinstance(r, CoreStats) else msgspec.convert(r, CoreStats) for r in results])
        if name == "add_lora":  # None, or the first core's refusal (they hold the same model)
            return next((r for r in results if r is not None), None)
        if name == "remove_lora":
            return any(results)
        if name == "reset_prefix_cache":
            return all(results)
        if name == "graph_replays":
            return sum(results)
        return results[0]  # profiles and timings: core 0's stand for all

    @staticmethod
    def _sum(stats: list[Optional[CoreStats]]) -> Optional[CoreStats]:
        """The cores' counters added up; the KV-cache usage is the share of all their blocks in use."""
        stats = [s for s in stats if s is not None]
        if not stats:
            return None
        total = CoreStats()
        for field in CoreStats.__struct_fields__:
            if field != "kv_cache_usage":
                setattr(total, field, sum(getattr(s, field) for s in stats))
        usable = total.kv_usable_blocks
        total.kv_cache_usage = (sum(s.kv_cache_usage * s.kv_usable_blocks for s in stats) / usable if usable
                                else sum(s.kv_cache_usage for s in stats) / len(stats))
        return total

    def is_alive(self) -> bool:
        return all(c.is_alive() for c in self.clients)

    def shutdown(self) -> None:
        for c in self.clients:
            c.shutdown()
        self._wakeup.close()


__all__ = ["DPClient", "EngineDeadError"]
