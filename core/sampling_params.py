"""Per-request generation options, named as in vLLM."""
from __future__ import annotations

import enum
import json
from dataclasses import dataclass, field, replace
from typing import Any, Optional, Union

_GREEDY_EPS = 1e-5


class RequestOutputKind(str, enum.Enum):
    """What each output of a request carries. A str enum, so `kind == "delta"` holds for DELTA."""
    CUMULATIVE = "cumulative"  # everything so far
    DELTA = "delta"  # only what is new since the last output (streaming)
    FINAL_ONLY = "final_only"  # one output, when the request finishes


@dataclass
class StructuredOutputsParams:
    """Constrains a request's output to a grammar: exactly one of json (a JSON schema, as a dict or its text),
    regex, choice (the output is one of these strings), grammar (EBNF as `root ::= ...`, or Lark),
    json_object (any JSON object) or structural_tag (xgrammar's structural-tag JSON)."""
    json: Optional[Union[str, dict]] = None
    regex: Optional[str] = None
    choice: Optional[list[str]] = None
    grammar: Optional[str] = None
    json_object: Optional[bool] = None
    structural_tag: Optional[str] = None
    disable_any_whitespace: bool = False  # JSON without free whitespace between tokens
    disable_additional_properties: bool = False  # objects take only the properties the schema names
    whitespace_pattern: Optional[str] = None  # accepted for vLLM's sake; xgrammar has no such option
    disable_fallback: bool = False

    _KINDS = ("json", "regex", "choice", "grammar", "json_object", "structural_tag")

    def __post_init__(self):
        if hasattr(self.json, "model_json_schema"):  # a pydantic model class
            self.json = self.json.model_json_schema()
        given = [k for k in self._KINDS if getattr(self, k) not in (None, False)]
        if len(given) != 1:
            raise ValueError("StructuredOutputsParams needs exactly one of " + ", ".join(self._KINDS)
                             + (f"; got {', '.join(given)}" if given else ""))
        if isinstance(self.json, str):
            try:
                json.loads(self.json)
            except ValueError as e:
                raise ValueError(f"structured_outputs.json is not valid JSON: {e}") from None
        elif self.json is not None and not isinstance(self.json, dict):
            raise ValueError(f"structured_outputs.json must be a JSON schema (dict or string), got "
                             f"{type(self.json).__name__}")
        for name in ("regex", "grammar", "structural_tag"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value.strip()):
                raise ValueError(f"structured_outputs.{name} must be a non-empty string")
        if self.choice is not None:
            if (not isinstance(self.choice, (list, tuple)) or not self.choice
                    or not all(isinstance(c, str) and c for c in self.choice)):
                raise ValueError("structured_outputs.choice must be a non-empty list of non-empty strings")
            self.choice = list(self.choice)
        from pageport.core.structured_output import check_spec  # imported here: it pulls in the grammar engine
        check_spec(self)

    @property
    def kind(self) -> str:
        return next(k for k in self._KINDS if getattr(self, k) not in (None, False))

    def key(self) -> tuple:
        """Equal keys compile to the same grammar (the compile cache's key)."""
        value = getattr(self, self.kind)
        if self.kind == "json":
            value = json.dumps(json.loads(value) if isinstance(value, str) else value, sort_keys=True)
        elif self.kind == "choice":
            value = tuple(value)
        return (self.kind, value, self.disable_any_whitespace, self.disable_additional_properties)


