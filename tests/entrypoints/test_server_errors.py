"""Bad input gets its status and an OpenAI error body, never a 500, and never disturbs other requests;
the API key is enforced."""
from __future__ import annotations

import threading

import httpx
import openai
import pytest

from live_server import MAX_MODEL_LEN, MODEL, ServerThread, wait_idle

CHAT = [{"role": "user", "content": "Hello"}]


def check_error(r: httpx.Response, status: int, *, param=None, contains: str = "") -> dict:
    assert r.status_code == status, (r.status_code, r.text)
    body = r.json()
    assert set(body) == {"error"}, body
    err = body["error"]
    assert set(err) == {"message", "type", "param", "code"}, err
    assert isinstance(err["message"], str) and err["message"]
    if param is not None:
        assert err["param"] == param, err
    assert contains.lower() in err["message"].lower(), err
    return err


def post(server, path: str, **kw) -> httpx.Response:
    return httpx.post(server.url + path, timeout=30, **kw)


BAD_REQUESTS = [
    # (path, body, status, param, text in the message)
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "temperature": -1}, 400, "temperature", "temperature"),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "top_p": 0}, 400, "top_p", "top_p"),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "max_tokens": "many"}, 400, "max_tokens", "max_tokens"),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "n": 0}, 400, "n", "n"),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "n": 1000}, 400, "n", "n=1000"),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "max_tokens": MAX_MODEL_LEN + 10}, 400, "max_tokens",
     str(MAX_MODEL_LEN)),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "logprobs": 1000}, 400, "logprobs", "logprobs"),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "presence_penalty": 5}, 400, "presence_penalty", ""),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "logit_bias": {"abc": 1}}, 400, "logit_bias", ""),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "logit_bias": {"1": 500}}, 400, "logit_bias", ""),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "seed": "x"}, 400, "seed", ""),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "suffix": "end"}, 400, "suffix", "not supported"),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "best_of": 3}, 400, "best_of", "not supported"),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "frobnicate": True}, 400, "frobnicate", "unsupported"),
    ("/v1/completions", {"model": MODEL, "prompt": ""}, 400, None, "empty"),
    ("/v1/completions", {"model": MODEL, "prompt": []}, 400, "prompt", ""),
    ("/v1/completions", {"model": MODEL, "prompt": [1, "a"]}, 400, "prompt", ""),
    ("/v1/completions", {"model": MODEL, "prompt": [10 ** 9]}, 400, "prompt", "vocabulary"),
    ("/v1/completions", {"model": MODEL, "prompt": [-1]}, 400, "prompt", "vocabulary"),
    ("/v1/completions", {"model": MODEL}, 400, "prompt", "prompt"),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "max_tokens": 0}, 400, "max_tokens", ""),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "stop_token_ids": [10 ** 9]}, 400, "stop_token_ids", ""),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "max_tokens": 4, "min_tokens": 9}, 400, "min_tokens", ""),
    ("/v1/chat/completions", {"model": MODEL}, 400, "messages", "messages"),
    ("/v1/chat/completions", {"model": MODEL, "messages": []}, 400, "messages", ""),
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": 5, "content": "x"}]}, 400, "messages",
     "role"),
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "http://x/y.png"}}]}]}, 400, "messages", "text only"),
    ("/v1/chat/completions", {"model": MODEL, "messages": CHAT, "tools": [
        {"type": "function", "function": {"name": "f", "parameters": {}}}]}, 400, "tool_choice",
     "--enable-auto-tool-choice"),
    ("/v1/chat/completions", {"model": MODEL, "messages": CHAT, "tool_choice": "required"}, 400, "tool_choice",
     "needs tools"),
    ("/v1/chat/completions", {"model": MODEL, "messages": CHAT, "tools": [
        {"type": "function", "function": {"name": "f"}}], "tool_choice": {"type": "function", "function": {
            "name": "g"}}}, 400, "tool_choice", "'g'"),
    ("/v1/chat/completions", {"model": MODEL, "messages": CHAT, "tools": [
        {"type": "function", "function": {"name": "f", "parameters": {"type": "bogus"}}}], "tool_choice": "required"},
     400, "tools", "bogus"),
    ("/v1/chat/completions", {"model": MODEL, "messages": CHAT, "response_format": {"type": "xml"}}, 400,
     "response_format", ""),
    ("/v1/chat/completions", {"model": MODEL, "messages": CHAT, "response_format": {"type": "json_schema"}}, 400,
     "response_format", "json_schema.schema"),
    ("/v1/chat/completions", {"model": MODEL, "messages": CHAT, "response_format": {
        "type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nonsense"}}}}, 400,
     "response_format", "nonsense"),
    ("/v1/chat/completions", {"model": MODEL, "messages": CHAT, "guided_regex": "[a-"}, 400, "guided_regex",
     "unclosed"),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "guided_json": "{not json"}, 400, "guided_json",
     "not valid json"),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "guided_grammar": 'root ::= "a" | b'}, 400,
     "guided_grammar", '"b" is not defined'),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "guided_choice": []}, 400, "guided_choice", "choice"),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "structured_outputs": {"regex": "a", "choice": ["a"]}},
     400, "structured_outputs", "exactly one"),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "structured_outputs": {"json": {"type": "wat"}}}, 400,
     "structured_outputs", "wat"),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "guided_regex": "a", "response_format": {
        "type": "json_object"}}, 400, "response_format", "one output constraint"),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "guided_choice": ["a"], "guided_decoding_backend": "outlines"},
     400, "guided_decoding_backend", "xgrammar"),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "allowed_token_ids": [10 ** 9]}, 400, "allowed_token_ids",
     "vocabulary"),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "truncate_prompt_tokens": -2}, 400,
     "truncate_prompt_tokens", ""),
    ("/v1/chat/completions", {"model": MODEL, "messages": CHAT, "top_logprobs": 3}, 400, "top_logprobs",
     "logprobs"),
    ("/v1/chat/completions", {"model": MODEL, "messages": CHAT, "logprobs": True, "top_logprobs": 50}, 400,
     "top_logprobs", ""),
    ("/v1/chat/completions", {"model": MODEL, "messages": CHAT, "max_completion_tokens": 10 ** 6}, 400,
     "max_tokens", str(MAX_MODEL_LEN)),
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "function", "content": "42"}]}, 400,
     "messages", "tool_calls and tool messages"),
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "x", "tool_calls": [
        {"function": {"name": "f", "arguments": "{}"}}]}]}, 400, "messages", "only an assistant"),
    ("/tokenize", {"model": MODEL}, 400, "prompt", "prompt or messages"),
    ("/detokenize", {"model": MODEL, "tokens": [10 ** 9]}, 400, "tokens", "vocabulary"),
]


