"""POST /v1/responses through the openai client's `responses.create` (plain and streamed) and its stream helper:
text, function calls, json_schema, reasoning, conversations with function outputs; a scripted engine gives the
text, so the API's shapes and events are what is tested."""
from __future__ import annotations

import json

import jsonschema
import openai
import pytest

from live_server import ServerThread
from scripted_engine import ScriptedEngine

WEATHER = {"type": "function", "name": "get_weather", "description": "Weather in a city", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}


@pytest.fixture(scope="module")
def engine(default_tokenizer):
    return ScriptedEngine(default_tokenizer)


@pytest.fixture(scope="module")
def client(engine):
    from pageport.entrypoints.openai.api_server import build_app
    from pageport.entrypoints.openai.serving import ServingOptions

    options = ServingOptions(enable_auto_tool_choice=True, tool_call_parser="hermes", reasoning_parser="qwen3")
    with ServerThread(build_app(engine, ["m"], options=options)) as srv:
        yield openai.OpenAI(base_url=srv.url + "/v1", api_key="x", max_retries=0)


def test_text(engine, client):
    engine.reply = "Hello there!"
    r = client.responses.create(model="m", input="Say hello", instructions="Be brief.", max_output_tokens=20)
    assert r.object == "response" and r.status == "completed" and r.id.startswith("resp_")
    assert r.output_text == "Hello there!"
    (item,) = r.output
    assert item.type == "message" and item.role == "assistant" and item.content[0].type == "output_text"
    assert r.usage.input_tokens > 0 and r.usage.total_tokens == r.usage.input_tokens + r.usage.output_tokens
    assert engine.last_prompt.startswith("<|im_start|>system\nBe brief.")
    assert engine.last_params.max_tokens == 20


def test_incomplete_at_max_output_tokens(engine, client):
    engine.reply, engine.finish_reason = "cut", "length"
    try:
        r = client.responses.create(model="m", input="x", max_output_tokens=2)
    finally:
        engine.finish_reason = "stop"
    assert r.status == "incomplete" and r.incomplete_details.reason == "max_output_tokens"


def test_streamed_text_events(engine, client):
    engine.reply = "Streaming works fine."
    events = list(client.responses.create(model="m", input="x", stream=True))
    kinds = [e.type for e in events]
    assert kinds[:2] == ["response.created", "response.in_progress"] and kinds[-1] == "response.completed"
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert "".join(e.delta for e in events if e.type == "response.output_text.delta") == "Streaming works fine."
    for k in ("response.output_item.added", "response.content_part.added", "response.output_text.done",
              "response.content_part.done", "response.output_item.done"):
        assert kinds.count(k) == 1, k
    assert events[-1].response.output_text == "Streaming works fine."


def test_stream_helper_accumulates(engine, client):
    engine.reply = "One two three."
    with client.responses.stream(model="m", input="count") as stream:
        for _ in stream:
            pass
        final = stream.get_final_response()
    assert final.output_text == "One two three."


def test_function_calls(engine, client):
    engine.reply = '<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>'
    r = client.responses.create(model="m", input="Weather in Paris?", tools=[WEATHER])
    (call,) = r.output
    assert call.type == "function_call" and call.name == "get_weather" and call.call_id.startswith("call_")
    jsonschema.validate(json.loads(call.arguments), WEATHER["parameters"])
    events = list(client.responses.create(model="m", input="Weather in Paris?", tools=[WEATHER], stream=True))
    added = [e.item for e in events if e.type == "response.output_item.added"]
    assert [i.type for i in added] == ["function_call"] and added[0].name == "get_weather"
    args = "".join(e.delta for e in events if e.type == "response.function_call_arguments.delta")
    assert json.loads(args) == {"city": "Paris"}
    assert events[-1].response.output[0].arguments == args


def test_required_and_named_tool_choice_ask_for_grammars(engine, client):
    engine.reply = '{"city": "Rome"}'
    r = client.responses.create(model="m", input="x", tools=[WEATHER],
                                tool_choice={"type": "function", "name": "get_weather"})
    assert engine.last_params.structured_outputs.json == WEATHER["parameters"]
    assert r.output[0].type == "function_call" and json.loads(r.output[0].arguments) == {"city": "Rome"}
    engine.reply = '[{"name": "get_weather", "parameters": {"city": "Rome"}}]'
    r = client.responses.create(model="m", input="x", tools=[WEATHER], tool_choice="required")
    assert [o.name for o in r.output] == ["get_weather"]


def test_function_call_outputs_go_back_to_the_model(engine, client):
    engine.reply = "It is 20 degrees in Paris."
    template = ("{% for m in messages %}{{ m.role }}:{{ m.content }}{% for c in m.tool_calls or [] %}"
                "<{{ c.function.name }} {{ c.function.arguments.city }} {{ c.id }}>{% endfor %}"
                "{% if m.tool_call_id %}[{{ m.tool_call_id }}]{% endif %}|{% endfor %}")
    r = client.responses.create(model="m", instructions="Be brief.", tools=[WEATHER], input=[
        {"role": "user", "content": [{"type": "input_text", "text": "Weather in Paris?"}]},
        {"type": "function_call", "call_id": "call_9", "name": "get_weather", "arguments": '{"city": "Paris"}'},
        {"type": "function_call_output", "call_id": "call_9", "output": "20C"}],
        extra_body={"chat_template": template})
    assert r.output_text == "It is 20 degrees in Paris."
    assert engine.last_prompt == ("system:Be brief.|user:Weather in Paris?|assistant:<get_weather Paris call_9>|"
                                  "tool:20C[call_9]|")


def test_json_schema_format(engine, client):
    engine.reply = '{"answer": 4}'
    schema = {"type": "object", "properties": {"answer": {"type": "integer"}}, "required": ["answer"]}
    r = client.responses.create(model="m", input="2+2?", text={"format": {
        "type": "json_schema", "name": "a", "schema": schema, "strict": True}})
    assert engine.last_params.structured_outputs.json == schema
    assert json.loads(r.output_text) == {"answer": 4}


def test_reasoning_items(engine, client):
    engine.reply = "<think>Simple sum.</think>4"
    r = client.responses.create(model="m", input="2+2?")
    assert [o.type for o in r.output] == ["reasoning", "message"]
    assert r.output[0].content[0].text == "Simple sum." and r.output_text == "4"
    events = list(client.responses.create(model="m", input="2+2?", stream=True))
    assert "".join(e.delta for e in events if e.type == "response.reasoning_text.delta") == "Simple sum."
    assert "".join(e.delta for e in events if e.type == "response.output_text.delta") == "4"


@pytest.mark.parametrize("kwargs, match", [
    (dict(previous_response_id="resp_1"), "keeps no responses"),
    (dict(background=True), "background"),
    (dict(tools=[{"type": "web_search"}]), "only function tools"),
    (dict(tool_choice="required"), "tool_choice needs tools"),
    (dict(text={"format": {"type": "json_schema", "name": "x", "schema": {"type": "nope"}}}), "JSON schema"),
])
def test_bad_requests(client, kwargs, match):
    with pytest.raises(openai.BadRequestError, match=match):
        client.responses.create(model="m", input="x", **kwargs)
