"""The OpenAI-compatible HTTP server: `build_app(async_engine, ...)` and `run_server(args)` (`pageport serve`).

Routes: POST /v1/completions, POST /v1/chat/completions, POST /v1/responses, GET /v1/models, GET /health, GET /version,
GET /metrics, POST /tokenize, POST /detokenize, the pooling routes of pooling models (/v1/embeddings, /pooling,
/classify, /score, /rerank: entrypoints/openai/pooling.py), and the schema at /openapi.json (Swagger UI at /docs). Every
error is an OpenAI body `{"error": {"message", "type", "param", "code"}}`; bad input is a 400 (FastAPI's 422
included), never a 500.

Lifecycle (`pageport serve`): SIGTERM stops new connections and lets the requests in flight finish for at most
--shutdown-timeout seconds; those still running then end with a 503 error (an error event in a stream) and the
process exits. If the engine dies, /health answers 503 and the process exits non-zero shortly after, so that
a supervisor restarts it.
"""
from __future__ import annotations

import asyncio
import hmac
import json
import logging
import signal
import time
from typing import Optional

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

import pageport
from pageport.core.async_engine import AsyncLLMEngine
from pageport.entrypoints.openai.chat_output import template_tools
from pageport.entrypoints.openai.errors import APIError, error_body, error_response
from pageport.entrypoints.openai.metrics import CONTENT_TYPE, ServerMetrics
from pageport.entrypoints.openai.protocol import (ChatCompletionRequest, ChatCompletionResponse, CompletionRequest,
                                                   CompletionResponse, DetokenizeRequest, DetokenizeResponse,
                                                   ErrorResponse, ModelList, TokenizeRequest, TokenizeResponse,
                                                   VersionResponse)
from pageport.entrypoints.openai.limits import ServerLimits
from pageport.entrypoints.openai.lora import LoRAModels, parse_lora_modules, register_lora_routes, runtime_updates_allowed
from pageport.entrypoints.openai.pooling import refuse_generation, register_pooling_routes
from pageport.entrypoints.openai.responses import ResponsesRequest
from pageport.entrypoints.openai.serving import OpenAIServing, ServingOptions, engine_dead_error

logger = logging.getLogger(__name__)

_OPEN_PATHS = {"/health", "/openapi.json", "/docs", "/docs/oauth2-redirect"}  # no secrets there (as vLLM)
DEAD_ENGINE_EXIT_DELAY = 0.5  # seconds /health answers 503 before the process exits


def default_model_name(config) -> str:
    if config.model:
        return str(config.model)
    from pageport.models.default import DEFAULT_MODEL_NAME
    return DEFAULT_MODEL_NAME


# ASGI middlewares (pure ASGI: they never buffer a streaming response) ---------------------------------
async def _send_error(send, status: int, message: str, code: Optional[str], headers=()) -> None:
    body = json.dumps(error_body(status, message, None, code)).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            *headers]})
    await send({"type": "http.response.body", "body": body})


def _route(scope) -> str:
    """The request's path without the --root-path prefix (which ASGI servers put in front of it)."""
    path, root = scope["path"], scope.get("root_path", "")
    return path[len(root):] if root and path.startswith(root) else path


class AuthMiddleware:
    """Bearer API key on every route but /health."""

    def __init__(self, app, api_key):
        self.app = app
        keys = [api_key] if isinstance(api_key, str) else list(api_key)
        self.expected = [f"Bearer {k}".encode() for k in keys]

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or _route(scope) in _OPEN_PATHS:
            return await self.app(scope, receive, send)
        got = dict(scope["headers"]).get(b"authorization", b"")
        # every key compared, so the time taken does not tell which one nearly matched
        if not sum(hmac.compare_digest(got, e) for e in self.expected):
            return await _send_error(send, 401, "Incorrect or missing API key: send the header "
                                                "'Authorization: Bearer <key>'.", "invalid_api_key",
                                     [(b"www-authenticate", b"Bearer")])
        return await self.app(scope, receive, send)


class _BodyTooLarge(Exception):
    pass


