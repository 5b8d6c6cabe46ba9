"""`pageport bench <subcommand>`: benchmarks with the metric names vLLM users know.

Subcommands live in `SUBCOMMANDS` (name -> `BenchSubcommand`); `register` turns each into
`pageport bench NAME`. To add one (e.g. `throughput`, `latency`), write its `add_cli_args(parser)` and
`run(args) -> int` (here or in a module of its own) and call `add_subcommand(...)` at import time; nothing
else changes. Shared helpers: `random_token_prompts` (the same prompts for a server run and an offline
run), `summarize` (mean/median/std/percentiles in ms) and `print_result_block`.

`pageport bench serve` is a load generator against a running OpenAI-compatible server (pageport's, vLLM's,
or any other): streaming /v1/completions requests with random token-id prompts of exact lengths
(ignore_eos, so every request generates exactly --random-output-len tokens) or prompts from a file,
Poisson arrivals at --request-rate (inf: all at once), at most --max-concurrency in flight.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime
from typing import Callable, Optional


@dataclass
class BenchSubcommand:
    name: str
    help: str
    add_cli_args: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


SUBCOMMANDS: dict[str, BenchSubcommand] = {}


def add_subcommand(name: str, help: str, add_cli_args, run) -> None:
    SUBCOMMANDS[name] = BenchSubcommand(name, help, add_cli_args, run)


def register(subparsers) -> None:
    p = subparsers.add_parser("bench", help="benchmarks: " + ", ".join(SUBCOMMANDS),
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="bench_command", required=True)
    for cmd in SUBCOMMANDS.values():
        sp = sub.add_parser(cmd.name, help=cmd.help)
        cmd.add_cli_args(sp)
        sp.set_defaults(func=cmd.run)
    from pageport.entrypoints import bench_offline  # throughput, latency: offline, with peers
    bench_offline.register(sub)
    from pageport.entrypoints import bench_memory  # kv-memory, prefix-caching
    bench_memory.register(sub)


# shared helpers ------------------------------------------------------------------------------------------
def random_token_prompts(num_prompts: int, input_len: int, seed: int = 0,
                         token_range: tuple[int, int] = (100, 10000)) -> list[list[int]]:
    """Deterministic random prompts of exactly `input_len` token ids (the same for a server and an offline run)."""
    rng = random.Random(seed)
    lo, hi = token_range
    return [[rng.randrange(lo, hi) for _ in range(input_len)] for _ in range(num_prompts)]


def load_prompt_file(path: str, num_prompts: int, seed: int = 0) -> list[dict]:
    """Prompts from a file: .txt (one per line), .jsonl (objects with "prompt" or "text", optional
    "max_tokens"/"output_len"), .json (a list of strings or such objects, or ShareGPT conversations)."""
    with open(path, encoding="utf-8") as f:
        if path.endswith(".jsonl"):
            rows = [json.loads(line) for line in f if line.strip()]
        elif path.endswith(".json"):
            rows = json.load(f)
        else:
            rows = [line.rstrip("\n") for line in f if line.strip()]
    out = []
    for row in rows:
        if isinstance(row, str):
            out.append({"prompt": row})
        elif isinstance(row, dict) and "conversations" in row:  # ShareGPT: the first human turn
            turns = row["conversations"]
            if turns:
                out.append({"prompt": turns[0].get("value", "")})
        elif isinstance(row, dict):
            prompt = row.get("prompt", row.get("text"))
            if prompt:
                out.append({"prompt": prompt, "max_tokens": row.get("max_tokens", row.get("output_len"))})
    if not out:
        raise ValueError(f"no prompts found in {path}")
    random.Random(seed).shuffle(out)
    while len(out) < num_prompts:
        out += out[:num_prompts - len(out)]
    return out[:num_prompts]


def percentile(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    s = sorted(values)
    k = (len(s) - 1) * q / 100
    f = int(k)
    c = min(f + 1, len(s) - 1)
    return s[f] + (s[c] - s[f]) * (k - f)


def summarize(values_s: list[float], percentiles=(99,)) -> dict:
    """mean / median / std / pXX of seconds, in ms."""
    import statistics
    ms = [v * 1000 for v in values_s]
    out = {"mean": statistics.fmean(ms) if ms else 0.0, "median": statistics.median(ms) if ms else 0.0,
           "std": statistics.pstdev(ms) if len(ms) > 1 else 0.0}
    for p in percentiles:
        out[f"p{p:g}"] = percentile(ms, p)
    return out


def print_result_block(title: str, rows: list, width: int = 50) -> None:
    """vLLM's result block: rows are (label, value) or a section title string."""
    print("{s:{c}^{n}}".format(s=f" {title} ", n=width, c="="))
    for row in rows:
        if isinstance(row, str):
            print("{s:{c}^{n}}".format(s=row, n=width, c="-"))
        else:
            label, value = row
            print("{:<40} {:<10}".format(label + ":", f"{value:.2f}" if isinstance(value, float) else value))
    print("=" * width)


