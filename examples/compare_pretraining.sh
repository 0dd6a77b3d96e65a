#!/usr/bin/env bash
# Pretrains the tiny wav2vec 2.0 on the shipped corpus once per quantizer variant, for the
# same number of updates, and prints a Markdown table of the final validation metrics
# (code usage, code and prob perplexity, tightness, KNN loss, contrastive accuracy).
#
#   examples/compare_pretraining.sh [OUT_DIR] [UPDATES] [VARIANT ...]
#
# OUT_DIR   new folder for manifests, runs and comparison.md (default: compare_pretraining_out)
# UPDATES   optimization.max_update of every run (default: 300)
# VARIANT   configs/pretraining/<VARIANT>.yaml (default: tiny_knn_ce tiny_diversity tiny_gumbel)
#
# Uses fairseq-hydra-train and knnvq-manifest from PATH (activate the project's venv, or
# set PYTHON and BIN, e.g. BIN=.venv/bin PYTHON=.venv/bin/python).
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT="${1:-compare_pretraining_out}"
UPDATES="${2:-300}"
shift $(( $# > 2 ? 2 : $# ))
VARIANTS=("$@")
if [ ${#VARIANTS[@]} -eq 0 ]; then
  VARIANTS=(tiny_knn_ce tiny_diversity tiny_gumbel)
fi
PYTHON="${PYTHON:-python}"
BIN="${BIN:+$BIN/}"

if [ -e "$OUT" ]; then
  echo "compare_pretraining.sh: $OUT exists; fairseq would resume from its checkpoints." >&2
  echo "Remove it or pass another OUT_DIR." >&2
  exit 2
fi
for variant in "${VARIANTS[@]}"; do
  if [ ! -f "$REPO/configs/pretraining/$variant.yaml" ]; then
    echo "compare_pretraining.sh: no config configs/pretraining/$variant.yaml" >&2
    exit 2
  fi
done
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"

"${BIN}knnvq-manifest" "$REPO/examples/tiny_corpus/LibriSpeech/train" --dest "$OUT/manifests" --split-name train
"${BIN}knnvq-manifest" "$REPO/examples/tiny_corpus/LibriSpeech/dev" --dest "$OUT/manifests" --split-name valid
USER_DIR="$("$PYTHON" -m fairseq_knnvq)"

for variant in "${VARIANTS[@]}"; do
  echo "== $variant: $UPDATES updates (log: $OUT/$variant.log)" >&2
  start=$(date +%s)
  "${BIN}fairseq-hydra-train" --config-dir "$REPO/configs/pretraining" --config-name "$variant" \
    task.data="$OUT/manifests" common.user_dir="$USER_DIR" hydra.run.dir="$OUT/$variant" \
    optimization.max_update="$UPDATES" > "$OUT/$variant.log" 2>&1 \
    || { echo "compare_pretraining.sh: $variant failed; see $OUT/$variant.log" >&2; tail -20 "$OUT/$variant.log" >&2; exit 1; }
  echo "   done in $(( $(date +%s) - start )) s" >&2
done

"$PYTHON" - "$OUT" "${VARIANTS[@]}" <<'EOF'
import json, os, re, sys, tempfile

out, variants = sys.argv[1], sys.argv[2:]
columns = [
    ("valid_num_updates", "updates", "{:.0f}"),
    ("valid_code_usage", "code usage", "{:.3f}"),
    ("valid_used_codes", "used codes", "{:.0f}"),
    ("valid_pooled_code_perplexity", "code perplexity", "{:.2f}"),
    ("valid_pooled_prob_perplexity", "prob perplexity", "{:.2f}"),
    ("valid_tightness_max_prob", "tightness max p", "{:.3f}"),
    ("valid_tightness_vertex_l2", "tightness L2", "{:.4f}"),
    ("valid_knn_loss", "KNN loss", "{:.3f}"),
    ("valid_accuracy", "contrastive acc.", "{:.3f}"),
]
record_line = re.compile(r"\]\[valid\]\[INFO\] - (\{.*\})\s*$")
lines = ["| variant | " + " | ".join(title for _, title, _ in columns) + " |",
         "|---|" + "---:|" * len(columns)]
for variant in variants:
    with open(os.path.join(out, variant + ".log"), encoding="utf-8") as log:
        records = [json.loads(m.group(1)) for m in map(record_line.search, log) if m]
    if not records:
        sys.exit(f"compare_pretraining.sh: no validation record in {variant}.log")
    last = records[-1]
    cells = [fmt.format(float(last[key])) if key in last else "n/a" for key, _, fmt in columns]
    lines.append(f"| {variant} | " + " | ".join(cells) + " |")
table = "\n".join(lines) + "\n"
fd, tmp = tempfile.mkstemp(dir=out, suffix=".md.tmp")
with os.fdopen(fd, "w") as f:
    f.write(table)
os.replace(tmp, os.path.join(out, "comparison.md"))
print(table, end="")
EOF
