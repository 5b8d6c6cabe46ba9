"""Tool calling, reasoning output and the request's output constraint through the official openai client, over
a scripted engine (the text a model would write is given; the server's parsing, streaming and the grammar
it asks the engine for are what is tested)."""
from __future__ import annotations

import json

import jsonschema
import openai
import pytest

from live_server import ServerThread
from scripted_engine import ScriptedEngine

WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Weather in a city", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}, "unit": {"enum": ["celsius", "fahrenheit"]}},
    "required": ["city"]}}}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {
    "type": "object", "properties": {"tz": {"type": "string"}}, "required": ["tz"]}}}
TOOLS = [WEATHER, TIME]
SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
ASK = [{"role": "user", "content": "Weather and time in Paris?"}]
HERMES_REPLY = ('I will look.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": '
                '"celsius"}}\n</tool_call>\n<tool_call>\n{"name": "get_time", "arguments": {"tz": "Europe/Paris"}}\n'
                '</tool_call>')


@pytest.fixture(scope="module")
def engine(default_tokenizer):
    return ScriptedEngine(default_tokenizer)


def _server(engine, **options):
    from pageport.entrypoints.openai.api_server import build_app
    from pageport.entrypoints.openai.serving import ServingOptions

    return ServerThread(build_app(engine, ["m"], options=ServingOptions(**options)))


@pytest.fixture(scope="module")
def auto_client(engine):
    with _server(engine, enable_auto_tool_choice=True, tool_call_parser="hermes") as srv:
        yield openai.OpenAI(base_url=srv.url + "/v1", api_key="x", max_retries=0)


@pytest.fixture(scope="module")
def plain_client(engine):
    with _server(engine) as srv:
        yield openai.OpenAI(base_url=srv.url + "/v1", api_key="x", max_retries=0)


@pytest.fixture(scope="module")
def reasoning_client(engine):
    with _server(engine, reasoning_parser="deepseek_r1", enable_auto_tool_choice=True,
                 tool_call_parser="hermes") as srv:
        yield openai.OpenAI(base_url=srv.url + "/v1", api_key="x", max_retries=0)


def _check_calls(calls, names):
    assert [c.function.name for c in calls] == names
    assert len({c.id for c in calls}) == len(calls)
    for c in calls:
        assert c.type == "function"
        jsonschema.validate(json.loads(c.function.arguments), SCHEMAS[c.function.name])


def _stream(client, **kw):
    """The streamed reply put together: content, reasoning, tool calls by index, finish reasons."""
    content, reasoning, calls, finishes = [], [], {}, []
    for chunk in client.chat.completions.create(model="m", stream=True, **kw):
        for ch in chunk.choices:
            d = ch.delta
            content.append(d.content or "")
            reasoning.append(getattr(d, "reasoning_content", None) or "")
            for tc in d.tool_calls or []:
                slot = calls.setdefault(tc.index, {"id": None, "name": "", "arguments": ""})
                slot["id"] = slot["id"] or tc.id
                slot["name"] += tc.function.name or "" if tc.function else ""
                slot["arguments"] += (tc.function.arguments or "") if tc.function else ""
            if ch.finish_reason:
                finishes.append(ch.finish_reason)
    return "".join(content), "".join(reasoning), [calls[i] for i in sorted(calls)], finishes


def test_auto_tool_calls(engine, auto_client):
    engine.reply = HERMES_REPLY
    r = auto_client.chat.completions.create(model="m", messages=ASK, tools=TOOLS)
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content == "I will look.\n"
    _check_calls(choice.message.tool_calls, ["get_weather", "get_time"])
    assert engine.last_params.structured_outputs is None  # auto: the model chooses, nothing is imposed


def test_auto_tool_calls_streamed(engine, auto_client):
    engine.reply = HERMES_REPLY
    for chunk in (1, 4, 50):
        engine.chunk = chunk
        content, _, calls, finishes = _stream(auto_client, messages=ASK, tools=TOOLS)
        assert content == "I will look.\n"
        assert [c["name"] for c in calls] == ["get_weather", "get_time"]
        for c in calls:
            assert c["id"].startswith("call_")
            jsonschema.validate(json.loads(c["arguments"]), SCHEMAS[c["name"]])
        assert finishes == ["tool_calls"]
    engine.chunk = 3