@dataclass
class SamplingParams:
    n: int = 1
    best_of: Optional[int] = None  # vLLM's; must be absent or equal n
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1: off
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: Optional[dict[int, float]] = None
    seed: Optional[int] = None
    max_tokens: Optional[int] = 16  # None: until the context is full
    min_tokens: int = 0
    stop: Optional[Union[str, list[str]]] = None
    stop_token_ids: Optional[list[int]] = None
    bad_words: Optional[list[str]] = None  # words never generated (their last token is banned after the rest)
    allowed_token_ids: Optional[list[int]] = None  # only these tokens may be generated
    ignore_eos: bool = False
    include_stop_str_in_output: bool = False
    logprobs: Optional[int] = None  # -1: the whole vocabulary
    prompt_logprobs: Optional[int] = None  # -1: the whole vocabulary
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    detokenize: bool = True
    truncate_prompt_tokens: Optional[int] = None  # keep only the prompt's last k tokens; -1: max_model_len
    structured_outputs: Optional[StructuredOutputsParams] = None
    # per-request callables are refused, as in vLLM v1: processors are classes given to the engine
    # (LLM(logits_processors=[...])) and configured per request through extra_args
    logits_processors: Optional[list[Any]] = None
    extra_args: Optional[dict[str, Any]] = None  # free-form, for plugins and custom logits processors
    output_kind: Union[RequestOutputKind, str] = RequestOutputKind.CUMULATIVE
    # bad_words as token sequences, filled by the engine's front end from its tokenizer (vLLM's name)
    _bad_words_token_ids: Optional[list[list[int]]] = field(default=None, repr=False, compare=False)

    def __post_init__(self):
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = [s for s in (self.stop or []) if s]
        self.stop_token_ids = list(self.stop_token_ids or [])
        self.logit_bias = {int(k): float(v) for k, v in (self.logit_bias or {}).items()}
        if self.top_k == -1:
            self.top_k = 0
        if isinstance(self.bad_words, str):
            self.bad_words = [self.bad_words]
        if isinstance(self.structured_outputs, dict):
            self.structured_outputs = StructuredOutputsParams(**self.structured_outputs)
        self._validate()
        self.output_kind = RequestOutputKind(self.output_kind)

    def _validate(self) -> None:
        def bad(name, rule):
            raise ValueError(f"SamplingParams.{name} {rule}, got {getattr(self, name)!r}")

        def is_int(x) -> bool:
            return isinstance(x, int) and not isinstance(x, bool)

        if not is_int(self.n) or self.n < 1:
            bad("n", "must be an integer >= 1")
        if self.best_of is not None and self.best_of != self.n:
            bad("best_of", f"is not supported beyond n (it must be None or equal n={self.n})")
        if self.temperature < 0:
            bad("temperature", "must be >= 0")
        if not 0 < self.top_p <= 1:
            bad("top_p", "must be in (0, 1]")
        if not is_int(self.top_k) or self.top_k < 0:
            bad("top_k", "must be 0 or -1 (off) or a positive integer")
        if not 0 <= self.min_p <= 1:
            bad("min_p", "must be in [0, 1]")
        if not -2 <= self.presence_penalty <= 2:
            bad("presence_penalty", "must be in [-2, 2]")
        if not -2 <= self.frequency_penalty <= 2:
            bad("frequency_penalty", "must be in [-2, 2]")
        if self.repetition_penalty <= 0:
            bad("repetition_penalty", "must be > 0")
        if self.max_tokens is not None and (not is_int(self.max_tokens) or self.max_tokens < 1):
            bad("max_tokens", "must be an integer >= 1")
        if self.min_tokens < 0 or (self.max_tokens is not None and self.min_tokens > self.max_tokens):
            bad("min_tokens", "must be in [0, max_tokens]")
        for name in ("logprobs", "prompt_logprobs"):
            k = getattr(self, name)
            if k is not None and (not is_int(k) or k < -1):
                bad(name, "must be >= 0, or -1 for the whole vocabulary")
        if self.truncate_prompt_tokens is not None and (not is_int(self.truncate_prompt_tokens)
                                                        or self.truncate_prompt_tokens == 0
                                                        or self.truncate_prompt_tokens < -1):
            bad("truncate_prompt_tokens", "must be >= 1, or -1 for max_model_len")
        if self.seed is not None and not is_int(self.seed):
            bad("seed", "must be an integer")
        if self.output_kind not in tuple(RequestOutputKind) + tuple(k.value for k in RequestOutputKind):
            bad("output_kind", "must be 'cumulative', 'delta' or 'final_only' (a RequestOutputKind)")
        if any(not is_int(t) or t < 0 for t in self.stop_token_ids):
            bad("stop_token_ids", "must be token ids >= 0")
        if self.allowed_token_ids is not None:
            if not self.allowed_token_ids or any(not is_int(t) or t < 0 for t in self.allowed_token_ids):
                bad("allowed_token_ids", "must be a non-empty list of token ids >= 0")
        if self.bad_words is not None and not all(isinstance(w, str) and w.strip() for w in self.bad_words):
            bad("bad_words", "must be a list of non-empty strings")
        if self.structured_outputs is not None and not isinstance(self.structured_outputs,
                                                                   StructuredOutputsParams):
            bad("structured_outputs", "must be a StructuredOutputsParams")
        if self.extra_args is not None and not isinstance(self.extra_args, dict):
            bad("extra_args", "must be a dict")
        if self.logits_processors:
            bad("logits_processors", "takes no per-request callables (as in vLLM v1, they cannot cross into the "
                                     "engine core's process): give LogitsProcessor classes to "
                                     "LLM(logits_processors=[...]) and configure them per request through extra_args")
        if self.stop and not self.detokenize:
            bad("stop", "needs detokenize=True (stop strings are matched in the text)")

    @property
    def greedy(self) -> bool:
        return self.temperature < _GREEDY_EPS

    def clone(self, **changes) -> "SamplingParams":
        return replace(self, **changes)


