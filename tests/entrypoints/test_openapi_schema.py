"""/openapi.json and /docs are served, and the live server conforms to its own schema: a bounded schemathesis run
(fixed seed) finds no 5xx, no undocumented status code or content type and no response body off the schema."""
from __future__ import annotations

import httpx
import pytest

from live_server import MODEL, ServerThread, wait_idle

schemathesis = pytest.importorskip("schemathesis")
from schemathesis.checks import not_a_server_error  # noqa: E402
from schemathesis.specs.openapi.checks import (content_type_conformance, response_headers_conformance,  # noqa: E402
                                               response_schema_conformance, status_code_conformance)

MAX_EXAMPLES = 30  # per operation and mode
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_headers_conformance,
          response_schema_conformance]


@pytest.fixture(scope="module")
def schema_server(async_engine):
    from pageport.entrypoints.openai.api_server import build_app
    from pageport.entrypoints.openai.limits import ServerLimits

    # small fan-out so that no generated request runs long on the CPU
    with ServerThread(build_app(async_engine, limits=ServerLimits(max_n=2, max_seqs_per_request=4))) as srv:
        srv.engine = async_engine
        yield srv


def test_openapi_and_docs_are_served(schema_server):
    spec = httpx.get(schema_server.url + "/openapi.json").json()
    assert spec["openapi"].startswith("3.")
    ops = {(path, method) for path, item in spec["paths"].items() for method in item}
    assert ops == {("/v1/completions", "post"), ("/v1/chat/completions", "post"), ("/v1/models", "get"),
                   ("/health", "get"), ("/version", "get"), ("/metrics", "get"), ("/tokenize", "post"),
                   ("/v1/responses", "post"),
                   ("/detokenize", "post"),
                   # the pooling routes (a 400 on this generation model)
                   ("/v1/embeddings", "post"), ("/pooling", "post"), ("/classify", "post"), ("/score", "post"),
                   ("/v1/score", "post"), ("/rerank", "post"), ("/v1/rerank", "post"), ("/v2/rerank", "post")}
    completions = spec["paths"]["/v1/completions"]["post"]
    assert set(completions["responses"]) == {"200", "400", "401", "404", "408", "413", "503"}  # no FastAPI 422
    assert set(completions["responses"]["200"]["content"]) == {"application/json", "text/event-stream"}
    schemas = spec["components"]["schemas"]
    assert schemas["ErrorInfo"]["required"] == ["message", "type", "param", "code"]
    assert "prompt" in schemas["CompletionRequest"]["required"]
    assert "messages" in schemas["ChatCompletionRequest"]["required"]
    assert "text/plain" in spec["paths"]["/metrics"]["get"]["responses"]["200"]["content"]
    docs = httpx.get(schema_server.url + "/docs")
    assert docs.status_code == 200 and "swagger" in docs.text.lower() and "/openapi.json" in docs.text


def _steer(case, positive: bool) -> None:
    """Keep generated requests short (the schema allows max_tokens up to the context; the CPU is slow) and, for
    valid requests, name the served model (a random name is a 404 and would hide everything behind it)."""
    body = case.body
    if not isinstance(body, dict):
        return
    for key in ("max_tokens", "max_completion_tokens", "min_tokens"):
        if isinstance(body.get(key), int) and not isinstance(body[key], bool) and body[key] > 4:
            body[key] = 4
    if case.path in ("/v1/completions", "/v1/chat/completions"):  # chat's default is the whole context
        body.setdefault("max_tokens", 4)
    if positive and "model" in body:
        body["model"] = MODEL
    if positive:  # output constraints and token rules are refused (400) until the engine core applies them
        for key in _ENGINE_APPLIED:
            body.pop(key, None)
        if body.get("tool_choice") != "none":  # auto needs --enable-auto-tool-choice; required / named a grammar
            body.pop("tools", None), body.pop("tool_choice", None)
        body.pop("function_call", None)  # deprecated, refused by name
        if body.get("top_logprobs") is not None and body.get("logprobs") is not True:
            body.pop("top_logprobs")
        if isinstance(body.get("messages"), list):  # the schema types a message; the handler checks its meaning
            body["messages"] = [_valid_message(m) for m in body["messages"]] or [{"role": "user", "content": "hi"}]


def _valid_message(m) -> dict:
    if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant"):
        return {"role": "user", "content": "hi"}
    m = {k: v for k, v in m.items() if k != "tool_calls" or m["role"] == "assistant"}
    if m["role"] != "assistant" or not m.get("tool_calls"):
        m.setdefault("content", "hi")
        if m["content"] is None:
            m["content"] = "hi"
    return m


_ENGINE_APPLIED = ("response_format", "structured_outputs", "guided_json", "guided_regex", "guided_choice",
                   "guided_grammar", "structural_tag", "bad_words", "allowed_token_ids")


@pytest.fixture(scope="module")
def api_schema(schema_server):
    return schemathesis.openapi.from_url(schema_server.url + "/openapi.json")


POST = ["POST /v1/completions", "POST /v1/chat/completions", "POST /tokenize", "POST /detokenize"]
GET = ["GET /v1/models", "GET /health", "GET /version", "GET /metrics"]  # no parameters: nothing to get wrong


@pytest.mark.parametrize("label,mode", [(op, "positive") for op in POST + GET] + [(op, "negative") for op in POST])
def test_server_conforms_to_its_schema(api_schema, label, mode):
    from hypothesis import HealthCheck, given, settings

    operation = next(r.ok() for r in api_schema.get_all_operations() if r.ok().label == label)
    strategy = operation.as_strategy(generation_mode=schemathesis.GenerationMode(mode))
    statuses = []

    # derandomize: the same cases on every run
    @settings(max_examples=MAX_EXAMPLES, deadline=None, database=None, derandomize=True,
              suppress_health_check=list(HealthCheck))
    @given(case=strategy)
    def run(case):
        _steer(case, mode == "positive")
        statuses.append(case.call_and_validate(checks=CHECKS, timeout=60).status_code)

    run()
    if mode == "positive":  # the valid cases reached the handlers, not only the validation
        assert 200 in statuses, statuses


def test_nothing_left_behind(schema_server):
    """After the generated requests (streams and all): no request in the engine, every KV block free."""
    assert wait_idle(schema_server.engine.engine)
    assert httpx.get(schema_server.url + "/health").status_code == 200
