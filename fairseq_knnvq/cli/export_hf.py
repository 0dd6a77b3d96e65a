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


def remove_interrupted_exports(out_dir: Path) -> None:
    """Removes the hidden staging folders (``.<name>.<random>.partial``) that an export
    into ``out_dir`` killed with SIGKILL left beside it (one ended by SIGTERM or
    Ctrl-C removes its own)."""
    import shutil

    out_dir = out_dir.absolute()
    if out_dir.parent.is_dir():
        for leftover in out_dir.parent.glob(f".{out_dir.name}.*.partial"):
            print(f"removing {leftover}, left by an interrupted export", file=sys.stderr)
            shutil.rmtree(leftover, ignore_errors=True)


def exit_on_sigterm() -> None:
    """SIGTERM ends the export like Ctrl-C: the staging folder is removed on the way out."""
    import signal

    def _raise(signum, frame):
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, _raise)


def main(argv: Sequence[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    from fairseq_knnvq.cli.outputs import output_folder_problem
    from fairseq_knnvq.hf import VERIFY_SECONDS, ExportError, export_checkpoint

    quiet_progress_bars()
    # OUT_DIR is staged beside itself and renamed into place: its parent must be writable.
    problem = output_folder_problem(args.out_dir.absolute().parent, "the folder of OUT_DIR")
    if problem:
        raise SystemExit(f"knnvq-export-hf: error: {problem}")
    exit_on_sigterm()
    remove_interrupted_exports(args.out_dir)
    try:
        result = export_checkpoint(
            args.checkpoint,
            args.out_dir,
            overwrite=args.overwrite,
            dictionary_path=args.dictionary,
            verify=not args.no_verify,
        )
    except ExportError as error:
        raise SystemExit(f"knnvq-export-hf: error: {error}") from None
    except OSError as error:  # e.g. OUT_DIR's folder made read-only, or a full disk, while writing
        raise SystemExit(f"knnvq-export-hf: error: cannot write {args.out_dir}: {error}; nothing was written") from None
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
