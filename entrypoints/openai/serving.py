"""The OpenAI endpoints' logic: requests -> SamplingParams + token ids -> AsyncLLMEngine -> OpenAI JSON / SSE.

Prompts are tokenized (and chat templates rendered) here with the server's own copy of the tokenizer, on one
worker thread so that a huge prompt never stalls the event loop (and the engine only schedules and runs the
model). Every request runs with delta outputs; non-streaming responses accumulate them.
"""
from __future__ import annotations

import asyncio
import copy
import functools
import logging
import math
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Optional

import msgspec

from pageport.core.async_engine import AsyncLLMEngine, EngineDeadError
from pageport.core.outputs import Logprob, RequestOutput
from pageport.core.sampling_params import SamplingParams, check_engine_features, engine_features, features_used
from pageport.entrypoints.openai.errors import APIError, bad_request, error_body
from pageport.entrypoints.openai.limits import PROMPT_CHARS_PER_TOKEN, ServerLimits
from pageport.entrypoints.openai.protocol import ChatCompletionRequest, CompletionRequest
from pageport.entrypoints.openai.chat_output import ChatOutput, arguments_dict, template_tools, tools_schema
from pageport.entrypoints.openai.reasoning_parsers import get_reasoning_parser
from pageport.entrypoints.openai.structured_outputs import request_constraints, structured_outputs_params
from pageport.entrypoints.openai.tool_parsers import get_tool_parser

logger = logging.getLogger(__name__)

_TEMPLATE_RESERVED = {"conversation", "tokenize", "add_generation_prompt", "continue_final_message",
                      "chat_template", "return_dict", "return_tensors"}


def _clamp(lp: float) -> float:
    """JSON has no -inf: vLLM's convention."""
    return max(lp, -9999.0) if not math.isnan(lp) else -9999.0


def engine_dead_error() -> APIError:
    # the exception itself is in the server log; clients (and the open /health) learn nothing of the internals
    return APIError(503, "the engine has failed; the server is restarting", code="engine_dead")


_json = msgspec.json.Encoder()  # ~10x json.dumps: one of these per streamed token


def _sse(obj: Any) -> bytes:
    return b"data: " + _json.encode(obj) + b"\n\n"


@dataclass
class ServingOptions:
    """Server-wide choices for chat and structured outputs (serve flags)."""
    structured_outputs_backend: str = "xgrammar"
    enable_auto_tool_choice: bool = False
    tool_call_parser: Optional[str] = None
    reasoning_parser: Optional[str] = None
    chat_template: Optional[str] = None  # the template text (--chat-template, a file or inline)
    default_chat_template_kwargs: Optional[dict] = None
    default_sampling: Optional[dict] = None  # the model's generation config: for fields a request leaves out
    log_requests: bool = False
    max_log_len: Optional[int] = None


@dataclass
class _Choice:
    """One completion being accumulated from delta outputs."""
    text: list[str] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    logprobs: Optional[list[dict[int, Logprob]]] = None
    cumulative_logprob: Optional[float] = None
    finish_reason: Optional[str] = None
    stop_reason: Any = None


@dataclass
class _Prompt:
    text: Optional[str]
    token_ids: list[int]
    mm_inputs: Optional[list] = None  # images: their placeholders are expanded in token_ids already


