"""Start-up on the CPU: `pageport generate --max-tokens 16 "Hello"` on the default model, timed as a whole process
(from the command to its exit), N times. The first run uses an empty cache folder (a cold cache entry: the GGUF
conversion is done and written), the later runs read that entry (warm). Reports the best and the median of the warm
runs, the cold run, the load average before and after, and the start-up phases the runs log at INFO.

    python benchmarks/cpu_startup.py --runs 6           # 1 cold + 5 warm, in a fresh cache folder
    python benchmarks/cpu_startup.py --label before     # a name for the result inside the file

Writes benchmarks/results/cpu_startup.json (the runs of each label kept side by side).
llama.cpp is not run here: its figure is the one measured earlier on this machine (see PEERS).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

COMMAND = ["pageport", "generate", "--max-tokens", "16", "Hello"]
# measured earlier on this machine, not by this script: llama.cpp on the same GGUF, 16 tokens, whole process
PEERS = {"llama.cpp (same GGUF, 16 tokens, whole process; measured earlier, not re-run here)": "0.4-0.65 s"}
_PHASE = re.compile(r"start-up[^:]*: (.*)$")


def loadavg() -> list[float]:
    try:
        return [float(x) for x in Path("/proc/loadavg").read_text().split()[:3]]
    except OSError:
        return []


def run_once(env: dict) -> dict:
    t0 = time.perf_counter()
    proc = subprocess.run(COMMAND, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(COMMAND)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    phases = [m.group(0) for line in proc.stderr.splitlines() if (m := _PHASE.search(line))]
    return {"wall_s": round(wall, 3), "text": proc.stdout.strip(), "phases": phases}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=6, help="runs in all: the first cold, the rest warm")
    ap.add_argument("--label", default="current")
    ap.add_argument("--cache-dir", default=None, help="use this cache folder as is (no cold run)")
    ap.add_argument("--output", default=str(Path(__file__).parent / "results" / "cpu_startup.json"))
    args = ap.parse_args()
    if shutil.which(COMMAND[0]) is None:
        raise SystemExit("the pageport command is not on PATH (pip install -e .)")

    tmp = None
    if args.cache_dir is None:
        tmp = tempfile.mkdtemp(prefix="pageport-startup-")
        cache = tmp
    else:
        cache = args.cache_dir
    env = {**os.environ, "PAGEPORT_CACHE_DIR": cache}
    load_before = loadavg()
    runs = []
    try:
        for i in range(args.runs):
            r = run_once(env)
            r["cache"] = "cold" if (i == 0 and tmp is not None) else "warm"
            r["loadavg_1m_after"] = loadavg()[:1]
            runs.append(r)
            print(f"run {i + 1}/{args.runs} ({r['cache']}): {r['wall_s']:.2f} s  load {r['loadavg_1m_after']}",
                  file=sys.stderr)
            for p in r["phases"]:
                print(f"    {p}", file=sys.stderr)
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    warm = [r["wall_s"] for r in runs if r["cache"] == "warm"]
    cold = [r["wall_s"] for r in runs if r["cache"] == "cold"]
    result = {
        "command": " ".join(COMMAND),
        "timed": "whole process, from the command to its exit (subprocess.run wall time)",
        "warm_best_s": min(warm) if warm else None,
        "warm_median_s": round(statistics.median(warm), 3) if warm else None,
        "cold_s": cold[0] if cold else None,
        "goal": "warm <= 3 s",
        "goal_met": bool(warm) and statistics.median(warm) <= 3.0,
        "loadavg_before": load_before,
        "loadavg_after": loadavg(),
        "cpus": os.cpu_count(),
        "machine": platform.processor() or platform.machine(),
        "env": {k: os.environ[k] for k in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "PAGEPORT_CPU_KVCACHE_SPACE")
                if k in os.environ},
        "peers": PEERS,
        "runs": runs,
        "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
    }
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    data = json.loads(out.read_text()) if out.is_file() else {}
    data[args.label] = result
    out.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n")
    print(json.dumps({k: result[k] for k in ("warm_best_s", "warm_median_s", "cold_s", "loadavg_before",
                                             "loadavg_after", "goal_met")}))


if __name__ == "__main__":
    main()
