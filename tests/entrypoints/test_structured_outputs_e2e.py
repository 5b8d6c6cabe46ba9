"""Structured outputs end to end on the default model: offline `LLM.generate` with StructuredOutputsParams, and the
server's response_format / structured_outputs / guided_* fields and tool_choice required / named through the
openai client. Every output must match its spec in full; free rows of a mixed batch keep their tokens."""
from __future__ import annotations

import json
import re

import jsonschema
import openai
import pytest

from live_server import MAX_MODEL_LEN, MODEL

PERSON = {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 16},
    "age": {"type": "integer", "minimum": 0, "maximum": 120},
    "city": {"type": "string", "maxLength": 16}},
    "required": ["name", "age", "city"], "additionalProperties": False}
PROMPTS = ["Describe a person as JSON.", "Give me a character for a story, as JSON.",
           "Who lives next door? Answer in JSON.", "A famous scientist, in JSON:"]
REGEX = r"\d{3}-\d{4}"
CHOICES = ["positive", "negative", "neutral"]
GRAMMAR = 'root ::= "The answer is " ("yes" | "no") "."'
TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string", "maxLength": 20},
                                     "unit": {"enum": ["celsius", "fahrenheit"]}},
    "required": ["city", "unit"], "additionalProperties": False}}},
    {"type": "function", "function": {"name": "get_time", "parameters": {
        "type": "object", "properties": {"tz": {"type": "string", "maxLength": 20}}, "required": ["tz"],
        "additionalProperties": False}}}]
SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}


def _chat(prompt: str) -> list[dict]:
    return [{"role": "user", "content": prompt}]


# offline ------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def llm():
    from pageport.core.llm import LLM

    try:
        return LLM(dtype="float32", max_model_len=MAX_MODEL_LEN, max_num_seqs=16,
                   kv_cache_memory_bytes=128 * 2 ** 20)
    except FileNotFoundError as e:
        pytest.skip(str(e))


def test_offline_json_schema(llm):
    from pageport import SamplingParams, StructuredOutputsParams

    params = SamplingParams(temperature=0, max_tokens=80,
                            structured_outputs=StructuredOutputsParams(json=PERSON))
    outs = llm.chat([_chat(p) for p in PROMPTS], params, use_tqdm=False)
    for out in outs:
        c = out.outputs[0]
        assert c.finish_reason == "stop", c.text
        jsonschema.validate(json.loads(c.text), PERSON)


def test_offline_regex_choice_grammar(llm):
    from pageport import SamplingParams, StructuredOutputsParams

    cases = [(StructuredOutputsParams(regex=REGEX), lambda t: re.fullmatch(REGEX, t)),
             (StructuredOutputsParams(choice=CHOICES), lambda t: t in CHOICES),
             (StructuredOutputsParams(grammar=GRAMMAR), lambda t: t in ("The answer is yes.", "The answer is no."))]
    prompts = ["A phone number:", "I loved this film! Sentiment:", "Is the sky blue?"]
    for so, ok in cases:
        outs = llm.generate(prompts, SamplingParams(temperature=0.8, seed=3, max_tokens=20, structured_outputs=so),
                            use_tqdm=False)
        for out in outs:
            assert ok(out.outputs[0].text), (so.kind, out.outputs[0].text)


def test_free_rows_keep_their_tokens_in_a_mixed_batch(llm):
    from pageport import SamplingParams, StructuredOutputsParams

    free = SamplingParams(temperature=0, max_tokens=24)
    prompts = ["The capital of France is", "Once upon a time", "def fibonacci(n):"]
    alone = [o.outputs[0].token_ids for o in llm.generate(prompts, free, use_tqdm=False)]
    constrained = SamplingParams(temperature=0, max_tokens=24, structured_outputs=StructuredOutputsParams(
        choice=CHOICES))
    mixed = llm.generate([prompts[0], "Sentiment:", prompts[1], "Mood:", prompts[2]],
                         [free, constrained, free, constrained, free], use_tqdm=False)
    assert [mixed[i].outputs[0].token_ids for i in (0, 2, 4)] == alone
    assert all(mixed[i].outputs[0].text in CHOICES for i in (1, 3))


STRUCTURED_SCRIPT = """
    from pageport import LLM, SamplingParams
    from pageport.sampling_params import StructuredOutputsParams
    llm = LLM(max_model_len=256)
    params = SamplingParams(structured_outputs=StructuredOutputsParams(choice=["Positive", "Negative"]))
    outputs = llm.generate("Classify this sentiment: pageport is wonderful!", params)
    print("RESULT", outputs[0].outputs[0].text)
"""


def test_vllm_style_structured_outputs_script(tmp_path):
    from test_vllm_names import run_script

    assert run_script("structured", STRUCTURED_SCRIPT, tmp_path) in (["RESULT Positive"], ["RESULT Negative"])