class BodyReadMiddleware:
    """Reads the whole request body before the app runs: 413 beyond `max_bytes` (by Content-Length, or counted
    while it is read), 408 when it has not all arrived within `timeout` seconds (a stalled client would
    otherwise hold its connection and a task forever). The app then gets the body in one message."""

    def __init__(self, app, max_bytes: int, timeout: float):
        self.app = app
        self.max_bytes = max_bytes
        self.timeout = timeout

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        too_big = f"the request body is larger than this server accepts ({self.max_bytes} bytes)"
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            return await _send_error(send, 413, too_big, "request_too_large", [(b"connection", b"close")])
        try:
            body = await asyncio.wait_for(self._read(receive), self.timeout)
        except asyncio.TimeoutError:
            return await _send_error(send, 408, f"the request body did not arrive within {self.timeout:g} s",
                                     "request_timeout", [(b"connection", b"close")])
        except _BodyTooLarge:
            return await _send_error(send, 413, too_big, "request_too_large", [(b"connection", b"close")])
        if body is None:  # the client left
            return
        replayed = False

        async def replay():
            nonlocal replayed
            if replayed:
                return await receive()  # from now on: the disconnect
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)

    async def _read(self, receive) -> Optional[bytes]:
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                raise _BodyTooLarge()
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)


# errors ------------------------------------------------------------------------------------------------
def _validation_error(exc: RequestValidationError) -> APIError:
    errors = exc.errors()
    if not errors:
        return APIError(400, "invalid request", code="invalid_value")
    e = errors[0]
    kind, loc = e.get("type", ""), tuple(e.get("loc", ()))
    field = ".".join(str(x) for x in loc[1:]) if loc and loc[0] == "body" else ".".join(str(x) for x in loc)
    if kind == "lone_surrogate":
        return APIError(400, e["msg"], (e.get("ctx") or {}).get("param"), "invalid_value")
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
def _errors(*statuses: int) -> dict:
    """OpenAPI `responses` for error statuses, all with the OpenAI error body."""
    why = {400: "invalid request", 401: "missing or wrong API key", 404: "unknown model", 408: "request body "
           "too slow", 413: "request body too large", 503: "engine dead or server shutting down"}
    return {s: {"model": ErrorResponse, "description": why[s]} for s in statuses}


_POST_ERRORS = _errors(400, 401, 404, 408, 413, 503)
# OpenAPI 3.0/3.1: an event stream's schema describes one event (its fields), not the body as a whole
_SSE = {"text/event-stream": {"schema": {
    "type": "object", "description": "one server-sent event when stream=true: data is a JSON chunk or [DONE]",
    "properties": {"data": {"type": "string"}, "event": {"type": "string"}, "id": {"type": "string"},
                   "retry": {"type": "integer"}}, "required": ["data"]}}}


def _openapi(app: FastAPI) -> dict:
    """FastAPI's schema without its 422 (this server answers invalid bodies with 400 and an error body)."""
    if app.openapi_schema is None:
        schema = get_openapi(title=app.title, version=app.version, routes=app.routes,
                             description="OpenAI-compatible API of pageport")
        for path in schema["paths"].values():
            for op in path.values():
                op.get("responses", {}).pop("422", None)
        for name in ("HTTPValidationError", "ValidationError"):
            schema.get("components", {}).get("schemas", {}).pop(name, None)
        app.openapi_schema = schema
    return app.openapi_schema