def test_auto_without_a_call_is_content(engine, auto_client):
    engine.reply = "It is sunny in Paris."
    r = auto_client.chat.completions.create(model="m", messages=ASK, tools=TOOLS)
    assert r.choices[0].message.content == "It is sunny in Paris."
    assert not r.choices[0].message.tool_calls and r.choices[0].finish_reason == "stop"
    content, _, calls, finishes = _stream(auto_client, messages=ASK, tools=TOOLS)
    assert content == "It is sunny in Paris." and not calls and finishes == ["stop"]


def test_tool_choice_none_keeps_the_text(engine, auto_client):
    engine.reply = HERMES_REPLY
    r = auto_client.chat.completions.create(model="m", messages=ASK, tools=TOOLS, tool_choice="none")
    assert r.choices[0].message.content == HERMES_REPLY and not r.choices[0].message.tool_calls


def test_required_asks_for_a_grammar_of_the_tools(engine, plain_client):
    engine.reply = ('[{"name": "get_time", "parameters": {"tz": "Europe/Paris"}}, '
                    '{"name": "get_weather", "parameters": {"city": "Paris"}}]')
    r = plain_client.chat.completions.create(model="m", messages=ASK, tools=TOOLS, tool_choice="required")
    assert r.choices[0].finish_reason == "tool_calls" and r.choices[0].message.content is None
    _check_calls(r.choices[0].message.tool_calls, ["get_time", "get_weather"])
    schema = engine.last_params.structured_outputs.json
    good = json.loads(engine.reply)
    jsonschema.validate(good, schema)
    for bad in ([], [{"name": "get_time", "parameters": {}}], [{"name": "other", "parameters": {"tz": "x"}}],
                [{"name": "get_time"}]):
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(bad, schema)
    # one call at most without parallel tool calls
    plain_client.chat.completions.create(model="m", messages=ASK, tools=TOOLS, tool_choice="required",
                                         parallel_tool_calls=False)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(good, engine.last_params.structured_outputs.json)
    _, _, calls, finishes = _stream(plain_client, messages=ASK, tools=TOOLS, tool_choice="required")
    assert [c["name"] for c in calls] == ["get_time", "get_weather"] and finishes == ["tool_calls"]


def test_named_function(engine, plain_client):
    engine.reply = '{"city": "Paris", "unit": "celsius"}'
    choice = {"type": "function", "function": {"name": "get_weather"}}
    r = plain_client.chat.completions.create(model="m", messages=ASK, tools=TOOLS, tool_choice=choice)
    assert engine.last_params.structured_outputs.json == SCHEMAS["get_weather"]
    _check_calls(r.choices[0].message.tool_calls, ["get_weather"])
    assert r.choices[0].message.content is None and r.choices[0].finish_reason == "tool_calls"
    _, _, calls, finishes = _stream(plain_client, messages=ASK, tools=TOOLS, tool_choice=choice)
    assert len(calls) == 1 and calls[0]["name"] == "get_weather"
    assert json.loads(calls[0]["arguments"]) == {"city": "Paris", "unit": "celsius"} and finishes == ["tool_calls"]


def test_tool_results_go_through_the_template(engine, plain_client):
    engine.reply = "It is 18 degrees."
    template = ("{% for t in tools %}TOOL {{ t.function.name }}\n{% endfor %}{% for m in messages %}[{{ m.role }}]"
                "{{ m.content }}{% for c in m.tool_calls or [] %}CALL {{ c.function.name }} city={{ "
                "c.function.arguments.city }} id={{ c.id }}{% endfor %}{% if m.tool_call_id %} for {{ m.tool_call_id }}"
                "{% endif %}\n{% endfor %}{% if add_generation_prompt %}[assistant]{% endif %}")
    messages = ASK + [
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "18C"}]
    r = plain_client.chat.completions.create(model="m", messages=messages, tools=TOOLS, tool_choice="none",
                                             extra_body={"chat_template": template})
    assert r.choices[0].message.content == "It is 18 degrees."
    # (chat templates drop the newline after a block tag)
    assert engine.last_prompt == ("TOOL get_weather\nTOOL get_time\n[user]Weather and time in Paris?"
                                  "[assistant]CALL get_weather city=Paris id=call_1[tool]18C for call_1[assistant]")


