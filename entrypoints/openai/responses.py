"""POST /v1/responses: OpenAI's Responses API over the chat machinery (templates, tools, reasoning, output
constraints), plain and streamed as its typed events. Stateless: `previous_response_id` and `background` are
refused, `store` is accepted and nothing is kept."""
from __future__ import annotations

import json
import time
import uuid
from typing import Any, AsyncIterator, Optional, Union

from pydantic import Field, ValidationError

from pageport.core.async_engine import EngineDeadError
from pageport.entrypoints.openai.errors import bad_request
from pageport.entrypoints.openai.protocol import ChatCompletionRequest, OpenAIBaseModel


class ResponsesRequest(OpenAIBaseModel):
    model: Optional[str] = None
    input: Union[str, list[dict[str, Any]]]
    instructions: Optional[str] = None
    max_output_tokens: Optional[int] = Field(None, ge=1)
    temperature: Optional[float] = Field(None, ge=0.0)
    top_p: Optional[float] = Field(None, gt=0.0, le=1.0)
    tools: Optional[list[dict[str, Any]]] = None
    tool_choice: Optional[Union[str, dict[str, Any]]] = None
    parallel_tool_calls: Optional[bool] = True
    text: Optional[dict[str, Any]] = None
    reasoning: Optional[dict[str, Any]] = None
    stream: Optional[bool] = False
    store: Optional[bool] = None
    background: Optional[bool] = None
    previous_response_id: Optional[str] = None
    truncation: Optional[str] = None
    include: Optional[list[str]] = None
    metadata: Optional[dict[str, Any]] = None
    user: Optional[str] = None
    service_tier: Optional[str] = None
    prompt_cache_key: Optional[str] = None
    safety_identifier: Optional[str] = None
    top_logprobs: Optional[int] = Field(None, ge=0, le=20)
    # vLLM's extras
    seed: Optional[int] = Field(None, ge=-(2 ** 63), le=2 ** 63 - 1)
    top_k: Optional[int] = Field(None, ge=-1)
    min_p: Optional[float] = Field(None, ge=0.0, le=1.0)
    repetition_penalty: Optional[float] = Field(None, gt=0.0)
    request_id: Optional[str] = Field(None, max_length=256)
    chat_template: Optional[str] = None
    chat_template_kwargs: Optional[dict[str, Any]] = None


def _messages(req: ResponsesRequest) -> list[dict]:
    """The input items as chat messages: messages, function calls (assistant tool_calls) and their outputs."""
    msgs: list[dict] = [{"role": "system", "content": req.instructions}] if req.instructions else []
    if isinstance(req.input, str):
        return msgs + [{"role": "user", "content": req.input}]
    for i, item in enumerate(req.input):
        kind = item.get("type", "message")
        if kind == "message":
            content = item.get("content")
            if isinstance(content, list):
                content = [{"type": "text", "text": p.get("text")} if isinstance(p, dict) and p.get("type") in (
                    "input_text", "output_text", "text") else p for p in content]
            msgs.append({"role": item.get("role"), "content": content})
        elif kind == "function_call":
            call = {"id": item.get("call_id"), "type": "function",
                    "function": {"name": item.get("name"), "arguments": item.get("arguments", "{}")}}
            if msgs and msgs[-1]["role"] == "assistant" and msgs[-1].get("tool_calls") is not None:
                msgs[-1]["tool_calls"].append(call)  # parallel calls: one assistant turn
            else:
                msgs.append({"role": "assistant", "content": None, "tool_calls": [call]})
        elif kind == "function_call_output":
            output = item.get("output")
            msgs.append({"role": "tool", "tool_call_id": item.get("call_id"),
                         "content": output if isinstance(output, str) else json.dumps(output)})
        elif kind == "reasoning":
            continue  # earlier reasoning is not fed back
        else:
            raise bad_request(f"input[{i}]: items of type {kind!r} are not supported", "input",
                              "unsupported_parameter")
    return msgs


def _tool_choice(choice):
    if isinstance(choice, dict):
        if choice.get("type") != "function" or not choice.get("name"):
            raise bad_request("tool_choice must be none, auto, required or {\"type\": \"function\", \"name\": ...}",
                              "tool_choice")
        return {"type": "function", "function": {"name": choice["name"]}}
    return choice


def _tools(tools: Optional[list[dict]]) -> Optional[list[dict]]:
    if tools is None:
        return None
    out = []
    for i, t in enumerate(tools):
        if t.get("type") != "function":
            raise bad_request(f"tools[{i}]: only function tools are supported, not {t.get('type')!r}", "tools",
                              "unsupported_parameter")
        out.append({"type": "function", "function": {k: t[k] for k in ("name", "description", "parameters", "strict")
                                                     if t.get(k) is not None}})
    return out


