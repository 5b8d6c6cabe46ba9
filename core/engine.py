"""LLMEngine, the front end: tokenize and validate requests, fan n > 1 out into child requests, send them
to the engine core (`core.client`), turn its token ids into text (detokenizer, stop strings) and outputs.

Request ids: every request gets an internal id from a counter here; the id a client gives is a label
only (duplicates do not matter), and nothing the core keys by is derived from client input.
"""
from __future__ import annotations

import itertools
import logging
import pickle
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Union

import msgspec

from pageport.core.client import EngineDeadError, make_client
from pageport.core.config import EngineConfig
from pageport.core.detokenizer import IncrementalDetokenizer
from pageport.core.engine_core import CoreOutputs, CoreRequest, CoreStats
from pageport.core.outputs import CompletionOutput, RequestOutput
from pageport.core.pooling import PoolingParams, tensor_from_bytes
from pageport.core.pooling_engine import add_pooling_request, pooling_output
from pageport.core.request import _FINISHED, Request, RequestStatus
from pageport.core.sampling_params import SamplingParams, prepare_request

logger = logging.getLogger(__name__)

PromptType = Union[str, list[int], dict]

_INT64 = (-(1 << 63), (1 << 63) - 1)


@dataclass
class _Group:
    """A user request: one child per `n`."""
    request_id: str  # internal
    label: str  # the client's id
    prompt: Optional[str]
    prompt_token_ids: list[int]
    children: list[Request]
    error: Optional[str] = None
    final_only: bool = False  # one output, when it finishes (nothing is assembled before)


@dataclass
class EngineStats:
    """Counters read by the server's /metrics and by benchmarks."""
    prompt_tokens: int = 0
    generation_tokens: int = 0
    finished: dict = field(default_factory=dict)  # finish reason -> count


def _cached_tokenizer(config: EngineConfig):
    """(folder, tokenizer) of a GGUF model whose cache entry holds its tokenizer, else None (the core then sends
    the tokenizer, or names the folder). Any trouble is left to the core, which reports it."""
    if config.tokenizer is not None or config.load_format not in ("auto", "gguf"):
        return None
    try:
        from pageport.models.gguf_loader import cached_tokenizer_dir, load_cached_tokenizer
        from pageport.models.loader import resolve_model_path
        path = resolve_model_path(config.model)
        folder = cached_tokenizer_dir(path) if path.suffix == ".gguf" else None
        if folder is None:
            return None
        return folder, load_cached_tokenizer(folder, bool(config.trust_remote_code))
    except Exception:  # noqa: BLE001
        return None


