"""Grammar engines behind one small interface: compile a spec against the vocabulary, then one matcher per
request that fills its bitmask row and accepts tokens."""
from __future__ import annotations

import json
import re
from typing import Any, Protocol

import torch

from pageport.core.sampling_params import StructuredOutputsParams


class GrammarMatcher(Protocol):
    def fill_bitmask(self, bitmask: torch.Tensor, row: int) -> None: ...
    def accept_token(self, token_id: int) -> bool: ...
    def rollback(self, num_tokens: int) -> None: ...  # undo the last accepted tokens (checking proposals)
    def is_terminated(self) -> bool: ...


class GrammarBackend(Protocol):
    def compile(self, params: StructuredOutputsParams) -> Any: ...  # raises ValueError saying what is wrong
    def matcher(self, compiled: Any) -> GrammarMatcher: ...
    # optional, every row of a step at once (else one row at a time): fill_bitmasks(matchers, bitmask, rows),
    # accept_tokens(matchers, tokens) -> [accepted]


# xgrammar ---------------------------------------------------------------------------------------------------
MAX_WHITESPACE_RUN = 24
_XGR_NOISE = re.compile(r"^\[[0-9:]+\] \S+?\.cc:\d+: ")  # "[14:23:49] /project/cpp/x.cc:94: " before the text


def _xgrammar():
    try:
        import xgrammar
    except ImportError as e:
        raise ValueError(f"structured outputs need xgrammar: pip install xgrammar ({e})") from None
    return xgrammar


def _clean(e: Exception) -> str:
    return _XGR_NOISE.sub("", str(e).strip()).strip()


def _is_ebnf(grammar: str) -> bool:
    return "::=" in grammar


def _choice_ebnf(choices: list[str]) -> str:
    # JSON string escapes are the EBNF literal escapes xgrammar reads
    return "root ::= " + " | ".join(json.dumps(c, ensure_ascii=False) for c in choices)


def _schema(params: StructuredOutputsParams) -> Any:
    schema = json.loads(params.json) if isinstance(params.json, str) else params.json
    if params.disable_additional_properties:
        schema = _no_additional_properties(schema)
    return schema


def _no_additional_properties(node: Any) -> Any:
    if isinstance(node, list):
        return [_no_additional_properties(x) for x in node]
    if not isinstance(node, dict):
        return node
    out = {k: _no_additional_properties(v) for k, v in node.items()}
    if out.get("type") == "object" or "properties" in out:
        out.setdefault("additionalProperties", False)
    return out


def _structural_tag(text: str) -> str:
    """vLLM's older form {"structures": [{"begin", "schema", "end"}], "triggers": [...]} as xgrammar's
    {"format": {"type": "triggered_tags", ...}}; the newer form passes through."""
    try:
        tag = json.loads(text)
    except ValueError:
        return text  # xgrammar says what is wrong with it
    if not isinstance(tag, dict) or "format" in tag or "structures" not in tag:
        return text
    tags = [{"begin": s.get("begin", ""), "content": {"type": "json_schema", "json_schema": s.get("schema", {})},
             "end": s.get("end", "")} for s in tag["structures"]]
    return json.dumps({"type": "structural_tag", "format": {"type": "triggered_tags",
                                                           "triggers": tag.get("triggers", []), "tags": tags}})


def _grammar(xgr, params: StructuredOutputsParams):
    """The tokenizer-free grammar of a spec: building it checks the spec."""
    kind = params.kind
    try:
        if kind in ("json", "json_object"):
            # json_object: any JSON object (xgrammar's built-in JSON grammar takes any value). Whitespace runs
            # are bounded: room for pretty-printing, none for a small model's endless newlines
            schema = json.dumps(_schema(params)) if kind == "json" else '{"type": "object"}'
            return xgr.Grammar.from_json_schema(schema, any_whitespace=not params.disable_any_whitespace,
                                                max_whitespace_cnt=MAX_WHITESPACE_RUN)
        if kind == "regex":
            return xgr.Grammar.from_regex(params.regex)
        if kind == "choice":
            return xgr.Grammar.from_ebnf(_choice_ebnf(params.choice))
        if kind == "grammar":
            g = params.grammar
            return xgr.Grammar.from_ebnf(g) if _is_ebnf(g) else xgr.Grammar.from_lark(g)
        if kind == "structural_tag":
            return xgr.Grammar.from_structural_tag(_structural_tag(params.structural_tag))
    except Exception as e:  # noqa: BLE001 - xgrammar raises RuntimeError/ValueError subclasses for bad specs
        what = {"json": "JSON schema", "grammar": "grammar (EBNF or Lark)", "json_object": "JSON grammar",
                "structural_tag": "structural tag"}.get(kind, kind)
        raise ValueError(f"invalid {what} in structured_outputs: {_clean(e)}") from None
    raise ValueError(f"unknown structured output kind {kind!r}")


_CHECKED: dict[tuple, str] = {}  # spec key -> "" (valid) or what is wrong; small, cleared when full


def check_spec(params: StructuredOutputsParams) -> None:
    """ValueError saying what is wrong with an invalid schema, regex or grammar; no tokenizer needed."""
    key = params.key()
    err = _CHECKED.get(key)
    if err is None:
        try:
            _grammar(_xgrammar(), params)
            err = ""
        except ValueError as e:
            err = str(e)
        if len(_CHECKED) >= 512:
            _CHECKED.clear()
        _CHECKED[key] = err
    if err:
        raise ValueError(err)