def test_offline_invalid_schema_is_a_value_error():
    from pageport import SamplingParams

    with pytest.raises(ValueError, match="JSON schema"):
        SamplingParams(structured_outputs={"json": {"type": "object", "properties": {"a": {"type": "nope"}}}})


# server -------------------------------------------------------------------------------------------------------
def test_response_format_json_object(client):
    """json_object guarantees the syntax, not an end: outputs that stop parse as objects; the small model may
    also go on nesting until max_tokens (then the text is cut, never invalid before the cut)."""
    stopped = 0
    for p in PROMPTS:
        r = client.chat.completions.create(model=MODEL, messages=_chat(p), max_tokens=300, temperature=0,
                                           response_format={"type": "json_object"})
        text = r.choices[0].message.content
        assert text.lstrip().startswith("{")
        if r.choices[0].finish_reason == "stop":
            stopped += 1
            assert isinstance(json.loads(text), dict)
        else:
            assert r.choices[0].finish_reason == "length"
    assert stopped >= 1


@pytest.mark.parametrize("strict", [True, False])
def test_response_format_json_schema(client, strict):
    for p in PROMPTS:
        r = client.chat.completions.create(model=MODEL, messages=_chat(p), max_tokens=80, temperature=0.7, seed=1,
                                           response_format={"type": "json_schema", "json_schema": {
                                               "name": "person", "schema": PERSON, "strict": strict}})
        jsonschema.validate(json.loads(r.choices[0].message.content), PERSON)


def test_structured_outputs_body_and_streaming(client):
    r = client.chat.completions.create(model=MODEL, messages=_chat("How do you feel?"), max_tokens=10,
                                       extra_body={"structured_outputs": {"choice": CHOICES}})
    assert r.choices[0].message.content in CHOICES
    text = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
        model=MODEL, messages=_chat("A phone number please"), max_tokens=16, stream=True,
        extra_body={"structured_outputs": {"regex": REGEX}}) if c.choices)
    assert re.fullmatch(REGEX, text), text


@pytest.mark.parametrize("field, value, ok", [
    ("guided_json", PERSON, lambda t: jsonschema.validate(json.loads(t), PERSON) is None),
    ("guided_regex", REGEX, lambda t: re.fullmatch(REGEX, t)),
    ("guided_choice", CHOICES, lambda t: t in CHOICES),
    ("guided_grammar", GRAMMAR, lambda t: t in ("The answer is yes.", "The answer is no.")),
])
def test_guided_fields(client, field, value, ok):
    r = client.completions.create(model=MODEL, prompt="Answer: ", max_tokens=80, temperature=0.5, seed=2, n=2,
                                  extra_body={field: value})
    for c in r.choices:
        assert ok(c.text), c.text


def test_tool_choice_required(client):
    for p in ("What is the weather in Paris?", "What time is it in Tokyo?"):
        r = client.chat.completions.create(model=MODEL, messages=_chat(p), tools=TOOLS, tool_choice="required",
                                           max_tokens=120, temperature=0)
        choice = r.choices[0]
        assert choice.finish_reason == "tool_calls" and choice.message.tool_calls
        for call in choice.message.tool_calls:
            jsonschema.validate(json.loads(call.function.arguments), SCHEMAS[call.function.name])


def test_tool_choice_named_and_streamed(client):
    named = {"type": "function", "function": {"name": "get_weather"}}
    r = client.chat.completions.create(model=MODEL, messages=_chat("Weather in Rome?"), tools=TOOLS,
                                       tool_choice=named, max_tokens=60, temperature=0)
    (call,) = r.choices[0].message.tool_calls
    assert call.function.name == "get_weather"
    jsonschema.validate(json.loads(call.function.arguments), SCHEMAS["get_weather"])
    args, names = "", []
    for chunk in client.chat.completions.create(model=MODEL, messages=_chat("Weather in Oslo?"), tools=TOOLS,
                                                tool_choice=named, max_tokens=60, temperature=0, stream=True):
        for tc in (chunk.choices[0].delta.tool_calls or []) if chunk.choices else []:
            names += [tc.function.name] if tc.function and tc.function.name else []
            args += tc.function.arguments or "" if tc.function else ""
    assert names == ["get_weather"]
    jsonschema.validate(json.loads(args), SCHEMAS["get_weather"])


def test_invalid_schema_is_a_400_and_the_server_goes_on(client):
    with pytest.raises(openai.BadRequestError, match="JSON schema"):
        client.chat.completions.create(model=MODEL, messages=_chat("x"), response_format={
            "type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object", "properties": {
                "a": {"type": "nope"}}}}})
    r = client.completions.create(model=MODEL, prompt="Hello", max_tokens=4)
    assert r.choices[0].text
