"""Request bodies of the OpenAI-compatible API (pydantic), with vLLM's extra sampling fields.

Unknown fields are refused (400, naming the field) rather than silently ignored; fields OpenAI defines but
pageport cannot honour (functions, suffix, audio…) are refused with a message that says so. A few harmless bookkeeping fields clients send (user, store, metadata…) are accepted and
ignored.
"""
from __future__ import annotations

import json
import re
from typing import Annotated, Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, WithJsonSchema, model_validator
from pydantic_core import PydanticCustomError

_SURROGATE = re.compile("[\ud800-\udfff]")


def _surrogate_path(value: Any, path: str = "") -> Optional[str]:
    """Where the first lone UTF-16 surrogate sits in parsed JSON ("" for a key of the body itself)."""
    if isinstance(value, str):
        return path if _SURROGATE.search(value) else None
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for k, v in items:
        if isinstance(k, str) and _SURROGATE.search(k):
            return path  # never echo the bad key itself
        found = _surrogate_path(v, f"{path}[{k}]" if isinstance(k, int) else f"{path}.{k}" if path else k)
        if found is not None:
            return found
    return None


class OpenAIBaseModel(BaseModel):
    model_config = ConfigDict(extra="forbid")

    @model_validator(mode="before")
    @classmethod
    def _no_lone_surrogates(cls, data: Any) -> Any:
        # JSON may spell "\ud800" but no Unicode text holds it: the tokenizer and every UTF-8 encoder fail on it
        try:
            json.dumps(data, ensure_ascii=False).encode("utf-8")  # the common case, at C speed
        except UnicodeEncodeError:
            where = _surrogate_path(data)
            raise PydanticCustomError(
                "lone_surrogate", "{where} contains a lone UTF-16 surrogate (such as \\ud800), which is not "
                "valid Unicode text", {"where": where or "the request body", "param": re.split(r"[.\[]", where)[0]
                                       if where else None}) from None
        except (TypeError, ValueError):
            pass  # not JSON data: the field validators say what is wrong
        return data


class StreamOptions(OpenAIBaseModel):
    include_usage: Optional[bool] = False
    continuous_usage_stats: Optional[bool] = False


class JsonSchemaFormat(OpenAIBaseModel):
    name: Optional[str] = None
    description: Optional[str] = None
    json_schema: Optional[dict[str, Any]] = Field(None, alias="schema")
    strict: Optional[bool] = None

    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class ResponseFormat(OpenAIBaseModel):
    type: Literal["text", "json_object", "json_schema", "structural_tag"]
    json_schema: Optional[JsonSchemaFormat] = None
    # structural_tag (vLLM's): the tag JSON as xgrammar reads it, given inline
    format: Optional[dict[str, Any]] = None
    structures: Optional[list[dict[str, Any]]] = None
    triggers: Optional[list[str]] = None