# bench serve ---------------------------------------------------------------------------------------------
@dataclass
class RequestResult:
    success: bool = False
    prompt_len: int = 0
    output_len: int = 0
    ttft: float = 0.0  # s
    latency: float = 0.0  # s
    itl: list[float] = field(default_factory=list)  # s, gaps between streamed chunks
    error: str = ""


def _serve_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--base-url", default=None, help="server URL (default http://HOST:PORT)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--endpoint", default="/v1/completions")
    p.add_argument("--model", default=None, help="model name (default: the server's first in /v1/models)")
    p.add_argument("--api-key", default=None, help="bearer key (default: $PAGEPORT_API_KEY or $OPENAI_API_KEY)")
    p.add_argument("--dataset", default=None, help="prompt file (.txt/.jsonl/.json, ShareGPT ok); "
                                                   "default: random token-id prompts")
    p.add_argument("--num-prompts", type=int, default=1000)
    p.add_argument("--random-input-len", type=int, default=1024)
    p.add_argument("--random-output-len", type=int, default=128,
                   help="max_tokens of each request (random prompts always ignore EOS)")
    p.add_argument("--random-token-range", type=int, nargs=2, default=(100, 10000), metavar=("LOW", "HIGH"),
                   help="random prompt token ids are drawn from [LOW, HIGH)")
    p.add_argument("--ignore-eos", action="store_true", help="also ignore EOS for --dataset prompts")
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--request-rate", type=float, default=float("inf"),
                   help="requests/s, Poisson arrivals (default inf: all at once)")
    p.add_argument("--max-concurrency", type=int, default=None, help="most requests in flight")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--percentiles", type=float, nargs="+", default=[99])
    p.add_argument("--timeout", type=float, default=6 * 3600, help="per-request timeout (s)")
    p.add_argument("--output-json", default=None, help="write the results here")
    p.add_argument("--label", default=None, help="free text stored in the JSON")


async def _one_request(client, url: str, payload: dict, headers: dict) -> RequestResult:
    res = RequestResult()
    start = time.perf_counter()
    last = start
    usage = None
    chunks = 0
    try:
        async with client.stream("POST", url, json=payload, headers=headers) as r:
            if r.status_code != 200:
                res.error = f"HTTP {r.status_code}: {(await r.aread()).decode(errors='replace')[:300]}"
                return res
            async for line in r.aiter_lines():
                if not line.startswith("data: "):
                    continue
                data = line[6:]
                if data == "[DONE]":
                    res.success = True
                    break
                obj = json.loads(data)
                if "error" in obj:
                    res.error = obj["error"].get("message", str(obj))
                    break
                if obj.get("usage"):
                    usage = obj["usage"]
                choices = obj.get("choices") or []
                if not choices or not (choices[0].get("text") or choices[0].get("delta", {}).get("content")):
                    continue
                now = time.perf_counter()
                if chunks == 0:
                    res.ttft = now - start
                else:
                    res.itl.append(now - last)
                last = now
                chunks += 1
    except Exception as e:  # noqa: BLE001 - a failed request is counted, not fatal
        res.error = f"{type(e).__name__}: {e}"
        res.success = False
    res.latency = time.perf_counter() - start
    if usage:
        res.output_len = usage.get("completion_tokens", chunks)
        res.prompt_len = usage.get("prompt_tokens", 0)
    else:
        res.output_len = chunks
    if res.success and chunks == 0:
        res.success, res.error = False, "no tokens streamed"
    return res


async def _bench_serve(args, requests: list[dict], base: str, model: str, headers: dict):
    import httpx

    limit = args.max_concurrency or len(requests)
    sem = asyncio.Semaphore(limit)
    rng = random.Random(args.seed)
    url = base + args.endpoint
    async with httpx.AsyncClient(timeout=httpx.Timeout(args.timeout, connect=60),
                                 limits=httpx.Limits(max_connections=limit + 4,
                                                     max_keepalive_connections=limit + 4)) as client:
        async def run(req: dict) -> RequestResult:
            async with sem:
                return await _one_request(client, url, req, headers)

        tasks = []
        start = time.perf_counter()
        for i, req in enumerate(requests):
            tasks.append(asyncio.ensure_future(run(req)))
            if args.request_rate != float("inf") and i < len(requests) - 1:
                await asyncio.sleep(rng.expovariate(args.request_rate))
        results = await asyncio.gather(*tasks)
        duration = time.perf_counter() - start
    return results, duration


def _discover_model(base: str, headers: dict) -> str:
    import httpx
    r = httpx.get(base + "/v1/models", headers=headers, timeout=30)
    r.raise_for_status()
    return r.json()["data"][0]["id"]