GuidedDecodingParams = StructuredOutputsParams  # vLLM's former name


# Options the engine core applies itself; an engine lists those it does in `sampling_features` (a set of these
# names), and a request using one it does not is refused instead of being run without it.
ENGINE_FEATURES = ("structured_outputs", "bad_words", "allowed_token_ids", "logits_processors", "logprobs_all",
                   "truncate_prompt_tokens")


def features_used(params: SamplingParams) -> list[str]:
    used = [name for name in ("structured_outputs", "bad_words", "allowed_token_ids", "logits_processors",
                              "truncate_prompt_tokens") if getattr(params, name)]
    if params.logprobs == -1 or params.prompt_logprobs == -1:
        used.append("logprobs_all")
    return used


def engine_features(engine) -> frozenset:
    """The ENGINE_FEATURES an engine (LLMEngine, AsyncLLMEngine or a wrapper of one) applies."""
    found = getattr(engine, "sampling_features", None)
    if found is None and getattr(engine, "engine", None) is not None:
        found = getattr(engine.engine, "sampling_features", None)
    return frozenset(found or ())


def check_engine_features(params: SamplingParams, supported: frozenset) -> None:
    missing = [f for f in features_used(params) if f not in supported]
    if missing:
        what = "logprobs=-1 (the whole vocabulary)" if missing[0] == "logprobs_all" else missing[0]
        raise ValueError(f"{what} is not applied by this engine yet; leave it out")


def prepare_request(params: SamplingParams, prompt_token_ids: list[int], engine) -> list[int]:
    """The front end's part of the options the engine core applies, before a request is sent: logprobs=-1
    against max_logprobs, allowed_token_ids against the vocabulary, bad_words tokenized (vLLM's rule), the
    engine's logits processors' `validate_params`, and truncate_prompt_tokens (the prompt's last k tokens are
    kept). Returns the prompt token ids to run. ValueError naming the field for a value the engine cannot take."""
    config = engine.config
    vocab = engine.vocab_size
    cap = getattr(config, "max_logprobs", 20)
    for name in ("logprobs", "prompt_logprobs"):
        if getattr(params, name) == -1 and 0 <= cap < vocab:
            raise ValueError(f"{name}=-1 asks for the whole vocabulary ({vocab} tokens), more than max_logprobs="
                             f"{cap}; start the engine with max_logprobs=-1 (no limit), as in vLLM")
    if params.allowed_token_ids:
        out = next((t for t in params.allowed_token_ids if not 0 <= t < vocab), None)
        if out is not None:
            raise ValueError(f"allowed_token_ids: token id {out} is out of the vocabulary [0, {vocab})")
    if params.bad_words:
        if engine.tokenizer is None:
            raise ValueError("bad_words needs the model's tokenizer; this model has none")
        from pageport.core.structured_output.token_masks import bad_words_token_ids
        ids = bad_words_token_ids(engine.tokenizer, params.bad_words)
        out = next((t for s in ids for t in s if not 0 <= t < vocab), None)
        if out is not None:
            raise ValueError(f"bad_words: a word tokenizes to id {out}, outside the vocabulary [0, {vocab})")
        params._bad_words_token_ids = ids
    for cls in getattr(engine, "logits_processor_classes", ()):
        check = getattr(cls, "validate_params", None)
        if check is not None:
            check(params)
    k = params.truncate_prompt_tokens
    if k is not None:
        if k == -1:
            k = config.max_model_len
        elif k > config.max_model_len:
            raise ValueError(f"truncate_prompt_tokens={k} is more than max_model_len={config.max_model_len}")
        if len(prompt_token_ids) > k:
            prompt_token_ids = prompt_token_ids[-k:]
    return prompt_token_ids
