"""Continuous batching without phases: every step gives each request the tokens it still needs.

Running requests go first, then waiting ones while the token budget, the sequence limit
and the KV blocks last. Long prompts are chunked. When blocks run out, the lowest-priority
(FCFS: newest) running request is preempted by recompute: its blocks are freed and it is
re-queued first; prefix caching usually brings most of them back.

Seats are shared fairly among owners (a client request that fanned out into many sequences is one
owner): waiting requests whose owner holds no seat are admitted first, and when every seat is taken
while such a request waits, an owner holding more than half of the seats gives one up (preempted).

With asynchronous scheduling a request may have a token in flight (`num_pending`): it is planned for
as if known, and a request whose pending tokens already reach its length limit is not scheduled.
"""
from __future__ import annotations

import bisect
import collections
import time
from dataclasses import dataclass, field
from typing import Optional

from pageport.core.kv_cache import KVCacheManager
from pageport.core.request import Request, RequestStatus


class ScheduledRequest:
    __slots__ = ("request", "num_tokens", "samples", "spec_token_ids")

    def __init__(self, request: Request, num_tokens: int, samples: Optional[bool] = None,
                 spec_token_ids: list[int] = ()):
        self.request = request
        self.num_tokens = num_tokens  # tokens computed this step, starting at request.num_computed_tokens
        self.spec_token_ids = spec_token_ids  # proposed tokens verified this step: the last len() of num_tokens
        # this step reaches the end of the known (and pending) tokens, so its last logits give a new token
        self.samples = (request.num_computed_tokens + num_tokens == request.num_total_tokens
                        if samples is None else samples)


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
                 max_model_len: int, enable_chunked_prefill: bool = True, policy: str = "fcfs",
                 fair: bool = True):
        self.kv = kv
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_model_len = max_model_len
        self.chunked = enable_chunked_prefill
        self.policy = policy
        self.fair = fair
        self.waiting: list[Request] = []
        self.running: list[Request] = []
        self.num_preemptions = 0
        self.max_loras = 0  # > 0: at most this many distinct LoRA adapters in the running set (the model's slots)

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
        req.num_computed_tokens = req.num_draft_computed = 0
        req.num_preemptions += 1
        self.num_preemptions += 1
        self._requeue_first(req)

    def _at_limit(self, req: Request) -> bool:
        """Its pending tokens already end it (max_tokens or the context): wait for them to land."""
        total = req.num_total_tokens
        mt = req.params.max_tokens
        return req.num_pending > 0 and (total >= self.max_model_len
                                        or (mt is not None and total - req.num_prompt_tokens >= mt))

    def _fair_share(self, out: SchedulerOutput) -> None:
        """Every seat is taken and a request of a seatless owner waits: the owner holding the most seats
        (more than half) gives up its newest one."""
        seated = collections.Counter(r.owner for r in self.running)
        if not any(seated[w.owner] == 0 and w.num_pending == 0 for w in self.waiting[:64]):
            return
        owner, held = seated.most_common(1)[0]
        if held <= self.max_num_seqs // 2:
            return
        victim = next(r for r in reversed(self.running) if r.owner == owner)
        self.running.remove(victim)
        self._preempt(victim)
        out.preempted.append(victim)

    def _admission_order(self) -> list[int]:
        """Indices into `waiting`: owners without a seat first (fair), each tier in queue order."""
        if not self.fair or self.policy == "priority" or not self.running:
            return list(range(len(self.waiting)))
        seated = {r.owner for r in self.running}
        first = [j for j, w in enumerate(self.waiting) if w.owner not in seated]
        if len(first) == len(self.waiting):
            return first
        return first + [j for j, w in enumerate(self.waiting) if w.owner in seated]

    def schedule(self, busy: Optional[set] = None, max_rows: Optional[int] = None) -> SchedulerOutput:
        """The next step. Pipeline parallelism keeps several steps in flight: `busy` holds the requests in them,
        which sit this step out, and `max_rows` splits the running set into micro-batches."""
        out = SchedulerOutput()
        if self.fair and len(self.running) >= self.max_num_seqs and self.waiting:
            self._fair_share(out)
        budget = self.max_num_batched_tokens
        short = False  # blocks ran out
        i = 0
        running, allocate, scheduled = self.running, self.kv.allocate_slots, out.scheduled
        rows = max_rows or self.max_num_seqs
        while i < len(running) and budget > 0 and len(scheduled) < rows:  # per running request: keep this lean
            req = running[i]
            if (req.num_pending and self._at_limit(req)) or (busy and req in busy):
                i += 1
                continue
            total = len(req.token_ids) + req.num_pending
            n = total - req.num_computed_tokens
            if req.spec_token_ids and n == 1:  # speculative decoding: verify the proposals in the same step
                spec = req.spec_token_ids[:budget - n]
                if spec and allocate(req, n + len(spec)):
                    scheduled.append(ScheduledRequest(req, n + len(spec), True, spec))
                    budget -= n + len(spec)
                    i += 1
                    continue
            if n > budget:
                n = budget
            while not allocate(req, n):
                short = True
                victim = self._preempt_victim(i)
                self._preempt(victim)
                out.preempted.append(victim)
                if victim is req:
                    break
            else:
                scheduled.append(ScheduledRequest(req, n, req.num_computed_tokens + n == total))
                budget -= n
                i += 1
        if short:  # nothing new joins a step that had to preempt for blocks
            return out

        now = time.monotonic()
        admitted: list[int] = []
        adapters = None  # the running set's LoRA adapters, gathered when a waiting request has one
        for j in (self._admission_order() if budget > 0 and len(self.running) < self.max_num_seqs else ()):
            if budget <= 0 or len(self.running) >= self.max_num_seqs or len(scheduled) >= rows:
                break
            req = self.waiting[j]
            if req.num_pending or (req.gate is not None and not (req.gate.prefill_done or req.gate.is_finished)):
                continue  # its last token is still in flight / n > 1: wait for the first sibling's prompt blocks
            if req.lora_id and self.max_loras:
                if adapters is None:
                    adapters = {r.lora_id for r in self.running if r.lora_id}
                if req.lora_id not in adapters and len(adapters) >= self.max_loras:
                    continue  # every slot is taken by other adapters: wait for one to come free
            computed, num_hit = self.kv.get_computed_blocks(req)
            n = req.num_total_tokens - num_hit
            if not self.chunked and n > budget:
                break
            n = min(n, budget)
            if not self.kv.allocate_slots(req, n, computed):
                break
            admitted.append(j)
            if req.num_preemptions == 0:
                req.num_cached_tokens = num_hit
            req.num_computed_tokens = num_hit
            req.status = RequestStatus.RUNNING
            if req.first_scheduled_time is None:
                req.first_scheduled_time = now
            self.running.append(req)
            if adapters is not None and req.lora_id:
                adapters.add(req.lora_id)
            out.scheduled.append(ScheduledRequest(req, n))
            budget -= n
        if admitted:
            gone = set(admitted)
            self.waiting = [w for j, w in enumerate(self.waiting) if j not in gone]
        return out
