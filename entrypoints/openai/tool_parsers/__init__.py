"""Tool-call parsers: a model's raw output -> (content, tool calls), whole or streamed.

Each parser is pure text processing for one model family's format, chosen with `--tool-call-parser NAME`:

* hermes       `<tool_call>{"name": ..., "arguments": {...}}</tool_call>` (Hermes, Qwen2.5, Qwen3)
* qwen3        `<tool_call>` blocks holding JSON (Qwen3) or `<function=NAME><parameter=P>V</parameter></function>`
               (Qwen3-Coder); also as qwen3_coder / qwen3_xml
* llama3_json  the output is `{"name": ..., "parameters": {...}}` (several joined by `;`), maybe after
               `<|python_tag|>` (Llama 3.1-3.3)
* mistral      `[TOOL_CALLS][{"name": ..., "arguments": {...}}]`, or `[TOOL_CALLS]NAME[ARGS]{...}` (newer tokenizers)
* pythonic     `[get_weather(city="Paris"), now()]` (Llama 3.2/4 pythonic, ToolACE), maybe inside
               `<|python_start|>...<|python_end|>`

`ToolCallStreamer` turns any of them into streaming: content passes through as it comes (held back only
while it might be the start of a tool-call marker) and each tool call goes out once it is complete.
"""
from __future__ import annotations

import ast
import json
import re
import uuid
from dataclasses import dataclass, field
from typing import Optional


@dataclass
class ToolCall:
    name: str
    arguments: str  # JSON text, as OpenAI sends it
    id: str = field(default_factory=lambda: f"call_{uuid.uuid4().hex[:24]}")

    def to_openai(self) -> dict:
        return {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}


@dataclass
class Extracted:
    content: Optional[str]
    tool_calls: list[ToolCall]

    @property
    def tools_called(self) -> bool:
        return bool(self.tool_calls)


def _args_text(args) -> str:
    if isinstance(args, str):  # some models write the arguments as a JSON string
        try:
            args = json.loads(args)
        except ValueError:
            return json.dumps(args)
    return json.dumps({} if args is None else args, ensure_ascii=False)


def _call_from_json(obj, args_keys=("arguments", "parameters")) -> Optional[ToolCall]:
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str) or not obj["name"]:
        return None
    args = next((obj[k] for k in args_keys if k in obj), {})
    return ToolCall(obj["name"], _args_text(args))


def _json_values(text: str) -> Optional[list]:
    """Consecutive JSON values in text (whitespace, `;` or `,` between them); None unless all of it parses."""
    dec, i, out = json.JSONDecoder(), 0, []
    while True:
        while i < len(text) and text[i] in " \t\r\n;,":
            i += 1
        if i == len(text):
            return out
        try:
            value, i = dec.raw_decode(text, i)
        except ValueError:
            return None
        out.append(value)


def _array_prefix(text: str) -> list:
    """The complete elements of a JSON array still being written (`[{...}, {...`)."""
    body = text.strip()
    if not body.startswith("["):
        return []
    dec, i, out = json.JSONDecoder(), 1, []
    while True:
        while i < len(body) and body[i] in " \t\r\n,":
            i += 1
        try:
            value, i = dec.raw_decode(body, i)
        except ValueError:
            return out
        out.append(value)


class ToolParser:
    """Subclasses give `markers` (text that opens the tool-call part; None: the output itself must start with
    `leading`) and `parse_calls(region)` -> the complete calls in the tool-call part (None: not parseable)."""
    name = ""
    markers: tuple[str, ...] = ()
    leading: tuple[str, ...] = ()  # for formats without a marker: the stripped output starts with one of these

    def __init__(self, tokenizer=None):
        self.tokenizer = tokenizer

    def parse_calls(self, region: str, final: bool) -> Optional[list[ToolCall]]:
        raise NotImplementedError

    def split(self, text: str) -> Optional[tuple[str, str]]:
        """(content before the tool calls, the tool-call part), or None when there is no tool-call part."""
        idx = [(text.find(m), m) for m in self.markers if m in text]
        if idx:
            i, _ = min(idx)
            return text[:i], text[i:]
        stripped = text.lstrip()
        if self.leading and stripped.startswith(self.leading):
            return "", stripped
        return None

    def extract_tool_calls(self, text: str) -> Extracted:
        parts = self.split(text)
        if parts is None:
            return Extracted(text, [])
        content, region = parts
        calls = self.parse_calls(region, final=True)
        if not calls:
            return Extracted(text, [])  # not a well-formed call: the text stays content
        return Extracted(content if content.strip() else None, calls)

    def could_start(self, tail: str) -> bool:
        """Whether `tail` (the end of the content so far) may be the beginning of a marker."""
        return any(m.startswith(tail) for m in self.markers if tail)


