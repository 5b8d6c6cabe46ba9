"""`pageport serve [MODEL]`: the OpenAI-compatible server (FastAPI + uvicorn) over an AsyncLLMEngine.

Every engine flag comes from `EngineConfig.add_cli_args` (the one definition of engine options); the server
adds --host, --port, --api-key (or $PAGEPORT_API_KEY), --served-model-name, a few limits and --shutdown-timeout.
Needs the `serve` extra (fastapi, uvicorn, prometheus-client); the command and its --help work without it.
"""
from __future__ import annotations

from pageport.core.config import EngineConfig
from pageport.entrypoints.openai.limits import API_KEY_ENV, PROMPT_CHARS_PER_TOKEN, ServerLimits

DEFAULT_SHUTDOWN_TIMEOUT = 20.0


def add_server_args(parser) -> None:
    g = parser.add_argument_group("server")
    g.add_argument("--host", default="0.0.0.0", help="address to bind (default: all interfaces, as vLLM)")
    g.add_argument("--port", type=int, default=8000)
    g.add_argument("--api-key", default=None,
                   help=f"require 'Authorization: Bearer KEY' on every route but /health (also ${API_KEY_ENV})")
    g.add_argument("--served-model-name", nargs="+", default=None,
                   help="model name(s) the API answers to (default: the model argument)")
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


def register(subparsers) -> None:
    p = subparsers.add_parser("serve", help="OpenAI-compatible HTTP server (/v1/completions, /v1/chat/completions…)",
                              description=__doc__)
    add_server_args(p)
    EngineConfig.add_cli_args(p.add_argument_group("engine"), model_positional=True)
    p.set_defaults(func=cmd_serve)


def cmd_serve(args) -> int:
    try:
        from pageport.entrypoints.openai.api_server import run_server
    except ImportError as e:  # pragma: no cover
        raise SystemExit(f"pageport serve needs the serve extra: pip install 'pageport[serve]' ({e})")
    return run_server(args)
