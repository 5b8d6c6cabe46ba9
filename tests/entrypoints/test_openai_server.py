"""The OpenAI-compatible server, live on loopback, through the official `openai` client."""
from __future__ import annotations

import asyncio
import json
import time

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from live_server import MAX_MODEL_LEN, MODEL, all_blocks_free, wait_idle

PROMPT = "The capital of France is"
CHAT = [{"role": "user", "content": "What is the capital of France?"}]


def sse_events(resp: httpx.Response) -> list:
    """Raw SSE `data:` payloads, [DONE] kept as the string."""
    events = []
    for line in resp.iter_lines():
        if not line:
            continue
        assert line.startswith("data: "), line
        data = line[len("data: "):]
        events.append(data if data == "[DONE]" else json.loads(data))
    return events


def tokenize(server, **body) -> list[int]:
    r = httpx.post(server.url + "/tokenize", json=body)
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["count"] == len(out["tokens"]) and out["max_model_len"] == MAX_MODEL_LEN
    return out["tokens"]


def test_models_version_health(server, client):
    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL]
    assert models.data[0].max_model_len == MAX_MODEL_LEN
    assert httpx.get(server.url + "/health").status_code == 200
    assert httpx.get(server.url + "/version").json()["version"]


def test_completion_stream_equals_non_stream(server, client):
    full = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=12, temperature=0)
    choice = full.choices[0]
    assert choice.text and choice.finish_reason in ("length", "stop")
    assert full.usage.prompt_tokens == len(tokenize(server, prompt=PROMPT))
    if choice.finish_reason == "length":
        assert full.usage.completion_tokens == 12
    assert full.usage.total_tokens == full.usage.prompt_tokens + full.usage.completion_tokens

    chunks = list(client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=12, temperature=0, stream=True,
                                            stream_options={"include_usage": True}))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == choice.text
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] == choice.finish_reason and not any(finishes[:-1])
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == full.usage.completion_tokens
    assert all(c.usage is None for c in chunks[:-1])
    assert len({c.id for c in chunks}) == 1


def test_chat_stream_equals_non_stream(server, client):
    full = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=16, temperature=0)
    msg = full.choices[0].message
    assert msg.role == "assistant" and msg.content
    assert full.usage.prompt_tokens == len(tokenize(server, messages=CHAT))

    with httpx.stream("POST", server.url + "/v1/chat/completions", timeout=60, json={
            "model": MODEL, "messages": CHAT, "max_tokens": 16, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = sse_events(r)
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    first = chunks[0]["choices"][0]
    assert first["delta"]["role"] == "assistant" and first["finish_reason"] is None
    body = [c for c in chunks if c["choices"]]
    assert all("role" not in c["choices"][0]["delta"] for c in body[1:])
    assert body[-1]["choices"][0]["finish_reason"] == full.choices[0].finish_reason
    assert all(c["choices"][0]["finish_reason"] is None for c in body[:-1])
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in body) == msg.content
    usage = chunks[-1]["usage"]
    assert chunks[-1]["choices"] == [] and usage == {"prompt_tokens": full.usage.prompt_tokens,
                                                     "completion_tokens": full.usage.completion_tokens,
                                                     "total_tokens": full.usage.total_tokens}

    # and through the client
    stream = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=16, temperature=0, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in stream) == msg.content


def test_n_completions(client):
    r = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=6, temperature=1.0, n=3, seed=7,
                                  extra_body={"ignore_eos": True})
    assert sorted(c.index for c in r.choices) == [0, 1, 2]
    assert r.usage.completion_tokens == 18
    chat = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=5, n=2, seed=3,
                                          extra_body={"ignore_eos": True})
    assert [c.index for c in chat.choices] == [0, 1] and chat.usage.completion_tokens == 10
    # two prompts x n=2 in one request: prompt-major indices
    r = client.completions.create(model=MODEL, prompt=[PROMPT, "1, 2, 3,"], max_tokens=3, n=2, temperature=0,
                                  extra_body={"ignore_eos": True})
    assert sorted(c.index for c in r.choices) == [0, 1, 2, 3]
    assert r.choices[0].text == r.choices[1].text  # greedy: both completions of a prompt agree


def test_n_streaming(client):
    seen: dict[int, list] = {}
    finish: dict[int, str] = {}
    for c in client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=4, n=3, stream=True,
                                            extra_body={"ignore_eos": True}):
        for ch in c.choices:
            seen.setdefault(ch.index, []).append(ch.delta)
            if ch.finish_reason:
                finish[ch.index] = ch.finish_reason
    assert sorted(seen) == [0, 1, 2] and finish == {0: "length", 1: "length", 2: "length"}
    assert all(deltas[0].role == "assistant" for deltas in seen.values())