class HermesToolParser(ToolParser):
    name = "hermes"
    markers = ("<tool_call>",)
    _block = re.compile(r"<tool_call>(.*?)(?:</tool_call>|$)", re.S)

    def parse_calls(self, region, final):
        calls = []
        for m in self._block.finditer(region):
            body, closed = m.group(1).strip(), m.group(0).endswith("</tool_call>")
            if not closed and not final:
                break  # still being written
            call = self.parse_block(body)
            if call is None:
                return None if final else calls
            calls.append(call)
        return calls

    def parse_block(self, body: str) -> Optional[ToolCall]:
        try:
            return _call_from_json(json.loads(body))
        except ValueError:
            return None


class Qwen3ToolParser(HermesToolParser):
    name = "qwen3"
    _function = re.compile(r"<function=([^>\s]+)>(.*?)(?:</function>|$)", re.S)
    _param = re.compile(r"<parameter=([^>\s]+)>\n?(.*?)\n?</parameter>", re.S)

    def parse_block(self, body):
        if body.startswith("{"):
            return super().parse_block(body)
        m = self._function.match(body)
        if m is None:
            return None
        args = {}
        for p in self._param.finditer(m.group(2)):
            raw = p.group(2)
            try:  # numbers, booleans, objects as JSON; anything else is a string
                args[p.group(1)] = json.loads(raw)
            except ValueError:
                args[p.group(1)] = raw
        return ToolCall(m.group(1), json.dumps(args, ensure_ascii=False))


class Llama3JsonToolParser(ToolParser):
    name = "llama3_json"
    markers = ("<|python_tag|>",)
    leading = ("{",)

    def parse_calls(self, region, final):
        region = region.removeprefix("<|python_tag|>").strip()
        values = _json_values(region)
        if values is None:
            if final:
                return None
            # the complete ones so far: parse value by value
            dec, i, values = json.JSONDecoder(), 0, []
            while True:
                while i < len(region) and region[i] in " \t\r\n;":
                    i += 1
                try:
                    v, i = dec.raw_decode(region, i)
                except ValueError:
                    break
                values.append(v)
        calls = [_call_from_json(v) for v in values]
        return None if any(c is None for c in calls) else calls


class MistralToolParser(ToolParser):
    name = "mistral"
    markers = ("[TOOL_CALLS]",)
    _named = re.compile(r"\[TOOL_CALLS\]\s*([A-Za-z0-9_.\-]+)\s*\[ARGS\]")

    def parse_calls(self, region, final):
        if self._named.match(region):  # NAME[ARGS]{...} per call
            calls, dec = [], json.JSONDecoder()
            pos = 0
            while (m := self._named.match(region, pos)) is not None:
                try:
                    args, end = dec.raw_decode(region, m.end())
                except ValueError:
                    return None if final else calls
                calls.append(ToolCall(m.group(1), _args_text(args)))
                pos = end
                while pos < len(region) and region[pos].isspace():
                    pos += 1
            return calls
        body = region.replace("[TOOL_CALLS]", " ").strip()
        values = _json_values(body)
        if values is None:
            if final:
                return None
            values = [_array_prefix(body)]
        flat = [x for v in values for x in (v if isinstance(v, list) else [v])]
        calls = [_call_from_json(v) for v in flat]
        return None if any(c is None for c in calls) else calls


class PythonicToolParser(ToolParser):
    name = "pythonic"
    markers = ("<|python_start|>",)
    leading = ("[",)

    def parse_calls(self, region, final):
        region = region.removeprefix("<|python_start|>").strip()
        region = region.removesuffix("<|python_end|>").strip()
        calls = self._parse(region)
        if calls is not None or final:
            return calls
        # still being written: the longest prefix that closes a call, closed as a list
        ends = [i for i, ch in enumerate(region) if ch == ")"][-16:]
        for i in reversed(ends):
            calls = self._parse(region[:i + 1] + "]")
            if calls is not None:
                return calls
        return []

    def _parse(self, region: str) -> Optional[list[ToolCall]]:
        try:
            tree = ast.parse(region, mode="eval")
        except SyntaxError:
            return None
        if not isinstance(tree.body, ast.List):
            return None
        calls = []
        for node in tree.body.elts:
            if not isinstance(node, ast.Call) or node.args:
                return None
            name = _dotted(node.func)
            if name is None:
                return None
            try:
                args = {kw.arg: ast.literal_eval(kw.value) for kw in node.keywords}
            except ValueError:
                return None
            if None in args:  # **kwargs
                return None
            calls.append(ToolCall(name, json.dumps(args, ensure_ascii=False)))
        return calls


