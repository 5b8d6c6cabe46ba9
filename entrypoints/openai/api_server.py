"""The OpenAI-compatible HTTP server: `build_app(async_engine, ...)` and `run_server(args)` (`pageport serve`).

Routes: POST /v1/completions, POST /v1/chat/completions, GET /v1/models, GET /health, GET /version,
GET /metrics, POST /tokenize, POST /detokenize. Every error is an OpenAI body
`{"error": {"message", "type", "param", "code"}}`; bad input is a 400 (FastAPI's 422 included), never a 500.
"""
from __future__ import annotations

import asyncio
import hmac
import logging
import os
import time
from typing import Optional

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

import pageport
from pageport.core.async_engine import AsyncLLMEngine
from pageport.entrypoints.openai.errors import APIError, error_body, error_response
from pageport.entrypoints.openai.metrics import CONTENT_TYPE, ServerMetrics
from pageport.entrypoints.openai.protocol import (ChatCompletionRequest, CompletionRequest, DetokenizeRequest,
                                                   TokenizeRequest)
from pageport.entrypoints.openai.limits import API_KEY_ENV, ServerLimits
from pageport.entrypoints.openai.serving import OpenAIServing

logger = logging.getLogger(__name__)

_OPEN_PATHS = {"/health"}


def default_model_name(config) -> str:
    if config.model:
        return str(config.model)
    from pageport.models.default import DEFAULT_MODEL_NAME
    return DEFAULT_MODEL_NAME


# ASGI middlewares (pure ASGI: they never buffer a streaming response) ---------------------------------
async def _send_error(send, status: int, message: str, code: Optional[str], headers=()) -> None:
    import json
    body = json.dumps(error_body(status, message, None, code)).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            *headers]})
    await send({"type": "http.response.body", "body": body})


class AuthMiddleware:
    """Bearer API key on every route but /health."""

    def __init__(self, app, api_key: str):
        self.app = app
        self.expected = f"Bearer {api_key}".encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["path"] in _OPEN_PATHS:
            return await self.app(scope, receive, send)
        got = dict(scope["headers"]).get(b"authorization", b"")
        if not hmac.compare_digest(got, self.expected):
            return await _send_error(send, 401, "Incorrect or missing API key: send the header "
                                                "'Authorization: Bearer <key>'.", "invalid_api_key",
                                     [(b"www-authenticate", b"Bearer")])
        return await self.app(scope, receive, send)


class _BodyTooLarge(Exception):
    pass


class BodyLimitMiddleware:
    """413 for a request body over the limit (by Content-Length, or counted while it is read)."""

    def __init__(self, app, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        message = f"the request body is larger than this server accepts ({self.max_bytes} bytes)"
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None:
            try:
                too_big = int(length) > self.max_bytes
            except ValueError:
                too_big = False
            if too_big:
                return await _send_error(send, 413, message, "request_too_large")
        seen = 0
        state = {"too_big": False, "started": False}

        async def counting_receive():
            nonlocal seen
            msg = await receive()
            if msg["type"] == "http.request":
                seen += len(msg.get("body", b""))
                if seen > self.max_bytes:
                    state["too_big"] = True
                    raise _BodyTooLarge()
            return msg

        async def guarded_send(msg):
            if state["too_big"]:  # drop whatever the app answers: the 413 goes out instead
                if not state["started"]:
                    state["started"] = True
                    await _send_error(send, 413, message, "request_too_large")
                return
            await send(msg)

        try:
            await self.app(scope, counting_receive, guarded_send)
        except _BodyTooLarge:
            if not state["started"]:
                state["started"] = True
                await _send_error(send, 413, message, "request_too_large")


# errors ------------------------------------------------------------------------------------------------
def _validation_error(exc: RequestValidationError) -> APIError:
    errors = exc.errors()
    if not errors:
        return APIError(400, "invalid request", code="invalid_value")
    e = errors[0]
    kind, loc = e.get("type", ""), tuple(e.get("loc", ()))
    field = ".".join(str(x) for x in loc[1:]) if loc and loc[0] == "body" else ".".join(str(x) for x in loc)
    if kind == "json_invalid":
        detail = (e.get("ctx") or {}).get("error", "")
        return APIError(400, f"malformed JSON in the request body{': ' + str(detail) if detail else ''}",
                        code="invalid_json")
    if not field:
        return APIError(400, "the request body must be a JSON object", code="invalid_json")
    if kind == "extra_forbidden":
        return APIError(400, f"unsupported field '{field}': pageport does not implement it", field,
                        "unsupported_parameter")
    if kind == "missing":
        return APIError(400, f"missing required field '{field}'", field, "missing_required_parameter")
    return APIError(400, f"{field}: {e.get('msg', 'invalid value')}", field.split(".")[0], "invalid_value")


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError):
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        return error_response(_validation_error(exc))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        status = exc.status_code
        if status == 400 and "parsing the body" in str(exc.detail):
            return error_response(APIError(400, "malformed request body", code="invalid_json"))
        msg = {404: f"no route {request.method} {request.url.path}",
               405: f"method {request.method} is not allowed on {request.url.path}"}.get(status, str(exc.detail))
        return JSONResponse(error_body(status, msg, None, None), status_code=status,
                            headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception):
        logger.exception("unexpected error on %s", request.url.path)
        return JSONResponse(error_body(500, f"internal server error: {type(exc).__name__}", None, None),
                            status_code=500)


