#!/usr/bin/env bash
# Pretrain -> fine-tune -> decode on the shipped tiny corpus, on CPU, with stock
# fairseq-hydra-train and this plugin:
#   1. knnvq-prepare-librispeech: manifests, letter labels, dict.ltr.txt (train, valid
#      = the corpus's dev/, test: the split names the shipped configs read)
#   2. pretraining, configs/pretraining/$PRETRAIN_CONFIG.yaml (default tiny_knn_ce)
#   3. CTC letter fine-tuning from that checkpoint, configs/finetuning/tiny.yaml
#   4. knnvq-infer: greedy CTC decoding of test, WER/CER in $OUT/decode/wer.test.json
# Run folders as everywhere in the docs: hydra.run.dir=$OUT/pretrain and $OUT/finetune, so
# the checkpoints are $OUT/{pretrain,finetune}/checkpoints/checkpoint_*.pt.
# Usage: examples/tiny_finetune.sh [OUT]   (default OUT: ./tiny_finetune_out)
# Environment: PYTHON (default: python3; the project's venv python if it is not on PATH),
#   PRETRAIN_CONFIG, and extra overrides in PRETRAIN_ARGS / FINETUNE_ARGS, e.g.
#   FINETUNE_ARGS="optimization.max_update=100" for a quick check.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT="$(mkdir -p "${1:-tiny_finetune_out}" && cd "${1:-tiny_finetune_out}" && pwd)"
PYTHON="${PYTHON:-python3}"
PRETRAIN_CONFIG="${PRETRAIN_CONFIG:-tiny_knn_ce}"
USER_DIR="$("$PYTHON" -m fairseq_knnvq)"
read -r -a PRETRAIN_EXTRA <<< "${PRETRAIN_ARGS:-}"
read -r -a FINETUNE_EXTRA <<< "${FINETUNE_ARGS:-}"

# One thread per process: these models are tiny, and more threads mostly spin on a
# small or shared machine.
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"

step() { echo; echo "== $1 ($(date +%H:%M:%S))"; }
started=$SECONDS

step "1/4 data: $OUT/data"
"$PYTHON" -m fairseq_knnvq.cli.prepare_librispeech "$REPO/examples/tiny_corpus/LibriSpeech" \
    --dest "$OUT/data" --split train=train --split valid=dev --split test=test

step "2/4 pretraining ($PRETRAIN_CONFIG): $OUT/pretrain"
t=$SECONDS
"$PYTHON" -m fairseq_cli.hydra_train --config-dir "$REPO/configs/pretraining" --config-name "$PRETRAIN_CONFIG" \
    task.data="$OUT/data" common.user_dir="$USER_DIR" \
    hydra.run.dir="$OUT/pretrain" "${PRETRAIN_EXTRA[@]}" \
    > "$OUT/pretrain.log" 2>&1 || { tail -n 40 "$OUT/pretrain.log"; exit 1; }
pretrain_seconds=$((SECONDS - t))
echo "pretraining took ${pretrain_seconds} s (log: $OUT/pretrain.log)"

step "3/4 CTC fine-tuning (tiny): $OUT/finetune"
t=$SECONDS
"$PYTHON" -m fairseq_cli.hydra_train --config-dir "$REPO/configs/finetuning" --config-name tiny \
    task.data="$OUT/data" model.w2v_path="$OUT/pretrain/checkpoints/checkpoint_last.pt" common.user_dir="$USER_DIR" \
    hydra.run.dir="$OUT/finetune" "${FINETUNE_EXTRA[@]}" \
    > "$OUT/finetune.log" 2>&1 || { tail -n 40 "$OUT/finetune.log"; exit 1; }
finetune_seconds=$((SECONDS - t))
echo "fine-tuning took ${finetune_seconds} s (log: $OUT/finetune.log)"
grep -E '\]\[valid\]\[' "$OUT/finetune.log" | tail -n 1 || true

step "4/4 decoding test: $OUT/decode"
t=$SECONDS
"$PYTHON" -m fairseq_knnvq.cli.infer_ctc "$OUT/finetune/checkpoints/checkpoint_best.pt" --data "$OUT/data" \
    --subset test --output-dir "$OUT/decode" --no-progress 2> "$OUT/decode.log" || { tail -n 40 "$OUT/decode.log"; exit 1; }
tail -n 1 "$OUT/decode.log"
echo "decoding took $((SECONDS - t)) s; total $((SECONDS - started)) s"
cat "$OUT/decode/wer.test.json"
