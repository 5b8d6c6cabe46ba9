#!/usr/bin/env bash
# The engine-machine run on one CUDA GPU: offline throughput with the step profile (asynchronous scheduling on
# and off), Transformers `generate` b256 on the same weights, batch-1 latency, the 8B shape, and `pageport bench
# serve` at concurrency 256 against offline on the same checkpoint. Every figure lands in OUT/engine_*.json.
# Usage: bash scripts/gpu_engine.sh OUT_DIR [part...]   parts: tests small steps big serve structured lora spec
# (default: all but structured and lora). structured: 64 json_schema requests against 64 free twins on the serve
# checkpoint. lora: the LoRA GPU tests, then 8 rank-16 adapters over a batch of 256 against the base model alone.
# spec: the speculative-decoding GPU tests, then benchmarks/spec_decode_gpu.py --markov on the 8B shape: n-gram (k=4) on
# predictable prompts at batch 1-256 and on random ones, the 8B as its own draft, a random 1B draft.
# Wheels the image lacks (fastapi, uvicorn, pyzmq, msgspec, ...) go in .whl/; a tokenizer folder in .gpu/tok
# (the default model's, saved with save_pretrained) makes the serve checkpoint.
set -uo pipefail
OUT=${1:?out dir}; shift
PARTS=${*:-tests small steps big serve}
mkdir -p "$OUT" /tmp/pp
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site
fi
python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1 || python3 -m pip install --no-deps -e .
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
[ -f /tmp/pp/ceilings.json ] || python3 scripts/gpu_ceilings.py /tmp/pp/ceilings.json

bench() {  # name, args...: one pageport bench run, its JSON in /tmp/pp
  local name=$1; shift
  timeout 600 pageport bench "$@" --output-json /tmp/pp/engine_$name.json > /tmp/pp/$name.log 2>&1
  grep -v "it/s\]\|Processed\|Loading\|Capturing\|^\s*$" /tmp/pp/$name.log | tail -${BENCH_TAIL:-3}
}
ckpt() {  # config name, out dir [vocab]: a random bf16 checkpoint, once
  [ -f "$2/config.json" ] && return
  if [ -n "${3:-}" ]; then
    python3 -c "import json,sys; c=json.load(open(sys.argv[1])); c['vocab_size']=int(sys.argv[2]); json.dump(c, open('/tmp/pp/cfg.json','w'))" \
      benchmarks/configs/$1.json "$3"
    python3 scripts/make_checkpoint.py /tmp/pp/cfg.json "$2"
  else
    python3 scripts/make_checkpoint.py benchmarks/configs/$1.json "$2"
  fi
}
TP="--dtype bfloat16 --input-len 1024 --output-len 128"
for part in $PARTS; do case $part in
tests)
  timeout 400 python3 -m pytest -q -m gpu tests/e2e/test_gpu.py -p no:cacheprovider 2>&1 | tail -8 ;;
small|small-async)
  ckpt llama-3.2-1b /tmp/llama1b
  bench tp_1b_async throughput --model /tmp/llama1b $TP --num-prompts 1000 --profile-step --async-scheduling
  if [ $part = small ]; then
    bench tp_1b_sync throughput --model /tmp/llama1b $TP --num-prompts 1000 --profile-step --no-async-scheduling
    bench tp_1b_hf_b256 throughput --model /tmp/llama1b $TP --backend hf --hf-batch-size 256 --num-prompts 256
  fi
  bench lat_1b_bs1 latency --model /tmp/llama1b --dtype bfloat16 --batch-size 1 --input-len 128 --output-len 128 \
    --num-iters 5 --num-iters-warmup 2 ;;
steps)  # decode-only steps of 256 rows and of 1 row, with the step profile
  ckpt llama-3.2-1b /tmp/llama1b
  bench decode_1b_b256 throughput --model /tmp/llama1b --dtype bfloat16 --input-len 128 --output-len 512 \
    --num-prompts 256 --profile-step
  if [ -n "${CORE_PROFILE:-}" ]; then  # the same run again under cProfile (slower): where the core's time goes
    PAGEPORT_CORE_PROFILE=/tmp/pp/core_b256.prof pageport bench throughput --model /tmp/llama1b --dtype bfloat16 \
      --input-len 128 --output-len 512 --num-prompts 256 > /tmp/pp/core_profile.log 2>&1
    python3 -c "import pstats; pstats.Stats('/tmp/pp/core_b256.prof').sort_stats('tottime').print_stats(25)" \
      2>/dev/null | tail -32 | cut -c1-150
  fi
  bench decode_1b_b1 throughput --model /tmp/llama1b --dtype bfloat16 --input-len 128 --output-len 256 \
    --num-prompts 1 --profile-step ;;
