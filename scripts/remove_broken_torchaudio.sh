#!/usr/bin/env bash
# fairseq depends on torchaudio, but the newest torchaudio does not load against
# torch 2.13. Nothing in fairseq's wav2vec path imports it, while a broken copy breaks
# other libraries that probe for it (HF transformers), so remove it when it cannot load.
py=${1:-python}
if "$py" -c "import torchaudio" >/dev/null 2>&1; then
  exit 0
fi
if "$py" -m pip show torchaudio >/dev/null 2>&1; then
  echo "torchaudio is installed but cannot be imported against this torch;" \
       "uninstalling it (fairseq's wav2vec 2.0 path does not need it)."
  "$py" -m pip uninstall -y torchaudio
fi
