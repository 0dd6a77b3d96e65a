"""``knnvq-export-hf``: a fairseq wav2vec 2.0 checkpoint as a Hugging Face ``transformers`` folder.

::

    knnvq-export-hf /exp/pretrain/checkpoints/checkpoint_last.pt /exp/hf/pretrained
    knnvq-export-hf /exp/ft/checkpoints/checkpoint_best.pt /exp/hf/ctc

A pretraining checkpoint (``wav2vec2_knnvq`` or fairseq's ``wav2vec2``) becomes a
``Wav2Vec2ForPreTraining`` folder (config, safetensors weights with the codebook, and
the feature extractor); a CTC fine-tuned checkpoint becomes a ``Wav2Vec2ForCTC`` folder
with its ``Wav2Vec2Processor`` (vocabulary from the checkpoint's dictionary, audio
normalisation from the fine-tuning task). Load them with ``from_pretrained(OUT_DIR)``
or ``pipeline("automatic-speech-recognition", model=OUT_DIR)``. The mapping and its
checks are in :mod:`fairseq_knnvq.hf`; needs ``pip install 'fairseq-knnvq[hf]'``.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="knnvq-export-hf",
        description="Convert a fairseq wav2vec 2.0 pretraining or CTC fine-tuned checkpoint "
        "into a Hugging Face transformers model folder.",
    )
    parser.add_argument("checkpoint", type=Path, help="checkpoint (.pt) written by fairseq-hydra-train")
    parser.add_argument("out_dir", type=Path, help="folder to write (config.json, model.safetensors, processor files)")
    parser.add_argument("--overwrite", action="store_true", help="replace OUT_DIR if it exists and is not empty")
    parser.add_argument(
        "--dictionary",
        type=Path,
        default=None,
        help="fine-tuning dictionary (dict.ltr.txt) for a CTC checkpoint that does not carry one "
        "(default: the one stored in the checkpoint, else the checkpoint's task.data/dict.LABELS.txt)",
    )
    parser.add_argument(
        "--no-verify",
        action="store_true",
        help="skip the check that reads the written model back and compares it with the fairseq model",
    )
    return parser


def quiet_progress_bars() -> None:
    """transformers and huggingface_hub draw progress bars for loading and writing a
    model of a few files; the summary line says what was written."""
    try:
        import huggingface_hub.utils
        import transformers.utils.logging

        transformers.utils.logging.disable_progress_bar()
        huggingface_hub.utils.disable_progress_bars()
    except ImportError:  # reported with the fix by export_checkpoint
        pass


def main(argv: Sequence[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    from fairseq_knnvq.hf import VERIFY_SECONDS, ExportError, export_checkpoint

    quiet_progress_bars()
    try:
        result = export_checkpoint(
            args.checkpoint, args.out_dir, overwrite=args.overwrite, dictionary_path=args.dictionary, verify=not args.no_verify
        )
    except ExportError as error:
        raise SystemExit(f"knnvq-export-hf: error: {error}") from None
    print(
        f"{result.out_dir}: {result.model_class} ({result.kind} checkpoint, {result.num_parameters:,} parameters): "
        + ", ".join(result.files)
    )
    if result.differences:
        shown = ", ".join(f"{name} {value:.2g}" for name, value in result.differences.items())
        print(f"checked against the fairseq model on {VERIFY_SECONDS:g} s of noise, largest differences: {shown}")
    for note in result.notes:
        print(f"note: {note}", file=sys.stderr)


if __name__ == "__main__":
    main()