def test_reasoning_is_split_off(engine, reasoning_client):
    engine.reply = "The user wants a greeting.</think>Hello!"
    r = reasoning_client.chat.completions.create(model="m", messages=ASK)
    msg = r.choices[0].message
    assert msg.content == "Hello!" and msg.reasoning_content == "The user wants a greeting."
    for chunk in (1, 5):
        engine.chunk = chunk
        content, reasoning, _, _ = _stream(reasoning_client, messages=ASK)
        assert (reasoning, content) == ("The user wants a greeting.", "Hello!")
    engine.chunk = 3


def test_reasoning_then_tool_calls(engine, reasoning_client):
    engine.reply = "Need the weather tool.</think>" + HERMES_REPLY
    r = reasoning_client.chat.completions.create(model="m", messages=ASK, tools=TOOLS)
    assert r.choices[0].message.reasoning_content == "Need the weather tool."
    _check_calls(r.choices[0].message.tool_calls, ["get_weather", "get_time"])
    content, reasoning, calls, finishes = _stream(reasoning_client, messages=ASK, tools=TOOLS)
    assert reasoning == "Need the weather tool." and content == "I will look.\n"
    assert [c["name"] for c in calls] == ["get_weather", "get_time"] and finishes == ["tool_calls"]


def test_response_format_asks_for_the_grammar(engine, plain_client):
    engine.reply = '{"a": 1}'
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
    plain_client.chat.completions.create(model="m", messages=ASK, response_format={
        "type": "json_schema", "json_schema": {"name": "thing", "schema": schema, "strict": True}})
    assert engine.last_params.structured_outputs.json == schema
    plain_client.chat.completions.create(model="m", messages=ASK, response_format={"type": "json_object"})
    assert engine.last_params.structured_outputs.json_object is True
    for body, kind, value in [({"guided_regex": r"\d+"}, "regex", r"\d+"),
                              ({"guided_choice": ["a", "b"]}, "choice", ["a", "b"]),
                              ({"guided_json": schema}, "json", schema),
                              ({"guided_grammar": 'root ::= "x"'}, "grammar", 'root ::= "x"'),
                              ({"structured_outputs": {"regex": "[ab]+"}}, "regex", "[ab]+")]:
        plain_client.completions.create(model="m", prompt="hi", extra_body=body)
        so = engine.last_params.structured_outputs
        assert so.kind == kind and getattr(so, kind) == value
    plain_client.chat.completions.create(model="m", messages=ASK, response_format={"type": "text"})
    assert engine.last_params.structured_outputs is None


def test_structured_output_with_tools_is_refused(plain_client):
    with pytest.raises(openai.BadRequestError, match="cannot be combined with tool_choice"):
        plain_client.chat.completions.create(model="m", messages=ASK, tools=TOOLS, tool_choice="required",
                                             response_format={"type": "json_object"})


def test_echo_and_continue(engine, plain_client):
    engine.reply = " world"
    messages = ASK + [{"role": "assistant", "content": "Hello"}]
    r = plain_client.chat.completions.create(model="m", messages=messages, extra_body={
        "echo": True, "add_generation_prompt": False, "continue_final_message": True})
    assert r.choices[0].message.content == "Hello world"
    assert engine.last_prompt.endswith("Hello")  # continued, not closed


def test_what_the_engine_does_not_apply_is_refused(engine, plain_client):
    saved = engine.sampling_features
    engine.sampling_features = set()
    try:
        with pytest.raises(openai.BadRequestError, match="does not apply output grammars") as e:
            plain_client.chat.completions.create(model="m", messages=ASK, response_format={"type": "json_object"})
        assert e.value.body["param"] == "response_format"
        with pytest.raises(openai.BadRequestError, match="tool_choice: this engine does not apply"):
            plain_client.chat.completions.create(model="m", messages=ASK, tools=TOOLS, tool_choice="required")
        with pytest.raises(openai.BadRequestError, match="bad_words is not applied by this engine yet"):
            plain_client.completions.create(model="m", prompt="hi", extra_body={"bad_words": ["x"]})
        engine.reply = "fine"  # the rest still works
        assert plain_client.completions.create(model="m", prompt="hi").choices[0].text == "fine"
    finally:
        engine.sampling_features = saved