class _XgrammarMatcher:
    def __init__(self, xgr, compiled):
        self._m = xgr.GrammarMatcher(compiled)

    def fill_bitmask(self, bitmask: torch.Tensor, row: int) -> None:
        self._m.fill_next_token_bitmask(bitmask, row)

    def accept_token(self, token_id: int) -> bool:
        return self._m.accept_token(token_id)

    def rollback(self, num_tokens: int) -> None:
        self._m.rollback(num_tokens)

    def is_terminated(self) -> bool:
        return self._m.is_terminated()


class XgrammarBackend:
    def __init__(self, tokenizer, vocab_size: int, max_threads: int = 2):
        self.xgr = _xgrammar()
        info = self.xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size)
        self.compiler = self.xgr.GrammarCompiler(info, max_threads=max_threads)
        self._batch = None  # a BatchGrammarMatcher, made on first use

    def compile(self, params: StructuredOutputsParams):
        grammar = _grammar(self.xgr, params)
        try:
            return self.compiler.compile_grammar(grammar)
        except Exception as e:  # noqa: BLE001
            raise ValueError(f"the {params.kind} grammar did not compile: {_clean(e)}") from None

    def matcher(self, compiled) -> GrammarMatcher:
        return _XgrammarMatcher(self.xgr, compiled)

    def fill_bitmasks(self, matchers: list, bitmask: torch.Tensor, rows: list[int]) -> None:
        """A step's rows together, on xgrammar's own threads (about 6x one row at a time, one thread)."""
        if self._batch is None:
            self._batch = self.xgr.BatchGrammarMatcher(max_threads="auto")
        self._batch.batch_fill_next_token_bitmask([m._m for m in matchers], bitmask, indices=rows)

    def accept_tokens(self, matchers: list, tokens: list[int]) -> list[bool]:
        return self.xgr.BatchGrammarMatcher.batch_accept_token([m._m for m in matchers], tokens)


# llguidance ---------------------------------------------------------------------------------------------------
class _LlguidanceMatcher:
    def __init__(self, llg_torch, matcher):
        self._torch, self._m = llg_torch, matcher

    def fill_bitmask(self, bitmask: torch.Tensor, row: int) -> None:
        self._torch.fill_next_token_bitmask(self._m, bitmask, row)

    def accept_token(self, token_id: int) -> bool:
        # checked first: a refused token would leave llguidance's matcher in its error state
        return self._m.validate_tokens([token_id]) == 1 and bool(self._m.consume_token(token_id))

    def rollback(self, num_tokens: int) -> None:
        self._m.rollback(num_tokens)

    def is_terminated(self) -> bool:
        return self._m.is_stopped()


class LlguidanceBackend:
    """llguidance (`pip install llguidance`): same bitmask layout. JSON objects take only their declared
    properties here too, so that both backends generate the same language for a schema."""

    def __init__(self, tokenizer, vocab_size: int):
        try:
            import llguidance
            import llguidance.hf
            import llguidance.torch
        except ImportError as e:
            raise ValueError(f"the guidance backend needs llguidance: pip install llguidance ({e})") from None
        self.llg = llguidance
        self.tokenizer = llguidance.hf.from_tokenizer(tokenizer, n_vocab=vocab_size)

    def compile(self, params: StructuredOutputsParams) -> str:
        M, kind = self.llg.LLMatcher, params.kind
        if kind in ("json", "json_object"):
            schema = _no_additional_properties(_schema(params) if kind == "json" else {"type": "object"})
            grammar = M.grammar_from_json_schema(schema, defaults={
                "whitespace_flexible": not params.disable_any_whitespace})
        elif kind == "regex":
            grammar = M.grammar_from_regex(params.regex)
        elif kind == "choice":
            grammar = M.grammar_from_lark("start: " + " | ".join(json.dumps(c, ensure_ascii=False)
                                                                 for c in params.choice))
        elif kind == "grammar":
            g = params.grammar
            from llguidance.gbnf_to_lark import gbnf_to_lark
            grammar = M.grammar_from_lark(gbnf_to_lark(g) if _is_ebnf(g) else g)
        else:
            raise ValueError(f"the guidance backend does not take {kind}; use xgrammar")
        err = M.validate_grammar(grammar)
        if err:
            raise ValueError(f"invalid {kind} in structured_outputs: {err.strip()}")
        return grammar

    def matcher(self, compiled: str) -> GrammarMatcher:
        import llguidance.torch
        return _LlguidanceMatcher(llguidance.torch, self.llg.LLMatcher(self.tokenizer, compiled))


BACKENDS = {"xgrammar": XgrammarBackend, "guidance": LlguidanceBackend, "llguidance": LlguidanceBackend}
_NOT_HERE = ("outlines", "lm-format-enforcer")


def make_backend(name: str, tokenizer, vocab_size: int) -> GrammarBackend:
    name = (name or "auto").lower()
    if name == "auto":
        name = "xgrammar"
    if name not in BACKENDS:
        why = "is not built into pageport yet" if name in _NOT_HERE else "is unknown"
        raise ValueError(f"structured output backend {name!r} {why}; choose one of: {', '.join(BACKENDS)}")
    if tokenizer is None:
        raise ValueError("structured outputs need the model's tokenizer")
    return BACKENDS[name](tokenizer, vocab_size)
