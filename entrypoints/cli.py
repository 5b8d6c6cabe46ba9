"""The `pageport` command: generate, chat, platforms (and serve/bench where installed)."""
from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Optional

import pageport
from pageport.core.config import EngineConfig


def _sampling_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("sampling")
    g.add_argument("--max-tokens", type=int, default=128)
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--min-p", type=float, default=0.0)
    g.add_argument("--repetition-penalty", type=float, default=1.0)
    g.add_argument("--sampling-seed", type=int, default=None, help="per-request seed")
    g.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")


def _sampling_params(args, **extra):
    from pageport.core.sampling_params import SamplingParams
    return SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                          top_k=args.top_k, min_p=args.min_p, repetition_penalty=args.repetition_penalty,
                          seed=args.sampling_seed, stop=args.stop, **extra)


def _engine_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("engine")
    EngineConfig.add_cli_args(g, model_positional=False)


def cmd_platforms(args) -> int:
    from pageport.core.executor import format_world
    from pageport.platforms import platforms_table, resolve_platform
    print(platforms_table())
    config = EngineConfig(device=args.device, tensor_parallel_size=args.tensor_parallel_size,
                          pipeline_parallel_size=args.pipeline_parallel_size,
                          data_parallel_size=args.data_parallel_size,
                          distributed_executor_backend=args.distributed_executor_backend)
    print()
    print(format_world(config, resolve_platform(config.device)))
    return 0


def _make_llm(args):
    config = EngineConfig.from_cli_args(args)
    # the core's imports and model load overlap ours (torch, the engine, the tokenizer): ~1 s on 2 cores
    from pageport.core import core_process
    core_process.start_early(config)
    try:
        from pageport.core.llm import LLM
        return LLM(**{k: v for k, v in vars(config).items()})
    finally:
        core_process.discard()  # not taken (a different configuration, or a failure): stop it


def cmd_generate(args) -> int:
    llm = _make_llm(args)
    params = _sampling_params(args)
    if args.chat:
        outs = llm.chat([[{"role": "user", "content": p}] for p in args.prompt], params)
    else:
        outs = llm.generate(args.prompt, params)
    for out in outs:
        if len(outs) > 1:
            print(f"--- {out.prompt!r}")
        print(out.outputs[0].text)
    llm.engine.shutdown()  # the core process ends here, not in the interpreter's teardown
    return 0


def cmd_chat(args) -> int:
    llm = _make_llm(args)
    engine = llm.engine
    params = _sampling_params(args, output_kind="delta")
    history = [{"role": "system", "content": args.system}] if args.system else []
    print("pageport chat — empty line or Ctrl-D to quit", file=sys.stderr)
    while True:
        try:
            line = input("> ")
        except EOFError:
            break
        if not line.strip():
            break
        history.append({"role": "user", "content": line})
        rid = engine.add_request(None, llm.render_chat(history), params)
        reply = []
        while engine.has_unfinished_requests():
            for out in engine.step():
                if out.engine_request_id == rid:
                    reply.append(out.outputs[0].text)
                    print(out.outputs[0].text, end="", flush=True)
        print()
        history.append({"role": "assistant", "content": "".join(reply)})
    return 0


_BUILTIN_COMMANDS = ("platforms", "generate", "chat")


def build_parser(extras: bool = True) -> argparse.ArgumentParser:
    """`extras`: add serve and bench (their modules import the engine, ~1 s; not needed to run the others)."""
    parser = argparse.ArgumentParser(prog="pageport", description=pageport.__doc__)
    parser.add_argument("--version", action="version", version=f"pageport {pageport.__version__}")
    parser.add_argument("--log-level", default="INFO", help="pageport's own log level (others log warnings)")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("platforms", help="list every registered platform, available or not, and why; then where "
                                         "each rank of the given world would run")
    p.add_argument("--device", default="auto")
    p.add_argument("-tp", "--tensor-parallel-size", type=int, default=1)
    p.add_argument("-pp", "--pipeline-parallel-size", type=int, default=1)
    p.add_argument("-dp", "--data-parallel-size", type=int, default=1)
    p.add_argument("--distributed-executor-backend", choices=("uni", "mp", "ray"), default=None)
    p.set_defaults(func=cmd_platforms)

    p = sub.add_parser("generate", help="complete prompts (batched) and print the outputs")
    p.add_argument("prompt", nargs="+")
    p.add_argument("--chat", action="store_true", help="treat each prompt as a user message (chat template)")
    _sampling_args(p)
    _engine_args(p)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("chat", help="interactive chat, streaming tokens")
    p.add_argument("--system", default=None, help="system prompt")
    _sampling_args(p)
    _engine_args(p)
    p.set_defaults(func=cmd_chat)

    for extra in ("serve", "bench") if extras else ():
        try:
            module = __import__(f"pageport.entrypoints.{extra}", fromlist=["register"])
        except ImportError:
            continue
        module.register(sub)
    return parser


def main(argv: Optional[list[str]] = None) -> int:
    command_line = argv is None
    argv = sys.argv[1:] if argv is None else argv
    command = next((a for a in argv if not a.startswith("-")), None)
    args = build_parser(extras=command not in _BUILTIN_COMMANDS or "-h" in argv or "--help" in argv).parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("pageport").setLevel(args.log_level.upper())
    try:
        rc = args.func(args)
        if command_line and args.func is cmd_generate:
            # all done and the engine shut down: skip the interpreter's teardown of torch and transformers (~0.5 s)
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(rc)
        return rc
    except (FileNotFoundError, ValueError) as e:  # bad input: one clear line, no traceback
        print(f"pageport: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