@pytest.mark.parametrize("path,body,status,param,text", BAD_REQUESTS,
                         ids=[f"{p}:{'/'.join(map(str, b))[:40]}" for p, b, *_ in BAD_REQUESTS])
def test_bad_request(server, path, body, status, param, text):
    check_error(post(server, path, json=body), status, param=param, contains=text)


def test_prompt_too_long_names_both_numbers(server):
    ids = [100] * (MAX_MODEL_LEN + 20)
    err = check_error(post(server, "/v1/completions", json={"model": MODEL, "prompt": ids}), 400)
    assert str(MAX_MODEL_LEN) in err["message"] and str(MAX_MODEL_LEN + 20) in err["message"]
    assert err["code"] == "context_length_exceeded"
    words = " ".join(["hello"] * (MAX_MODEL_LEN + 50))
    err = check_error(post(server, "/v1/chat/completions",
                           json={"model": MODEL, "messages": [{"role": "user", "content": words}]}), 400)
    assert str(MAX_MODEL_LEN) in err["message"]


def test_malformed_and_odd_bodies(server):
    check_error(post(server, "/v1/completions", content=b'{"model": "x", "prompt": ',
                     headers={"content-type": "application/json"}), 400, contains="JSON")
    check_error(post(server, "/v1/chat/completions", content=b"[1, 2]",
                     headers={"content-type": "application/json"}), 400)
    check_error(post(server, "/v1/chat/completions", content=b"",
                     headers={"content-type": "application/json"}), 400)
    check_error(post(server, "/v1/chat/completions", content=b"hello", headers={"content-type": "text/plain"}),
                400)
    check_error(post(server, "/v1/completions", content=b"\xff\xfe", headers={"content-type": "application/json"}),
                400)