class LLMEngine:
    # what the engine core applies beyond the basic sampling options (sampling_params.ENGINE_FEATURES)
    sampling_features = frozenset({"structured_outputs", "bad_words", "allowed_token_ids", "logits_processors",
                                   "logprobs_all", "truncate_prompt_tokens"})

    def __init__(self, config: EngineConfig, multiprocess: Optional[bool] = None):
        self.config = config
        t0 = time.perf_counter()
        self.client = make_client(config, multiprocess, wait=False)
        early = _cached_tokenizer(config)  # while the core starts: it leaves a cached tokenizer to us
        t_tok = time.perf_counter()
        if self.client.info is None:
            self.client.wait_ready()
        info = self.client.info
        resolved = info["config"]
        for name in vars(resolved):  # the core resolved dtype, lengths and budgets
            setattr(config, name, getattr(resolved, name))
        self.model_source = info["model_source"]
        self.hf_config = info["hf_config"]
        self.tokenizer = info["tokenizer"]
        if self.tokenizer is None and info.get("tokenizer_dir") is not None:
            if early is not None and str(early[0]) == info["tokenizer_dir"]:
                self.tokenizer = early[1]
            else:
                from pageport.models.gguf_loader import load_cached_tokenizer
                self.tokenizer = load_cached_tokenizer(Path(info["tokenizer_dir"]))
        logger.info("start-up (front end): tokenizer %.2f s while the core loaded, core ready after %.2f s",
                    t_tok - t0 if early is not None else 0.0, time.perf_counter() - t0)
        self.vocab_size = info["vocab_size"]
        self.eos_token_id = info["eos_token_id"]
        self.platform_name = info["platform"]
        self.attention_backend = info["attention"]
        self.uses_graphs = info["graphs"]
        # the custom logits processors' classes: their validate_params checks each request in add_request
        from pageport.core.logits_processors import processor_classes
        self.logits_processor_classes = processor_classes(config.logits_processors)
        self.groups: dict[str, _Group] = {}  # internal group id -> group
        self.requests: dict[str, Request] = {}  # internal child id -> child
        self._labels: dict[str, set[str]] = {}  # client label -> internal group ids
        self.stats = EngineStats()
        self._ids = itertools.count()
        self._reported: set[str] = set()  # groups finished here (abort, stop string, error) to report
        self.loras: dict[int, object] = {}  # LoRA id -> the LoRARequest the core checked (add_lora)

    @property
    def core(self):
        """The in-process EngineCore (PAGEPORT_ENGINE_INPROC=1 / multiprocess=False), else None."""
        return getattr(self.client, "core", None)

    def core_stats(self):
        """The core's counters, fresh (a round trip, ordered after everything sent before)."""
        stats = self.client.call("stats")
        return stats if isinstance(stats, CoreStats) else msgspec.convert(stats, CoreStats)

    def reset_prefix_cache(self) -> bool:
        return self.client.call("reset_prefix_cache")

    def shutdown(self) -> None:
        self.client.shutdown()

    # LoRA adapters (vLLM's add_lora / remove_lora / list_loras) ---------------------------------------
    def add_lora(self, lora_request) -> bool:
        """Check an adapter against the model in the core and keep it read there; ValueError if it is bad."""
        known = self.loras.get(lora_request.lora_int_id)
        if known is not None and known.lora_path == lora_request.lora_path:
            return True
        if known is not None:
            raise ValueError(f"LoRA id {lora_request.lora_int_id} is already {known.lora_name!r} from "
                             f"{known.lora_path!r}")
        error = self.client.call("add_lora", *lora_request.to_wire())
        if error is not None:
            raise ValueError(error)
        self.loras[lora_request.lora_int_id] = lora_request
        return True

    def remove_lora(self, lora_id: int) -> bool:
        """Forget an adapter; requests already running with it finish with it."""
        self.loras.pop(lora_id, None)
        return bool(self.client.call("remove_lora", lora_id))

    def list_loras(self) -> set[int]:
        return set(self.loras)

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

    def multimodal(self):
        """The image processor of a vision-language model (loaded on first use); ValueError for other models."""
        if getattr(self, "_mm_processor", None) is None:
            if not hasattr(self.hf_config, "vision_config"):
                raise ValueError("this model takes no images (multi_modal_data given to a text-only model)")
            from pageport.models.multimodal.inputs import ImageProcessor

            self._mm_processor = ImageProcessor(self.model_source, self.hf_config,
                                                getattr(self.config, "limit_mm_per_prompt", None))
        return self._mm_processor

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
            if k is not None and k != -1 and 0 <= self.config.max_logprobs < k:  # -1: prepare_request
                raise ValueError(f"{name}={k} is more than max_logprobs={self.config.max_logprobs}")
        if params.logit_bias and not all(0 <= t < self.vocab_size for t in params.logit_bias):
            raise ValueError(f"logit_bias names a token id outside [0, {self.vocab_size})")
        if params.seed is not None and not _INT64[0] <= params.seed <= _INT64[1]:
            raise ValueError(f"seed must be in [{_INT64[0]}, {_INT64[1]}], got {params.seed}")

    def add_request(self, request_id: Optional[str], prompt: PromptType, params: SamplingParams,
                    priority: int = 0, arrival_time: Optional[float] = None,
                    cache_salt: Optional[str] = None, owner: Optional[str] = None, lora_request=None) -> str:
        """Queue a request; returns its internal id. Raises ValueError (and queues nothing) when it is
        invalid. `request_id` is the client's label; `owner` groups requests that share a fair share of
        the seats (default: this request alone); `lora_request`: the LoRARequest of the adapter to run."""
        if isinstance(params, PoolingParams) or self.config.runner == "pooling":  # a vector, not tokens
            if lora_request is not None:
                raise ValueError("LoRA adapters run with generation only, not with pooling requests")
            return add_pooling_request(self, request_id, prompt, params, priority, arrival_time, owner)
        text, token_ids = self.tokenize(prompt)
        token_ids = prepare_request(params, token_ids, self)  # bad words, allowed tokens, truncation...
        mm_inputs = None
        if isinstance(prompt, dict) and prompt.get("mm_inputs"):  # the server expanded them already (same processor)
            mm_inputs = list(prompt["mm_inputs"])
        elif isinstance(prompt, dict) and prompt.get("multi_modal_data"):  # images: placeholders expanded
            token_ids, mm_inputs = self.multimodal().process(token_ids, prompt["multi_modal_data"])
        self._validate(token_ids, params)
        lora = None
        if lora_request is not None:
            if not getattr(self.config, "enable_lora", False):
                raise ValueError("a LoRA adapter was requested, but this engine runs without enable_lora "
                                 "(--enable-lora)")
            self.add_lora(lora_request)
            lora = lora_request.to_wire()
        gid = str(next(self._ids))
        label = gid if request_id is None else str(request_id)
        arrival = time.monotonic() if arrival_time is None else arrival_time
        owner = gid if owner is None else f"o:{owner}"
        children, core_reqs = [], []
        for i in range(params.n):
            # children's seeds: seed + i within int64 (wrapping), so a valid seed never overflows
            seed = None if params.seed is None else (params.seed + i - _INT64[0]) % (1 << 64) + _INT64[0]
            p = params if params.n == 1 else params.clone(
                n=1, seed=seed, prompt_logprobs=params.prompt_logprobs if i == 0 else None)
            cid = gid if params.n == 1 else f"{gid}.{i}"
            child = Request(cid, token_ids, p, self.eos_token_id, text, priority, arrival, cache_salt, owner)
            child.index = i
            child.detokenizer = IncrementalDetokenizer(self.tokenizer if p.detokenize else None, p, token_ids)
            children.append(child)
            gate = children[0].request_id if i > 0 and self.config.enable_prefix_caching else None
            core_reqs.append(CoreRequest(cid, token_ids, pickle.dumps(p), self.eos_token_id, arrival, priority,
                                         cache_salt, owner, gate, mm_inputs or None, lora))
        self.client.add(core_reqs)
        group = _Group(gid, label, text, token_ids, children, final_only=params.output_kind == "final_only")
        self.groups[gid] = group
        self._labels.setdefault(label, set()).add(gid)
        for child in children:
            child.group = group
            child.status = RequestStatus.WAITING
            self.requests[child.request_id] = child
        return gid

    def abort_request(self, request_ids) -> None:
        """Abort by internal id, or by client label (every request that carries it)."""
        if isinstance(request_ids, str):
            request_ids = [request_ids]
        gone = []
        for rid in request_ids:
            for gid in ([rid] if rid in self.groups else list(self._labels.get(rid, ()))):
                for child in self.groups[gid].children:
                    if not child.is_finished:
                        self._finish(child, RequestStatus.FINISHED_ABORTED)
                        gone.append(child.request_id)
                self._reported.add(gid)
        self.client.abort(gone)

    def has_unfinished_requests(self) -> bool:
        return bool(self.groups)

    def get_num_unfinished_requests(self) -> int:
        return len(self.groups)

    # the step ----------------------------------------------------------------------------------
    def step(self, timeout: Optional[float] = None) -> list[RequestOutput]:
        """Outputs of the requests the core advanced since the last call; waits for the core up to
        `timeout` seconds (None: until it has something, unless something is ready here)."""
        touched: dict[str, _Group] = {gid: self.groups[gid] for gid in self._reported if gid in self.groups}
        self._reported.clear()
        waiting = len(touched) < len(self.groups)  # requests with nothing to report yet: wait for the core
        msg: CoreOutputs = self.client.get_outputs(timeout if waiting and not touched else 0)
        if msg.outputs:
            now = time.monotonic()
            for o in msg.outputs:
                child = self.requests.get(o.request_id)
                if child is None or child.is_finished:
                    continue
                self._update(child, o, now)
                touched[child.group.request_id] = child.group
            for gid in self._reported:  # finished while updating (stop strings, errors)
                if gid in self.groups:
                    touched[gid] = self.groups[gid]
            self._reported.clear()
        return [self._output(g) for g in touched.values()
                if not g.final_only or g.error is not None or all(c.is_finished for c in g.children)]

    def _update(self, req: Request, o, now: float) -> None:
        if o.num_cached_tokens >= 0:
            req.num_cached_tokens = o.num_cached_tokens
        if o.first_scheduled_time >= 0:
            req.first_scheduled_time = o.first_scheduled_time
        if o.pooled is not None:  # a pooling request's output: it is finished
            req.pooled = tensor_from_bytes(o.pooled, o.pooled_shape)
            req.first_token_time = req.last_token_time = now
            self._finish(req, RequestStatus.FINISHED_STOPPED)
            return
        if o.prompt_logprobs:
            for d in o.prompt_logprobs:
                for tid, lp in d.items():
                    lp.decoded_token = req.detokenizer.decode_token(tid)
            req.prompt_logprobs.extend(o.prompt_logprobs)
        if o.error is not None:
            req.group.error = o.error
            self._finish(req, RequestStatus.FINISHED_ERROR)
            return
        if not o.new_token_ids:
            return
        if req.first_token_time is None:
            req.first_token_time = now
        req.last_token_time = now
        for k, token in enumerate(o.new_token_ids):
            req.append_token(token)
            self.stats.generation_tokens += 1
            if o.logprobs is not None and req.logprobs is not None:
                lps = o.logprobs[k]
                req.cumulative_logprob += lps[token].logprob
                for tid, lp in lps.items():
                    lp.decoded_token = req.detokenizer.decode_token(tid)
                req.logprobs.append(lps)
            try:
                stop_str = req.detokenizer.update([token], req.num_output_tokens)
            except Exception as e:  # noqa: BLE001 - this request's text alone is broken
                logger.exception("detokenizing request %s failed", req.request_id)
                req.group.error = f"detokenization failed: {type(e).__name__}: {e}"
                self._finish(req, RequestStatus.FINISHED_ERROR)
                self.client.abort([req.request_id])
                return
            if stop_str is not None:
                req.stop_reason = stop_str
                self._finish(req, RequestStatus.FINISHED_STOPPED)
                self.client.abort([req.request_id])  # the core goes on until told
                return
        if o.finish_reason is not None:
            req.stop_reason = o.stop_reason
            self._finish(req, RequestStatus.FINISHED_STOPPED if o.finish_reason == "stop"
                         else RequestStatus.FINISHED_LENGTH if o.finish_reason == "length"
                         else RequestStatus.FINISHED_ERROR)

    def _finish(self, req: Request, status: RequestStatus) -> None:
        req.status = status
        self.stats.finished[status.value] = self.stats.finished.get(status.value, 0) + 1
        if status in (RequestStatus.FINISHED_ABORTED, RequestStatus.FINISHED_ERROR):
            self._reported.add(req.group.request_id)

    def _output(self, g: _Group) -> RequestOutput:
        outs = []
        finished = True
        for i, c in enumerate(g.children):
            done = c.status in _FINISHED
            finished = finished and done
            if c.params.output_kind == "delta":
                start = c.num_sent_tokens
                token_ids = c.token_ids[c.num_prompt_tokens + start:]
                c.num_sent_tokens = start + len(token_ids)
                text = c.detokenizer.get_delta(done)
                logprobs = c.logprobs[start:] if c.logprobs is not None else None
            else:
                text, token_ids, logprobs = c.detokenizer.output_text, c.output_token_ids, c.logprobs
            outs.append(CompletionOutput(i, text, token_ids,
                                         c.cumulative_logprob if c.logprobs is not None else None,
                                         logprobs, c.status.value if done else None, c.stop_reason))
        if g.error is not None and not finished:  # one child failed: the request fails as a whole
            gone = [c.request_id for c in g.children if not c.is_finished]
            for c in g.children:
                if not c.is_finished:
                    self._finish(c, RequestStatus.FINISHED_ABORTED)
            self.client.abort(gone)
            finished = True
        first = g.children[0]  # it carries the prompt logprobs
        out = RequestOutput(g.label, g.prompt, g.prompt_token_ids, outs, finished,
                            prompt_logprobs=first.prompt_logprobs, num_cached_tokens=first.num_cached_tokens,
                            error=g.error, engine_request_id=g.request_id)
        if hasattr(first, "pooling_params"):
            out = pooling_output(out, first)
        if finished:
            self.stats.prompt_tokens += len(g.prompt_token_ids)
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
            labels = self._labels.get(g.label)
            if labels is not None:
                labels.discard(g.request_id)
                if not labels:
                    del self._labels[g.label]
        return out
