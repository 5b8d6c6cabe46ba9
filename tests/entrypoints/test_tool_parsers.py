"""Tool-call parsers on hand-written model outputs: whole, and streamed in every chunking."""
from __future__ import annotations

import json

import pytest

from pageport.entrypoints.openai.tool_parsers import (RequiredCallParser, ToolCallStreamer, get_tool_parser,
                                                      parse_required)

WEATHER = {"city": "Paris", "unit": "celsius"}
TIME = {"tz": "Europe/Paris"}

# (parser, model output, expected content, expected [(name, arguments)])
CASES = [
    ("hermes", '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}\n'
               '</tool_call>', None, [("get_weather", WEATHER)]),
    ("hermes", 'Let me check.\n<tool_call>{"name": "get_weather", "arguments": {"city": "Paris", "unit": '
               '"celsius"}}</tool_call>\n<tool_call>{"name": "get_time", "arguments": {"tz": "Europe/Paris"}}'
               '</tool_call>', "Let me check.\n", [("get_weather", WEATHER), ("get_time", TIME)]),
    ("hermes", '<tool_call>{"name": "get_time", "arguments": {"tz": "Europe/Paris"}}', None,  # EOS before close
     [("get_time", TIME)]),
    ("hermes", "The weather in Paris is sunny.", "The weather in Paris is sunny.", []),
    ("hermes", "<tool_call>{not json}</tool_call>", "<tool_call>{not json}</tool_call>", []),
    ("hermes", "Use a < b and <tool> tags freely", "Use a < b and <tool> tags freely", []),
    ("qwen3", '<tool_call>\n{"name": "get_time", "arguments": {"tz": "Europe/Paris"}}\n</tool_call>', None,
     [("get_time", TIME)]),
    ("qwen3", "<tool_call>\n<function=get_weather>\n<parameter=city>\nParis\n</parameter>\n<parameter=unit>\n"
              "celsius\n</parameter>\n</function>\n</tool_call>", None, [("get_weather", WEATHER)]),
    ("qwen3", "<tool_call><function=add><parameter=a>2</parameter><parameter=b>[1, 2]</parameter></function>"
              "</tool_call>", None, [("add", {"a": 2, "b": [1, 2]})]),
    ("qwen3_coder", "No tools needed.", "No tools needed.", []),
    ("llama3_json", '{"name": "get_weather", "parameters": {"city": "Paris", "unit": "celsius"}}', None,
     [("get_weather", WEATHER)]),
    ("llama3_json", '<|python_tag|>{"name": "get_weather", "parameters": {"city": "Paris", "unit": "celsius"}}; '
                    '{"name": "get_time", "parameters": {"tz": "Europe/Paris"}}', None,
     [("get_weather", WEATHER), ("get_time", TIME)]),
    ("llama3_json", '  {"name": "get_time", "arguments": "{\\"tz\\": \\"Europe/Paris\\"}"}', None,
     [("get_time", TIME)]),  # arguments as a JSON string
    ("llama3_json", '{"answer": 42}', '{"answer": 42}', []),  # JSON, but not a call
    ("llama3_json", "Sure: it is 42.", "Sure: it is 42.", []),
    ("mistral", '[TOOL_CALLS] [{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}, '
                '{"name": "get_time", "arguments": {"tz": "Europe/Paris"}}]', None,
     [("get_weather", WEATHER), ("get_time", TIME)]),
    ("mistral", 'Checking. [TOOL_CALLS]get_weather[ARGS]{"city": "Paris", "unit": "celsius"}[TOOL_CALLS]get_time'
                '[ARGS]{"tz": "Europe/Paris"}', "Checking. ", [("get_weather", WEATHER), ("get_time", TIME)]),
    ("mistral", "[TOOL_CALLS] [{\"name\": broken", "[TOOL_CALLS] [{\"name\": broken", []),
    ("pythonic", '[get_weather(city="Paris", unit="celsius"), get_time(tz="Europe/Paris")]', None,
     [("get_weather", WEATHER), ("get_time", TIME)]),
    ("pythonic", '<|python_start|>[math.add(a=1, b=2.5, flags=[True, None])]<|python_end|>', None,
     [("math.add", {"a": 1, "b": 2.5, "flags": [True, None]})]),
    ("pythonic", "[1, 2, 3] are numbers", "[1, 2, 3] are numbers", []),
    ("pythonic", '[f(x=open("/etc"))]', '[f(x=open("/etc"))]', []),  # no code is run: not a literal
]


def _expect(calls, expected):
    assert [(c.name, json.loads(c.arguments)) for c in calls] == expected
    assert len({c.id for c in calls}) == len(calls) and all(c.id.startswith("call_") for c in calls)


@pytest.mark.parametrize("name, text, content, expected", CASES)
def test_whole_output(name, text, content, expected):
    out = get_tool_parser(name)().extract_tool_calls(text)
    assert out.content == content
    assert out.tools_called == bool(expected)
    _expect(out.tool_calls, expected)


@pytest.mark.parametrize("chunk", [1, 2, 3, 7, 1000])
@pytest.mark.parametrize("name, text, content, expected", CASES)
def test_streamed_output(name, text, content, expected, chunk):
    streamer = ToolCallStreamer(get_tool_parser(name)())
    got_content, calls, seen_at = [], [], []
    for i in range(0, len(text), chunk):
        c, new = streamer.feed(text[i:i + chunk])
        got_content.append(c)
        calls += new
        seen_at += [i + chunk] * len(new)
    c, new = streamer.finish()
    got_content.append(c)
    calls += new
    streamed = "".join(got_content)
    assert streamed == (content or "") if expected else streamed == text
    _expect(calls, expected)
    if len(expected) > 1 and chunk < 10:  # the first call went out before the output ended
        assert seen_at and seen_at[0] < len(text)


def test_content_is_not_held_back_needlessly():
    streamer = ToolCallStreamer(get_tool_parser("hermes")())
    assert streamer.feed("Hello") == ("Hello", [])
    assert streamer.feed(" <tool") == (" ", [])  # may open <tool_call>: held
    assert streamer.feed("s are fun") == ("<tools are fun", [])


def test_required_output():
    text = '[{"name": "get_weather", "parameters": {"city": "Paris", "unit": "celsius"}}, ' \
           '{"name": "get_time", "parameters": {"tz": "Europe/Paris"}}]'
    _expect(parse_required(text), [("get_weather", WEATHER), ("get_time", TIME)])
    assert parse_required('[{"name": "x"') is None and parse_required('{"name": "x"}') is None
    streamer = ToolCallStreamer(RequiredCallParser())
    calls, first_at = [], None
    for i, ch in enumerate(text):
        calls += streamer.feed(ch)[1]
        if calls and first_at is None:
            first_at = i
    calls += streamer.finish()[1]
    assert first_at == text.index("}},") + 1  # the first call went out as soon as it closed
    _expect(calls, [("get_weather", WEATHER), ("get_time", TIME)])


def test_unknown_parser_names_the_choices():
    with pytest.raises(ValueError, match="unknown tool-call parser 'nope'; choose one of: hermes"):
        get_tool_parser("nope")