def test_completion_logprobs(client):
    r = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=5, temperature=0, logprobs=3,
                                  extra_body={"ignore_eos": True})
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 5
    assert "".join(lp.tokens) == r.choices[0].text
    assert lp.text_offset == sorted(lp.text_offset) and lp.text_offset[0] == 0
    for tok, chosen, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
        assert chosen <= 0 and 1 <= len(top) <= 4
        assert top[tok] == pytest.approx(chosen)
        assert chosen == pytest.approx(max(top.values()))  # greedy picks the most likely token

    # streamed logprobs add up to the same
    toks = []
    for c in client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=5, temperature=0, logprobs=1,
                                       stream=True, extra_body={"ignore_eos": True}):
        if c.choices[0].logprobs:
            toks += c.choices[0].logprobs.tokens
    assert toks == lp.tokens


def test_chat_logprobs(client):
    r = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=6, temperature=0, logprobs=True,
                                       top_logprobs=3, extra_body={"ignore_eos": True})
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens == 6
    assert "".join(t.token for t in content) == r.choices[0].message.content
    for t in content:
        assert len(t.top_logprobs) == 3 and t.bytes == list(t.token.encode())
        values = [x.logprob for x in t.top_logprobs]
        assert values == sorted(values, reverse=True)
        assert t.top_logprobs[0].token == t.token and t.logprob == pytest.approx(values[0])
    streamed = []
    for c in client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=6, temperature=0, logprobs=True,
                                            top_logprobs=1, stream=True, extra_body={"ignore_eos": True}):
        if c.choices and c.choices[0].logprobs:
            streamed += [t.token for t in c.choices[0].logprobs.content]
    assert streamed == [t.token for t in content]


def test_echo(server, client):
    r = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=3, temperature=0, echo=True, logprobs=1)
    c = r.choices[0]
    assert c.text.startswith(PROMPT) and len(c.text) > len(PROMPT)
    n_prompt = len(tokenize(server, prompt=PROMPT))
    assert len(c.logprobs.tokens) == n_prompt + r.usage.completion_tokens
    assert c.logprobs.token_logprobs[0] is None and all(x <= 0 for x in c.logprobs.token_logprobs[1:])
    # max_tokens=0 + echo scores the prompt alone (lm-eval style)
    r0 = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=0, echo=True, logprobs=0)
    assert r0.choices[0].text == PROMPT and r0.usage.completion_tokens == 0
    assert r0.choices[0].logprobs.token_logprobs[1:] == pytest.approx(c.logprobs.token_logprobs[1:n_prompt],
                                                                      abs=1e-3)
    streamed = "".join(ch.choices[0].text for ch in client.completions.create(
        model=MODEL, prompt=PROMPT, max_tokens=3, temperature=0, echo=True, stream=True))
    assert streamed == c.text


def test_stop_strings(client):
    base = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=24, temperature=0,
                                     extra_body={"ignore_eos": True}).choices[0].text
    words = base.split()
    assert len(words) >= 3, base
    stop = words[2]
    cut = base[:base.index(stop)]
    r = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=24, temperature=0, stop=[stop])
    assert r.choices[0].text == cut and r.choices[0].finish_reason == "stop"
    assert r.choices[0].model_extra.get("stop_reason") == stop
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model=MODEL, prompt=PROMPT, max_tokens=24, temperature=0, stop=stop, stream=True))
    assert streamed == cut
    kept = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=24, temperature=0, stop=[stop],
                                     extra_body={"include_stop_str_in_output": True})
    assert kept.choices[0].text == cut + stop


def test_seed_reproduces(client):
    def sample(seed):
        return client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=12, temperature=1.0,
                                         seed=seed, extra_body={"ignore_eos": True}).choices[0].text

    a, b, c = sample(1234), sample(1234), sample(99)
    assert a == b
    assert a != c
    chat = [client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=10, seed=5, temperature=1.0)
            .choices[0].message.content for _ in range(2)]
    assert chat[0] == chat[1]


def test_token_id_prompts_and_detokenize(server, client):
    ids = tokenize(server, prompt=PROMPT)
    assert httpx.post(server.url + "/detokenize", json={"tokens": ids}).json()["prompt"] == PROMPT
    by_text = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=5, temperature=0)
    by_ids = client.completions.create(model=MODEL, prompt=ids, max_tokens=5, temperature=0)
    assert by_ids.choices[0].text == by_text.choices[0].text
    assert by_ids.usage.prompt_tokens == len(ids)
    r = client.completions.create(model=MODEL, prompt=ids, max_tokens=5, temperature=0,
                                  extra_body={"return_token_ids": True})
    out_ids = r.choices[0].model_extra["token_ids"]
    assert len(out_ids) == r.usage.completion_tokens
    assert httpx.post(server.url + "/detokenize", json={"tokens": out_ids}).json()["prompt"] == r.choices[0].text


