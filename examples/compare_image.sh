#!/usr/bin/env bash
# Trains the five tiny image configs (tiny_ste, tiny_gumbel, tiny_gumbel_diversity,
# tiny_knn_l2, tiny_knn_ce) with stock fairseq-hydra-train on a generated folder of
# structured 40x40 images, evaluates each final checkpoint on the validation folder with
# knnvq-eval-image and prints a side-by-side table.
#
#   bash examples/compare_image.sh [OUT_DIR] [extra fairseq overrides...]
#   e.g. bash examples/compare_image.sh /tmp/compare optimization.max_update=300
#
# Runs on a CPU; about 2-3 minutes per method on 2 cores.
set -euo pipefail

OUT=${1:-compare_image_out}
shift || true
HERE=$(cd "$(dirname "$0")/.." && pwd)
# The project's venv when there is one; fairseq-hydra-train and knnvq-eval-image sit
# next to its python.
if [ -z "${PYTHON:-}" ] && [ -x "$HERE/.venv/bin/python" ]; then PYTHON="$HERE/.venv/bin/python"; fi
PY=${PYTHON:-python}
BIN=$(dirname "$($PY -c 'import sys; print(sys.executable)')")
USER_DIR=$($PY -m fairseq_knnvq)
# One BLAS thread per process: more oversubscribes small CPUs and slows training down.
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)

if [ ! -d "$OUT/data/train" ]; then
  $PY -c "
from fairseq_knnvq.preparation.synthetic_images import write_synthetic_image_folder
write_synthetic_image_folder('$OUT/data.tmp', {'train': 256, 'val': 64}, size=40, seed=0)
"
  mv "$OUT/data.tmp" "$OUT/data"
fi

METHODS="ste gumbel gumbel_diversity knn_l2 knn_ce"
for m in $METHODS; do
  run="$OUT/$m"
  if [ ! -f "$run/eval.json" ]; then
    rm -rf "$run"
    mkdir -p "$run"
    echo "== training tiny_$m (log: $run/train.log)"
    "$BIN/fairseq-hydra-train" task.data="$OUT/data" common.user_dir="$USER_DIR" \
      hydra.run.dir="$run" "$@" \
      --config-dir "$HERE/configs/image" --config-name "tiny_$m" > "$run/train.log" 2>&1
    "$BIN/knnvq-eval-image" "$run/checkpoints/checkpoint_last.pt" "$OUT/data/val" -o "$run/eval.json" --no-progress \
      > "$run/eval.log" 2>&1
  fi
done

$PY - "$OUT" $METHODS <<'PYEOF'
import json, sys
out, methods = sys.argv[1], sys.argv[2:]
rows = []
for m in methods:
    with open(f"{out}/{m}/eval.json") as f:
        r = json.load(f)
    rows.append((f"tiny_{m}", r["psnr"], r["ssim"], r["mse"], r["code_usage"], r["used_codes"], r["num_codes"],
                 r["code_perplexity"], r.get("prob_perplexity", float("nan")), r.get("tightness_max_prob", float("nan"))))
print("| config | PSNR (dB) | SSIM | MSE | code usage | used / M | code perplexity | prob perplexity | mean max p |")
print("|---|---|---|---|---|---|---|---|---|")
for name, psnr, ssim, mse, usage, used, num, cppl, pppl, tight in rows:
    print(f"| {name} | {psnr:.2f} | {ssim:.3f} | {mse:.4f} | {usage:.3f} | {used} / {num} | {cppl:.1f} | {pppl:.1f} | {tight:.2f} |")
PYEOF