def _dotted(node) -> Optional[str]:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        base = _dotted(node.value)
        return None if base is None else f"{base}.{node.attr}"
    return None


TOOL_PARSERS: dict[str, type[ToolParser]] = {
    "hermes": HermesToolParser, "qwen3": Qwen3ToolParser, "qwen3_coder": Qwen3ToolParser,
    "qwen3_xml": Qwen3ToolParser, "llama3_json": Llama3JsonToolParser, "llama4_json": Llama3JsonToolParser,
    "mistral": MistralToolParser, "pythonic": PythonicToolParser, "llama4_pythonic": PythonicToolParser,
}


def get_tool_parser(name: str) -> type[ToolParser]:
    try:
        return TOOL_PARSERS[name]
    except KeyError:
        raise ValueError(f"unknown tool-call parser {name!r}; choose one of: {', '.join(TOOL_PARSERS)}") from None


class ToolCallStreamer:
    """Feed text deltas; get (content delta, tool calls completed by it). `finish()` flushes the rest."""

    def __init__(self, parser: ToolParser):
        self.parser = parser
        self.text = ""
        self.sent_content = 0  # characters of `text` sent as content
        self.region_start: Optional[int] = None  # where the tool-call part begins, once seen
        self.calls: list[ToolCall] = []

    def feed(self, delta: str) -> tuple[str, list[ToolCall]]:
        self.text += delta
        if self.region_start is None:
            parts = self.parser.split(self.text)
            if parts is not None:
                self.region_start = len(self.text) - len(parts[1])
            elif self.parser.leading and not self.text.strip():
                return "", []  # only whitespace so far: it may still open a marker-less call
            else:
                return self._content(self._safe_end()), []
        out = self._content(self.region_start)
        calls = self.parser.parse_calls(self.text[self.region_start:], final=False) or []
        new = calls[len(self.calls):]
        self.calls.extend(new)
        return out, new

    def _safe_end(self) -> int:
        """Content may go out up to where a marker might begin."""
        text = self.text
        for k in range(min(len(text), max((len(m) for m in self.parser.markers), default=0)), 0, -1):
            if self.parser.could_start(text[-k:]):
                return len(text) - k
        return len(text)

    def _content(self, end: int) -> str:
        if self.parser.leading and self.sent_content == 0 and not self.text[:end].strip():
            return ""
        out = self.text[self.sent_content:end]
        self.sent_content = max(self.sent_content, end)
        return out

    def finish(self) -> tuple[str, list[ToolCall]]:
        """At the end: calls not yet sent; if the tool-call part never parsed, it goes out as content."""
        if self.region_start is None:
            return self._content(len(self.text)), []
        final = self.parser.parse_calls(self.text[self.region_start:], final=True)
        if not final and not self.calls:
            return self._content(len(self.text)), []  # not a call after all: the text is content
        new = (final or [])[len(self.calls):]
        self.calls.extend(new)
        return self._content(self.region_start), new


# parsers for the grammars the server imposes itself (tool_choice required / named) -------------------------
def parse_required(text: str) -> Optional[list[ToolCall]]:
    """tool_choice=required: the output is a JSON array of {"name", "parameters"}."""
    try:
        values = json.loads(text)
    except ValueError:
        return None
    if not isinstance(values, list):
        return None
    calls = [_call_from_json(v, ("parameters", "arguments")) for v in values]
    return None if any(c is None for c in calls) else calls


class RequiredCallParser(ToolParser):
    """Streams tool_choice=required output (a JSON array) one call at a time."""
    name = "required"
    leading = ("[",)

    def parse_calls(self, region, final):
        if final:
            return parse_required(region)
        calls = [_call_from_json(v, ("parameters", "arguments")) for v in _array_prefix(region)]
        return calls[:calls.index(None)] if None in calls else calls