def test_extra_sampling_fields(client):
    r = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=8, temperature=0.8, top_p=0.9,
                                  presence_penalty=0.5, frequency_penalty=0.5, seed=1, user="someone",
                                  logit_bias={"13": -100},
                                  extra_body={"top_k": 20, "min_p": 0.05, "repetition_penalty": 1.1,
                                              "min_tokens": 4, "stop_token_ids": [2],
                                              "skip_special_tokens": True})
    assert r.usage.completion_tokens >= 4
    c = client.chat.completions.create(model=MODEL, messages=CHAT, max_completion_tokens=3, temperature=0,
                                       extra_body={"ignore_eos": True})
    assert c.usage.completion_tokens == 3 and c.choices[0].finish_reason == "length"


def _metrics(server) -> dict:
    text = httpx.get(server.url + "/metrics").text
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            key = s.name if "finished_reason" not in s.labels else f"{s.name}[{s.labels['finished_reason']}]"
            if "le" in s.labels:
                continue
            out[key] = out.get(key, 0) + s.value
    return out


def test_metrics(server, client):
    before = _metrics(server)
    for name in ("pageport:num_requests_running", "pageport:num_requests_waiting", "pageport:kv_cache_usage_perc",
                 "pageport:prefix_cache_queries_total", "pageport:prefix_cache_hits_total",
                 "pageport:num_preemptions_total", "pageport:prompt_tokens_total",
                 "pageport:generation_tokens_total", "pageport:request_success_total[length]",
                 "pageport:time_to_first_token_seconds_count", "pageport:inter_token_latency_seconds_count",
                 "pageport:e2e_request_latency_seconds_count", "pageport:request_queue_time_seconds_count"):
        assert name in before, name
    r = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=7, temperature=0,
                                  extra_body={"ignore_eos": True})
    r2 = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=7, temperature=0,
                                   extra_body={"ignore_eos": True})  # a prefix-cache hit for full blocks
    after = _metrics(server)

    def moved(name):
        return after[name] - before[name]

    assert moved("pageport:generation_tokens_total") == 14
    assert moved("pageport:prompt_tokens_total") == 2 * r.usage.prompt_tokens
    assert moved("pageport:request_success_total[length]") == 2
    assert moved("pageport:prefix_cache_queries_total") >= 2 * r.usage.prompt_tokens
    assert moved("pageport:time_to_first_token_seconds_count") == 2
    assert moved("pageport:e2e_request_latency_seconds_count") == 2
    assert moved("pageport:request_queue_time_seconds_count") == 2
    assert moved("pageport:inter_token_latency_seconds_count") == 12
    assert moved("pageport:e2e_request_latency_seconds_sum") > 0
    assert r2.usage == r.usage


def test_disconnect_mid_stream_aborts(server):
    engine = server.engine.engine
    assert wait_idle(engine)
    aborted = engine.stats.finished.get("abort", 0)
    with httpx.stream("POST", server.url + "/v1/completions", timeout=60, json={
            "model": MODEL, "prompt": PROMPT, "max_tokens": 400, "stream": True, "ignore_eos": True}) as r:
        got = 0
        for line in r.iter_lines():
            if line.startswith("data: "):
                got += 1
            if got >= 3:
                break  # leave mid-stream: the connection closes
    t0 = time.monotonic()
    assert wait_idle(engine, 20), "the request was not aborted / its blocks were not returned"
    assert time.monotonic() - t0 < 20
    assert engine.stats.finished.get("abort", 0) == aborted + 1
    assert all_blocks_free(engine)


def test_disconnect_non_streaming_aborts(server):
    engine = server.engine.engine
    assert wait_idle(engine)
    aborted = engine.stats.finished.get("abort", 0)
    with pytest.raises(httpx.TimeoutException):
        httpx.post(server.url + "/v1/chat/completions", timeout=1.0, json={
            "model": MODEL, "messages": CHAT, "max_tokens": 400, "ignore_eos": True, "n": 2})
    assert wait_idle(engine, 20)
    assert engine.stats.finished.get("abort", 0) == aborted + 2  # both completions of n=2
    assert all_blocks_free(engine)


def test_64_concurrent_streams(server):
    async def one(client, i):
        text, finish, usage = [], None, None
        stream = await client.completions.create(model=MODEL, prompt=f"{i} + {i} =", max_tokens=8, temperature=0,
                                                 stream=True, stream_options={"include_usage": True},
                                                 extra_body={"ignore_eos": True})
        async for c in stream:
            if c.choices:
                text.append(c.choices[0].text)
                finish = c.choices[0].finish_reason or finish
            if c.usage:
                usage = c.usage
        return "".join(text), finish, usage

    async def main():
        async with openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0, timeout=120,
                                      http_client=httpx.AsyncClient(limits=httpx.Limits(max_connections=100),
                                                                    timeout=120)) as client:
            return await asyncio.gather(*[one(client, i) for i in range(64)])

    results = asyncio.run(main())
    assert len(results) == 64
    for text, finish, usage in results:
        assert finish == "length" and usage.completion_tokens == 8 and text
    assert wait_idle(server.engine.engine)
