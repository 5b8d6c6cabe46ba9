"""What a chat completion's text becomes: reasoning (`--reasoning-parser`), content and tool calls, whole or as
streaming deltas. One `ChatOutput` per choice.

Tool modes: "none" (plain content), "auto" (the model may call tools; `--tool-call-parser` finds the calls),
"required" (the grammar made the output a JSON array of calls), "named" (the grammar made the output the named
function's arguments).
"""
from __future__ import annotations

import json
from typing import Any, Optional

from pageport.entrypoints.openai.reasoning_parsers import ReasoningParser, ReasoningStreamer
from pageport.entrypoints.openai.tool_parsers import (RequiredCallParser, ToolCall, ToolCallStreamer, ToolParser,
                                                      parse_required)


def tools_schema(tools: list[dict], parallel: bool) -> dict:
    """tool_choice=required: a JSON array of calls, each {"name": one of the tools, "parameters": its schema}."""
    options = [{"type": "object", "properties": {"name": {"const": t["name"]},
                                                 "parameters": t.get("parameters") or {"type": "object"}},
                "required": ["name", "parameters"], "additionalProperties": False} for t in tools]
    schema: dict[str, Any] = {"type": "array", "minItems": 1,
                              "items": options[0] if len(options) == 1 else {"anyOf": options}}
    if not parallel:
        schema["maxItems"] = 1
    return schema


class ChatOutput:
    def __init__(self, mode: str = "none", tool_parser: Optional[ToolParser] = None,
                 reasoning_parser: Optional[ReasoningParser] = None, named: Optional[str] = None):
        self.mode = mode
        self.named = named
        self.reasoning_parser = reasoning_parser
        self.tool_parser = tool_parser if mode == "auto" else RequiredCallParser() if mode == "required" else None
        self._reasoning = ReasoningStreamer(reasoning_parser) if reasoning_parser is not None else None
        self._tools = ToolCallStreamer(self.tool_parser) if self.tool_parser is not None else None
        self._named_call: Optional[ToolCall] = None
        self.num_calls = 0

    # whole ------------------------------------------------------------------------------------------------
    def message(self, text: str) -> dict:
        """The assistant message of a finished (non-streamed) choice."""
        reasoning, content = None, text
        if self.reasoning_parser is not None:
            reasoning, content = self.reasoning_parser.extract_reasoning(text)
        calls: list[ToolCall] = []
        if self.mode == "named":
            calls, content = [ToolCall(self.named, content or "")], None
        elif self.mode == "required":
            calls = parse_required(content or "") or []
            content = None if calls else content
        elif self.mode == "auto" and content:
            out = self.tool_parser.extract_tool_calls(content)
            calls, content = out.tool_calls, out.content
        self.num_calls = len(calls)
        msg = {"role": "assistant", "content": content if content is not None or calls else "",
               "tool_calls": [c.to_openai() for c in calls]}
        if self.reasoning_parser is not None:
            msg["reasoning_content"] = reasoning
        return msg

    # streamed ---------------------------------------------------------------------------------------------
    def delta(self, text: str, final: bool = False) -> dict:
        """The delta for the next piece of text (final: the last piece, flushing whatever was held)."""
        reasoning, content = "", text
        if self._reasoning is not None:
            reasoning, content = self._reasoning.feed(text)
            if final:
                r2, c2 = self._reasoning.finish()
                reasoning, content = reasoning + r2, content + c2
        out: dict[str, Any] = {}
        if reasoning:
            out["reasoning_content"] = reasoning
        calls: list[dict] = []
        if self.mode == "named":
            if self._named_call is None and (content or final):
                self._named_call = ToolCall(self.named, "")
                calls.append({"index": 0, "id": self._named_call.id, "type": "function",
                              "function": {"name": self.named, "arguments": content}})
                self.num_calls = 1
            elif content:
                calls.append({"index": 0, "function": {"arguments": content}})
            content = ""
        elif self._tools is not None:
            content, new = self._tools.feed(content)
            if final:
                c2, more = self._tools.finish()
                content, new = content + c2, new + more
            for call in new:
                calls.append(dict(call.to_openai(), index=self.num_calls))
                self.num_calls += 1
        if content:
            out["content"] = content
        if calls:
            out["tool_calls"] = calls
        return out

    def finish_reason(self, reason: Optional[str]) -> Optional[str]:
        """"tool_calls" when the model stopped after calling tools; otherwise the engine's reason."""
        return "tool_calls" if reason == "stop" and self.num_calls else reason


def template_tools(tools) -> Optional[list[dict]]:
    """The request's tools as chat templates take them (OpenAI's shape)."""
    if not tools:
        return None
    return [{"type": "function", "function": t.function.model_dump(exclude_none=True)} for t in tools]


def arguments_dict(arguments: Any) -> Any:
    """An assistant tool call's arguments (JSON text in OpenAI's messages) as the object templates iterate."""
    if isinstance(arguments, str):
        try:
            return json.loads(arguments)
        except ValueError:
            return arguments
    return arguments