class OpenAIServing:
    def __init__(self, engine: AsyncLLMEngine, model_names: list[str], limits: ServerLimits,
                 model_source: str = "", options: Optional[ServingOptions] = None):
        self.engine = engine
        self.options = options = options or ServingOptions()
        self.structured_outputs_backend = options.structured_outputs_backend
        self.tool_parser_cls = get_tool_parser(options.tool_call_parser) if options.tool_call_parser else None
        self.reasoning_parser_cls = (get_reasoning_parser(options.reasoning_parser) if options.reasoning_parser
                                     else None)
        self.model_names = model_names
        self.loras = None  # LoRAModels (entrypoints/openai/lora.py): adapters by model name
        self.limits = limits
        self.model_source = model_source
        tok = engine.tokenizer
        try:  # our own copy: the engine thread decodes with the original
            self.tokenizer = copy.deepcopy(tok) if tok is not None else None
        except Exception:  # noqa: BLE001
            self.tokenizer = tok
        self.max_model_len = engine.config.max_model_len
        self.max_logprobs = getattr(engine.config, "max_logprobs", 20)
        inner = getattr(engine, "engine", None)
        self.vocab_size = getattr(inner, "vocab_size", None) or (len(tok) if tok is not None else 2 ** 31)
        self.max_prompt_chars = limits.max_prompt_chars or PROMPT_CHARS_PER_TOKEN * self.max_model_len
        self.created = int(time.time())
        self._tok_strs: dict[int, str] = {}
        # one thread: a fast tokenizer must not be used by two threads at once ("Already borrowed")
        self._tokenizer_thread = ThreadPoolExecutor(1, thread_name_prefix="pageport-tokenizer")
        self._live: set = set()  # how to fail each request in flight: fail(error)
        self.closing: Optional[APIError] = None  # set once no request may run any more (see end_all)

    def end_all(self, error: APIError) -> None:
        """End every request in flight with `error` and refuse new ones (shutdown timeout, dead engine)."""
        self.closing = error
        for fail in list(self._live):
            fail(error)

    @property
    def features(self) -> frozenset:
        """What the engine applies of structured outputs, bad words, allowed tokens… (ENGINE_FEATURES)."""
        return engine_features(self.engine)

    async def in_tokenizer_thread(self, fn, *args, **kwargs):
        """Tokenizer and chat-template work, off the event loop."""
        return await asyncio.get_running_loop().run_in_executor(self._tokenizer_thread,
                                                                  functools.partial(fn, *args, **kwargs))

    # helpers --------------------------------------------------------------------------------------
    def check_model(self, name: Optional[str]) -> str:
        if name is None or name in self.model_names:
            return self.model_names[0]
        if self.loras is not None and name in self.loras.by_name:
            return name
        raise APIError(404, f"The model `{name}` does not exist.", "model", "model_not_found")

    def _lora_kwargs(self, model: Optional[str]) -> dict:
        lora = self.loras.by_name.get(model) if self.loras is not None and model else None
        return {"lora_request": lora} if lora is not None else {}

    def _need_tokenizer(self):
        if self.tokenizer is None:
            raise bad_request("this model has no tokenizer: send token ids", "prompt")
        return self.tokenizer

    def tok_str(self, token_id: int) -> str:
        s = self._tok_strs.get(token_id)
        if s is None:
            tok = self.tokenizer
            s = tok.decode([token_id], skip_special_tokens=False) if tok is not None else ""
            self._tok_strs[token_id] = s
        return s

    def _lp_str(self, token_id: int, lp: Optional[Logprob]) -> str:
        if lp is not None and lp.decoded_token is not None:
            return lp.decoded_token
        return self.tok_str(token_id)

    def check_prompt_chars(self, n: int, where: str) -> None:
        if n > self.max_prompt_chars:
            raise APIError(400, f"the {where} has {n} characters; this server tokenizes at most "
                                f"{self.max_prompt_chars} per request (--max-prompt-chars)", where, "prompt_too_long")

    def check_fanout(self, num_prompts: int, n: int) -> None:
        """400 for more completions, or more sequences (prompts x n), than one request may ask for."""
        if n > self.limits.max_n:
            raise bad_request(f"n={n} is more than this server allows ({self.limits.max_n}, --max-n)", "n")
        cap = self.limits.max_seqs_per_request
        if num_prompts * n > cap:
            asked = f"{num_prompts} prompts x n={n} = {num_prompts * n}" if num_prompts > 1 else f"n={n}"
            raise bad_request(f"this request asks for {asked} sequences; this server allows {cap} per request "
                              "(--max-seqs-per-request)", "n" if n > 1 else "prompt")

    def check_token_ids(self, ids: list, param: str) -> list[int]:
        for t in ids:
            if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < self.vocab_size:
                raise bad_request(f"token id {t!r} is not in the vocabulary [0, {self.vocab_size})", param)
        return ids

    async def render_chat(self, messages: list[dict], add_generation_prompt: bool = True,
                          continue_final_message: bool = False, template_kwargs: Optional[dict] = None,
                          add_special_tokens: bool = False, chat_template: Optional[str] = None,
                          tools: Optional[list[dict]] = None, documents: Optional[list[dict]] = None) -> _Prompt:
        tok = self._need_tokenizer()
        images, processor = [], None
        if _has_image_parts(messages):
            messages, images, processor = await self._chat_images(messages)
        conversation = _conversation(messages)
        self.check_prompt_chars(sum(len(m["content"]) for m in conversation if isinstance(m["content"], str)),
                                "messages")
        kwargs = dict(self.options.default_chat_template_kwargs or {})
        kwargs.update(template_kwargs or {})
        bad = sorted(set(template_kwargs or {}) & _TEMPLATE_RESERVED)
        if bad:
            raise bad_request(f"chat_template_kwargs may not set {', '.join(bad)}", "chat_template_kwargs")
        if add_generation_prompt and continue_final_message:
            raise bad_request("add_generation_prompt and continue_final_message cannot both be true",
                              "continue_final_message")
        if continue_final_message and conversation[-1]["role"] != "assistant":
            raise bad_request("continue_final_message needs an assistant message last", "messages")
        template = chat_template or self.options.chat_template
        if tools is not None:
            kwargs["tools"] = tools
        if documents is not None:
            kwargs["documents"] = documents

        def render() -> _Prompt:
            try:
                text = tok.apply_chat_template(conversation, tokenize=False, chat_template=template,
                                               add_generation_prompt=add_generation_prompt,
                                               continue_final_message=continue_final_message, **kwargs)
            except Exception as e:  # noqa: BLE001 - template errors come from the input
                raise bad_request(f"the chat template could not render these messages: {e}", "messages") from e
            ids = tok.encode(text, add_special_tokens=add_special_tokens)
            if not images:
                return _Prompt(text, ids)
            try:  # the engine's own processor: the same expansion and hashes as an offline prompt
                ids, mm = processor.process(ids, {"image": images})
            except ValueError as e:
                raise bad_request(str(e), "messages") from None
            return _Prompt(text, ids, mm)

        return await self.in_tokenizer_thread(render)

    async def _chat_images(self, messages: list) -> tuple[list, list, Any]:
        """Image content parts: the messages with the model's image token in their place, the decoded images and
        the engine's image processor. 400 for a model without a vision tower, more images than
        --limit-mm-per-prompt, or an image that does not decode or fetch (http(s) URLs are fetched here, off the
        event loop and the tokenizer thread, with a timeout and a size limit)."""
        from pageport.models.multimodal.inputs import check_mm_limit, load_image, split_chat_images

        inner = getattr(self.engine, "engine", None)
        if not hasattr(getattr(inner, "hf_config", None), "vision_config"):
            raise bad_request("this model takes text only (it has no vision tower): it takes no images",
                              "messages", "unsupported_parameter")
        try:
            processor = await self.in_tokenizer_thread(inner.multimodal)
            messages, images = split_chat_images(messages, processor.chat_image_text(self.tokenizer))
            check_mm_limit(len(images), processor.limits)
        except ValueError as e:
            raise bad_request(str(e), "messages") from None
        loaded = await asyncio.gather(*[asyncio.to_thread(load_image, im) for im in images],
                                      return_exceptions=True)
        for i, im in enumerate(loaded):
            if isinstance(im, ValueError):
                raise bad_request(f"image {i}: {im}", "messages")
            if isinstance(im, BaseException):
                raise im
        return messages, list(loaded), processor

    def _context_check(self, prompt: _Prompt, max_tokens: Optional[int], where: str) -> int:
        """The effective max_tokens; 400 when the prompt (plus max_tokens) does not fit."""
        n, limit = len(prompt.token_ids), self.max_model_len
        if n == 0:
            raise bad_request("the prompt is empty: give at least one token", where)
        if n >= limit:
            raise APIError(400, f"This model's maximum context length is {limit} tokens, but the prompt has {n} "
                                f"tokens (at least one token must remain for the output). Shorten the "
                                f"{where}.", where, "context_length_exceeded")
        if max_tokens is None:
            return limit - n
        if n + max_tokens > limit:
            raise APIError(400, f"This model's maximum context length is {limit} tokens. However, you requested "
                                f"{n + max_tokens} tokens ({n} in the {where}, {max_tokens} in the completion). "
                                f"Reduce the length of the {where} or max_tokens.", "max_tokens",
                           "context_length_exceeded")
        return max_tokens

    async def structured_outputs(self, req, extra: Optional[tuple[str, dict]] = None):
        """The request's output constraint (checked off the event loop: a big schema takes a while), or None.
        `extra`: one the server adds itself (tool_choice), which the request may not combine with its own."""
        param, spec = request_constraints(req, self.structured_outputs_backend)
        if extra is not None:
            if spec is not None:
                raise bad_request(f"{param} cannot be combined with tool_choice={extra[0]!r}", param)
            param, spec = extra
        if spec is None:
            return None
        structured = await self.in_tokenizer_thread(structured_outputs_params, param, spec)  # a bad spec: 400
        if "structured_outputs" not in self.features:
            raise bad_request(f"{param}: this engine does not apply output grammars yet", param,
                              "unsupported_parameter")
        return structured

    def truncate(self, prompt: _Prompt, k: Optional[int]) -> None:
        """truncate_prompt_tokens: keep the prompt's last k tokens (-1: max_model_len)."""
        if k is None:
            return
        k = self.max_model_len if k == -1 else k
        if len(prompt.token_ids) > k:
            prompt.token_ids = prompt.token_ids[-k:]
            prompt.text = None  # decoded again where needed (echo)

    def sampling_params(self, req, max_tokens: int, logprobs: Optional[int],
                        prompt_logprobs: Optional[int], structured=None) -> SamplingParams:
        n = 1 if req.n is None else req.n
        bias = None
        if req.logit_bias:
            bias = {}
            for k, v in req.logit_bias.items():
                try:
                    tid = int(k)
                except ValueError:
                    raise bad_request(f"logit_bias keys must be token ids, got {k!r}", "logit_bias") from None
                if not 0 <= tid < self.vocab_size:
                    raise bad_request(f"logit_bias names token id {tid}, outside [0, {self.vocab_size})",
                                      "logit_bias")
                if not -100 <= v <= 100:
                    raise bad_request(f"logit_bias values must be in [-100, 100], got {v}", "logit_bias")
                bias[tid] = v
        for name, k in (("logprobs", logprobs), ("prompt_logprobs", prompt_logprobs)):
            if k is not None and k > self.max_logprobs:
                raise bad_request(f"{name}={k} is more than this server allows ({self.max_logprobs})",
                                  "top_logprobs" if name == "logprobs" and isinstance(req, ChatCompletionRequest)
                                  else name)
        if req.stop_token_ids:
            self.check_token_ids(req.stop_token_ids, "stop_token_ids")
        if req.allowed_token_ids is not None:
            if not req.allowed_token_ids:
                raise bad_request("allowed_token_ids must name at least one token", "allowed_token_ids")
            self.check_token_ids(req.allowed_token_ids, "allowed_token_ids")
        if req.min_tokens and req.min_tokens > max_tokens:
            raise bad_request(f"min_tokens={req.min_tokens} is more than max_tokens={max_tokens}", "min_tokens")
        d = self.options.default_sampling or {}

        def given(name: str, fallback):
            value = getattr(req, name)
            return d.get(name, fallback) if value is None else value

        try:
            params = SamplingParams(
                n=n, temperature=given("temperature", 1.0), top_p=given("top_p", 1.0), top_k=given("top_k", 0),
                min_p=given("min_p", 0.0), presence_penalty=req.presence_penalty or 0.0,
                frequency_penalty=req.frequency_penalty or 0.0,
                repetition_penalty=given("repetition_penalty", 1.0),
                logit_bias=bias, seed=req.seed, max_tokens=max_tokens, min_tokens=req.min_tokens,
                stop=req.stop, stop_token_ids=req.stop_token_ids, ignore_eos=req.ignore_eos,
                include_stop_str_in_output=req.include_stop_str_in_output, logprobs=logprobs,
                prompt_logprobs=prompt_logprobs, skip_special_tokens=req.skip_special_tokens,
                spaces_between_special_tokens=req.spaces_between_special_tokens, bad_words=req.bad_words,
                allowed_token_ids=req.allowed_token_ids,  # truncate_prompt_tokens: done here already
                structured_outputs=structured, extra_args=req.vllm_xargs, output_kind="delta")
        except (ValueError, TypeError) as e:
            msg = str(e)
            param = msg.split(" ", 1)[0].removeprefix("SamplingParams.") if msg.startswith("SamplingParams.") \
                else None
            raise bad_request(msg.removeprefix("SamplingParams."), param) from e
        try:
            check_engine_features(params, self.features)
        except ValueError as e:
            raise bad_request(str(e), features_used(params)[0], "unsupported_parameter") from None
        # the engine's custom logits processors read their settings from vllm_xargs (extra_args)
        for cls in getattr(getattr(self.engine, "engine", self.engine), "logits_processor_classes", ()):
            try:
                getattr(cls, "validate_params", lambda p: None)(params)
            except ValueError as e:
                raise bad_request(str(e), "vllm_xargs") from None
        return params

    async def _start(self, prompts: list[_Prompt], params: SamplingParams, base_id: str, req,
                     arrival: float) -> list:
        """Add every prompt's request at once; all or nothing."""
        ids = [base_id] if len(prompts) == 1 else [f"{base_id}-{i}" for i in range(len(prompts))]
        if self.options.log_requests:
            for p, rid in zip(prompts, ids):
                text = p.text if p.text is not None else str(p.token_ids)
                if self.options.max_log_len is not None:
                    text = text[:self.options.max_log_len]
                logger.info("request %s: prompt %r (%d tokens), %s", rid, text, len(p.token_ids), params)
        results = await asyncio.gather(
            *[self.engine.add_request({"prompt": p.text, "prompt_token_ids": p.token_ids,
                                       **({"mm_inputs": p.mm_inputs} if p.mm_inputs else {})}, params, rid,
                                      priority=req.priority, arrival_time=arrival, cache_salt=req.cache_salt,
                                      owner=base_id,  # one client request: one fair share of the seats
                                      **self._lora_kwargs(req.model))
              for p, rid in zip(prompts, ids)], return_exceptions=True)
        errors = [r for r in results if isinstance(r, BaseException)]
        if errors:
            for r in results:
                if not isinstance(r, BaseException):
                    r.abort()
            err = errors[0]
            if isinstance(err, EngineDeadError):
                raise engine_dead_error() from err
            if isinstance(err, (ValueError, TypeError)):
                msg = str(err)
                code = "context_length_exceeded" if "max_model_len" in msg else "invalid_value"
                raise bad_request(msg, None, code)
            raise err
        return list(results)

    # /v1/completions ------------------------------------------------------------------------------
    async def _completion_prompts(self, req: CompletionRequest) -> list[_Prompt]:
        p = req.prompt
        if p is None:
            raise bad_request("prompt is required", "prompt", "missing_required_parameter")
        if isinstance(p, str):
            items: list = [p]
        elif isinstance(p, list) and p:
            if all(isinstance(x, int) and not isinstance(x, bool) for x in p):
                items = [p]
            elif all(isinstance(x, str) for x in p) or all(isinstance(x, list) for x in p):
                items = p
            else:
                raise bad_request("prompt must be a string, a list of strings, a list of token ids or a list of "
                                  "lists of token ids", "prompt")
        else:
            raise bad_request("prompt must be a non-empty string, list of strings, list of token ids or list of "
                              "lists of token ids", "prompt")
        self.check_fanout(len(items), req.n or 1)
        texts = [x for x in items if isinstance(x, str)]
        if texts:
            self._need_tokenizer()
            self.check_prompt_chars(sum(len(x) for x in texts), "prompt")
            encoded = iter(await self.in_tokenizer_thread(
                lambda: [self.tokenizer.encode(x, add_special_tokens=req.add_special_tokens) for x in texts]))
        out = []
        for x in items:
            if isinstance(x, str):
                out.append(_Prompt(x, next(encoded)))
            else:
                if not x:
                    raise bad_request("a prompt of token ids is empty", "prompt")
                out.append(_Prompt(None, list(x)))
        return out

    async def create_completion(self, req: CompletionRequest, arrival: float):
        model = self.check_model(req.model)
        if req.suffix is not None:
            raise bad_request("suffix is not supported (pageport has no fill-in-the-middle)", "suffix",
                              "unsupported_parameter")
        n = req.n or 1
        if req.best_of is not None and req.best_of != n:
            raise bad_request("best_of is not supported (it must be absent or equal n)", "best_of",
                              "unsupported_parameter")
        if req.max_tokens == 0 and not req.echo:
            raise bad_request("max_tokens must be at least 1 (0 only together with echo)", "max_tokens")
        prompts = await self._completion_prompts(req)
        for p in prompts:
            self.truncate(p, req.truncate_prompt_tokens)
        structured = await self.structured_outputs(req)
        echo_only = req.max_tokens == 0
        max_tokens = [self._context_check(p, 1 if echo_only else req.max_tokens, "prompt") for p in prompts]
        for p in prompts:  # after the length check: a long list of ids is refused without walking it
            if p.text is None:
                self.check_token_ids(p.token_ids, "prompt")
        if req.echo and any(p.text is None for p in prompts):
            tok = self._need_tokenizer()
            texts = await self.in_tokenizer_thread(
                lambda: [tok.decode(p.token_ids, skip_special_tokens=False) for p in prompts if p.text is None])
            for p, text in zip([p for p in prompts if p.text is None], texts):
                p.text = text
        prompt_lp = req.prompt_logprobs
        if req.echo and req.logprobs is not None:
            prompt_lp = max(prompt_lp or 0, req.logprobs)
        # max_tokens may differ per prompt when it was left open; group by it
        params_by_max: dict[int, SamplingParams] = {}
        for m in set(max_tokens):
            params_by_max[m] = self.sampling_params(req, m, req.logprobs, prompt_lp, structured)
        base_id = req.request_id or f"cmpl-{uuid.uuid4().hex}"
        if len(params_by_max) == 1:
            streams = await self._start(prompts, params_by_max[max_tokens[0]], base_id, req, arrival)
        else:
            streams = []
            for i, (p, m) in enumerate(zip(prompts, max_tokens)):
                try:
                    streams += await self._start([p], params_by_max[m], f"{base_id}-{i}", req, arrival)
                except BaseException:
                    for s in streams:
                        s.abort()
                    raise
        ctx = _CompletionContext(self, req, model, base_id, prompts, streams, n, echo_only)
        if req.stream:
            return ctx.stream()
        return await ctx.collect()

    # /v1/chat/completions ---------------------------------------------------------------------------
    async def create_chat_completion(self, req: ChatCompletionRequest, arrival: float):
        model, base_id, prompt, stream, output = await self.start_chat(req, arrival, "chatcmpl")
        echo = ""
        last = req.messages[-1]
        if req.echo and isinstance(last, dict) and last.get("role") == "assistant":
            echo = _text_of(last.get("content"))
        ctx = _ChatContext(self, req, model, base_id, prompt, stream, req.n or 1, output, echo)
        if req.stream:
            return ctx.stream()
        return await ctx.collect()

    async def create_response(self, req, arrival: float):
        """POST /v1/responses (see responses.py)."""
        from pageport.entrypoints.openai.responses import ResponsesContext, to_chat_request

        chat = to_chat_request(req)
        model, base_id, prompt, stream, output = await self.start_chat(chat, arrival, "resp")
        ctx = ResponsesContext(self, req, chat, model, base_id.replace("resp-", "resp_", 1), prompt, stream, output)
        if req.stream:
            return ctx.stream()
        return await ctx.collect()

    async def start_chat(self, req: ChatCompletionRequest, arrival: float, id_prefix: str):
        """Check, render and start a chat request: (model, request id, prompt, its stream, a factory of the
        ChatOutput that turns each choice's text into content, reasoning and tool calls)."""
        model = self.check_model(req.model)
        _refuse_unsupported_chat_fields(req)
        if req.top_logprobs is not None and not req.logprobs:
            raise bad_request("top_logprobs needs logprobs set to true", "top_logprobs")
        self.check_fanout(1, req.n or 1)
        mode, named, tool_constraint = self._tool_mode(req)
        prompt = await self.render_chat(req.messages, req.add_generation_prompt, req.continue_final_message,
                                        req.chat_template_kwargs, chat_template=req.chat_template,
                                        tools=template_tools(req.tools), documents=req.documents)
        if prompt.mm_inputs and req.truncate_prompt_tokens is not None:  # it would cut into the images' tokens
            raise bad_request("truncate_prompt_tokens cannot be used with images", "truncate_prompt_tokens")
        self.truncate(prompt, req.truncate_prompt_tokens)
        max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        if max_tokens is None and self.options.default_sampling:
            max_tokens = self.options.default_sampling.get("max_tokens")
            if max_tokens is not None:  # the model's default never overflows the context
                max_tokens = min(max_tokens, self.max_model_len - len(prompt.token_ids))
        max_tokens = self._context_check(prompt, max_tokens, "messages")
        logprobs = (req.top_logprobs or 0) if req.logprobs else None
        structured = await self.structured_outputs(req, tool_constraint)
        params = self.sampling_params(req, max_tokens, logprobs, req.prompt_logprobs, structured)
        base_id = req.request_id or f"{id_prefix}-{uuid.uuid4().hex}"
        streams = await self._start([prompt], params, base_id, req, arrival)
        # the grammar shapes the whole output, so there is no reasoning to split off
        reasoning = self.reasoning_parser_cls if structured is None else None

        def output() -> ChatOutput:
            return ChatOutput(mode, self.tool_parser_cls(self.tokenizer) if mode == "auto" else None,
                              reasoning(self.tokenizer) if reasoning is not None else None, named)

        return model, base_id, prompt, streams[0], output

    def _tool_mode(self, req: ChatCompletionRequest) -> tuple[str, Optional[str], Optional[tuple[str, dict]]]:
        """(mode, the named function, the grammar the mode needs) from tools and tool_choice."""
        choice = req.tool_choice
        if not req.tools:
            if choice not in (None, "none"):
                raise bad_request("tool_choice needs tools", "tool_choice")
            return "none", None, None
        names = [t.function.name for t in req.tools]
        if len(set(names)) != len(names):
            raise bad_request("tools has two functions of one name", "tools")
        for t in req.tools:
            if t.function.parameters is not None:
                self._check_schema(t.function.parameters, f"tools: function {t.function.name!r} parameters")
        if choice is None:
            choice = "auto"
        if choice == "none":
            return "none", None, None
        if choice == "auto":
            if not (self.options.enable_auto_tool_choice and self.tool_parser_cls is not None):
                raise bad_request('"auto" tool choice needs the server started with --enable-auto-tool-choice and '
                                  '--tool-call-parser NAME; or send tool_choice "required", "none" or a named '
                                  "function", "tool_choice")
            return "auto", None, None
        functions = [t.function.model_dump(exclude_none=True) for t in req.tools]
        if choice == "required":
            return "required", None, ("tool_choice", {"json": tools_schema(functions, req.parallel_tool_calls
                                                                          is not False)})
        name = choice.function.name
        fn = next((f for f in functions if f["name"] == name), None)
        if fn is None:
            raise bad_request(f"tool_choice names function {name!r}, which is not among the tools "
                              f"({', '.join(names)})", "tool_choice")
        return "named", name, ("tool_choice", {"json": fn.get("parameters") or {"type": "object"}})

    @staticmethod
    def _check_schema(schema: dict, where: str) -> None:
        from pageport.core.sampling_params import StructuredOutputsParams
        try:
            StructuredOutputsParams(json=schema)
        except ValueError as e:
            raise bad_request(f"{where}: {str(e).replace('in structured_outputs', '').strip()}", "tools") from None

    # logprobs in OpenAI's shapes ----------------------------------------------------------------------
    def completion_logprobs(self, token_ids: list[int], logprobs: list[Optional[dict[int, Logprob]]], k: int,
                            offset: int) -> tuple[dict, int]:
        tokens, token_lps, tops, offsets = [], [], [], []
        for tid, d in zip(token_ids, logprobs):
            chosen = d.get(tid) if d else None
            s = self._lp_str(tid, chosen)
            tokens.append(s)
            offsets.append(offset)
            offset += len(s)
            if d is None:
                token_lps.append(None)
                tops.append(None)
                continue
            token_lps.append(_clamp(chosen.logprob) if chosen is not None else None)
            top = {}
            for t2, lp in sorted(d.items(), key=lambda kv: kv[1].rank or 0):
                if t2 == tid or (lp.rank is not None and lp.rank <= k):
                    top[self._lp_str(t2, lp)] = _clamp(lp.logprob)
            tops.append(top)
        return {"tokens": tokens, "token_logprobs": token_lps, "top_logprobs": tops, "text_offset": offsets}, offset

    def chat_logprobs(self, token_ids: list[int], logprobs: list[dict[int, Logprob]], k: int) -> list[dict]:
        content = []
        for tid, d in zip(token_ids, logprobs):
            chosen = d.get(tid)
            s = self._lp_str(tid, chosen)
            top = []
            for t2, lp in sorted(d.items(), key=lambda kv: kv[1].rank or 0):
                if lp.rank is not None and lp.rank <= k and len(top) < k:
                    s2 = self._lp_str(t2, lp)
                    top.append({"token": s2, "logprob": _clamp(lp.logprob), "bytes": list(s2.encode("utf-8"))})
            content.append({"token": s, "logprob": _clamp(chosen.logprob) if chosen is not None else -9999.0,
                            "bytes": list(s.encode("utf-8")), "top_logprobs": top})
        return content

    def prompt_logprobs_json(self, plps) -> Optional[list]:
        if plps is None:
            return None
        return [None if d is None else {str(t): {"logprob": _clamp(lp.logprob), "rank": lp.rank,
                                                 "decoded_token": self._lp_str(t, lp)} for t, lp in d.items()}
                for d in plps]