def run_serve(args) -> int:
    base = (args.base_url or f"http://{args.host}:{args.port}").rstrip("/")
    key = args.api_key or os.environ.get("PAGEPORT_API_KEY") or os.environ.get("OPENAI_API_KEY")
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    model = args.model or _discover_model(base, headers)
    chat = "chat" in args.endpoint
    if args.dataset:
        rows = load_prompt_file(args.dataset, args.num_prompts, args.seed)
        prompts = [(r["prompt"], r.get("max_tokens") or args.random_output_len) for r in rows]
        ignore_eos = args.ignore_eos
    else:
        ids = random_token_prompts(args.num_prompts, args.random_input_len, args.seed,
                                   tuple(args.random_token_range))
        prompts = [(p, args.random_output_len) for p in ids]
        ignore_eos = True
        if chat:
            raise SystemExit("random token-id prompts need --endpoint /v1/completions (or pass --dataset)")
    requests = []
    for prompt, max_tokens in prompts:
        req = {"model": model, "max_tokens": int(max_tokens), "temperature": args.temperature, "stream": True,
               "stream_options": {"include_usage": True}, "ignore_eos": ignore_eos}
        if chat:
            req["messages"] = [{"role": "user", "content": prompt}]
        else:
            req["prompt"] = prompt
        requests.append(req)

    print(f"bench serve: {len(requests)} requests to {base}{args.endpoint} ({model}), request rate "
          f"{args.request_rate}, max concurrency {args.max_concurrency}", file=sys.stderr)
    results, duration = asyncio.run(_bench_serve(args, requests, base, model, headers))
    result = serve_metrics(results, duration, args.percentiles)
    ok = [r for r in results if r.success]
    pcts = args.percentiles
    rows = [("Successful requests", result["completed"]), ("Failed requests", result["failed"]),
            ("Maximum request concurrency", args.max_concurrency or "inf"),
            ("Benchmark duration (s)", duration),
            ("Total input tokens", result["total_input_tokens"]),
            ("Total generated tokens", result["total_output_tokens"]),
            ("Request throughput (req/s)", result["request_throughput"]),
            ("Output token throughput (tok/s)", result["output_throughput"]),
            ("Total Token throughput (tok/s)", result["total_token_throughput"])]
    for key, title, label in (("ttft", "Time to First Token", "TTFT"),
                              ("tpot", "Time per Output Token (excl. 1st token)", "TPOT"),
                              ("itl", "Inter-token Latency", "ITL")):
        rows.append(title)
        rows += [(f"Mean {label} (ms)", result[f"mean_{key}_ms"]), (f"Median {label} (ms)", result[f"median_{key}_ms"])]
        rows += [(f"P{p:g} {label} (ms)", result[f"p{p:g}_{key}_ms"]) for p in pcts]
    print_result_block("Serving Benchmark Result", rows)
    if result["failed"]:
        errors = sorted({r.error for r in results if not r.success})
        print("errors: " + "; ".join(errors[:5]), file=sys.stderr)
    if args.output_json:
        result.update({"date": datetime.now().strftime("%Y%m%d-%H%M%S"), "backend": "openai",
                       "base_url": base, "endpoint": args.endpoint, "model_id": model,
                       "num_prompts": len(requests), "request_rate": str(args.request_rate),
                       "max_concurrency": args.max_concurrency,
                       "random_input_len": None if args.dataset else args.random_input_len,
                       "random_output_len": args.random_output_len, "dataset": args.dataset,
                       "seed": args.seed, "label": args.label,
                       "input_lens": [r.prompt_len for r in results], "output_lens": [r.output_len for r in results],
                       "ttfts": [r.ttft for r in results], "errors": [r.error for r in results]})
        folder = os.path.dirname(args.output_json)
        if folder:
            os.makedirs(folder, exist_ok=True)
        with open(args.output_json, "w") as f:
            json.dump(result, f, indent=2)
    return 0 if ok else 1


def serve_metrics(results: list[RequestResult], duration: float, percentiles=(99,)) -> dict:
    ok = [r for r in results if r.success]
    total_in = sum(r.prompt_len for r in ok)
    total_out = sum(r.output_len for r in ok)
    tpots = [(r.latency - r.ttft) / (r.output_len - 1) for r in ok if r.output_len > 1]
    out = {"duration": duration, "completed": len(ok), "failed": len(results) - len(ok),
           "total_input_tokens": total_in, "total_output_tokens": total_out,
           "request_throughput": len(ok) / duration if duration else 0.0,
           "output_throughput": total_out / duration if duration else 0.0,
           "total_token_throughput": (total_in + total_out) / duration if duration else 0.0}
    for key, values in (("ttft", [r.ttft for r in ok]), ("tpot", tpots),
                        ("itl", [x for r in ok for x in r.itl]), ("e2el", [r.latency for r in ok])):
        for stat, v in summarize(values, percentiles).items():
            out[f"{stat}_{key}_ms"] = v
    return out


add_subcommand("serve", "load-test a running OpenAI-compatible server (TTFT, TPOT, ITL, throughput)",
               _serve_args, run_serve)
