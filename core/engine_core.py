"""The engine core: scheduler, KV-cache manager, model runner and sampler, driven step by step.

It knows token ids only (no tokenizer, no text) and runs in a process of its own (`run_engine_core`):
front ends send `AddRequests` / `AbortRequests` / `Utility` messages over a ZMQ PUSH socket and read
`CoreOutputs` from a PULL socket (msgpack through msgspec; `core.client` is the other end). Two IO threads
move the messages, so the step loop never waits on a client.

Asynchronous scheduling: the core launches step N+1 before it reads step N's sampled ids, which stay on
the device and feed step N+1 there; their ids reach the host (and the front end) one step later. A request
whose pending token reaches its length limit is not scheduled again; one that sampled a stop token gets
one more step, whose token is dropped. Requests whose sampling reads their whole history on the host
(penalties) make their steps synchronous.

A failure that belongs to one request (its seed, its parameters) fails that request alone with an error
output; an exception out of a step is an engine fault and ends the process.
"""
from __future__ import annotations

import collections
import logging
import os
import pickle
import queue
import signal
import threading
import time
import traceback
from typing import Any, Optional, Union

import msgspec
import torch

from pageport.core.config import EngineConfig
from pageport.core.executor import ExecutorError, make_executor, place_rank
from pageport.core.kv_cache import KVCacheManager
from pageport.core.logits_processors import build_logits_processors
from pageport.core.logits_processors import needs_host_state as _needs_host_tokens  # bad words, processors
from pageport.core.model_runner import PendingStep, StepOutput
from pageport.core.outputs import Logprob
from pageport.core.request import _FINISHED, Request, RequestStatus
from pageport.core.sampling_params import SamplingParams
from pageport.core.scheduler import Scheduler
from pageport.models.multimodal.inputs import MultiModalInput
from pageport.platforms import resolve_platform

logger = logging.getLogger(__name__)


# messages ---------------------------------------------------------------------------------------------
class CoreRequest(msgspec.Struct, array_like=True, omit_defaults=True, gc=False):
    request_id: str  # the front end's internal id, unique
    prompt_token_ids: list[int]
    params: bytes  # pickled SamplingParams
    eos_token_id: Optional[int] = None
    arrival_time: float = 0.0
    priority: int = 0
    cache_salt: Optional[str] = None
    owner: Optional[str] = None  # requests of one owner share its fair share of seats
    gate: Optional[str] = None  # n > 1: a sibling whose prompt blocks this one waits for
    mm_inputs: Optional[list[MultiModalInput]] = None  # images, their placeholder runs and hashes
    lora: Optional[list] = None  # its LoRA adapter: [name, id, path] (core/lora.py)


class AddRequests(msgspec.Struct, tag="add", array_like=True, gc=False):
    requests: list[CoreRequest]


class AbortRequests(msgspec.Struct, tag="abort", array_like=True, gc=False):
    request_ids: list[str]


class Utility(msgspec.Struct, tag="call", array_like=True, gc=False):
    call_id: int
    name: str  # a method of EngineCore listed in UTILITIES
    args: list = []


class Shutdown(msgspec.Struct, tag="shutdown", array_like=True):
    pass


CoreInput = Union[AddRequests, AbortRequests, Utility, Shutdown]


class CoreOutput(msgspec.Struct, array_like=True, omit_defaults=True, gc=False):
    request_id: str
    new_token_ids: list[int] = []
    finish_reason: Optional[str] = None  # "stop" | "length" | "error"
    stop_reason: Optional[int] = None  # the stop token id
    logprobs: Optional[list[dict[int, Logprob]]] = None  # one per new token
    prompt_logprobs: Optional[list[dict[int, Logprob]]] = None  # this step's chunk of the prompt
    num_cached_tokens: int = -1  # sent once, with the request's first output
    first_scheduled_time: float = -1.0  # likewise (time.monotonic, the same clock in every process)
    error: Optional[str] = None
    pooled: Optional[bytes] = None  # a pooling request's output (float32, C order; core/pooling_core.py)
    pooled_shape: list[int] = []


class CoreStats(msgspec.Struct, array_like=True, gc=False):
    num_running: int = 0
    num_waiting: int = 0
    kv_cache_usage: float = 0.0
    kv_free_blocks: int = 0
    kv_usable_blocks: int = 0
    prefix_cache_queries: int = 0
    prefix_cache_hits: int = 0
    num_preemptions: int = 0
    prompt_tokens: int = 0
    generation_tokens: int = 0
    num_steps: int = 0
    # where the steps' time went (seconds, summed): preparing and launching, waiting for the device,
    # turning samples into outputs
    time_launch: float = 0.0
    time_wait: float = 0.0
    time_update: float = 0.0
    time_device: float = 0.0  # device time between a step's first launch and its sample (when profiling)
    # speculative decoding (vLLM's vllm:spec_decode_*): proposals verified, their tokens, those accepted,
    # tokens emitted by the steps that verified proposals
    spec_num_drafts: int = 0
    spec_num_draft_tokens: int = 0
    spec_num_accepted_tokens: int = 0
    spec_num_emitted_tokens: int = 0
    # the encoder cache of a vision-language model (vLLM's vllm:mm_cache_*): image lookups (one per prompt chunk
    # holding image tokens), those found there
    mm_cache_queries: int = 0
    mm_cache_hits: int = 0