async def _wait_disconnect(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def _unless_disconnected(request: Request, coro):
    """Run a non-streaming handler; if the client goes away first, cancel it (which aborts its requests)."""
    work = asyncio.ensure_future(coro)
    gone = asyncio.ensure_future(_wait_disconnect(request))
    try:
        await asyncio.wait({work, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        if not work.done():
            work.cancel()
        gone.cancel()
    if not work.done() or work.cancelled():
        try:
            await work
        except asyncio.CancelledError:
            pass
        return Response(status_code=499)
    return work.result()


# the app -------------------------------------------------------------------------------------------------
def build_app(engine: AsyncLLMEngine, served_model_names: Optional[list[str]] = None, api_key: Optional[str] = None,
              limits: Optional[ServerLimits] = None) -> FastAPI:
    """An app over a running AsyncLLMEngine. Several apps may share one engine (each has its own metrics)."""
    limits = limits or ServerLimits()
    inner = engine.engine
    names = list(served_model_names or [default_model_name(engine.config)])
    serving = OpenAIServing(engine, names, limits, str(getattr(inner, "model_source", "")))
    metrics = ServerMetrics(engine, names[0])
    _chain_observer(engine, metrics.observe)

    app = FastAPI(title="pageport OpenAI-compatible server", version=pageport.__version__, docs_url=None,
                  redoc_url=None, openapi_url=None)
    app.state.engine = engine
    app.state.serving = serving
    app.state.metrics = metrics
    _install_error_handlers(app)
    app.add_middleware(BodyLimitMiddleware, max_bytes=limits.max_body_bytes)
    if api_key:
        app.add_middleware(AuthMiddleware, api_key=api_key)  # outermost: checked before the body is read

    def _alive():
        if engine.errored:
            raise APIError(503, f"the engine is dead: {engine.dead_error!r}", code="engine_dead")

    @app.get("/health")
    async def health():
        if engine.errored or not engine.is_running:
            return JSONResponse(error_body(503, f"the engine is not running: {engine.dead_error!r}", None,
                                           "engine_dead"), status_code=503)
        return Response(status_code=200)

    @app.get("/version")
    async def version():
        return {"version": pageport.__version__}

    @app.get("/metrics")
    async def prometheus_metrics():
        return Response(metrics.render(), media_type=CONTENT_TYPE)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [
            {"id": name, "object": "model", "created": serving.created, "owned_by": "pageport",
             "root": serving.model_source or name, "parent": None, "max_model_len": serving.max_model_len,
             "permission": []} for name in names]}

    async def _respond(raw: Request, make, body):
        _alive()
        arrival = time.monotonic()
        if body.stream:
            gen = await make(body, arrival)
            return StreamingResponse(gen, media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        return await _unless_disconnected(raw, make(body, arrival))

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, raw: Request):
        return await _respond(raw, serving.create_completion, body)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, raw: Request):
        return await _respond(raw, serving.create_chat_completion, body)

    @app.post("/tokenize")
    async def tokenize(body: TokenizeRequest):
        serving.check_model(body.model)
        if (body.prompt is None) == (body.messages is None):
            raise APIError(400, "give exactly one of prompt or messages", "prompt", "invalid_value")
        if body.messages is not None:
            if not body.messages:
                raise APIError(400, "messages is empty", "messages", "invalid_value")
            p = serving.render_chat(body.messages, body.add_generation_prompt, body.continue_final_message,
                                    body.chat_template_kwargs)
            ids = p.token_ids
            if body.add_special_tokens:
                ids = serving._need_tokenizer().encode(p.text, add_special_tokens=True)
        else:
            add = True if body.add_special_tokens is None else body.add_special_tokens
            ids = serving._need_tokenizer().encode(body.prompt, add_special_tokens=add)
        out = {"count": len(ids), "max_model_len": serving.max_model_len, "tokens": ids}
        if body.return_token_strs:
            out["token_strs"] = serving._need_tokenizer().convert_ids_to_tokens(ids)
        return out

    @app.post("/detokenize")
    async def detokenize(body: DetokenizeRequest):
        serving.check_model(body.model)
        serving.check_token_ids(body.tokens, "tokens")
        return {"prompt": serving._need_tokenizer().decode(body.tokens)}

    return app


def _chain_observer(engine: AsyncLLMEngine, fn) -> None:
    """Several apps on one engine: call every app's observer."""
    prev = engine.observer
    if prev is None:
        engine.observer = fn
    else:
        def both(out, itls, _a=prev, _b=fn):
            _a(out, itls)
            _b(out, itls)
        engine.observer = both


# `pageport serve` ----------------------------------------------------------------------------------------
def run_server(args) -> int:
    import uvicorn

    from pageport.core.config import EngineConfig

    config = EngineConfig.from_cli_args(args)
    api_key = args.api_key or os.environ.get(API_KEY_ENV) or None
    engine = AsyncLLMEngine.from_config(config)
    try:
        app = build_app(engine, args.served_model_name, api_key,
                        ServerLimits(max_n=args.max_n, max_body_bytes=args.max_request_body_bytes))
        logger.warning("pageport %s serving %s on http://%s:%d (max_model_len %d)%s", pageport.__version__,
                       ", ".join(app.state.serving.model_names), args.host, args.port, config.max_model_len,
                       " with an API key" if api_key else "")
        uvicorn.run(app, host=args.host, port=args.port, log_level=args.uvicorn_log_level,
                    timeout_keep_alive=30)
    finally:
        engine.shutdown()
    return 0
