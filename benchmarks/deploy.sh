#!/bin/bash
# The deploy measurement of issue 24 in one command (run it on a quiet machine: nothing else running):
#
#     bash benchmarks/deploy.sh [SUFFIX]          # SUFFIX names the result files (default: quiet)
#
# 1. dense vs low rank 50 % / 25 % / Monarch (BERT-base-shaped encoder, random weights, 2 threads, batch 8 x 128)
#    in ONNX Runtime with attention fused (fp32, int8 dynamic, int8 static) and eager PyTorch (fp32, bf16), each
#    with the dense fp32 model in the same rounds, per-op profiles and every row's Amdahl bound;
# 2. rank_multiple 1 / 8 / 16 / 32 / 64 for low rank 50 % and Monarch 37.5 % (eager and ONNX Runtime fp32);
# 3. docs/deploy.md regenerated from the files.
# Rows record the load average and `loaded` (load above the measurement's own threads + 1).
set -euo pipefail
cd "$(dirname "$0")/.."
SUFFIX=${1:-quiet}
PY=${PYTHON:-python}
R=benchmarks/results
CACHE=${EXPORT_CACHE:-$(mktemp -d)}
COMMON=(--model bert-base --part encoder --threads 2 --batch-sizes 8 --seq-lens 128 --init random --repeats 7
        --warmup 2 --export-cache "$CACHE")
$PY benchmarks/latency.py "${COMMON[@]}" --variants lowrank@0.5 lowrank@0.25 monarch@none \
    --runtime onnxruntime eager --fusions attention --precision fp32 int8 int8-static bf16 \
    --json $R/cpu_deploy_2threads_encoder_8x128_$SUFFIX.json --profile $R/cpu_deploy_2threads_encoder_8x128_${SUFFIX}_profile.txt
$PY benchmarks/latency.py "${COMMON[@]}" --variants lowrank@0.5 monarch@0.375 --rank-multiple 1 8 16 32 64 \
    --runtime eager onnxruntime --fusions attention --json $R/cpu_rank_multiple_2threads_encoder_8x128_$SUFFIX.json
$PY benchmarks/deploy_report.py