def _response_format(text: Optional[dict]) -> Optional[dict]:
    fmt = (text or {}).get("format")
    if fmt is None or fmt.get("type") == "text":
        return None
    if fmt.get("type") == "json_schema":
        return {"type": "json_schema", "json_schema": {k: fmt[k] for k in ("name", "description", "schema", "strict")
                                                        if k in fmt}}
    return {"type": fmt.get("type")}


def to_chat_request(req: ResponsesRequest) -> ChatCompletionRequest:
    if req.previous_response_id is not None:
        raise bad_request("previous_response_id is not supported: this server keeps no responses; send the whole "
                          "conversation as input", "previous_response_id", "unsupported_parameter")
    if req.background:
        raise bad_request("background responses are not supported", "background", "unsupported_parameter")
    body = {"model": req.model, "messages": _messages(req), "max_completion_tokens": req.max_output_tokens,
            "temperature": req.temperature, "top_p": req.top_p, "tools": _tools(req.tools),
            "tool_choice": _tool_choice(req.tool_choice), "parallel_tool_calls": req.parallel_tool_calls,
            "response_format": _response_format(req.text), "seed": req.seed, "top_k": req.top_k, "min_p": req.min_p,
            "repetition_penalty": req.repetition_penalty, "request_id": req.request_id,
            "chat_template": req.chat_template, "chat_template_kwargs": req.chat_template_kwargs,
            "stream": req.stream,
            "logprobs": req.top_logprobs is not None, "top_logprobs": req.top_logprobs}
    try:
        return ChatCompletionRequest(**{k: v for k, v in body.items() if v is not None})
    except ValidationError as e:
        err = e.errors()[0]
        where = ".".join(str(x) for x in err.get("loc", ()))
        raise bad_request(f"{where}: {err.get('msg')}", where.split(".")[0] or None) from None


def _item_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


class ResponsesContext:
    def __init__(self, serving, req: ResponsesRequest, chat: ChatCompletionRequest, model: str, request_id: str,
                 prompt, stream, output):
        self.serving, self.req, self.chat, self.model = serving, req, chat, model
        self.id = request_id
        self.prompt, self.stream_, self.output = prompt, stream, output()
        self.created = int(time.time())
        self.output_tokens = 0
        self.cached = 0
        self.finish: Optional[str] = None

    def _response(self, status: str, output: list[dict]) -> dict:
        r = self.req
        body = {"id": self.id, "object": "response", "created_at": self.created, "status": status, "model": self.model,
                "output": output, "error": None, "incomplete_details": None, "instructions": r.instructions,
                "max_output_tokens": r.max_output_tokens, "metadata": r.metadata or {},
                "parallel_tool_calls": r.parallel_tool_calls is not False,
                "temperature": r.temperature, "top_p": r.top_p, "tool_choice": r.tool_choice or "auto",
                "tools": r.tools or [], "text": r.text or {"format": {"type": "text"}}, "truncation": "disabled",
                "store": False, "background": False, "previous_response_id": None, "reasoning": r.reasoning,
                "usage": None, "user": r.user}
        if status != "in_progress":
            n_in = len(self.prompt.token_ids)
            body["usage"] = {"input_tokens": n_in, "input_tokens_details": {"cached_tokens": self.cached},
                             "output_tokens": self.output_tokens, "output_tokens_details": {"reasoning_tokens": 0},
                             "total_tokens": n_in + self.output_tokens}
            if status == "incomplete":
                body["incomplete_details"] = {"reason": "max_output_tokens"}
        return body

    def _status(self) -> str:
        return "incomplete" if self.finish == "length" else "completed"

    async def _outputs(self):
        from pageport.entrypoints.openai.serving import _merged, engine_dead_error

        try:
            async for _, out in _merged(self.serving, [self.stream_]):
                c = out.outputs[0]
                self.output_tokens += len(c.token_ids)
                if out.finished:
                    self.cached = out.num_cached_tokens
                if c.finish_reason is not None:
                    self.finish = c.finish_reason
                yield c
        except EngineDeadError as e:
            raise engine_dead_error() from e
        finally:
            if not self.stream_.finished:
                self.stream_.abort()

    async def collect(self) -> dict:
        text = "".join([c.text async for c in self._outputs()])
        msg = self.output.message(text)
        items: list[dict] = []
        if msg.get("reasoning_content"):
            items.append(_reasoning_item(_item_id("rs"), msg["reasoning_content"]))
        if msg["content"]:
            items.append(_message_item(_item_id("msg"), msg["content"], "completed"))
        for call in msg["tool_calls"]:
            fn = call["function"]
            items.append(_call_item(_item_id("fc"), call["id"], fn["name"], fn["arguments"], "completed"))
        return self._response(self._status(), items)

    async def stream(self) -> AsyncIterator[str]:
        from pageport.entrypoints.openai.serving import _stream_error

        w = _EventWriter()
        yield w.event("response.created", response=self._response("in_progress", []))
        yield w.event("response.in_progress", response=self._response("in_progress", []))
        try:
            async for c in self._outputs():
                if not c.text and c.finish_reason is None:
                    continue
                for e in w.delta(self.output.delta(c.text, final=c.finish_reason is not None)):
                    yield e
            for e in w.close():
                yield e
            yield w.event("response.completed", response=self._response(self._status(), w.items))
        except Exception as e:  # noqa: BLE001 - the status line is gone: report in the stream
            yield _stream_error(e)