def _refuse_unsupported_chat_fields(req: ChatCompletionRequest) -> None:
    def refuse(param: str, why: str):
        raise bad_request(f"{param} is not supported: {why}", param, "unsupported_parameter")

    if req.functions:
        refuse("functions", "the deprecated functions field is not implemented; send tools")
    if req.function_call not in (None, "none"):
        refuse("function_call", "the deprecated function_call field is not implemented; send tool_choice")
    if req.modalities is not None and list(req.modalities) != ["text"]:
        refuse("modalities", "only text output")
    if req.audio is not None:
        refuse("audio", "only text output")
    if req.prediction is not None:
        refuse("prediction", "pageport has no predicted outputs")


_IMAGE_PARTS = ("image_url", "image", "image_pil", "input_image")


def _has_image_parts(messages: list) -> bool:
    return any(isinstance(m, dict) and isinstance(m.get("content"), list)
               and any(isinstance(p, dict) and p.get("type") in _IMAGE_PARTS for p in m["content"])
               for m in messages)


def _text_of(content) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "\n".join(p.get("text", "") for p in content if isinstance(p, dict))
    return ""


def _conversation(messages: list[dict]) -> list[dict]:
    """OpenAI messages as chat templates take them: text content, tool calls with their arguments as objects,
    tool results with their call id; roles other than OpenAI's go through for the template to judge."""
    conv = []
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise bad_request(f"{where} must be an object", "messages")
        role = m.get("role")
        if role == "function" or m.get("function_call"):
            raise bad_request(f"{where}: the deprecated function messages are not supported; use tool_calls and "
                              "tool messages", "messages", "unsupported_parameter")
        if not isinstance(role, str) or not role:
            raise bad_request(f"{where}.role must be a non-empty string, got {role!r}", "messages")
        content = m.get("content")
        tool_calls = m.get("tool_calls")
        if content is None:
            if role not in ("assistant", "tool") or (role == "tool" and "content" not in m):
                raise bad_request(f"{where}.content is required", "messages")
            content = ""
        elif isinstance(content, list):
            texts = []
            for j, part in enumerate(content):
                kind = part.get("type") if isinstance(part, dict) else None
                if kind not in ("text", "input_text", "output_text") or not isinstance(part.get("text"), str):
                    raise bad_request(f"{where}.content[{j}]: content of type {kind!r} is not supported "
                                      "(this model takes text only)", "messages", "unsupported_parameter")
                texts.append(part["text"])
            content = "\n".join(texts)
        elif not isinstance(content, str):
            raise bad_request(f"{where}.content must be a string or a list of text parts", "messages")
        out = {"role": "system" if role == "developer" else role, "content": content}
        if tool_calls:
            if role != "assistant" or not isinstance(tool_calls, list):
                raise bad_request(f"{where}.tool_calls: only an assistant message has a list of tool calls",
                                  "messages")
            calls = []
            for j, c in enumerate(tool_calls):
                fn = c.get("function") if isinstance(c, dict) else None
                if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
                    raise bad_request(f"{where}.tool_calls[{j}] needs function.name", "messages")
                calls.append({"id": c.get("id"), "type": "function",
                              "function": {"name": fn["name"], "arguments": arguments_dict(fn.get("arguments"))}})
            out["tool_calls"] = calls
        for key in ("name", "tool_call_id"):
            if isinstance(m.get(key), str):
                out[key] = m[key]
        conv.append(out)
    return conv