class StructuredOutputsBody(OpenAIBaseModel):
    """`structured_outputs` in a request body: StructuredOutputsParams' fields."""
    json_: Optional[Union[str, dict[str, Any]]] = Field(None, alias="json")
    regex: Optional[str] = None
    choice: Optional[list[str]] = None
    grammar: Optional[str] = None
    json_object: Optional[bool] = None
    structural_tag: Optional[str] = None
    disable_any_whitespace: bool = False
    disable_additional_properties: bool = False
    whitespace_pattern: Optional[str] = None
    disable_fallback: bool = False

    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class _SamplingFields(OpenAIBaseModel):
    """Fields both endpoints share: OpenAI's, then vLLM's extras."""
    model: Optional[str] = None
    temperature: Optional[float] = Field(None, ge=0.0)
    top_p: Optional[float] = Field(None, gt=0.0, le=1.0)
    n: int = Field(1, ge=1)
    stream: Optional[bool] = False
    stream_options: Optional[StreamOptions] = None
    stop: Optional[Union[str, list[str]]] = None
    seed: Optional[int] = Field(None, ge=-(2 ** 63), le=2 ** 63 - 1)  # torch's int64, as vLLM (n > 1 adds to it)
    presence_penalty: Optional[float] = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: Optional[float] = Field(0.0, ge=-2.0, le=2.0)
    logit_bias: Optional[dict[str, float]] = None
    user: Optional[str] = None
    # accepted and ignored (bookkeeping some clients send)
    store: Optional[bool] = None
    metadata: Optional[dict[str, Any]] = None
    service_tier: Optional[str] = None
    prompt_cache_key: Optional[str] = None
    safety_identifier: Optional[str] = None
    # vLLM's extras
    top_k: Optional[int] = Field(None, ge=-1)
    min_p: Optional[float] = Field(None, ge=0.0, le=1.0)
    repetition_penalty: Optional[float] = Field(None, gt=0.0)
    stop_token_ids: Optional[list[int]] = None
    ignore_eos: bool = False
    min_tokens: int = Field(0, ge=0)
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    priority: int = 0
    cache_salt: Optional[str] = None
    return_token_ids: Optional[bool] = False
    prompt_logprobs: Optional[int] = Field(None, ge=0)
    request_id: Optional[str] = Field(None, max_length=256)
    bad_words: Optional[list[str]] = None
    allowed_token_ids: Optional[list[int]] = None
    truncate_prompt_tokens: Optional[int] = Field(None, ge=-1)
    vllm_xargs: Optional[dict[str, Union[str, int, float, bool]]] = None
    # structured outputs: one of these (response_format, structured_outputs, or vLLM's older guided_* fields)
    response_format: Optional[ResponseFormat] = None
    structured_outputs: Optional[StructuredOutputsBody] = None
    guided_json: Optional[Union[str, dict[str, Any]]] = None
    guided_regex: Optional[str] = None
    guided_choice: Optional[list[str]] = None
    guided_grammar: Optional[str] = None
    structural_tag: Optional[str] = None
    guided_decoding_backend: Optional[str] = None
    guided_whitespace_pattern: Optional[str] = None


_PROMPT_SCHEMA = {"anyOf": [
    {"type": "string"}, {"type": "array", "items": {"type": "string"}, "minItems": 1},
    {"type": "array", "items": {"type": "integer", "minimum": 0}, "minItems": 1},
    {"type": "array", "items": {"type": "array", "items": {"type": "integer", "minimum": 0}, "minItems": 1},
     "minItems": 1}],
    "description": "a string, strings, token ids or lists of token ids"}


_MESSAGES_SCHEMA = {"type": "array", "minItems": 1, "items": {
    "type": "object", "required": ["role"], "properties": {
        "role": {"type": "string", "description": "system, developer, user, assistant, tool, or another role the "
                                                  "chat template knows"},
        "content": {"anyOf": [{"type": "string"}, {"type": "null"}, {"type": "array", "items": {
            "type": "object", "required": ["type", "text"],
            "properties": {"type": {"enum": ["text"]}, "text": {"type": "string"}}}}]},
        "name": {"type": "string"},
        "tool_call_id": {"type": "string"},
        "tool_calls": {"type": "array", "items": {"type": "object", "required": ["function"], "properties": {
            "id": {"type": "string"}, "type": {"enum": ["function"]}, "function": {
                "type": "object", "required": ["name", "arguments"],
                "properties": {"name": {"type": "string"}, "arguments": {"type": "string"}}}}}}}},
    "description": "the conversation (text; assistant tool calls and tool results included)"}
# checked by the server, which names the offending message
Messages = Annotated[list[dict[str, Any]], WithJsonSchema(_MESSAGES_SCHEMA)]


class FunctionDefinition(OpenAIBaseModel):
    name: str = Field(..., min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.\-]+$")
    description: Optional[str] = None
    parameters: Optional[dict[str, Any]] = None
    strict: Optional[bool] = None


class ChatTool(OpenAIBaseModel):
    type: Literal["function"] = "function"
    function: FunctionDefinition


class NamedFunction(OpenAIBaseModel):
    name: str


class NamedToolChoice(OpenAIBaseModel):
    type: Literal["function"] = "function"
    function: NamedFunction


class CompletionRequest(_SamplingFields):
    # str | list[str] | list[int] | list[list[int]]: checked by the server, which names the offending part
    prompt: Annotated[Any, WithJsonSchema(_PROMPT_SCHEMA)] = Field(...)
    max_tokens: Optional[int] = Field(16, ge=0)
    logprobs: Optional[int] = Field(None, ge=0)
    echo: Optional[bool] = False
    best_of: Optional[int] = Field(None, ge=1)
    suffix: Optional[str] = None
    add_special_tokens: bool = True


