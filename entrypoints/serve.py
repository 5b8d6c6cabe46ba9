"""`pageport serve [MODEL]`: the OpenAI-compatible server (FastAPI + uvicorn) over an AsyncLLMEngine.

Every engine flag comes from `EngineConfig.add_cli_args` (the one definition of engine options); the server
adds --host, --port, --api-key (or $PAGEPORT_API_KEY / $VLLM_API_KEY), --served-model-name, chat, tool-calling,
reasoning and structured-output choices, TLS, CORS, a few limits and --shutdown-timeout. The flags vLLM users
type are accepted under vLLM's names (`--model`, `-tp`, `-q`, `--config FILE.yaml`, underscores for dashes);
those pageport cannot honour are still parsed, so that their value is never taken for the model, and refused
with one line. Needs the `serve` extra (fastapi, uvicorn, prometheus-client); the command and its --help work
without it.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
from pathlib import Path

from pageport.core.arg_utils import (add_source_args, check_tokenizer_mode, closest, expand_config_file, known_flags,
                                  normalize_flags, resolve_hub_model, unknown_flag_message)
from pageport.core.config import EngineConfig
from pageport.entrypoints.openai.limits import API_KEY_ENV, PROMPT_CHARS_PER_TOKEN, ServerLimits

DEFAULT_SHUTDOWN_TIMEOUT = 20.0
VLLM_API_KEY_ENV = "VLLM_API_KEY"

# vLLM flags pageport cannot honour yet: (flag, aliases, takes a value)
UNSUPPORTED = [
    ("--data-parallel-address", (), True), ("--data-parallel-rpc-port", (), True),
    ("--data-parallel-size-local", (), True), ("--enable-expert-parallel", ("-ep",), False),
    ("--cpu-offload-gb", (), True), ("--swap-space", (), True), ("--limit-mm-per-prompt", (), True),
    ("--mm-processor-kwargs", (), True), ("--hf-overrides", (), True), ("--rope-scaling", (), True),
    ("--kv-transfer-config", (), True), ("--compilation-config", ("-O",), True),
    ("--max-seq-len-to-capture", (), True), ("--task", (), True), ("--runner", (), True),
    ("--code-revision", (), True), ("--enable-sleep-mode", (), False),
    ("--tool-parser-plugin", (), True), ("--chat-template-content-format", (), True),
    ("--response-role", (), True), ("--return-tokens-as-token-ids", (), False),
    ("--enable-prompt-tokens-details", (), False), ("--enable-force-include-usage", (), False),
    ("--api-server-count", (), True), ("--headless", (), False), ("--middleware", (), "+"),
    ("--preemption-mode", (), True), ("--long-prefill-token-threshold", (), True),
    ("--otlp-traces-endpoint", (), True), ("--disable-custom-all-reduce", (), False),
]
_UNSUPPORTED_VALUES = {"--chat-template-content-format": "auto",
                       "--response-role": "assistant"}  # these values pageport does honour


class ServeArgumentParser(argparse.ArgumentParser):
    """`pageport serve`'s parser: underscores for dashes, `--config FILE.yaml`, and an unknown flag answered
    with the closest known one (argparse hands a subparser's leftovers to the top parser, which cannot)."""

    def parse_known_args(self, args=None, namespace=None):
        args = expand_config_file(self, normalize_flags(list(args or [])))
        ns, extra = super().parse_known_args(args, namespace)
        if extra:
            self.error(unknown_flag_message(self, extra))
        return ns, extra

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")  # one line, no usage dump


def add_server_args(parser) -> None:
    g = parser.add_argument_group("server")
    g.add_argument("--model", dest="model_flag", default=None, help="the model (as the positional argument)")
    g.add_argument("--config", default=None, help="YAML file of flags (keys as the flags without dashes); the "
                                                  "command line wins over it")
    g.add_argument("--host", default="0.0.0.0", help="address to bind (default: all interfaces, as vLLM)")
    g.add_argument("--port", type=int, default=8000)
    g.add_argument("--uds", default=None, help="serve on this Unix domain socket instead of host:port")
    g.add_argument("--api-key", nargs="+", action="extend", default=None,
                   help=f"require 'Authorization: Bearer KEY' on every route but /health; several keys may be "
                        f"given (also ${API_KEY_ENV} or ${VLLM_API_KEY_ENV})")
    g.add_argument("--served-model-name", nargs="+", default=None,
                   help="model name(s) the API answers to (default: the model argument)")
    g.add_argument("--lora-modules", nargs="+", action="extend", default=None,
                   help="LoRA adapters to serve (with --enable-lora), each name=path or JSON "
                        "'{\"name\": ..., \"path\": ..., \"base_model_name\": ...}'; a request picks one by its "
                        "model field")
    g.add_argument("--root-path", default=None, help="path prefix when behind a proxy that strips it")
    g.add_argument("--ssl-keyfile", default=None)
    g.add_argument("--ssl-certfile", default=None)
    g.add_argument("--ssl-ca-certs", default=None)
    g.add_argument("--allowed-origins", type=json.loads, default=["*"], help='CORS origins, JSON (["*"])')
    g.add_argument("--allowed-methods", type=json.loads, default=["*"], help="CORS methods, JSON")
    g.add_argument("--allowed-headers", type=json.loads, default=["*"], help="CORS headers, JSON")
    g.add_argument("--allow-credentials", action="store_true", help="CORS: allow credentials")
    g.add_argument("--disable-fastapi-docs", action="store_true", help="no /docs and no /openapi.json")
    g.add_argument("--disable-uvicorn-access-log", action="store_true")
    g.add_argument("--disable-frontend-multiprocessing", action="store_true", help="accepted (no effect)")
    g.add_argument("--enable-log-requests", action="store_true", help="log each request's prompt and params")
    g.add_argument("--disable-log-requests", action="store_true", help="the default: requests are not logged")
    g.add_argument("--max-log-len", type=int, default=None, help="most prompt characters a request log shows")
    g.add_argument("--disable-log-stats", action="store_true", help="accepted (pageport logs no periodic stats)")
    g.add_argument("--max-n", type=int, default=ServerLimits.max_n, help="most completions per request (n)")
    g.add_argument("--max-seqs-per-request", type=int, default=ServerLimits.max_seqs_per_request,
                   help="most sequences (prompts x n) one request may ask for (400 beyond)")
    g.add_argument("--max-request-body-bytes", type=int, default=ServerLimits.max_body_bytes,
                   help="largest request body accepted (413 beyond)")
    g.add_argument("--max-prompt-chars", type=int, default=None,
                   help="most prompt characters per request, checked before tokenizing (400 beyond; default "
                        f"{PROMPT_CHARS_PER_TOKEN} x max_model_len)")
    g.add_argument("--request-body-timeout", type=float, default=ServerLimits.request_body_timeout,
                   help="seconds a client has to send its whole request body (408 beyond)")
    g.add_argument("--shutdown-timeout", type=float, default=DEFAULT_SHUTDOWN_TIMEOUT,
                   help="on SIGTERM, seconds the requests in flight may take to finish before they end with "
                        "an error and the server exits")
    g.add_argument("--uvicorn-log-level", default="info",
                   choices=["critical", "error", "warning", "info", "debug", "trace"])

    c = parser.add_argument_group("chat, tools, reasoning, structured outputs")
    c.add_argument("--chat-template", default=None, help="a chat template file, or the template itself")
    c.add_argument("--default-chat-template-kwargs", type=json.loads, default=None,
                   help="JSON of chat-template arguments for every request (a request's own win)")
    c.add_argument("--enable-auto-tool-choice", action="store_true",
                   help='let the model call tools on its own (tool_choice "auto"); needs --tool-call-parser')
    c.add_argument("--tool-call-parser", default=None,
                   help="how to find tool calls in the output: hermes, qwen3, llama3_json, mistral, pythonic")
    c.add_argument("--reasoning-parser", default=None,
                   help="split reasoning_content from content: deepseek_r1, qwen3")
    c.add_argument("--structured-outputs-config", type=json.loads, default=None,
                   help='JSON, e.g. \'{"backend": "xgrammar"}\' (the only backend built in)')
    c.add_argument("--guided-decoding-backend", default=None, help="vLLM's older name for the backend")

def add_unsupported_args(parser) -> None:
    """vLLM's flags that pageport does not have (those an engine option now covers are skipped)."""
    known = set(known_flags(parser))
    u = parser.add_argument_group("vLLM flags pageport does not support (refused)")
    for flag, aliases, value in UNSUPPORTED:
        if flag in known:
            continue
        names = [flag, *(a for a in aliases if a not in known)]
        dest = "unsupported_" + flag[2:].replace("-", "_")
        if value is False:
            u.add_argument(*names, dest=dest, action="store_true", help=argparse.SUPPRESS)
        else:
            u.add_argument(*names, dest=dest, nargs="+" if value == "+" else None, default=None,
                           help=argparse.SUPPRESS)


def _engine_aliases(parser) -> None:
    """vLLM's short engine flags, onto EngineConfig's options."""
    g = parser.add_argument_group("engine (vLLM's short names)")
    g.add_argument("-tp", dest="tensor_parallel_size", type=int, default=argparse.SUPPRESS,
                   help="--tensor-parallel-size")
    g.add_argument("-pp", dest="pipeline_parallel_size", type=int, default=argparse.SUPPRESS,
                   help="--pipeline-parallel-size")
    g.add_argument("-dp", dest="data_parallel_size", type=int, default=argparse.SUPPRESS,
                   help="--data-parallel-size")
    choices = next(f.metadata.get("choices") for f in dataclasses.fields(EngineConfig) if f.name == "quantization")
    g.add_argument("-q", dest="quantization", default=argparse.SUPPRESS, choices=choices, help="--quantization")


def register(subparsers) -> None:
    p = subparsers.add_parser("serve", help="OpenAI-compatible HTTP server (/v1/completions, /v1/chat/completions…)",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.__class__ = ServeArgumentParser  # argparse takes a subparser's class only for all of them at once
    add_server_args(p)
    engine = p.add_argument_group("engine")
    EngineConfig.add_cli_args(engine, model_positional=True)
    add_source_args(engine)
    _engine_aliases(p)
    add_unsupported_args(p)
    p.set_defaults(func=cmd_serve)


def check_serve_args(args) -> None:
    """Refusals and the model's source, before anything loads: ValueError / FileNotFoundError, one line each."""
    for flag, _, _ in UNSUPPORTED:
        value = getattr(args, "unsupported_" + flag[2:].replace("-", "_"), None)  # absent: an engine option now
        if value not in (None, False) and value != _UNSUPPORTED_VALUES.get(flag):
            raise ValueError(f"{flag} is not supported by pageport yet")
    if args.model_flag is not None:
        if args.model not in (None, args.model_flag):
            raise ValueError(f"two models given: {args.model} and --model {args.model_flag}")
        args.model = args.model_flag
    check_tokenizer_mode(args.tokenizer_mode)
    args.model = resolve_hub_model(args.model, args.download_dir, args.revision)
    backend = structured_outputs_backend(args)
    from pageport.core.structured_output.backends import BACKENDS
    if backend not in BACKENDS and backend != "auto":
        raise ValueError(f"structured output backend {backend!r} is not built into pageport; choose one of: "
                         f"{', '.join(BACKENDS)}{closest(backend, BACKENDS)}")
    if args.enable_auto_tool_choice and not args.tool_call_parser:
        raise ValueError("--enable-auto-tool-choice needs --tool-call-parser NAME")
    if args.tool_call_parser:
        from pageport.entrypoints.openai.tool_parsers import get_tool_parser
        get_tool_parser(args.tool_call_parser)
    if args.reasoning_parser:
        from pageport.entrypoints.openai.reasoning_parsers import get_reasoning_parser
        get_reasoning_parser(args.reasoning_parser)
    if args.lora_modules:
        from pageport.entrypoints.openai.lora import parse_lora_modules
        parse_lora_modules(args.lora_modules)
        if not args.enable_lora:
            raise ValueError("--lora-modules needs --enable-lora")
    if (args.ssl_keyfile is None) != (args.ssl_certfile is None):
        raise ValueError("--ssl-keyfile and --ssl-certfile go together")


def structured_outputs_backend(args) -> str:
    config = args.structured_outputs_config or {}
    if not isinstance(config, dict):
        raise ValueError("--structured-outputs-config must be a JSON object")
    backend = config.get("backend") or args.guided_decoding_backend or "xgrammar"
    return "xgrammar" if backend == "auto" else backend


def load_chat_template(value):
    """--chat-template: a file's text, or the template itself when it looks like one."""
    if value is None:
        return None
    path = Path(value).expanduser()
    if path.is_file():
        return path.read_text()
    if any(tag in value for tag in ("{{", "{%")):
        return value
    raise FileNotFoundError(f"--chat-template {value}: no such file (and not a template: it has no {{{{ or {{%)")


def api_keys(args) -> list[str]:
    keys = list(args.api_key or [])
    for env in (API_KEY_ENV, VLLM_API_KEY_ENV):
        if os.environ.get(env) and not keys:
            keys.append(os.environ[env])
    return keys


def cmd_serve(args) -> int:
    check_serve_args(args)
    try:
        from pageport.entrypoints.openai.api_server import run_server
    except ImportError as e:  # pragma: no cover
        raise SystemExit(f"pageport serve needs the serve extra: pip install 'pageport[serve]' ({e})")
    return run_server(args)


__all__ = ["register", "add_server_args", "check_serve_args", "known_flags"]
