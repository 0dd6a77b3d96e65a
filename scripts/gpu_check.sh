#!/usr/bin/env bash
# The GPU check: everything that needs a CUDA device, in one run of about 5 minutes
# (each stage has a time cap; the caps add up to 8 minutes).
#
#   scripts/gpu_check.sh [OUT_DIR]        # default OUT_DIR: benchmarks/results/gpu_check
#
# Needs a CUDA build of torch and the project installed with its test extras
# (pip install -e '.[dev]'); run it from any folder. PYTHON=/path/to/python picks the
# interpreter (default: python on PATH). Stages:
#   1. pytest -m cuda: the quantizer against fairseq's on the GPU, the KNN losses against
#      the brute-force reference, the fused softmax + KNN backward, the quantizer's
#      training step without host syncs (torch.cuda.set_sync_debug_mode), and 20 updates
#      of the tiny pretraining through fairseq-hydra-train with common.fp16=true;
#   2. benchmarks/bench_quantizer.py --quick --device cuda (time and peak memory against
#      fairseq's GumbelVectorQuantizer);
#   3. benchmarks/bench_step.py --device cuda: one wav2vec 2.0 BASE training step, plugin
#      (KNN-CE) against stock fairseq (diversity), in float32 and as an fp16 model (common.fp16).
# Writes the logs, the JSON results and summary.txt (the figures, one line each) into
# OUT_DIR; exits non-zero if any stage failed or ran out of time.
set -uo pipefail

cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
OUT=${1:-benchmarks/results/gpu_check}
mkdir -p "$OUT"
SUMMARY="$OUT/summary.txt"

if ! "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "gpu_check.sh: $PY's torch sees no CUDA device ($("$PY" -c 'import torch; print("torch", torch.__version__, "CUDA build", torch.version.cuda)' 2>&1)); nothing run" >&2
    exit 2
fi

{
    echo "gpu_check.sh started $(date -u '+%Y-%m-%d %H:%M:%S UTC') in $(pwd) at commit $(git rev-parse --short HEAD 2>/dev/null || echo '?')"
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || true
    "$PY" -c "import torch, fairseq; print('torch', torch.__version__, 'CUDA', torch.version.cuda, 'fairseq', fairseq.__version__)"
} > "$SUMMARY"

status=0
stage() {  # stage NAME CAP_SECONDS COMMAND...
    local name=$1 cap=$2
    shift 2
    local start=$SECONDS
    echo "== $name (cap ${cap}s): $*" | tee -a "$SUMMARY"
    timeout "$cap" "$@" > "$OUT/$name.log" 2>&1
    local rc=$?
    tail -n 25 "$OUT/$name.log"
    if [ $rc -ne 0 ]; then
        status=1
        [ $rc -eq 124 ] && echo "   TIMED OUT after ${cap}s" | tee -a "$SUMMARY"
    fi
    echo "   exit $rc, $((SECONDS - start)) s" | tee -a "$SUMMARY"
}

stage pytest_cuda 150 "$PY" -m pytest -m cuda -rs -q -p no:cacheprovider tests --junitxml "$OUT/pytest_cuda.xml"
stage bench_quantizer 150 "$PY" benchmarks/bench_quantizer.py --quick --device cuda --out "$OUT/quantizer_cuda_quick.json"
stage bench_step_fp32 90 "$PY" benchmarks/bench_step.py --device cuda --batch 8 --seconds 15 --repeats 5 --out "$OUT/step_cuda_fp32.json"
stage bench_step_fp16 90 "$PY" benchmarks/bench_step.py --device cuda --batch 8 --seconds 15 --repeats 5 --precision fp16 --out "$OUT/step_cuda_fp16.json"

# The figures, one line each, from the JSON files the stages wrote.
"$PY" - "$OUT" >> "$SUMMARY" 2>&1 <<'EOF'
import json, os, sys
import xml.etree.ElementTree as ET

out = sys.argv[1]

def load(name):
    path = os.path.join(out, name)
    return json.load(open(path)) if os.path.exists(path) else None

junit = os.path.join(out, "pytest_cuda.xml")
if os.path.exists(junit):
    suite = ET.parse(junit).getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    print("pytest -m cuda: {tests} tests, {failures} failures, {errors} errors, {skipped} skipped, {time} s".format(**suite.attrib))
q = load("quantizer_cuda_quick.json")
if q:
    for label, methods in q["ratios"]["vs_fairseq"].items():
        for method, r in methods.items():
            mem = "-" if r["peak_memory"] is None else f"{r['peak_memory']:.3f}"
            wall = "-" if r["wall"] is None else f"{r['wall']:.3f}"
            print(f"quantizer {label}: {method} / fairseq: time {wall}, peak memory {mem}")
    for t in q["targets"]:
        print(f"quantizer target {t['target']}: {t['value']} {t['op']} {t['limit']}: {t['met']}")
for kind in ("fp32", "fp16"):
    s = load(f"step_cuda_{kind}.json")
    if s:
        r, t, m = s["ratios_plugin_over_stock"], s["timing"], s["memory"]
        mem = "-" if r["peak_memory"] is None else f"{r['peak_memory']:.3f}"
        print(f"BASE step {s['batch']} x {s['seconds']:g} s {kind}: stock {t['stock']['median_s'] * 1000:.1f} ms, "
              f"plugin {t['plugin']['median_s'] * 1000:.1f} ms (x{r['wall']:.3f}); peak memory stock "
              f"{m['stock']['peak_bytes'] / 2**20:.0f} MiB, plugin {m['plugin']['peak_bytes'] / 2**20:.0f} MiB (x{mem})")
EOF

echo "gpu_check.sh finished $(date -u '+%H:%M:%S UTC'), total $SECONDS s, status $status" | tee -a "$SUMMARY"
echo "figures: $SUMMARY"
exit $status