class ChatCompletionRequest(_SamplingFields):
    messages: Messages = Field(..., min_length=1)
    max_tokens: Optional[int] = Field(None, ge=1)
    max_completion_tokens: Optional[int] = Field(None, ge=1)
    logprobs: Optional[bool] = False
    top_logprobs: Optional[int] = Field(None, ge=0, le=20)
    tools: Optional[list[ChatTool]] = None
    tool_choice: Optional[Union[Literal["none", "auto", "required"], NamedToolChoice]] = None
    parallel_tool_calls: Optional[bool] = True
    # OpenAI fields pageport refuses with a clear message unless they ask for nothing
    functions: Optional[list[Any]] = None
    function_call: Optional[Any] = None
    modalities: Optional[list[str]] = None
    audio: Optional[Any] = None
    prediction: Optional[Any] = None
    # vLLM's chat extras
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    chat_template: Optional[str] = None
    chat_template_kwargs: Optional[dict[str, Any]] = None
    echo: bool = False  # start the reply with the last message's content when it has the reply's role
    documents: Optional[list[dict[str, str]]] = None


class TokenizeRequest(OpenAIBaseModel):
    model_config = ConfigDict(extra="forbid", json_schema_extra={
        "oneOf": [{"required": ["prompt"]}, {"required": ["messages"]}]})  # exactly one of them
    model: Optional[str] = None
    prompt: Optional[str] = None
    messages: Optional[Messages] = None
    add_special_tokens: Optional[bool] = None  # default: True for a prompt, False for messages
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    chat_template: Optional[str] = None
    chat_template_kwargs: Optional[dict[str, Any]] = None
    tools: Optional[list[ChatTool]] = None
    return_token_strs: bool = False


class DetokenizeRequest(OpenAIBaseModel):
    model: Optional[str] = None
    tokens: list[int]


ErrorType = Literal["invalid_request_error", "authentication_error", "not_found_error", "server_error",
                    "service_unavailable"]


# Response bodies: for the OpenAPI schema only (the handlers build plain dicts) ---------------------------
class ErrorInfo(BaseModel):
    message: str
    type: str
    param: Optional[str]
    code: Optional[str]


class ErrorResponse(BaseModel):
    error: ErrorInfo


class PromptTokensDetails(BaseModel):
    cached_tokens: int


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: Optional[PromptTokensDetails] = None


class CompletionLogprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[Optional[float]]
    top_logprobs: list[Optional[dict[str, float]]]
    text_offset: list[int]


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: Optional[CompletionLogprobs]
    finish_reason: Optional[str]
    stop_reason: Union[int, str, None]
    prompt_logprobs: Optional[list[Optional[dict[str, Any]]]] = None
    prompt_token_ids: Optional[list[int]] = None
    token_ids: Optional[list[int]] = None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage
    system_fingerprint: Optional[str]


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int]


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(BaseModel):
    content: list[TokenLogprob]


class FunctionCall(BaseModel):
    name: str
    arguments: str


class ToolCallOut(BaseModel):
    id: str
    type: Literal["function"]
    function: FunctionCall


class ChatMessage(BaseModel):
    role: Literal["assistant"]
    content: Optional[str]
    tool_calls: list[ToolCallOut]
    reasoning_content: Optional[str] = None


class ChatChoice(BaseModel):
    index: int
    message: ChatMessage
    logprobs: Optional[ChatLogprobs]
    finish_reason: Optional[str]
    stop_reason: Union[int, str, None]
    token_ids: Optional[list[int]] = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    system_fingerprint: Optional[str]
    prompt_logprobs: Optional[list[Optional[dict[str, Any]]]] = None
    prompt_token_ids: Optional[list[int]] = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str
    root: str
    parent: Optional[str]
    max_model_len: int
    permission: list[Any]


class ModelList(BaseModel):
    object: Literal["list"]
    data: list[ModelCard]


class TokenizeResponse(BaseModel):
    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: Optional[list[str]] = None


class DetokenizeResponse(BaseModel):
    prompt: str


class VersionResponse(BaseModel):
    version: str