class CoreOutputs(msgspec.Struct, array_like=True, omit_defaults=True, gc=False):
    outputs: list[CoreOutput] = []
    stats: Optional[CoreStats] = None
    call_id: int = -1  # a Utility's answer
    result: Any = None
    ready: Optional[bytes] = None  # the first message: pickled core info, or a start-up error


UTILITIES = ("stats", "reset_prefix_cache", "profile", "replay_ms", "graph_replays", "add_lora", "remove_lora")


# the core -------------------------------------------------------------------------------------------------
class EngineCore:
    def __init__(self, config: EngineConfig):
        t0 = time.perf_counter()
        self.config = config
        self.platform = resolve_platform(config.device)
        config.resolve_dtype(self.platform.supported_dtypes)
        self.platform.check_config(config)
        place_rank(config, self.platform)
        self.platform.seed(config.seed)

        # uni: the model runner here; mp: this process is rank 0 of a tensor-parallel group (core/executor/)
        self.executor = make_executor(config, self.platform)
        t_load = time.perf_counter()
        self.loaded = loaded = self.executor.loaded
        self.runner = self.executor.runner  # rank 0's: its sampler, logits hook and graphs are the core's
        # custom logits processors (LLM(logits_processors=[...])): the sampler drives them every step
        self.runner.sampler.logits_processors = build_logits_processors(config, self.platform.device)
        sc = config.speculative_config
        self.drafter = None  # speculative decoding with a draft model: its KV cache shares the block pool
        if sc is not None and sc["method"] in ("draft_model", "eagle", "eagle3"):
            if self.executor.world_size > 1:
                raise ValueError("speculative decoding with a draft model does not run with tensor parallelism yet")
            if sc["method"] in ("eagle", "eagle3"):
                from pageport.core.spec_decode.eagle import EagleProposer
                from pageport.core.spec_decode.eagle3 import Eagle3Proposer
                self.drafter = (EagleProposer if sc["method"] == "eagle" else Eagle3Proposer)(
                    config, self.platform, sc, loaded.model, self._speculable, lambda: self._switch.on)
                self.runner.hidden_hook = self.drafter.stash
                self.runner.aux_hook = getattr(self.drafter, "mark", None)  # EAGLE-3: inner layers' states too
            else:
                from pageport.core.spec_decode.draft import DraftProposer
                self.drafter = DraftProposer(config, self.platform, sc)
            self.drafter.check_vocab(loaded.hf_config, loaded.tokenizer)
            self.runner.draft = self.drafter.runner
        num_blocks = self.executor.profile_num_blocks()
        t_profile = time.perf_counter()
        capacity = (num_blocks - 1) * config.block_size
        if capacity < config.max_model_len:
            logger.warning("the KV cache holds %d tokens; max_model_len lowered from %d", capacity,
                           config.max_model_len)
            config.max_model_len = capacity
        self.executor.allocate_kv_cache(num_blocks)
        t_kv = time.perf_counter()
        self.kv = KVCacheManager(num_blocks, config.block_size, config.enable_prefix_caching)
        self.scheduler = Scheduler(self.kv, config.max_num_seqs, config.max_num_batched_tokens,
                                   config.max_model_len, config.enable_chunked_prefill, config.scheduling_policy)
        self.requests: dict[str, Request] = {}
        self.loras = None  # LoRASlots: the adapters read on the host and written into the model's slots
        if getattr(config, "enable_lora", False):
            from pageport.core.lora import LoRASlots
            self.loras = LoRASlots(self.runner.model.lora, config.max_cpu_loras)
            self.scheduler.max_loras = config.max_loras
        self.async_scheduling = (config.async_scheduling if config.async_scheduling is not None
                                 else self.runner.async_copies)
        if self.executor.world_size > 1 and self.async_scheduling:
            # the workers take each step's input ids from the host: a token still on rank 0's device is not theirs
            logger.info("tensor parallelism: asynchronous scheduling turned off")
            self.async_scheduling = False
        self.proposer = None  # speculative decoding: proposals need every token on the host, so steps are synchronous
        self._async_plain = self.async_scheduling  # while speculation is switched off (it does not pay)
        self._switch = None
        if sc is not None:
            from pageport.core.spec_decode.switch import SpecSwitch
            self._switch = SpecSwitch(1.1 if self._async_plain else 1.02)
            self._spec_rows, self._t_lookup = 0, 0.0  # rows the last proposing tried for, and its time
            from pageport.core.spec_decode import NgramProposer
            self.proposer = (self.drafter if self.drafter is not None else
                             NgramProposer(sc["num_speculative_tokens"], sc["prompt_lookup_max"],
                                           sc["prompt_lookup_min"]))
            if self.async_scheduling:
                logger.info("speculative decoding: asynchronous scheduling turned off")
            self.async_scheduling = False
        self._init_loop_state(config)
        logger.info("%s on %s: %d KV blocks of %d tokens (%d tokens; %.1fx max_model_len %d); async "
                    "scheduling %s", loaded.source, self.platform.name, num_blocks - 1, config.block_size,
                    capacity, capacity / config.max_model_len, config.max_model_len,
                    "on" if self.async_scheduling else "off")
        if self.executor.world_size > 1:
            logger.info("world: %s", self.executor.layout())
        logger.info("start-up: load %.2f s, profile %.2f s, KV cache + graphs %.2f s", t_load - t0,
                    t_profile - t_load, t_kv - t_profile)

    def _init_loop_state(self, config: EngineConfig) -> None:
        """The step loop's state, shared with cores that build the rest differently (pooling)."""
        self._inflight: Optional[StepOutput] = None
        # pipeline parallelism: the steps in flight (micro-batches) and their requests
        pp = config.pipeline_parallel_size  # PAGEPORT_PP_MICRO_BATCHES=1: one step at a time (to compare)
        self._depth = max(1, min(pp, int(os.environ.get("PAGEPORT_PP_MICRO_BATCHES", pp))))
        self._flight: collections.deque = collections.deque()
        self._busy: set = set()
        self._prev: Optional[StepOutput] = None  # the step in flight while the next one launches
        self._early: list[CoreOutput] = []  # failures found when a request was added
        self._num_sync = 0  # running requests whose sampling needs their whole history on the host
        self._timing = False  # device events around every step (the step profile)
        self._grammars = None  # the StructuredOutputManager, made with the first constrained request
        self._compiling: list[Request] = []  # constrained requests whose grammar is not compiled yet
        self.counters = CoreStats()

    def info(self) -> dict:
        """What a front end needs to know about the model and the resolved configuration."""
        hf = self.loaded.hf_config
        eos = getattr(hf, "eos_token_id", None)
        if isinstance(eos, list):
            eos = eos[0] if eos else None
        if eos is None and self.loaded.tokenizer is not None:
            eos = self.loaded.tokenizer.eos_token_id
        # a tokenizer the core has not loaded is named instead: the front end loads it (often already has)
        tokenizer, tokenizer_dir = self.loaded.for_front_end()
        return {"config": self.config, "tokenizer": tokenizer, "tokenizer_dir": tokenizer_dir, "hf_config": hf,
                "model_source": self.loaded.source, "vocab_size": hf.vocab_size, "eos_token_id": eos,
                "platform": self.platform.name, "attention": self.runner.model.attn_backend.name,
                "graphs": self.runner.graphs is not None}

    # requests ---------------------------------------------------------------------------------------
    def add_request(self, r: CoreRequest) -> None:
        if self._switch is not None and not self.requests and not self._switch.on:
            self._switch.wake()  # an idle engine starts the next batch speculating
            self.async_scheduling = False
        try:
            params: SamplingParams = pickle.loads(r.params)
            if params.seed is not None:
                torch.Generator().manual_seed(params.seed)  # the range torch accepts, checked before any step
            req = Request(r.request_id, r.prompt_token_ids, params, r.eos_token_id, None, r.priority,
                          r.arrival_time or time.monotonic(), r.cache_salt, r.owner)
            if r.mm_inputs:  # the images' content is part of every block's cache key
                req.mm_inputs = r.mm_inputs
                req.cache_salt = (r.cache_salt, tuple(m.hash for m in r.mm_inputs))
            if r.lora:  # so is the adapter: its KV differs from the base model's
                if self.loras is None:
                    raise ValueError("a LoRA adapter was requested, but this engine runs without enable_lora")
                self.loras.acquire(r.lora[1], r.lora[2])
                req.lora_id = r.lora[1]
                req.cache_salt = (req.cache_salt, "lora", req.lora_id)
        except Exception as e:  # noqa: BLE001 - this request's own fault
            self._early.append(CoreOutput(r.request_id, finish_reason="error", error=f"{type(e).__name__}: {e}"))
            return
        if r.request_id in self.requests:
            self._release_lora(req)
            self._early.append(CoreOutput(r.request_id, finish_reason="error", error="duplicate request id"))
            return
        if r.gate is not None:
            req.gate = self.requests.get(r.gate)
        req.sync = _needs_history(params)
        req.sync = req.sync or _needs_host_tokens(params, self.runner.sampler.logits_processors is not None)
        self._num_sync += req.sync
        self.requests[r.request_id] = req
        if params.structured_outputs is not None:
            try:
                self.grammars.add_request(r.request_id, params.structured_outputs)
            except Exception as e:  # noqa: BLE001 - this request's grammar: it fails alone
                self.requests.pop(r.request_id)
                self._num_sync -= req.sync
                self._release_lora(req)
                self._early.append(CoreOutput(r.request_id, finish_reason="error",
                                              error=f"structured outputs: {type(e).__name__}: {e}"))
                return
            req.grammar = True
            self._compiling.append(req)  # the scheduler sees it once its grammar is compiled
            return
        self.scheduler.add(req)

    @property
    def grammars(self):
        if self._grammars is None:
            from pageport.core.structured_output import StructuredOutputManager
            self._grammars = StructuredOutputManager(self.loaded.tokenizer, self.loaded.hf_config.vocab_size,
                                                     getattr(self.config, "structured_outputs_backend", "xgrammar"))
            self.runner.logits_hook = self._constrain
        return self._grammars

    def _constrain(self, logits: torch.Tensor, requests: list[Request]) -> None:
        """Mask each constrained row's logits to the tokens its grammar allows next. Called between this step's
        forward pass and its sampling: the previous step's tokens are taken into the grammars first (`_prev`,
        under asynchronous scheduling), while the device runs this step's forward pass."""
        if self._prev is not None:
            self._accept_early(self._prev)
        if not any(r.grammar for r in requests):
            return
        from pageport.core.structured_output import apply_bitmask
        mask = self._grammars.bitmask([r.request_id if r.grammar else None for r in requests])
        if mask is not None:
            apply_bitmask(logits, mask)  # it moves the mask to the logits' device

    def _accept_early(self, prev: StepOutput) -> None:
        if prev.grammar_goes_on is not None:
            return
        rows = [j for j, r in enumerate(prev.requests)
                if r.grammar and r.status not in _FINISHED and not (prev.spec and j in prev.spec)]
        prev.grammar_goes_on = {}
        if rows:
            tokens = prev.token_list()  # that step's samples: ahead of this step's work on the device
            goes_on = self._grammars.advance([prev.requests[j].request_id for j in rows], [tokens[j] for j in rows])
            prev.grammar_goes_on = dict(zip(rows, goes_on))

    def _admit_compiled(self) -> list[CoreOutput]:
        failed, still = [], []
        for req in self._compiling:
            if req.is_finished:
                continue
            error = self._grammars.error(req.request_id)
            if error is not None:
                failed.append(CoreOutput(req.request_id, finish_reason="error", error=error))
                self._finish(req, RequestStatus.FINISHED_ERROR)
            elif self._grammars.is_ready(req.request_id):
                self.scheduler.add(req)  # its masks take the previous step's token in _constrain
            else:
                still.append(req)
        self._compiling = still
        return failed

    def abort(self, request_ids: list[str]) -> None:
        for rid in request_ids:
            req = self.requests.get(rid)
            if req is not None and not req.is_finished:
                self._finish(req, RequestStatus.FINISHED_ABORTED)

    def has_work(self) -> bool:
        return (self.scheduler.has_unfinished() or self._inflight is not None or bool(self._early)
                or bool(self._compiling) or bool(self._flight))

    def _finish(self, req: Request, status: RequestStatus) -> None:
        self.scheduler.finish(req, status)
        self.executor.release(req.request_id)
        self.requests.pop(req.request_id, None)
        self._num_sync -= req.sync
        if req.grammar:
            self._grammars.remove(req.request_id)
        self._release_lora(req)

    def _release_lora(self, req: Request) -> None:
        if req.lora_id:
            self.loras.release(req.lora_id)
            req.lora_id = 0

    # the step ------------------------------------------------------------------------------------------
    def step(self) -> list[CoreOutput]:
        if self._depth > 1:
            return self._step_pipelined()
        outputs, self._early = self._early, []
        if self._compiling:
            outputs += self._admit_compiled()
            if self._compiling and not self.scheduler.has_unfinished() and self._inflight is None:
                time.sleep(0.001)  # only grammars compiling: do not spin
        c = self.counters
        t0 = time.perf_counter()
        t_propose = 0.0
        if self._inflight is not None and (self._num_sync or not self.async_scheduling):
            outputs += self._process(self._inflight)  # these steps need every earlier token on the host
            self._inflight = None
        sched = self.scheduler.schedule()
        for victim in sched.preempted:
            self.executor.release(victim.request_id)
        launched = None
        if sched:
            if self.loras is not None:
                self._assign_loras(sched)
            if self.drafter is not None and self._switch.on:  # the proposals this step verifies
                t = time.perf_counter()
                self.drafter.run(sched, self.kv, self._speculable)
                t_propose += time.perf_counter() - t
            if self._grammars is not None and self.proposer is not None:
                self._check_proposals(sched)
            ev = None
            if self._timing:
                ev = (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
                ev[0].record()
            self._prev = self._inflight  # for _constrain, during this step's launch
            try:
                launched = self.executor.execute_model(sched, self.kv, self._inflight)
            finally:
                self._prev = None
            if ev is not None:
                ev[1].record()
                launched.timing = ev
            self._advance(sched)
        t1 = time.perf_counter()
        c.time_launch += t1 - t0
        prev, self._inflight = self._inflight, launched
        if prev is not None:
            outputs += self._process(prev)
        if not self.async_scheduling and self._inflight is not None:
            outputs += self._process(self._inflight)
            self._inflight = None
        if self.proposer is not None:
            if launched is not None:
                self._record_spec(launched, time.perf_counter() - t0 + self._t_lookup, t_propose + self._t_lookup)
            t = time.perf_counter()
            self._spec_rows = self._propose() if self._switch.on else 0
            self._t_lookup = time.perf_counter() - t  # counted with the step it proposes for
        return outputs

    def _advance(self, sched) -> None:
        """The scheduled requests as the launched step leaves them (their samples still to come)."""
        c = self.counters
        for s in sched.scheduled:
            r = s.request
            if s.samples:
                r.num_pending += 1
            r.num_computed_tokens += s.num_tokens
            if not r.prefill_done and r.num_computed_tokens >= r.num_prompt_tokens:
                r.prefill_done = True
                c.prompt_tokens += r.num_prompt_tokens
        c.num_steps += 1

    def _step_pipelined(self) -> list[CoreOutput]:
        """Pipeline parallelism: up to one step per stage in flight, each with requests of its own (a
        micro-batch), so the stages work at once; a step ends, sampled here on stage 0, when its hidden states
        are back from the last stage, and its requests can be scheduled again."""
        outputs, self._early = self._early, []
        flight, c = self._flight, self.counters
        t0 = time.perf_counter()
        sched = None
        if len(flight) < self._depth:
            s = self.scheduler
            rows = -(-(len(s.running) + len(s.waiting)) // self._depth)  # an equal share per micro-batch
            sched = s.schedule(busy=self._busy, max_rows=max(1, rows))
            for victim in sched.preempted:
                self.executor.release(victim.request_id)
            if sched:
                reqs = [x.request for x in sched.scheduled]
                flight.append((self.executor.execute_model(sched, self.kv), reqs))
                self._busy.update(reqs)
                self._advance(sched)
        t1 = time.perf_counter()
        c.time_launch += t1 - t0
        if flight and (len(flight) >= self._depth or not sched):
            step, reqs = flight.popleft()
            self._busy.difference_update(reqs)
            outputs += self._process(step.result())
        c.time_wait += time.perf_counter() - t1  # the wait for the stages, and the sampling after it
        return outputs

    def _record_spec(self, step: StepOutput, t_step: float, t_propose: float) -> None:
        """Feed the step to the speculation switch; follow it when it flips (core/spec_decode/switch.py)."""
        sw, was_on = self._switch, self._switch.on
        sw.record(self._spec_rows, sum(len(t) - 1 for t, _ in (step.spec or {}).values()), t_step, t_propose)
        if sw.on == was_on:
            return
        if not sw.on:
            for req in self.scheduler.running:
                req.spec_token_ids = []
            logger.info("speculative decoding off for %d steps: proposals did not pay", sw.steps_off)
        self.async_scheduling = self._async_plain and not sw.on

    def _assign_loras(self, sched) -> None:
        """Each scheduled request's adapter slot for this step (the scheduler admits at most max_loras adapters
        to the running set, so they fit). A slot that is rewritten was used by no row of this step; the copy is
        queued on the device after the step in flight, which may still read it."""
        ids = {s.request.lora_id for s in sched.scheduled if s.request.lora_id}
        slot_of = self.loras.assign(ids) if ids else {}
        for s in sched.scheduled:
            r = s.request
            r.lora_slot = slot_of[r.lora_id] if r.lora_id else 0

    def _speculable(self, req: Request) -> bool:
        """Proposals cannot change its sampling: no penalties, logprobs, bad words / allowed tokens, logit bias,
        nor custom logits processors (a grammar is checked along the proposals: `_check_proposals`)."""
        p = req.params
        return not (self.runner.sampler.logits_processors is not None or req.sync
                    or p.logprobs is not None or p.logit_bias or p.allowed_token_ids)

    def _check_proposals(self, sched) -> None:
        """A constrained row's grammar masks at each position the step verifies (the runner applies them before
        the rejection sampler, which then turns down the first proposal the grammar refuses)."""
        for s in sched.scheduled:
            r = s.request
            r.spec_mask = (self._grammars.spec_bitmask(r.request_id, s.spec_token_ids)
                           if r.grammar and s.spec_token_ids else None)

    def _propose(self) -> int:
        """Proposals for each running request that decodes next step, is speculable and has met its min_tokens.
        A draft model's are placeholders here: it makes them once the step is scheduled (`DraftProposer.run`).
        Returns how many requests it tried for (found proposals or not)."""
        k, max_len = self.proposer.k, self.config.max_model_len
        tried = 0
        for req in self.scheduler.running:
            req.spec_token_ids = []
            ids, p = req.token_ids, req.params
            if (req.num_pending or req.num_computed_tokens != len(ids) - 1 or not self._speculable(req)
                    or (p.min_tokens and len(ids) - req.num_prompt_tokens < p.min_tokens)):
                continue
            n = min(k, max_len - len(ids) - 1)  # the last proposal's position stays inside the context
            if p.max_tokens is not None:  # and the emitted tokens within max_tokens
                n = min(n, p.max_tokens - (len(ids) - req.num_prompt_tokens) - 1)
            if n > 0:
                if self.drafter is not None:
                    req.spec_token_ids = [0] * n
                else:
                    if req.ngram_index is None:
                        req.ngram_index = self.proposer.new_index()
                    req.spec_token_ids = self.proposer.propose(ids, n, req.ngram_index)
                tried += 1
        return tried

    def _process(self, out: StepOutput) -> list[CoreOutput]:
        """Turn a finished step's samples into outputs; finish the requests they end."""
        if isinstance(out, PendingStep):  # a pipelined step run one at a time
            out = out.result()
        t0 = time.perf_counter()
        tokens = out.token_list()
        t1 = time.perf_counter()
        c = self.counters
        if out.timing is not None:
            out.timing[1].synchronize()
            c.time_device += out.timing[0].elapsed_time(out.timing[1]) / 1000
        # prompt logprobs first: the request may finish with this step's token
        outputs = [CoreOutput(rid, prompt_logprobs=chunk) for rid, chunk in out.prompt_logprobs.items()]
        max_len = self.config.max_model_len
        made = 0
        spec = out.spec
        for j, req in enumerate(out.requests):  # per request: keep this loop lean
            req.num_pending -= 1
            if req.status in _FINISHED:
                continue  # ended while this step was in flight: its token is dropped
            if spec and j in spec:
                outputs.append(self._emit_spec(req, *spec[j]))
                made += len(outputs[-1].new_token_ids)
                continue
            tok = tokens[j]
            ids = req.token_ids
            ids.append(tok)
            made += 1
            num_out = len(ids) - req.num_prompt_tokens
            o = CoreOutput(req.request_id, [tok])
            if req.logprobs is not None:
                o.logprobs = [out.logprobs[j]]
            if num_out == 1:
                o.num_cached_tokens = req.num_cached_tokens
                o.first_scheduled_time = req.first_scheduled_time or -1.0
            p = req.params
            goes_on = (out.grammar_goes_on or {}).get(j) if req.grammar else True
            if goes_on is None:  # not taken early (a synchronous step)
                goes_on = self._grammars.advance([req.request_id], [tok])[0]
            if not goes_on:
                # the grammar is complete (or, never expected, refused the token): the output ends here
                o.finish_reason = "stop"
                o.stop_reason = None if tok == req.eos_token_id else tok
                self._finish(req, RequestStatus.FINISHED_STOPPED)
            elif tok in req.stop_token_ids and num_out >= p.min_tokens:
                o.finish_reason = "stop"
                o.stop_reason = None if tok == req.eos_token_id and tok not in p.stop_token_ids else tok
                self._finish(req, RequestStatus.FINISHED_STOPPED)
            elif (p.max_tokens is not None and num_out >= p.max_tokens) or len(ids) >= max_len:
                o.finish_reason = "length"
                self._finish(req, RequestStatus.FINISHED_LENGTH)
            outputs.append(o)
        c.generation_tokens += made
        c.time_wait += t1 - t0
        c.time_update += time.perf_counter() - t1
        return outputs

    def _emit_spec(self, req: Request, toks: list[int], num_draft: int) -> CoreOutput:
        """A verified step's tokens, cut at the first that ends the request (stop token, max_tokens, context);
        the KV of rejected proposals is given up (their slots are rewritten by later steps)."""
        c, p, ids = self.counters, req.params, req.token_ids
        c.spec_num_drafts += 1
        c.spec_num_draft_tokens += num_draft
        c.spec_num_accepted_tokens += len(toks) - 1
        o = CoreOutput(req.request_id, [])
        max_len = self.config.max_model_len
        status = None
        for tok in toks:
            ids.append(tok)
            o.new_token_ids.append(tok)
            num_out = len(ids) - req.num_prompt_tokens
            if num_out == 1:
                o.num_cached_tokens = req.num_cached_tokens
                o.first_scheduled_time = req.first_scheduled_time or -1.0
            if req.grammar and not self._grammars.advance([req.request_id], [tok])[0]:
                o.finish_reason = "stop"  # the grammar is complete
                o.stop_reason = None if tok == req.eos_token_id else tok
                status = RequestStatus.FINISHED_STOPPED
                break
            if tok in req.stop_token_ids and num_out >= p.min_tokens:
                o.finish_reason = "stop"
                o.stop_reason = None if tok == req.eos_token_id and tok not in p.stop_token_ids else tok
                status = RequestStatus.FINISHED_STOPPED
                break
            if (p.max_tokens is not None and num_out >= p.max_tokens) or len(ids) >= max_len:
                o.finish_reason = "length"
                status = RequestStatus.FINISHED_LENGTH
                break
        c.spec_num_emitted_tokens += len(o.new_token_ids)
        req.num_computed_tokens = len(ids) - 1  # KV up to the last accepted proposal; the new last token has none
        req.num_draft_computed = min(req.num_draft_computed, req.num_computed_tokens)  # so is the draft's
        if status is not None:
            self._finish(req, status)
        return o

    def fail_all(self, error: str) -> list[CoreOutput]:
        """Every request held here fails with `error`: the executor is gone, so nothing more can run."""
        outputs = [o for o in self._early]
        outputs += [CoreOutput(rid, finish_reason="error", error=error) for rid in self.requests]
        self._early, self._inflight = [], None
        self._flight.clear()
        self._busy.clear()
        return outputs

    def shutdown(self) -> None:
        executor = getattr(self, "executor", None)  # None when start-up failed before it was made
        if executor is not None:
            executor.shutdown()

    # utilities ------------------------------------------------------------------------------------------
    def stats(self) -> CoreStats:
        s, sched, kv = self.counters, self.scheduler, self.kv
        s.num_running, s.num_waiting = len(sched.running), len(sched.waiting)
        s.kv_cache_usage, s.kv_free_blocks, s.kv_usable_blocks = kv.usage(), kv.pool.num_free, kv.pool.num_usable
        s.prefix_cache_queries, s.prefix_cache_hits = kv.stats.queries, kv.stats.hits
        s.num_preemptions = sched.num_preemptions
        cache = getattr(self.runner, "encoder_cache", None)
        if cache is not None:
            s.mm_cache_queries, s.mm_cache_hits = cache.hits + cache.misses, cache.hits
        return s

    def reset_prefix_cache(self) -> bool:
        self.kv.reset_prefix_cache()
        return True

    def add_lora(self, name: str, lora_id: int, path: str) -> Optional[str]:
        """Read and check an adapter now (it stays on the host, in the LRU of max_cpu_loras); the error text
        if it is bad or LoRA is off, else None."""
        if self.loras is None:
            return "LoRA adapters need an engine started with enable_lora (--enable-lora)"
        try:
            self.loras.load(lora_id, path)
        except Exception as e:  # noqa: BLE001 - a bad file is the caller's error, never the core's end
            return f"LoRA adapter {name!r}: {e}"
        return None

    def remove_lora(self, lora_id: int) -> bool:
        """Forget an adapter (requests still using it finish with it first); False if it was not held."""
        if self.loras is None or (lora_id not in self.loras.host and not self.loras.users.get(lora_id)):
            return False
        self.loras.drop(lora_id)
        return True

    def profile(self, start: bool = False) -> dict:
        """The step-time counters since the last call, then zeroed; `start`: time every step on the device
        from now on (CUDA events; a benchmark brackets its run with profile(True) ... profile())."""
        c = self.counters
        out = {"steps": c.num_steps, "launch_s": c.time_launch, "wait_s": c.time_wait, "update_s": c.time_update,
               "device_s": c.time_device if self._timing else None}
        c.num_steps, c.time_launch, c.time_wait, c.time_update, c.time_device = 0, 0.0, 0.0, 0.0, 0.0
        self._timing = start and self.platform.device.type == "cuda"
        return out

    def graph_replays(self) -> dict:
        """Steps replayed from captured graphs so far, by query tokens a row ("1": decode, "1+k": verifying)."""
        return {str(q): n for q, n in getattr(self.runner.graphs, "replays", {}).items()}

    def replay_ms(self, batch: int, iters: int = 50) -> Optional[float]:
        """Median-free mean time of replaying the captured decode graph of `batch` rows alone (None: none)."""
        graphs = getattr(self.runner.graphs, "graphs", None)
        if not graphs or (batch, 1) not in graphs:
            return None
        g = graphs[batch, 1]
        for _ in range(5):
            g.replay()
        t0, t1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        t0.record()
        for _ in range(iters):
            g.replay()
        t1.record()
        t1.synchronize()
        return t0.elapsed_time(t1) / iters


def _needs_history(p: SamplingParams) -> bool:
    return p.repetition_penalty != 1.0 or p.frequency_penalty != 0.0 or p.presence_penalty != 0.0


# the process ------------------------------------------------------------------------------------------------
def main() -> None:
    """`python -c "from pageport.core.engine_core import main; main()"`, its arguments pickled on stdin."""
    import sys
    config, input_addr, output_addr, parent_pid, level, started = pickle.loads(sys.stdin.buffer.read())
    logging.basicConfig(format="%(levelname)s %(asctime)s [engine core] %(name)s: %(message)s")
    logging.getLogger("pageport").setLevel(level)
    logger.info("start-up: interpreter + imports %.2f s (from the spawn)",
                time.time() - started)
    run_engine_core(config, input_addr, output_addr, parent_pid)


def run_engine_core(config: EngineConfig, input_addr: str, output_addr: str, parent_pid: int) -> None:
    """Entry point of the engine-core process."""
    import zmq

    signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the front end decides; Ctrl-C reaches both processes
    ctx = zmq.Context()
    out_sock = ctx.socket(zmq.PUSH)
    out_sock.setsockopt(zmq.LINGER, 1000)
    out_sock.connect(output_addr)
    encoder = msgspec.msgpack.Encoder()
    try:
        from pageport.core.pooling_core import make_engine_core  # generation or pooling, by the model
        core = make_engine_core(config)
        # with the first stats: the front end knows the pool's state before any request
        out_sock.send(encoder.encode(CoreOutputs(stats=core.stats(), ready=pickle.dumps(("ok", core.info())))))
    except BaseException as e:  # noqa: BLE001 - reported to the front end, which raises it again
        try:
            error = pickle.dumps(e)
        except Exception:  # noqa: BLE001 - an exception that does not pickle: its text
            error = pickle.dumps(RuntimeError(f"{type(e).__name__}: {e}"))
        out_sock.send(encoder.encode(CoreOutputs(ready=pickle.dumps(("error", error, traceback.format_exc())))))
        out_sock.close()
        return
    if core.platform.device.type != "cpu" and "OMP_NUM_THREADS" not in os.environ:
        # the host side of a device's step is small tensors and numpy: a full OpenMP pool only spins against the
        # step loop and the front end (measured on an H200 host: 42k -> 65k output tok/s at 256 rows)
        logger.info("torch CPU threads 1 in the engine core (OMP_NUM_THREADS overrides)")
        torch.set_num_threads(1)

    inbox: queue.SimpleQueue = queue.SimpleQueue()
    outbox: queue.SimpleQueue = queue.SimpleQueue()

    def read() -> None:
        sock = ctx.socket(zmq.PULL)
        sock.connect(input_addr)
        decoder = msgspec.msgpack.Decoder(CoreInput)
        while True:
            if sock.poll(1000):
                inbox.put(decoder.decode(sock.recv(copy=False).buffer))
            elif os.getppid() != parent_pid:  # the front end is gone: so is the core
                inbox.put(Shutdown())
                return

    def write() -> None:
        while True:
            msg = outbox.get()
            if msg is None:
                return
            out_sock.send(encoder.encode(msg), copy=False)

    threading.Thread(target=read, name="core-input", daemon=True).start()
    writer = threading.Thread(target=write, name="core-output", daemon=True)
    writer.start()
    profile_path = os.environ.get("PAGEPORT_CORE_PROFILE")  # a cProfile of the step loop, written at shutdown
    prof = None
    if profile_path:
        import cProfile
        prof = cProfile.Profile()
        prof.enable()
    try:
        _loop(core, inbox, outbox)
    except BaseException:  # noqa: BLE001 - an engine fault: the front end sees the process end
        logger.exception("the engine core died")
        outbox.put(None)  # what is queued (the requests a dead worker failed) still reaches the front end
        writer.join(5)
        core.shutdown()
        os._exit(1)
    if prof is not None:
        prof.disable()
        prof.dump_stats(profile_path)
    outbox.put(None)
    writer.join(5)
    out_sock.close()
    core.shutdown()
    os._exit(0)


def _loop(core: EngineCore, inbox: queue.SimpleQueue, outbox: queue.SimpleQueue) -> None:
    while True:
        msgs = [] if core.has_work() else [inbox.get()]  # idle: sleep until there is something to do
        while True:
            try:
                msgs.append(inbox.get_nowait())
            except queue.Empty:
                break
        aborted = False
        for msg in msgs:
            if isinstance(msg, AddRequests):
                for r in msg.requests:
                    core.add_request(r)
            elif isinstance(msg, AbortRequests):
                core.abort(msg.request_ids)
                aborted = True
            elif isinstance(msg, Utility):
                result = getattr(core, msg.name)(*msg.args) if msg.name in UTILITIES else None
                outbox.put(CoreOutputs(stats=core.stats(), call_id=msg.call_id, result=result))
            elif isinstance(msg, Shutdown):
                return
        try:
            outputs = core.step() if core.has_work() else []
        except ExecutorError as e:  # a rank failed: every request fails with why, then the core ends
            outbox.put(CoreOutputs(core.fail_all(str(e)), core.stats()))
            raise
        if outputs or aborted:  # after an abort the front end hears of the blocks that came back
            outbox.put(CoreOutputs(outputs, core.stats()))
