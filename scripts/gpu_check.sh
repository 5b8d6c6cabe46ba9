#!/usr/bin/env bash
# The GPU run: kernel and end-to-end checks (pytest -m gpu), then the benchmarks, on one CUDA GPU.
# Usage: bash scripts/gpu_check.sh OUT_DIR [quick]. Writes one JSON with every figure plus a log.
set -uo pipefail
OUT=${1:?out dir}
MODE=${2:-full}
mkdir -p "$OUT" /tmp/pp
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1 || python3 -m pip install --no-deps -e .
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 scripts/gpu_ceilings.py /tmp/pp/ceilings.json
python3 -m pytest -q -m gpu tests/kernels_cuda tests/e2e/test_gpu.py -p no:cacheprovider 2>&1 | tail -25

bench() {  # name, args...
  local name=$1; shift
  timeout 900 pageport bench "$@" --output-json /tmp/pp/$name.json > /tmp/pp/$name.log 2>&1
  grep -v "it/s\]\|Processed\|Loading\|Capturing\|^\s*$" /tmp/pp/$name.log | tail -${BENCH_TAIL:-3}
}
python3 scripts/make_checkpoint.py benchmarks/configs/llama-3.2-1b.json /tmp/llama1b
TP="throughput --model /tmp/llama1b --dtype bfloat16 --input-len 1024 --output-len 128"
bench tp_1b_pageport $TP --backend pageport --num-prompts 1000
bench lat_1b_bs1 latency --model /tmp/llama1b --dtype bfloat16 --batch-size 1 --input-len 128 --output-len 128 --num-iters 5 --num-iters-warmup 2
if [ "$MODE" = full ]; then
  bench tp_1b_hf_b64 $TP --backend hf --hf-batch-size 64 --num-prompts 128
  bench tp_1b_hf_b256 $TP --backend hf --hf-batch-size 256 --num-prompts 256
  bench tp_1b_hfcb $TP --backend hf-cb --num-prompts 256
  for shape in ${SHAPES-qwen2.5-0.5b llama-3.1-8b}; do
    python3 scripts/make_checkpoint.py benchmarks/configs/$shape.json /tmp/$shape
    bench tp_${shape}_pageport throughput --model /tmp/$shape --dtype bfloat16 --input-len 1024 --output-len 128 --backend pageport --num-prompts 1000
  done
fi
timeout ${KERNEL_BENCH_S:-300} python3 benchmarks/kernel_attention.py --out /tmp/pp/kernel_attention.json 2>&1 | tail -30
python3 - "$OUT" <<'PY'
import glob, json, os, sys
res = {os.path.basename(f)[:-5]: json.load(open(f)) for f in sorted(glob.glob("/tmp/pp/*.json"))}
json.dump(res, open(os.path.join(sys.argv[1], "gpu_results.json"), "w"), indent=2)
print("collected:", ", ".join(res))
PY
tar czf "$OUT/logs.tgz" -C /tmp/pp $(cd /tmp/pp && ls *.log 2>/dev/null)