async def _merged(serving: OpenAIServing, streams: list) -> AsyncIterator[tuple[int, RequestOutput]]:
    """Outputs of several streams as they come, tagged with the stream's index; `serving.end_all` ends them."""
    if serving.closing is not None:
        raise serving.closing
    fail = getattr(streams[0], "fail", None) if len(streams) == 1 else None
    if fail is not None:  # the common case: read the engine's stream itself (end_all fails it directly)
        serving._live.add(fail)
        try:
            async for out in streams[0]:
                yield 0, out
        finally:
            serving._live.discard(fail)
        return
    q: asyncio.Queue = asyncio.Queue()

    async def pump(i: int, s):
        try:
            async for out in s:
                q.put_nowait((i, out))
            q.put_nowait((i, None))
        except asyncio.CancelledError:
            raise
        except BaseException as e:  # noqa: BLE001
            q.put_nowait((i, e))

    def fail(error: BaseException) -> None:
        q.put_nowait((-1, error))

    tasks = [asyncio.ensure_future(pump(i, s)) for i, s in enumerate(streams)]
    serving._live.add(fail)
    try:
        remaining = len(streams)
        while remaining:
            i, item = await q.get()
            if item is None:
                remaining -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield i, item
    finally:
        serving._live.discard(fail)
        for t in tasks:
            t.cancel()