def test_unknown_model_route_method(server):
    err = check_error(post(server, "/v1/completions", json={"model": "gpt-9", "prompt": "hi"}), 404,
                      param="model", contains="gpt-9")
    assert err["code"] == "model_not_found"
    check_error(post(server, "/v1/chat/completions", json={"model": "gpt-9", "messages": CHAT}), 404)
    check_error(httpx.get(server.url + "/v1/nothing"), 404)
    check_error(httpx.get(server.url + "/v1/completions"), 405)


def test_body_too_large(server):
    big = {"model": MODEL, "prompt": "x" * (9 * 2 ** 20)}
    check_error(post(server, "/v1/completions", json=big), 413, contains="larger")

    def chunks():  # no Content-Length: counted while read
        yield b'{"model": "' + MODEL.encode() + b'", "prompt": "'
        for _ in range(10):
            yield b"y" * 2 ** 20
        yield b'"}'

    check_error(post(server, "/v1/completions", content=chunks(), headers={"content-type": "application/json"}),
                413)


def test_openai_client_sees_errors(server):
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0)
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=CHAT, temperature=-3)
    assert e.value.status_code == 400 and "temperature" in str(e.value)
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="nope", prompt="hi")


def test_bad_input_does_not_disturb_others(server):
    """A long stream runs while every bad request above fires; it completes normally."""
    result = {}

    def long_stream():
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0)
        reference = client.completions.create(model=MODEL, prompt="Count: 1, 2, 3,", max_tokens=40,
                                              temperature=0, extra_body={"ignore_eos": True}).choices[0].text
        result["reference"] = reference
        result["stream"] = "".join(c.choices[0].text for c in client.completions.create(
            model=MODEL, prompt="Count: 1, 2, 3,", max_tokens=40, temperature=0, stream=True,
            extra_body={"ignore_eos": True}))

    t = threading.Thread(target=long_stream)
    t.start()
    for path, body, status, *_ in BAD_REQUESTS * 2:
        assert post(server, path, json=body).status_code == status
    t.join(120)
    assert result["stream"] == result["reference"]
    assert wait_idle(server.engine.engine)
    assert httpx.get(server.url + "/health").status_code == 200


def test_api_key(async_engine):
    from pageport.entrypoints.openai.api_server import build_app

    with ServerThread(build_app(async_engine, api_key="sesame")) as srv:
        assert httpx.get(srv.url + "/health").status_code == 200  # open
        for path in ("/v1/models", "/metrics", "/version"):
            check_error(httpx.get(srv.url + path), 401, contains="API key")
            check_error(httpx.get(srv.url + path, headers={"Authorization": "Bearer wrong"}), 401)
            assert httpx.get(srv.url + path, headers={"Authorization": "Bearer sesame"}).status_code == 200
        check_error(httpx.post(srv.url + "/tokenize", json={"prompt": "hi"}), 401)
        check_error(httpx.post(srv.url + "/v1/nothing"), 401)  # before routing: no probing without a key

        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=srv.url + "/v1", api_key="wrong", max_retries=0).completions.create(
                model=MODEL, prompt="hi", max_tokens=2)
        good = openai.OpenAI(base_url=srv.url + "/v1", api_key="sesame", max_retries=0)
        assert good.completions.create(model=MODEL, prompt="hi", max_tokens=2).usage.completion_tokens >= 1