big)
  mkdir -p /tmp/llama8b_cfg && cp benchmarks/configs/llama-3.1-8b.json /tmp/llama8b_cfg/config.json  # random weights
  bench tp_8b throughput --model /tmp/llama8b_cfg --load-format dummy $TP --num-prompts 1000 --profile-step
  bench lat_8b_bs1 latency --model /tmp/llama8b_cfg --load-format dummy --dtype bfloat16 --batch-size 1 \
    --input-len 128 --output-len 128 --num-iters 5 --num-iters-warmup 2 ;;
serve)
  ckpt llama-3.2-1b /tmp/llama1b_tok 49152
  cp .gpu/tok/* /tmp/llama1b_tok/ 2>/dev/null
  bench serve_offline throughput --model /tmp/llama1b_tok $TP --num-prompts 1000
  pageport serve /tmp/llama1b_tok --dtype bfloat16 --port 8011 > /tmp/pp/server.log 2>&1 &
  SERVER=$!
  for _ in $(seq 180); do curl -sf localhost:8011/health >/dev/null && break; sleep 1; done
  cpu() { awk '{print $14 + $15}' /proc/$SERVER/stat; }  # the API server's CPU ticks (the core is a child)
  before=$(cpu)
  bench serve_c256 serve --port 8011 --num-prompts 1000 --random-input-len 1024 --random-output-len 128 \
    --max-concurrency 256 --percentiles 50 90 99
  echo "API server process: $(( ($(cpu) - before) * 10000 / 128000 )) us of CPU per output token"
  kill $SERVER; wait $SERVER 2>/dev/null
  tail -3 /tmp/pp/server.log ;;
structured)
  ckpt llama-3.2-1b /tmp/llama1b_tok 49152
  cp .gpu/tok/* /tmp/llama1b_tok/ 2>/dev/null
  timeout 500 python3 benchmarks/structured_vs_free.py --device cuda --model /tmp/llama1b_tok --dtype bfloat16 \
    --out /tmp/pp/structured.json > /tmp/pp/structured.log 2>&1
  grep -v "it/s\]" /tmp/pp/structured.log | tail -16 ;;
lora)  # peft (and accelerate) wheels in .whl/ for the PEFT comparison
  timeout 300 python3 -m pytest -q -m gpu tests/kernels_cuda/test_lora_kernel.py tests/e2e/test_gpu.py -k lora \
    -p no:cacheprovider 2>&1 | tail -5
  ckpt llama-3.2-1b /tmp/llama1b
  timeout 500 python3 benchmarks/lora_throughput.py --device cuda --model /tmp/llama1b --dtype bfloat16 \
    --adapters 8 --rank 16 --batch 256 --input-len 256 --output-len 128 --out /tmp/pp/lora.json > /tmp/pp/lora.log 2>&1
  grep -v "it/s\]\|Processed" /tmp/pp/lora.log | tail -14 ;;
spec)
  timeout 300 python3 -m pytest -q -m gpu tests/e2e/test_gpu.py -k speculative -p no:cacheprovider 2>&1 | tail -5
  mkdir -p /tmp/llama8b_cfg /tmp/llama1b_cfg  # random weights; the same vocabulary
  cp benchmarks/configs/llama-3.1-8b.json /tmp/llama8b_cfg/config.json
  cp benchmarks/configs/llama-3.2-1b.json /tmp/llama1b_cfg/config.json
  timeout 560 python3 benchmarks/spec_decode_gpu.py --model /tmp/llama8b_cfg --draft /tmp/llama1b_cfg --self-draft \
    ${SPEC_ARGS:---markov} --out /tmp/pp/spec.json > /tmp/pp/spec.log 2>&1
  grep -v "it/s\]\|Processed\|Loading\|Capturing" /tmp/pp/spec.log | grep "^{\|Error\|error" | cut -c1-400 | tail -14 ;;
esac; done
python3 - "$OUT" <<'PY'
import glob, json, os, sys
res = {os.path.basename(f)[:-5]: json.load(open(f)) for f in sorted(glob.glob("/tmp/pp/*.json")) if "cfg" not in f}
json.dump(res, open(os.path.join(sys.argv[1], "engine_results.json"), "w"), indent=2)
for k, v in res.items():
    keep = {x: v[x] for x in ("output_tokens_per_second", "avg_latency", "output_throughput", "median_ttft_ms",
                              "median_tpot_ms", "p99_ttft_ms", "step_profile", "spec_decode") if x in v}
    print(k, json.dumps(keep))
PY
tar czf "$OUT/engine_logs.tgz" -C /tmp/pp $(cd /tmp/pp && ls *.log 2>/dev/null)