def build_app(engine: AsyncLLMEngine, served_model_names: Optional[list[str]] = None, api_key=None,
              limits: Optional[ServerLimits] = None, options: Optional[ServingOptions] = None,
              docs: bool = True, lora_modules: Optional[list] = None,
              allow_lora_updates: Optional[bool] = None) -> FastAPI:
    """An app over a running AsyncLLMEngine. Several apps may share one engine (each has its own metrics).
    `api_key`: one key or a list of keys, any of which is accepted. `lora_modules`: (name, path, base) of the LoRA
    adapters to serve; `allow_lora_updates` (default: the environment, entrypoints/openai/lora.py) adds the routes
    that load and unload adapters at run time."""
    limits = limits or ServerLimits()
    inner = getattr(engine, "engine", None)
    names = list(served_model_names or [default_model_name(engine.config)])
    serving = OpenAIServing(engine, names, limits, str(getattr(inner, "model_source", "")), options)
    if getattr(engine.config, "enable_lora", False) or lora_modules:
        serving.loras = LoRAModels(engine, names)
        for name, path, base in lora_modules or ():
            serving.loras.add_at_start(name, path, base)
    metrics = ServerMetrics(engine, names[0])
    _chain_observer(engine, metrics.observe)

    app = FastAPI(title="pageport OpenAI-compatible server", version=pageport.__version__,
                  docs_url="/docs" if docs else None, redoc_url=None, openapi_url="/openapi.json" if docs else None)
    app.openapi = lambda: _openapi(app)
    app.state.engine = engine
    app.state.serving = serving
    app.state.metrics = metrics
    _install_error_handlers(app)
    app.add_middleware(BodyReadMiddleware, max_bytes=limits.max_body_bytes, timeout=limits.request_body_timeout)
    if api_key:
        app.add_middleware(AuthMiddleware, api_key=api_key)  # outermost: checked before the body is read
    auth = _errors(401)

    def _alive():
        if engine.errored:
            raise engine_dead_error()
        if serving.closing is not None:
            raise serving.closing

    @app.get("/health", response_class=Response, responses={
        200: {"description": "the engine is running", "content": {}}, **_errors(503)})
    async def health():
        if engine.errored or not getattr(engine, "is_running", True):
            return error_response(engine_dead_error())
        return Response(status_code=200)

    @app.get("/version", response_model=VersionResponse, responses=auth)
    async def version():
        return {"version": pageport.__version__}

    @app.get("/metrics", response_class=Response, responses={
        200: {"description": "Prometheus text format", "content": {"text/plain": {"schema": {"type": "string"}}}},
        **auth})
    async def prometheus_metrics():
        return Response(metrics.render(), media_type=CONTENT_TYPE)

    @app.get("/v1/models", response_model=ModelList, responses=auth)
    async def models():
        return {"object": "list", "data": [
            {"id": name, "object": "model", "created": serving.created, "owned_by": "pageport",
             "root": serving.model_source or name, "parent": None, "max_model_len": serving.max_model_len,
             "permission": []} for name in names]
            + (serving.loras.cards(serving.created, serving.max_model_len) if serving.loras is not None else [])}

    async def _respond(raw: Request, make, body):
        _alive()
        refuse_generation(engine)  # a pooling model: only the pooling routes
        arrival = time.monotonic()
        if body.stream:
            gen = await make(body, arrival)
            return StreamingResponse(gen, media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        return await _unless_disconnected(raw, make(body, arrival))

    @app.post("/v1/completions", response_model=None, responses={
        200: {"model": CompletionResponse, "content": _SSE}, **_POST_ERRORS})
    async def completions(body: CompletionRequest, raw: Request):
        return await _respond(raw, serving.create_completion, body)

    @app.post("/v1/chat/completions", response_model=None, responses={
        200: {"model": ChatCompletionResponse, "content": _SSE}, **_POST_ERRORS})
    async def chat_completions(body: ChatCompletionRequest, raw: Request):
        return await _respond(raw, serving.create_chat_completion, body)

    @app.post("/v1/responses", response_model=None, responses={
        200: {"description": "a response object, or its events when stream=true",
              "content": {"application/json": {"schema": {"type": "object"}}, **_SSE}}, **_POST_ERRORS})
    async def responses(body: ResponsesRequest, raw: Request):
        return await _respond(raw, serving.create_response, body)

    @app.post("/tokenize", response_model=TokenizeResponse, responses=_POST_ERRORS)
    async def tokenize(body: TokenizeRequest):
        serving.check_model(body.model)
        if (body.prompt is None) == (body.messages is None):
            raise APIError(400, "give exactly one of prompt or messages", "prompt", "invalid_value")
        tok = serving._need_tokenizer()
        if body.messages is not None:
            if not body.messages:
                raise APIError(400, "messages is empty", "messages", "invalid_value")
            ids = (await serving.render_chat(body.messages, body.add_generation_prompt, body.continue_final_message,
                                             body.chat_template_kwargs, bool(body.add_special_tokens),
                                             body.chat_template, template_tools(body.tools))).token_ids
        else:
            serving.check_prompt_chars(len(body.prompt), "prompt")
            add = True if body.add_special_tokens is None else body.add_special_tokens
            ids = await serving.in_tokenizer_thread(tok.encode, body.prompt, add_special_tokens=add)
        out = {"count": len(ids), "max_model_len": serving.max_model_len, "tokens": ids}
        if body.return_token_strs:
            out["token_strs"] = await serving.in_tokenizer_thread(tok.convert_ids_to_tokens, ids)
        return out

    @app.post("/detokenize", response_model=DetokenizeResponse, responses=_POST_ERRORS)
    async def detokenize(body: DetokenizeRequest):
        serving.check_model(body.model)
        serving.check_token_ids(body.tokens, "tokens")
        tok = serving._need_tokenizer()
        return {"prompt": await serving.in_tokenizer_thread(tok.decode, body.tokens)}

    if serving.loras is not None and (runtime_updates_allowed() if allow_lora_updates is None else allow_lora_updates):
        register_lora_routes(app, serving.loras, _POST_ERRORS)
    # /v1/embeddings, /pooling, /classify, /score, /rerank (entrypoints/openai/pooling.py)
    app.state.pooling = register_pooling_routes(app, serving, _alive, _unless_disconnected, _POST_ERRORS)
    return app


def _chain_observer(engine: AsyncLLMEngine, fn) -> None:
    """Several apps on one engine: call every app's observer."""
    prev = getattr(engine, "observer", None)
    if prev is None:
        engine.observer = fn
    else:
        def both(out, itls, _a=prev, _b=fn):
            _a(out, itls)
            _b(out, itls)
        engine.observer = both


# `pageport serve` ----------------------------------------------------------------------------------------
class _Server:
    """uvicorn's Server with pageport's lifecycle: a bounded drain on SIGTERM/SIGINT, exit when the engine dies."""

    def __init__(self, app: FastAPI, config, shutdown_timeout: float):
        import uvicorn

        outer = self

        class Server(uvicorn.Server):
            def handle_exit(self, sig, frame):  # runs in the signal handler, on the loop's thread
                if not self.should_exit and outer.loop is not None:
                    outer.loop.call_soon_threadsafe(outer.start_drain)
                super().handle_exit(sig, frame)

        self.server = Server(config)
        self.app = app
        self.shutdown_timeout = shutdown_timeout
        self.loop: Optional[asyncio.AbstractEventLoop] = None
        self.exit_code = 0

    def start_drain(self) -> None:
        logger.warning("shutting down: requests in flight have %g s to finish", self.shutdown_timeout)
        self.loop.call_later(self.shutdown_timeout, self.app.state.serving.end_all,
                             APIError(503, f"the server shut down before this request finished (it waited "
                                           f"{self.shutdown_timeout:g} s, --shutdown-timeout)",
                                      code="server_shutting_down"))

    async def _watch_engine(self) -> None:
        engine = self.app.state.engine
        while not engine.errored:
            await asyncio.sleep(0.1)
        await asyncio.sleep(DEAD_ENGINE_EXIT_DELAY)  # /health says 503 meanwhile
        logger.error("the engine died (%r): exiting so that a supervisor restarts the server", engine.dead_error)
        self.exit_code = 1
        self.app.state.serving.end_all(engine_dead_error())
        self.server.should_exit = True

    async def _serve(self) -> None:
        self.loop = asyncio.get_running_loop()
        watch = asyncio.ensure_future(self._watch_engine())
        try:
            await self.server.serve()
        finally:
            watch.cancel()

    def run(self) -> int:
        # uvicorn re-raises the signal that stopped it once it is done: a no-op handler lets us clean up and
        # return our own exit status instead of dying of SIGTERM
        previous = signal.signal(signal.SIGTERM, lambda *_: None)
        try:
            with asyncio.Runner(loop_factory=_loop_factory()) as runner:
                runner.run(self._serve())
        finally:
            signal.signal(signal.SIGTERM, previous)
        return self.exit_code


def _loop_factory():
    """uvloop's event loop where it is installed (the serve extra has it): a cheaper loop per streamed token."""
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop


def serving_options(args) -> ServingOptions:
    """The chat, tool, reasoning and structured-output choices of `pageport serve`'s flags."""
    from pageport.core.arg_utils import default_sampling_params
    from pageport.entrypoints.serve import load_chat_template, structured_outputs_backend

    defaults = default_sampling_params(getattr(args, "model", None), getattr(args, "generation_config", "auto"),
                                       getattr(args, "override_generation_config", None))
    changed = {k: getattr(defaults, k) for k in ("temperature", "top_p", "top_k", "min_p", "repetition_penalty",
                                                 "max_tokens")
               if getattr(defaults, k) != getattr(type(defaults)(), k)}
    return ServingOptions(
        structured_outputs_backend=structured_outputs_backend(args),
        enable_auto_tool_choice=args.enable_auto_tool_choice, tool_call_parser=args.tool_call_parser,
        reasoning_parser=args.reasoning_parser, chat_template=load_chat_template(args.chat_template),
        default_chat_template_kwargs=args.default_chat_template_kwargs, default_sampling=changed,
        log_requests=args.enable_log_requests and not args.disable_log_requests, max_log_len=args.max_log_len)


def serve(engine: AsyncLLMEngine, args) -> int:
    """Serve `engine` until SIGTERM/SIGINT (exit status 0) or until the engine dies (1)."""
    import uvicorn
    from fastapi.middleware.cors import CORSMiddleware

    from pageport.entrypoints.serve import api_keys, check_serve_args

    check_serve_args(args)
    keys = api_keys(args)
    limits = ServerLimits(max_n=args.max_n, max_seqs_per_request=args.max_seqs_per_request,
                          max_body_bytes=args.max_request_body_bytes, max_prompt_chars=args.max_prompt_chars,
                          request_body_timeout=args.request_body_timeout)
    app = build_app(engine, args.served_model_name, keys or None, limits, serving_options(args),
                    docs=not args.disable_fastapi_docs, lora_modules=parse_lora_modules(args.lora_modules))
    app.add_middleware(CORSMiddleware, allow_origins=args.allowed_origins, allow_methods=args.allowed_methods,
                       allow_headers=args.allowed_headers, allow_credentials=args.allow_credentials)
    where = f"unix:{args.uds}" if args.uds else f"http{'s' if args.ssl_certfile else ''}://{args.host}:{args.port}"
    logger.warning("pageport %s serving %s on %s (max_model_len %d)%s", pageport.__version__,
                   ", ".join(app.state.serving.model_names), where, engine.config.max_model_len,
                   f" with {len(keys)} API key(s)" if keys else "")
    # uvicorn's own graceful timeout only backs ours up: past it, it cuts connections without an answer
    config = uvicorn.Config(app, host=args.host, port=args.port, uds=args.uds, log_level=args.uvicorn_log_level,
                            timeout_keep_alive=30, timeout_graceful_shutdown=args.shutdown_timeout + 5,
                            root_path=args.root_path or "", ssl_keyfile=args.ssl_keyfile,
                            ssl_certfile=args.ssl_certfile, ssl_ca_certs=args.ssl_ca_certs,
                            access_log=not args.disable_uvicorn_access_log)
    return _Server(app, config, args.shutdown_timeout).run()


def run_server(args) -> int:
    from pageport.core.config import EngineConfig

    from pageport.entrypoints.serve import structured_outputs_backend
    config = EngineConfig.from_cli_args(args)
    config.structured_outputs_backend = structured_outputs_backend(args)  # the core's grammars use it too
    engine = AsyncLLMEngine.from_config(config)
    try:
        return serve(engine, args)
    finally:
        engine.shutdown()