def _usage(prompt_tokens: int, completion_tokens: int, cached: int = 0) -> dict:
    u = {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
         "total_tokens": prompt_tokens + completion_tokens}
    if cached:
        u["prompt_tokens_details"] = {"cached_tokens": cached}
    return u


def _stream_error(e: BaseException) -> str:
    if isinstance(e, EngineDeadError):
        e = engine_dead_error()
    if isinstance(e, APIError):
        return _sse(error_body(e.status, e.message, e.param, e.code, e.type))
    logger.exception("a streaming request failed", exc_info=e)
    return _sse(error_body(500, f"internal error: {e!r}"))


class _Context:
    """One request's streams and its accumulation; subclasses write OpenAI's shapes."""

    def __init__(self, serving: OpenAIServing, req, model: str, request_id: str, streams: list):
        self.serving = serving
        self.req = req
        self.model = model
        self.id = request_id
        self.streams = streams
        self.created = int(time.time())
        opts = req.stream_options
        self.include_usage = bool(opts and opts.include_usage)
        self.continuous_usage = bool(opts and opts.continuous_usage_stats)

    def _abort_all(self) -> None:
        for s in self.streams:
            if not s.finished:
                s.abort()

    async def _gather(self, n: int) -> tuple[list[list[_Choice]], list[Optional[RequestOutput]]]:
        choices = [[_Choice() for _ in range(n)] for _ in self.streams]
        finals: list[Optional[RequestOutput]] = [None] * len(self.streams)
        try:
            async for i, out in _merged(self.serving, self.streams):
                for c in out.outputs:
                    acc = choices[i][c.index]
                    if c.text:
                        acc.text.append(c.text)
                    acc.token_ids.extend(c.token_ids)
                    if c.logprobs is not None:
                        acc.logprobs = (acc.logprobs or []) + list(c.logprobs)
                    acc.cumulative_logprob = c.cumulative_logprob
                    acc.finish_reason, acc.stop_reason = c.finish_reason, c.stop_reason
                if out.finished:
                    finals[i] = out
        except EngineDeadError as e:
            raise engine_dead_error() from e
        finally:
            self._abort_all()
        return choices, finals


