#!/usr/bin/env bash
# The GPU check: everything that needs a CUDA device, in one run. Each stage has a time
# cap with room (the caps add up to 20 minutes; the expected time is not known: this
# script has not run on a GPU yet).
#
#   scripts/gpu_check.sh [OUT_DIR]        # default OUT_DIR: benchmarks/results/gpu_check
#
# Needs a CUDA build of torch and the project installed with its test extras
# (pip install -e '.[dev]'); run it from any folder. PYTHON=/path/to/python picks the
# interpreter (default: python on PATH). Stages:
#   1. pytest_cuda: pytest -m "cuda and not slow" over tests/: the quantizer against
#      fairseq's on the GPU; the KNN losses against the brute-force reference; the fused
#      softmax + KNN backward; no host sync in a training step
#      (torch.cuda.set_sync_debug_mode); half precision (tests/core/test_precision.py:
#      the VQ-VAE code search in fp16 and bf16 against the float64 argmin, half-precision
#      codebook gradients against the float64 sums, the core under fp16 / bf16 autocast
#      with masks, CE and L2 against the values without it); the tiny image model as an
#      fp16 and a bf16 model (VQ-VAE and KNN-CE); two processes with CUDA tensors (gloo
#      on one GPU, NCCL when there are two) for the global KNN and CodeUsage.all_reduce;
#   2. pytest_cuda_fairseq: pytest -m "cuda and slow": 20 updates of the tiny pretraining
#      through fairseq-hydra-train with common.fp16=true, against the same run in float32;
#   3. bench_topk_layout: the KNN search's top-k over rows in each layout
#      (benchmarks/bench_topk_layout.py --device cuda);
#   4. bench_quantizer: benchmarks/bench_quantizer.py --quick --device cuda (time and peak
#      memory against fairseq's GumbelVectorQuantizer);
#   5. bench_step_fp32 / bench_step_fp16: benchmarks/bench_step.py --device cuda: one
#      wav2vec 2.0 BASE training step, plugin (KNN-CE) against stock fairseq (diversity),
#      in float32 and as an fp16 model (common.fp16).
# Writes the logs, the JSON results and summary.txt (scripts/gpu_check_summary.py: one
# line per stage, the failed tests by name, the figures) into OUT_DIR and prints the
# summary; exits non-zero if any stage failed or ran out of time.
set -uo pipefail

cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
OUT=${1:-benchmarks/results/gpu_check}

if ! found=$("$PY" -c "import sys, torch; print('torch', torch.__version__, 'CUDA build', torch.version.cuda); sys.exit(0 if torch.cuda.is_available() else 1)" 2>&1); then
    echo "gpu_check.sh: $PY's torch sees no CUDA device ($found); nothing run" >&2
    exit 2
fi
mkdir -p "$OUT"
STAGES="$OUT/stages.tsv"
: > "$STAGES"

{
    echo "gpu_check.sh started $(date -u '+%Y-%m-%d %H:%M:%S UTC') in $(pwd) at commit $(git rev-parse --short HEAD 2>/dev/null || echo '?')"
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || true
    "$PY" -c "import torch, fairseq; print('torch', torch.__version__, 'CUDA', torch.version.cuda, 'fairseq', fairseq.__version__, 'GPUs', torch.cuda.device_count())"
} > "$OUT/header.txt"
cat "$OUT/header.txt"

stage() {  # stage NAME CAP_SECONDS COMMAND...
    local name=$1 cap=$2
    shift 2
    local start=$SECONDS
    echo "== $name (cap ${cap}s): $*"
    timeout "$cap" "$@" > "$OUT/$name.log" 2>&1
    local rc=$?
    tail -n 15 "$OUT/$name.log"
    printf '%s\t%s\t%s\t%s\n' "$name" "$cap" "$rc" "$((SECONDS - start))" >> "$STAGES"
    echo "   exit $rc, $((SECONDS - start)) s"
}

stage pytest_cuda 360 "$PY" -m pytest -m "cuda and not slow" -rs -q -p no:cacheprovider tests --junitxml "$OUT/pytest_cuda.xml"
stage pytest_cuda_fairseq 420 "$PY" -m pytest -m "cuda and slow" -rs -q -p no:cacheprovider tests --junitxml "$OUT/pytest_cuda_fairseq.xml"
stage bench_topk_layout 120 "$PY" benchmarks/bench_topk_layout.py --device cuda --out "$OUT/topk_layout_cuda.json"
stage bench_quantizer 150 "$PY" benchmarks/bench_quantizer.py --quick --device cuda --out "$OUT/quantizer_cuda_quick.json"
stage bench_step_fp32 90 "$PY" benchmarks/bench_step.py --device cuda --batch 8 --seconds 15 --repeats 5 --out "$OUT/step_cuda_fp32.json"
stage bench_step_fp16 90 "$PY" benchmarks/bench_step.py --device cuda --batch 8 --seconds 15 --repeats 5 --precision fp16 --out "$OUT/step_cuda_fp16.json"

echo
"$PY" scripts/gpu_check_summary.py "$OUT" --total-seconds "$SECONDS"
