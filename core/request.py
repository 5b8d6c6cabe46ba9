"""A request's state as it moves through the scheduler, the KV cache and the sampler."""
from __future__ import annotations

import enum
import time
from typing import Any, Optional

import torch

from pageport.core.outputs import Logprob
from pageport.core.sampling_params import SamplingParams


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    PREEMPTED = "preempted"
    FINISHED_STOPPED = "stop"
    FINISHED_LENGTH = "length"
    FINISHED_ABORTED = "abort"
    FINISHED_ERROR = "error"  # a failure that belongs to this request alone

    __hash__ = object.__hash__  # members are singletons: Enum's own hash (of the name, in Python) costs per token

    @property
    def finished(self) -> bool:
        return self in _FINISHED


_FINISHED = frozenset({RequestStatus.FINISHED_STOPPED, RequestStatus.FINISHED_LENGTH,
                       RequestStatus.FINISHED_ABORTED, RequestStatus.FINISHED_ERROR})


class Request:
    def __init__(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                 eos_token_id: Optional[int], prompt: Optional[str] = None, priority: int = 0,
                 arrival_time: Optional[float] = None, cache_salt: Optional[str] = None,
                 owner: Optional[str] = None):
        self.request_id = request_id  # the engine's own id, never a client's
        self.owner = owner if owner is not None else request_id  # fair scheduling shares seats among owners
        self.prompt = prompt
        self.prompt_token_ids = list(prompt_token_ids)
        self.num_prompt_tokens = len(self.prompt_token_ids)
        self.token_ids = list(prompt_token_ids)  # prompt + output, grows as tokens are sampled
        self.params = params
        self.eos_token_id = eos_token_id
        self.priority = priority
        self.arrival_time = arrival_time if arrival_time is not None else time.monotonic()
        self.cache_salt = cache_salt
        self.mm_inputs: Optional[list] = None  # images: MultiModalInput (models/multimodal/inputs.py)
        self.mrope: Optional[tuple] = None  # M-RoPE models: the prompt's (t, h, w) positions and delta (model runner)
        self.lora_id = 0  # its LoRA adapter's id (0: the base model) and the slot it runs in this step
        self.lora_slot = 0
        self.status = RequestStatus.WAITING
        self.stop_reason: Any = None

        self.num_computed_tokens = 0  # tokens whose KV is in the cache (or being written by a step in flight)
        self.sync = False  # its sampling reads its whole history on the host (no step may be in flight)
        self.grammar = False  # constrained by a grammar (structured outputs)
        self.num_pending = 0
        self.spec_token_ids: list[int] = []  # proposed tokens for its next step (speculative decoding)
        self.spec_probs: Optional[torch.Tensor] = None  # a draft model's distributions they were drawn from
        self.num_draft_computed = 0  # tokens whose KV the draft model has written (core/spec_decode/draft.py)
        self.draft_generator: Optional[torch.Generator] = None
        self.ngram_index = None  # n-gram lookup's index of token_ids (core/spec_decode/ngram.py)
        self.eagle_hidden = None  # (first position, the target's hidden states from there) for an EAGLE head
        self.spec_mask: Optional[torch.Tensor] = None  # its grammar's masks at the positions a step verifies
        self.sample_index = 0  # its row among the samples of the last step it sampled in  # tokens sampled on the device whose ids have not reached the host yet
        self.num_cached_tokens = 0  # of the prompt, found by prefix caching at first admission
        self.block_hashes: list[int] = []  # chained hashes of full blocks, filled by the KV manager
        self.num_preemptions = 0
        self.prefill_done = False  # the whole prompt has been computed at least once
        self.gate: Optional[Request] = None  # n > 1: wait for this sibling's prefill to share its blocks
        self.group: Any = None  # the engine's record of the user request this one belongs to
        self.index = 0  # which of the n completions
        self.num_sent_tokens = 0  # output tokens already returned (delta outputs)

        # sampling state
        self.generator: Optional[torch.Generator] = None
        self.cumulative_logprob = 0.0
        self.logprobs: Optional[list[dict[int, Logprob]]] = [] if params.logprobs is not None else None
        self.prompt_logprobs: Optional[list[Optional[dict[int, Logprob]]]] = (
            [None] if params.prompt_logprobs is not None else None)

        # stop tokens: EOS unless ignored, plus the request's own
        self.stop_token_ids = set(params.stop_token_ids)
        if eos_token_id is not None and not params.ignore_eos:
            self.stop_token_ids.add(eos_token_id)

        # timings for metrics
        self.first_scheduled_time: Optional[float] = None
        self.first_token_time: Optional[float] = None
        self.last_token_time: Optional[float] = None

        self.detokenizer: Any = None  # set by the engine

    # sizes ------------------------------------------------------------------------
    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def num_total_tokens(self) -> int:
        """Known and pending tokens: what the scheduler plans with."""
        return len(self.token_ids) + self.num_pending

    @property
    def is_finished(self) -> bool:
        return self.status in _FINISHED

    def append_token(self, token_id: int) -> None:
        self.token_ids.append(token_id)

    def __repr__(self) -> str:
        return (f"Request({self.request_id!r}, {self.status.value}, prompt={self.num_prompt_tokens}, "
                f"output={self.num_output_tokens}, computed={self.num_computed_tokens})")
