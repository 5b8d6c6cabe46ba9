"""64 concurrent json_schema-constrained requests against 64 free ones of the same lengths, offline on the default
model: the constrained run goes first; each free request then gets exactly as many output tokens as its constrained
twin produced (max_tokens = that length, EOS ignored), so both runs do the same prefill and decode work and differ
only by the grammar (compile, mask fill, mask apply, synchronous steps). Runs alternate (C, F, C, F, ...) over
`--repeats`; the ratio is the median of the per-repeat ratios. Also the schema's cold compile time.

    OMP_NUM_THREADS=1 python benchmarks/structured_vs_free.py --threads 1        # the default model, on this CPU
    python benchmarks/structured_vs_free.py --device cuda --model DIR --out benchmarks/results/h200_structured.json

Writes benchmarks/results/cpu_structured_vs_free.json unless --out says otherwise. With a random-weight --model the
grammar still makes every constrained output valid JSON; the free twins copy their lengths as always.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

from structured_outputs import PERSON, TOPICS  # the schema and prompts of the other structured benchmark (beside it)


def compile_ms(tokenizer, vocab_size: int) -> float:
    from pageport.core.sampling_params import StructuredOutputsParams
    from pageport.core.structured_output import StructuredOutputManager

    m = StructuredOutputManager(tokenizer, vocab_size)
    t0 = time.perf_counter()
    m.add_request("cold", StructuredOutputsParams(json=PERSON))
    m.wait("cold")
    dt = (time.perf_counter() - t0) * 1e3
    m.shutdown()
    return dt


def run(llm, convs, params) -> tuple[float, list]:
    t0 = time.perf_counter()
    outs = llm.chat(convs, params, use_tqdm=False)
    return time.perf_counter() - t0, outs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--max-tokens", type=int, default=96, help="the constrained requests' limit")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--model", default=None, help="a model folder (default: the default model)")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "cpu_structured_vs_free.json"))
    args = ap.parse_args()

    import jsonschema

    from pageport import LLM, SamplingParams, StructuredOutputsParams

    kwargs = {"num_threads": args.threads} if args.device == "cpu" else {}
    llm = LLM(model=args.model, device=args.device, dtype=args.dtype, max_num_seqs=args.requests, max_model_len=1024,
              **kwargs)
    convs = [[{"role": "user", "content": f"Describe {TOPICS[i % len(TOPICS)]} as JSON (name, age, city, hobbies)."}]
             for i in range(args.requests)]
    so = SamplingParams(temperature=0, max_tokens=args.max_tokens, structured_outputs=StructuredOutputsParams(json=PERSON))
    cold_ms = compile_ms(llm.get_tokenizer(), llm.engine.vocab_size)
    run(llm, convs[:8], so.clone(max_tokens=16))  # warm-up: kernels, the grammar cache

    trials = []
    free_params = None
    for rep in range(args.repeats):
        c_s, c_outs = run(llm, convs, so)
        lengths = [len(o.outputs[0].token_ids) for o in c_outs]
        valid = 0
        for o in c_outs:
            try:
                jsonschema.validate(json.loads(o.outputs[0].text), PERSON)
                valid += 1
            except (ValueError, jsonschema.ValidationError):
                pass
        if free_params is None:  # greedy: the same lengths every repeat
            free_params = [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for n in lengths]
        f_s, f_outs = run(llm, convs, free_params)
        f_tokens = sum(len(o.outputs[0].token_ids) for o in f_outs)
        c_tokens = sum(lengths)
        trials.append({"repeat": rep, "load_avg_1m": os.getloadavg()[0],
                       "json_schema": {"seconds": c_s, "output_tokens": c_tokens, "output_tok_s": c_tokens / c_s,
                                       "valid_json": valid},
                       "free": {"seconds": f_s, "output_tokens": f_tokens, "output_tok_s": f_tokens / f_s},
                       "ratio": (c_tokens / c_s) / (f_tokens / f_s)})
        print(json.dumps(trials[-1]), flush=True)

    machine = llm.engine.platform_name
    if args.device != "cpu":
        import torch
        machine = torch.cuda.get_device_name() if torch.cuda.is_available() else machine
    result = {"host": platform.node(), "machine": machine, "cpu_count": os.cpu_count(), "threads": args.threads,
              "model": args.model or "SmolLM2-135M-Instruct (default)", "dtype": str(llm.config.dtype), "requests": args.requests,
              "schema": PERSON, "compile_cold_ms": cold_ms,
              "ratio_median": statistics.median(t["ratio"] for t in trials),
              "json_schema_tok_s_median": statistics.median(t["json_schema"]["output_tok_s"] for t in trials),
              "free_tok_s_median": statistics.median(t["free"]["output_tok_s"] for t in trials),
              "note": ("shared 2-core VM: other jobs ran during the measurement (load averages per trial)"
                       if args.device == "cpu" else "one process on the machine"),
              "trials": trials}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(json.dumps({k: v for k, v in result.items() if k not in ("trials", "schema")}, indent=2))


if __name__ == "__main__":
    main()