class _CompletionContext(_Context):
    def __init__(self, serving, req: CompletionRequest, model, request_id, prompts: list[_Prompt],
                 streams, n: int, echo_only: bool):
        super().__init__(serving, req, model, request_id, streams)
        self.prompts = prompts
        self.n = n
        self.echo_only = echo_only

    def _echo_logprobs(self, i: int, final: Optional[RequestOutput]):
        p = self.prompts[i]
        plps = final.prompt_logprobs if final is not None else None
        if plps is None:
            plps = [None] * len(p.token_ids)
        return p.token_ids, list(plps) + [None] * (len(p.token_ids) - len(plps))

    async def collect(self) -> dict:
        s, req = self.serving, self.req
        per_prompt, finals = await self._gather(self.n)
        choices, completion_tokens = [], 0
        for i, accs in enumerate(per_prompt):
            p = self.prompts[i]
            for j, acc in enumerate(accs):
                text = "" if self.echo_only else "".join(acc.text)
                token_ids = [] if self.echo_only else acc.token_ids
                completion_tokens += len(token_ids)
                logprobs = None
                if req.logprobs is not None:
                    ids, lps, offset = [], [], 0
                    if req.echo:
                        ids, lps = self._echo_logprobs(i, finals[i])
                    if not self.echo_only:
                        ids = list(ids) + token_ids
                        lps = list(lps) + list(acc.logprobs or [])
                    logprobs, _ = s.completion_logprobs(ids, lps, req.logprobs, offset)
                if req.echo:
                    text = p.text + text
                choice = {"index": i * self.n + j, "text": text, "logprobs": logprobs,
                          "finish_reason": "length" if self.echo_only else acc.finish_reason,
                          "stop_reason": None if self.echo_only else acc.stop_reason}
                if req.prompt_logprobs is not None and j == 0:
                    choice["prompt_logprobs"] = s.prompt_logprobs_json(finals[i].prompt_logprobs if finals[i]
                                                                       else None)
                if req.return_token_ids:
                    choice["prompt_token_ids"] = p.token_ids
                    choice["token_ids"] = token_ids
                choices.append(choice)
        prompt_tokens = sum(len(p.token_ids) for p in self.prompts)
        cached = sum(f.num_cached_tokens for f in finals if f is not None)
        return {"id": self.id, "object": "text_completion", "created": self.created, "model": self.model,
                "choices": choices, "usage": _usage(prompt_tokens, completion_tokens, cached),
                "system_fingerprint": None}

    async def stream(self) -> AsyncIterator[str]:
        s, req, n = self.serving, self.req, self.n
        prompt_tokens = sum(len(p.token_ids) for p in self.prompts)
        completion_tokens = 0
        echoed: set[int] = set()
        finished: set[int] = set()  # choices whose finish_reason went out: the engine may repeat it
        offsets: dict[int, int] = {}
        head = {"id": self.id, "object": "text_completion", "created": self.created, "model": self.model}
        try:
            async for i, out in _merged(self.serving, self.streams):
                p = self.prompts[i]
                for c in out.outputs:
                    idx = i * n + c.index
                    if idx in finished:
                        continue
                    text = "" if self.echo_only else c.text
                    token_ids = [] if self.echo_only else c.token_ids
                    lp_ids, lps = [], []
                    if req.echo and idx not in echoed and (c.token_ids or c.finish_reason):
                        # the prompt once it is fully computed (its logprobs complete)
                        echoed.add(idx)
                        text = p.text + text
                        if req.logprobs is not None:
                            lp_ids, lps = self._echo_logprobs(i, out)
                    completion_tokens += len(token_ids)
                    finish = c.finish_reason if not self.echo_only else ("length" if c.finish_reason else None)
                    if not text and not token_ids and finish is None and not lp_ids:
                        continue
                    if self.echo_only and not text and finish is None:
                        continue
                    logprobs = None
                    if req.logprobs is not None:
                        if not self.echo_only:
                            lp_ids, lps = list(lp_ids) + token_ids, list(lps) + list(c.logprobs or [])
                        logprobs, offsets[idx] = s.completion_logprobs(lp_ids, lps, req.logprobs,
                                                                       offsets.get(idx, 0))
                    choice = {"index": idx, "text": text, "logprobs": logprobs, "finish_reason": finish,
                              "stop_reason": c.stop_reason if finish and not self.echo_only else None}
                    if req.return_token_ids:
                        choice["token_ids"] = token_ids
                    if finish is not None:
                        finished.add(idx)
                    chunk = dict(head, choices=[choice])
                    if self.include_usage:
                        chunk["usage"] = (_usage(prompt_tokens, completion_tokens) if self.continuous_usage
                                          else None)
                    yield _sse(chunk)
            if self.include_usage:
                yield _sse(dict(head, choices=[], usage=_usage(prompt_tokens, completion_tokens)))
        except Exception as e:  # noqa: BLE001 - the status line is gone: report in the stream
            yield _stream_error(e)
        finally:
            self._abort_all()
        yield "data: [DONE]\n\n"


