"""LLMEngine: add requests, then step() = schedule -> run model -> sample -> update."""
from __future__ import annotations

import itertools
import logging
import time
from dataclasses import dataclass, field
from typing import Optional, Union

from pageport.core.config import EngineConfig
from pageport.core.detokenizer import IncrementalDetokenizer
from pageport.core.kv_cache import KVCacheManager
from pageport.core.model_runner import ModelRunner, StepResult
from pageport.core.outputs import CompletionOutput, RequestOutput
from pageport.core.request import Request, RequestStatus
from pageport.core.sampling_params import SamplingParams
from pageport.core.scheduler import Scheduler
from pageport.platforms import resolve_platform

logger = logging.getLogger(__name__)

PromptType = Union[str, list[int], dict]


@dataclass
class _Group:
    """A user request: one child per `n`."""
    request_id: str
    prompt: Optional[str]
    prompt_token_ids: list[int]
    children: list[Request]


@dataclass
class EngineStats:
    """Counters read by the server's /metrics and by benchmarks."""
    prompt_tokens: int = 0
    generation_tokens: int = 0
    finished: dict = field(default_factory=dict)  # finish reason -> count


class LLMEngine:
    def __init__(self, config: EngineConfig):
        self.config = config
        self.platform = resolve_platform(config.device)
        config.resolve_dtype(self.platform.supported_dtypes)
        self.platform.check_config(config)
        self.platform.seed(config.seed)

        from pageport.models import load_model
        loaded = load_model(config, self.platform)
        self.model_source = loaded.source
        self.hf_config = loaded.hf_config
        self.tokenizer = loaded.tokenizer
        self.vocab_size = loaded.hf_config.vocab_size
        self.eos_token_id = self._eos_id()

        if config.max_num_batched_tokens is None:
            config.max_num_batched_tokens = 2048 if config.enable_chunked_prefill else max(
                2048, config.max_model_len)
        self.runner = ModelRunner(config, self.platform, loaded.model)
        num_blocks = self.runner.profile_num_blocks()
        capacity = (num_blocks - 1) * config.block_size
        if capacity < config.max_model_len:
            logger.warning("the KV cache holds %d tokens; max_model_len lowered from %d", capacity,
                           config.max_model_len)
            config.max_model_len = capacity
        self.runner.allocate_kv_cache(num_blocks)
        self.kv = KVCacheManager(num_blocks, config.block_size, config.enable_prefix_caching)
        self.scheduler = Scheduler(self.kv, config.max_num_seqs, config.max_num_batched_tokens,
                                   config.max_model_len, config.enable_chunked_prefill, config.scheduling_policy)
        self.groups: dict[str, _Group] = {}
        self.requests: dict[str, Request] = {}  # child id -> request
        self.stats = EngineStats()
        self._ids = itertools.count()
        self._aborted: set[str] = set()
        logger.info("%s on %s: %d KV blocks of %d tokens (%d tokens; %.1fx max_model_len %d)",
                    self.model_source, self.platform.name, num_blocks - 1, config.block_size, capacity,
                    capacity / config.max_model_len, config.max_model_len)

    def _eos_id(self) -> Optional[int]:
        eos = getattr(self.hf_config, "eos_token_id", None)
        if isinstance(eos, list):
            eos = eos[0] if eos else None
        if eos is None and self.tokenizer is not None:
            eos = self.tokenizer.eos_token_id
        return eos

    # requests ------------------------------------------------------------------------------
    def tokenize(self, prompt: PromptType) -> tuple[Optional[str], list[int]]:
        if isinstance(prompt, dict):
            if "prompt_token_ids" in prompt:
                return prompt.get("prompt"), list(prompt["prompt_token_ids"])
            prompt = prompt.get("prompt")
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("this model has no tokenizer: pass prompt token ids")
            return prompt, self.tokenizer.encode(prompt)
        if isinstance(prompt, (list, tuple)) and all(isinstance(t, int) for t in prompt):
            return None, list(prompt)
        raise ValueError(f"a prompt must be a string or a list of token ids, got {type(prompt).__name__}")

    def _validate(self, token_ids: list[int], params: SamplingParams) -> None:
        if not token_ids:
            raise ValueError("the prompt is empty: give at least one token")
        bad = next((t for t in token_ids if not 0 <= t < self.vocab_size), None)
        if bad is not None:
            raise ValueError(f"token id {bad} is out of the vocabulary [0, {self.vocab_size})")
        if len(token_ids) >= self.config.max_model_len:
            raise ValueError(f"the prompt has {len(token_ids)} tokens, but max_model_len is "
                             f"{self.config.max_model_len} (at least one token must remain for the output)")
        for name in ("logprobs", "prompt_logprobs"):
            k = getattr(params, name)
            if k is not None and k > self.config.max_logprobs:
                raise ValueError(f"{name}={k} is more than max_logprobs={self.config.max_logprobs}")
        if params.logit_bias and not all(0 <= t < self.vocab_size for t in params.logit_bias):
            raise ValueError(f"logit_bias names a token id outside [0, {self.vocab_size})")

    def add_request(self, request_id: Optional[str], prompt: PromptType, params: SamplingParams,
                    priority: int = 0, arrival_time: Optional[float] = None,
                    cache_salt: Optional[str] = None) -> str:
        """Queue a request; raises ValueError (and queues nothing) when it is invalid."""
        request_id = str(next(self._ids)) if request_id is None else request_id
        if request_id in self.groups:
            raise ValueError(f"request id {request_id!r} is already in use")
        text, token_ids = self.tokenize(prompt)
        self._validate(token_ids, params)
        arrival = time.monotonic() if arrival_time is None else arrival_time
        children = []
        for i in range(params.n):
            p = params if params.n == 1 else params.clone(
                n=1, seed=None if params.seed is None else params.seed + i,
                prompt_logprobs=params.prompt_logprobs if i == 0 else None)
            child = Request(request_id if params.n == 1 else f"{request_id}#{i}", token_ids, p,
                            self.eos_token_id, text, priority, arrival, cache_salt)
            child.index = i
            child.detokenizer = IncrementalDetokenizer(self.tokenizer if p.detokenize else None, p, token_ids)
            if i > 0 and self.config.enable_prefix_caching:
                child.gate = children[0]  # share the first child's prompt blocks
            children.append(child)
        group = _Group(request_id, text, token_ids, children)
        self.groups[request_id] = group
        for child in children:
            child.group = group
            self.requests[child.request_id] = child
            self.scheduler.add(child)
        return request_id

    def abort_request(self, request_ids) -> None:
        if isinstance(request_ids, str):
            request_ids = [request_ids]
        for rid in request_ids:
            group = self.groups.get(rid)
            for child in (group.children if group else []):
                if not child.is_finished:
                    self._finish(child, RequestStatus.FINISHED_ABORTED)
                    self._aborted.add(rid)

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished()

    def get_num_unfinished_requests(self) -> int:
        return len(self.scheduler.waiting) + len(self.scheduler.running)

    # the step ----------------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        sched = self.scheduler.schedule()
        touched: dict[str, _Group] = {}
        for victim in sched.preempted:
            logger.debug("preempted %s", victim.request_id)
        if sched:
            results = self.runner.execute(sched, self.kv)
            now = time.monotonic()
            for s, res in zip(sched.scheduled, results):
                self._update(s.request, s.num_tokens, res, now)
                touched[s.request.group.request_id] = s.request.group
        for rid in self._aborted:  # aborted groups report once too
            if rid in self.groups:
                touched[rid] = self.groups[rid]
        self._aborted.clear()
        return [self._output(g) for g in touched.values()]

    def _update(self, req: Request, num_tokens: int, res: StepResult, now: float) -> None:
        req.num_computed_tokens += num_tokens
        if res.prompt_logprobs:
            req.prompt_logprobs.extend(res.prompt_logprobs)
        if req.num_computed_tokens >= req.num_prompt_tokens and not req.prefill_done:
            req.prefill_done = True
            self.stats.prompt_tokens += req.num_prompt_tokens
        if res.token_id is None or req.is_finished:
            return
        token = res.token_id
        req.append_token(token)
        self.stats.generation_tokens += 1
        req.cumulative_logprob += res.logprob
        if req.logprobs is not None:
            for tid, lp in res.logprobs.items():
                lp.decoded_token = req.detokenizer.decode_token(tid)
            req.logprobs.append(res.logprobs)
        if req.first_token_time is None:
            req.first_token_time = now
        req.last_token_time = now
        stop_str = req.detokenizer.update([token], req.num_output_tokens)
        p = req.params
        if stop_str is not None:
            req.stop_reason = stop_str
            self._finish(req, RequestStatus.FINISHED_STOPPED)
        elif token in req.stop_token_ids and req.num_output_tokens >= p.min_tokens:
            req.stop_reason = None if token == self.eos_token_id and token not in p.stop_token_ids else token
            self._finish(req, RequestStatus.FINISHED_STOPPED)
        elif (p.max_tokens is not None and req.num_output_tokens >= p.max_tokens) \
                or req.num_tokens >= self.config.max_model_len:
            self._finish(req, RequestStatus.FINISHED_LENGTH)

    def _finish(self, req: Request, status: RequestStatus) -> None:
        self.scheduler.finish(req, status)
        self.stats.finished[status.value] = self.stats.finished.get(status.value, 0) + 1

    def _output(self, g: _Group) -> RequestOutput:
        outs = []
        for i, c in enumerate(g.children):
            if c.params.output_kind == "delta":
                text, start = c.detokenizer.get_delta(c.is_finished), c.num_sent_tokens
                c.num_sent_tokens = c.num_output_tokens
                token_ids = c.output_token_ids[start:]
                logprobs = c.logprobs[start:] if c.logprobs is not None else None
            else:
                text, token_ids, logprobs = c.detokenizer.output_text, c.output_token_ids, c.logprobs
            outs.append(CompletionOutput(
                index=i, text=text, token_ids=token_ids,
                cumulative_logprob=c.cumulative_logprob if c.logprobs is not None else None,
                logprobs=logprobs, finish_reason=c.status.value if c.is_finished else None,
                stop_reason=c.stop_reason))
        finished = all(c.is_finished for c in g.children)
        first = g.children[0]  # it carries the prompt logprobs
        out = RequestOutput(g.request_id, g.prompt, g.prompt_token_ids, outs, finished,
                            prompt_logprobs=first.prompt_logprobs, num_cached_tokens=first.num_cached_tokens)
        if finished:
            out.metrics = {"arrival_time": first.arrival_time,
                           "first_scheduled_time": min((c.first_scheduled_time for c in g.children
                                                        if c.first_scheduled_time), default=None),
                           "first_token_time": min((c.first_token_time for c in g.children
                                                    if c.first_token_time), default=None),
                           "last_token_time": max((c.last_token_time for c in g.children
                                                   if c.last_token_time), default=None),
                           "num_generation_tokens": sum(c.num_output_tokens for c in g.children)}
            for c in g.children:
                self.requests.pop(c.request_id, None)
            self.groups.pop(g.request_id, None)
        return out