class _EventWriter:
    """Chat deltas -> the Responses API's events: output items opened and closed in order (reasoning, message,
    function calls), each with its deltas."""

    def __init__(self):
        self.seq = 0
        self.items: list[dict] = []  # finished output items
        self.kind: Optional[str] = None  # of the item being streamed
        self.item: Optional[dict] = None
        self.text = ""

    def event(self, kind: str, **data) -> str:
        payload = {"type": kind, "sequence_number": self.seq, **data}
        self.seq += 1
        return f"event: {kind}\ndata: {json.dumps(payload, ensure_ascii=False, separators=(',', ':'))}\n\n"

    def _where(self) -> dict:
        return {"item_id": self.item["id"], "output_index": len(self.items)}

    def close(self) -> list[str]:
        if self.item is None:
            return []
        item, text, out = self.item, self.text, []
        if self.kind == "message":
            part = {"type": "output_text", "text": text, "annotations": []}
            item.update(status="completed", content=[part])
            out += [self.event("response.output_text.done", **self._where(), content_index=0, text=text, logprobs=[]),
                    self.event("response.content_part.done", **self._where(), content_index=0, part=part)]
        elif self.kind == "reasoning":
            item.update(content=[{"type": "reasoning_text", "text": text}])
            out.append(self.event("response.reasoning_text.done", **self._where(), content_index=0, text=text))
        else:
            item.update(status="completed", arguments=text)
            out.append(self.event("response.function_call_arguments.done", **self._where(), arguments=text))
        out.append(self.event("response.output_item.done", output_index=len(self.items), item=item))
        self.items.append(item)
        self.kind = self.item = None
        return out

    def open(self, kind: str, item: dict) -> list[str]:
        out = self.close()
        self.kind, self.item, self.text = kind, item, ""
        out.append(self.event("response.output_item.added", output_index=len(self.items), item=dict(item)))
        if kind == "message":
            out.append(self.event("response.content_part.added", **self._where(), content_index=0,
                                  part={"type": "output_text", "text": "", "annotations": []}))
        return out

    def add(self, kind: str, text: str, make_item) -> list[str]:
        out = [] if self.kind == kind else self.open(kind, make_item())
        self.text += text
        if kind == "message":
            return out + [self.event("response.output_text.delta", **self._where(), content_index=0, delta=text,
                                     logprobs=[])]
        if kind == "reasoning":
            return out + [self.event("response.reasoning_text.delta", **self._where(), content_index=0, delta=text)]
        return out + [self.event("response.function_call_arguments.delta", **self._where(), delta=text)]

    def delta(self, delta: dict) -> list[str]:
        out = []
        if delta.get("reasoning_content"):
            out += self.add("reasoning", delta["reasoning_content"], lambda: _reasoning_item(_item_id("rs"), ""))
        if delta.get("content"):
            out += self.add("message", delta["content"], lambda: _message_item(_item_id("msg"), "", "in_progress"))
        for call in delta.get("tool_calls", []):
            fn = call.get("function", {})
            if call.get("id"):  # a new call
                out += self.open("function_call", _call_item(_item_id("fc"), call["id"], fn.get("name", ""), "",
                                                             "in_progress"))
            if fn.get("arguments"):
                out += self.add("function_call", fn["arguments"], None)
        return out


def _message_item(item_id: str, text: str, status: str) -> dict:
    content = [{"type": "output_text", "text": text, "annotations": []}] if status == "completed" else []
    return {"type": "message", "id": item_id, "status": status, "role": "assistant", "content": content}


def _reasoning_item(item_id: str, text: str) -> dict:
    return {"type": "reasoning", "id": item_id, "summary": [],
            "content": [{"type": "reasoning_text", "text": text}] if text else []}


def _call_item(item_id: str, call_id: str, name: str, arguments: str, status: str) -> dict:
    return {"type": "function_call", "id": item_id, "call_id": call_id, "name": name, "arguments": arguments,
            "status": status}
