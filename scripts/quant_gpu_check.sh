#!/usr/bin/env bash
# Quantized models on one CUDA GPU (H200): the quantized-GEMM tests (pytest -m gpu), the GEMM benchmark at
# Llama-3-8B shapes, then end to end on an 8B-shaped random checkpoint with the weights quantized in the run and
# bf16 in the same call: throughput 1000 x 1024/128 (bf16 vs fp8 W8A8) and batch-1 decode latency (bf16 vs
# W4A16). Usage: [PARTS="kernels e2e"] [SWEEP=1] bash scripts/quant_gpu_check.sh OUT_DIR.
# Writes OUT_DIR/quant_e2e.json (+ logs and raw JSON); SWEEP=1 also sweeps the W4A16 and attention launches.
set -uo pipefail
OUT=${1:?out dir}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
if ls .whl/*.whl >/dev/null 2>&1; then  # wheels the image lacks (pyzmq, msgspec, ...)
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site
fi
python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1 || python3 -m pip install --no-deps -e .
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
PARTS=${PARTS:-kernels e2e}
if [[ $PARTS == *kernels* ]]; then
  python3 -m pytest -q -m gpu tests/kernels_cuda/test_quant_gemm.py tests/kernels_cuda/test_cuda_fp8_kv_cache.py \
    -p no:cacheprovider 2>&1 | tail -5
  timeout 400 python3 benchmarks/quant_gpu.py ${SWEEP:+--sweep} --out "$OUT/quant_gemm.json" 2>&1 | grep -v "^w4a16 sweep\|^attention sweep" | tail -8
fi
[[ $PARTS == *e2e* ]] || exit 0
mkdir -p /tmp/llama8b && cp benchmarks/configs/llama-3.1-8b.json /tmp/llama8b/config.json  # random weights
run() {  # name, args...
  local name=$1; shift
  timeout 1500 pageport bench "$@" --output-json "$OUT/$name.json" > "$OUT/$name.log" 2>&1
  grep -v "it/s\]\|Processed\|Loading\|Capturing\|^\s*$" "$OUT/$name.log" | tail -3
}
TP="throughput --model /tmp/llama8b --dtype bfloat16 --input-len 1024 --output-len 128 --num-prompts 1000 --backend pageport --load-format dummy"
run tp_bf16 $TP
run tp_fp8 $TP --quantization fp8
LAT="latency --model /tmp/llama8b --dtype bfloat16 --batch-size 1 --input-len 128 --output-len 128 --num-iters 5 --num-iters-warmup 2 --load-format dummy"
run lat_bf16 $LAT
run lat_w4a16 $LAT --quantization w4a16
run lat_w4a16_kv_fp8 $LAT --quantization w4a16 --kv-cache-dtype fp8
grep -h "KV blocks" "$OUT"/lat_*.log | cut -c1-160  # the KV capacity each run reports (fp8 KV: twice the tokens)
python3 - "$OUT" <<'PY'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
def load(n):
    p = out / f"{n}.json"
    return json.loads(p.read_text()) if p.is_file() else None
tp_b, tp_f, lat_b, lat_w, lat_wk = (load(n) for n in ("tp_bf16", "tp_fp8", "lat_bf16", "lat_w4a16",
                                                      "lat_w4a16_kv_fp8"))
res = {"model": "Llama-3.1-8B shape, random weights, quantized in the run", "raw": {
    "tp_bf16": tp_b, "tp_fp8": tp_f, "lat_bf16": lat_b, "lat_w4a16": lat_w, "lat_w4a16_kv_fp8": lat_wk}}
def tok_s(r):
    return r and (r.get("tokens_per_second") or r.get("total_tokens_per_second") or r.get("output_tokens_per_second"))
if tok_s(tp_b) and tok_s(tp_f):
    res["fp8_throughput_ratio"] = tok_s(tp_f) / tok_s(tp_b)
    res["goal_fp8_ge_1.5x"] = res["fp8_throughput_ratio"] >= 1.5
if lat_b and lat_w:
    res["w4a16_decode_ratio"] = lat_b["avg_latency"] / lat_w["avg_latency"]
    res["goal_w4a16_ge_2x"] = res["w4a16_decode_ratio"] >= 2.0
if lat_b and lat_wk:
    res["w4a16_kv_fp8_decode_ratio"] = lat_b["avg_latency"] / lat_wk["avg_latency"]
(out / "quant_e2e.json").write_text(json.dumps(res, indent=1))
print({k: v for k, v in res.items() if k != "raw"})
PY