class _ChatContext(_Context):
    def __init__(self, serving, req: ChatCompletionRequest, model, request_id, prompt: _Prompt, stream,
                 n: int, output, echo: str = ""):
        super().__init__(serving, req, model, request_id, [stream])
        self.prompt = prompt
        self.n = n
        self.top_k = req.top_logprobs or 0
        self.output = output  # () -> a new ChatOutput
        self.echo = echo

    async def collect(self) -> dict:
        s, req = self.serving, self.req
        per_prompt, finals = await self._gather(self.n)
        choices, completion_tokens = [], 0
        for j, acc in enumerate(per_prompt[0]):
            completion_tokens += len(acc.token_ids)
            logprobs = None
            if req.logprobs:
                logprobs = {"content": s.chat_logprobs(acc.token_ids, acc.logprobs or [], self.top_k)}
            out = self.output()
            message = out.message("".join(acc.text))
            if self.echo and message["content"] is not None:
                message["content"] = self.echo + message["content"]
            choice = {"index": j, "message": message, "logprobs": logprobs,
                      "finish_reason": out.finish_reason(acc.finish_reason), "stop_reason": acc.stop_reason}
            if req.return_token_ids:
                choice["token_ids"] = acc.token_ids
            choices.append(choice)
        final = finals[0]
        body = {"id": self.id, "object": "chat.completion", "created": self.created, "model": self.model,
                "choices": choices,
                "usage": _usage(len(self.prompt.token_ids), completion_tokens,
                                final.num_cached_tokens if final else 0),
                "system_fingerprint": None}
        if req.prompt_logprobs is not None:
            body["prompt_logprobs"] = s.prompt_logprobs_json(final.prompt_logprobs if final else None)
        if req.return_token_ids:
            body["prompt_token_ids"] = self.prompt.token_ids
        return body

    async def stream(self) -> AsyncIterator[str]:
        s, req = self.serving, self.req
        prompt_tokens = len(self.prompt.token_ids)
        completion_tokens = 0
        head = {"id": self.id, "object": "chat.completion.chunk", "created": self.created, "model": self.model}
        outputs = [self.output() for _ in range(self.n)]

        def chunk(choice: dict) -> str:
            c = dict(head, choices=[choice])
            if self.include_usage:
                c["usage"] = _usage(prompt_tokens, completion_tokens) if self.continuous_usage else None
            return _sse(c)

        try:
            for j in range(self.n):  # the role first, before any token
                yield chunk({"index": j, "delta": {"role": "assistant", "content": self.echo}, "logprobs": None,
                             "finish_reason": None})
            finished: set[int] = set()  # choices whose finish_reason went out: the engine may repeat it
            async for _, out in _merged(self.serving, self.streams):
                for c in out.outputs:
                    if c.index in finished:
                        continue
                    completion_tokens += len(c.token_ids)
                    delta = outputs[c.index].delta(c.text, final=c.finish_reason is not None) \
                        if c.text or c.finish_reason is not None else {}
                    if not delta and c.finish_reason is None and not (req.logprobs and c.token_ids):
                        continue
                    logprobs = None
                    if req.logprobs:
                        logprobs = {"content": s.chat_logprobs(c.token_ids, c.logprobs or [], self.top_k)}
                    choice = {"index": c.index, "delta": delta, "logprobs": logprobs,
                              "finish_reason": outputs[c.index].finish_reason(c.finish_reason)}
                    if c.finish_reason is not None:
                        choice["stop_reason"] = c.stop_reason
                        finished.add(c.index)
                    if req.return_token_ids:
                        choice["token_ids"] = c.token_ids
                    yield chunk(choice)
            if self.include_usage:
                yield _sse(dict(head, choices=[], usage=_usage(prompt_tokens, completion_tokens)))
        except Exception as e:  # noqa: BLE001
            yield _stream_error(e)
        finally:
            self._abort_all()
        yield "data: [DONE]\n\n"
