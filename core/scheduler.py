"""Continuous batching without phases: every step gives each request the tokens it still needs.

Running requests go first, then waiting ones while the token budget, the sequence limit
and the KV blocks last. Long prompts are chunked. When blocks run out, the lowest-priority
(FCFS: newest) running request is preempted by recompute: its blocks are freed and it is
re-queued first; prefix caching usually brings most of them back.
"""
from __future__ import annotations

import bisect
import time
from dataclasses import dataclass, field
from pageport.core.kv_cache import KVCacheManager
from pageport.core.request import Request, RequestStatus


@dataclass
class ScheduledRequest:
    request: Request
    num_tokens: int  # tokens computed this step, starting at request.num_computed_tokens

    @property
    def samples(self) -> bool:
        """This step reaches the end of the known tokens, so its last logits give a new token."""
        r = self.request
        return r.num_computed_tokens + self.num_tokens == r.num_tokens


@dataclass
class SchedulerOutput:
    scheduled: list[ScheduledRequest] = field(default_factory=list)
    preempted: list[Request] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(s.num_tokens for s in self.scheduled)

    def __bool__(self) -> bool:
        return bool(self.scheduled)


class Scheduler:
    def __init__(self, kv: KVCacheManager, max_num_seqs: int, max_num_batched_tokens: int,
                 max_model_len: int, enable_chunked_prefill: bool = True, policy: str = "fcfs"):
        self.kv = kv
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_model_len = max_model_len
        self.chunked = enable_chunked_prefill
        self.policy = policy
        self.waiting: list[Request] = []
        self.running: list[Request] = []
        self.num_preemptions = 0

    # queue -------------------------------------------------------------------------
    def _key(self, req: Request):
        return (req.priority, req.arrival_time) if self.policy == "priority" else (0, 0)

    def add(self, req: Request) -> None:
        req.status = RequestStatus.WAITING
        if self.policy == "priority":
            bisect.insort(self.waiting, req, key=self._key)
        else:
            self.waiting.append(req)

    def _requeue_first(self, req: Request) -> None:
        if self.policy == "priority":
            bisect.insort_left(self.waiting, req, key=self._key)
        else:
            self.waiting.insert(0, req)

    def finish(self, req: Request, status: RequestStatus) -> None:
        """Remove a request wherever it is and give its blocks back."""
        if req.status == RequestStatus.RUNNING:
            self.running.remove(req)
        elif not req.status.finished and req in self.waiting:
            self.waiting.remove(req)
        req.status = status
        self.kv.free(req)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    # the step ----------------------------------------------------------------------------
    def _preempt_victim(self, first: int) -> Request:
        """The request to preempt among those not yet scheduled this step (running[first:])."""
        if self.policy == "priority":
            victim = max(self.running[first:], key=self._key)
            self.running.remove(victim)
            return victim
        return self.running.pop()

    def _preempt(self, req: Request) -> None:
        self.kv.free(req)
        req.status = RequestStatus.PREEMPTED
        req.num_computed_tokens = 0
        req.num_preemptions += 1
        self.num_preemptions += 1
        self._requeue_first(req)

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.max_num_batched_tokens
        i = 0
        while i < len(self.running) and budget > 0:
            req = self.running[i]
            n = min(req.num_tokens - req.num_computed_tokens, budget)
            while not self.kv.allocate_slots(req, n):
                victim = self._preempt_victim(i)
                self._preempt(victim)
                out.preempted.append(victim)
                if victim is req:
                    break
            else:
                out.scheduled.append(ScheduledRequest(req, n))
                budget -= n
                i += 1
        if out.preempted:  # nothing new joins a step that had to preempt
            return out

        now = time.monotonic()
        j = 0
        while j < len(self.waiting) and budget > 0 and len(self.running) < self.max_num_seqs:
            req = self.waiting[j]
            if req.gate is not None and not (req.gate.prefill_done or req.gate.is_finished):
                j += 1  # n > 1: wait until the first sibling's prompt blocks are cached
                continue
            computed, num_hit = self.kv.get_computed_blocks(req)
            n = req.num_tokens - num_hit
            if not self.chunked and n > budget:
                break
            n = min(n, budget)
            if not self.kv.allocate_slots(req, n, computed):
                break
            del self.waiting[j]
            if req.num_preemptions == 0:
                req.num_cached_tokens = num_hit
            req.num_computed_tokens = num_hit
            req.status = RequestStatus.RUNNING
            if req.first_scheduled_time is None:
                req.first_scheduled_time = now
            self.running.append(req)
            out.scheduled.append(ScheduledRequest(req, n))
            budget -= n
        return out
