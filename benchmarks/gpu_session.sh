#!/usr/bin/env bash
# One device-tool call that measures what needs a GPU (issue 5's table, issue 15's memory at length), in stages with
# their own time limits so a failure early costs little device time. Run from the repo root on the GPU machine:
#     bash benchmarks/gpu_session.sh            # writes logs and results under $OUT (or ./gpu_out)
# Packages the GPU image lacks travel as wheels in .whl/ (compressed-tensors and its pydantic/loguru needs); the
# image's own torch and transformers are used (their versions are printed and recorded in the results).
set -u -o pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site || exit 9
fi
start=$(date +%s)
left() { echo $(( ${BUDGET:-560} - ($(date +%s) - start) )); }
{
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv
  python3 -c "import torch, transformers, compressed_tensors as ct; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'transformers', transformers.__version__, 'compressed-tensors', ct.__version__, torch.cuda.get_device_name(), torch.cuda.get_device_capability())"
} 2>&1 | tee "$OUT/env.log"

# 1. the whole flow on tiny shapes on the GPU: every CUDA kernel path once (seconds); SKIP_TINY=1 skips it
passed=${VARIANTS:-bf16,fp8-dynamic,w4a16}
if [ -z "${SKIP_TINY:-}" ]; then
  timeout 150 python3 benchmarks/gpu_bench.py --tiny --device cuda --models qwen3-4b --variants "$passed" \
    --work-dir /tmp/gb-tiny --out-dir /tmp/gb-tiny-out 2>&1 | tee "$OUT/tiny.log" || { echo "tiny smoke failed"; exit 1; }
  passed=$(python3 -c "import json; print(','.join(r['variant'] for r in json.load(open('/tmp/gb-tiny-out/gpu_bench_smoke.json'))['rows'] if not r.get('error')))")
  echo "variants that ran on tiny shapes: $passed"
  case ",$passed," in *,bf16,*) ;; *) echo "bf16 failed on tiny shapes: stopping"; exit 1;; esac
fi

# 2. issue 5: bf16 vs FP8 dynamic / static vs W4A16 on shape-true Qwen3-4B (random weights), batch 1, context 1024
timeout $(( $(left) - ${LC_SECONDS:-100} )) python3 benchmarks/gpu_bench.py --quick --models ${MODELS:-qwen3-4b} --variants $passed --keep \
  --work-dir /tmp/gb --out-dir "$OUT" 2>&1 | tee "$OUT/bench.log"

# 3. issue 15: memory at length on this GPU (FP8 dynamic 4B; bf16 vs FP8 cache), eager decode, a few steps
for kv in bf16 fp8; do
  t=$(( $(left) / 2 )); [ "$t" -gt 20 ] || break
  timeout $t python3 -m qwenquant bench /tmp/gb/qwen3-4b/fp8-dynamic --batch-sizes 1 --context 4096,16384,32768 \
    --decode-tokens 8 --kv-cache $kv --no-compile --device cuda --out /tmp/lc-$kv --quiet 2>&1 | tee -a "$OUT/lc.log"
  cp /tmp/lc-$kv/qwenquant_bench.json "$OUT/lc-$kv.json" 2>/dev/null
done
ls -la "$OUT"
