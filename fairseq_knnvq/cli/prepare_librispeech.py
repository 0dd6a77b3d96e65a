"""``knnvq-prepare-librispeech``: manifests, labels and dictionaries for CTC fine-tuning.

From a corpus in LibriSpeech's layout, where each audio folder
``<speaker>/<chapter>/`` holds a ``<speaker>-<chapter>.trans.txt`` with lines
``<utterance-id> TRANSCRIPT``, this writes what fairseq's ``audio_finetuning`` task
reads (``{data}/{split}.tsv``, ``{data}/{split}.{labels}``, ``{data}/dict.{labels}.txt``),
for each split named on the command line::

    knnvq-prepare-librispeech /data/LibriSpeech --dest /data/manifests \\
        --split train=train-clean-100 --split dev_other=dev-other --split test_clean=test-clean

    <dest>/<name>.tsv     the audio manifest (same as ``knnvq-manifest --split-name``)
    <name>.wrd            the transcript, one line per manifest line
    <name>.ltr            letters separated by spaces, "|" between words and at the end,
                          exactly as fairseq's examples/wav2vec/libri_labels.py:
                          ``H E L L O | W O R L D |``
    dict.ltr.txt          fairseq Dictionary ``<symbol> <count>``, counts descending,
                          from the training split's labels

Split names follow the shipped configs, so prepared data trains without a split override:
every config validates on ``valid`` (``--split valid=dev`` for the tiny corpus), except
the LibriSpeech fine-tuning configs ``configs/finetuning/base_*``, which validate on
``dev_other`` as fairseq's do. Data without either name gets a note saying which
``dataset.valid_subset`` to train with.

Libri-Light's limited-supervision sets (``librispeech_finetuning/1h``, ``9h`` ...)
use the same layout one or two folders deeper and work the same way
(``--split train=librispeech_finetuning/1h``).

``--units spm --spm-vocab N`` (or ``--units letter spm`` for both) trains a unigram
sentencepiece model on the training transcripts, offline, and writes ``<name>.spm``
(pieces separated by spaces), ``dict.spm.txt`` and ``spm_unigram<N>.model``/``.vocab``;
fine-tune with ``task.labels=spm`` and ``criterion.post_process=sentencepiece``.

Every audio file is decoded to its end first (``--workers`` threads, as in
``knnvq-manifest``), and every manifest line must have a UTF-8 transcript; otherwise the
run stops, naming the files, before anything is written. All outputs are written
atomically, and a manifest of an earlier run left in ``--dest`` that shares audio with
the training split stops the run too.
The labels are made by :mod:`fairseq_knnvq.preparation.librispeech`, the manifests by
:mod:`fairseq_knnvq.preparation.manifest`. Nothing here imports fairseq or torchaudio.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from pathlib import Path
from typing import Sequence

from fairseq_knnvq.cli.help_format import DefaultsHelpFormatter
from fairseq_knnvq.cli.manifest import (
    add_check_arguments,
    check_dest,
    describe,
    refuse_stale_manifests,
    resample_folder,
)
from fairseq_knnvq.preparation.librispeech import (
    LabelledSplit,
    PreparationError,
    attach_transcripts,
    count_symbols,
    dictionary_text,
    letter_labels,
    train_sentencepiece,
)
from fairseq_knnvq.preparation.manifest import DEFAULT_SAMPLE_RATE, ManifestError, build_manifest
from fairseq_knnvq.files import write_files_atomically

UNIT_CHOICES = ("letter", "spm")
# The split each shipped speech config validates on (dataset.valid_subset) -> those configs.
CONFIG_VALIDATION_SPLITS = {
    "valid": "configs/pretraining/* and configs/finetuning/tiny.yaml",
    "dev_other": "configs/finetuning/base_*",
}


@dataclasses.dataclass(frozen=True)
class SplitSpec:
    """``--split NAME=DIR``: the output name (``train``, ``dev_other``) and its audio folder."""

    name: str
    audio_dir: Path


def parse_split(text: str) -> SplitSpec:
    """Parse ``NAME=DIR`` (argparse ``type=``)."""
    name, sep, directory = text.partition("=")
    name = name.strip()
    if not sep or not name or not directory.strip():
        raise argparse.ArgumentTypeError(f"expected NAME=DIR (e.g. train=train-clean-100), got {text!r}")
    if os.sep in name or "/" in name or name.startswith("."):
        raise argparse.ArgumentTypeError(f"split name {name!r} must be a plain file name stem")
    return SplitSpec(name=name, audio_dir=Path(directory.strip()))


def validation_split_note(names: Sequence[str]) -> str | None:
    """A note for data that no shipped config validates on as it is (``None`` if one does)."""
    if any(name in CONFIG_VALIDATION_SPLITS for name in names):
        return None
    read = "; ".join(f"{split!r} by {configs}" for split, configs in CONFIG_VALIDATION_SPLITS.items())
    candidates = [name for name in names if name != "train"] or list(names)
    return (
        f"note: no split is named as the shipped configs' validation split ({read}); train with "
        f"dataset.valid_subset={candidates[0]}, or prepare with --split valid=DIR"
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="knnvq-prepare-librispeech",
        description=(
            "Write fairseq fine-tuning data (NAME.tsv, NAME.wrd, NAME.ltr, dict.ltr.txt; "
            "optionally sentencepiece units) for splits of a LibriSpeech-layout corpus."
        ),
        formatter_class=DefaultsHelpFormatter,
    )
    parser.add_argument("root", type=Path, help="corpus root; split folders are relative to it")
    parser.add_argument("--dest", type=Path, required=True, help="output folder (fairseq's task.data)")
    parser.add_argument(
        "--split",
        dest="splits",
        type=parse_split,
        action="append",
        required=True,
        metavar="NAME=DIR",
        help="a split to write as NAME.*, from the audio under ROOT/DIR (repeatable), "
        "e.g. --split train=train-clean-100 --split dev_other=dev-other",
    )
    parser.add_argument(
        "--dict-from",
        default=None,
        help="split whose labels make the dictionaries (and train sentencepiece); "
        "default: the split named 'train', else the first --split",
    )
    parser.add_argument(
        "--units",
        nargs="+",
        choices=UNIT_CHOICES,
        default=["letter"],
        help="label units to write: letter (NAME.ltr), spm (NAME.spm), or both",
    )
    parser.add_argument("--spm-vocab", type=int, default=1000, help="sentencepiece vocabulary size")
    parser.add_argument("--ext", default="flac", help="audio extension(s), e.g. flac or flac,wav")
    parser.add_argument("--sample-rate", type=int, default=DEFAULT_SAMPLE_RATE, help="required sample rate (Hz)")
    parser.add_argument(
        "--resample",
        action="store_true",
        help="convert audio at another rate or with several channels into DEST/resampled_<rate>hz/NAME/",
    )
    add_check_arguments(parser)
    return parser


def run(args: argparse.Namespace) -> dict[str, LabelledSplit]:
    """Do everything ``args`` asks for; returns the labelled splits by name."""
    root: Path = args.root.resolve()
    dest: Path = args.dest.resolve()
    specs: list[SplitSpec] = args.splits
    names = [spec.name for spec in specs]
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise PreparationError(f"split name(s) given more than once: {', '.join(duplicates)}")
    dict_split = args.dict_from or ("train" if "train" in names else names[0])
    if dict_split not in names:
        raise PreparationError(f"--dict-from {dict_split!r} is not one of the splits: {', '.join(names)}")
    units = list(dict.fromkeys(args.units))
    if "spm" in units and args.spm_vocab < 2:
        raise PreparationError(f"--spm-vocab must be at least 2, got {args.spm_vocab}")
    check_dest(dest)

    # Read and check everything before writing anything.
    splits: dict[str, LabelledSplit] = {}
    for spec in specs:
        audio_dir = spec.audio_dir if spec.audio_dir.is_absolute() else root / spec.audio_dir
        if not audio_dir.is_dir():
            raise PreparationError(f"split {spec.name!r}: {audio_dir} is not a folder")
        try:
            manifest = build_manifest(
                audio_dir,
                extensions=args.ext,
                sample_rate=args.sample_rate,
                resample_dir=resample_folder(dest, args.sample_rate, spec.name) if args.resample else None,
                exclude_dirs=[resample_folder(dest, args.sample_rate)],
                workers=args.workers,
                progress=not args.no_progress,
            )
        except ManifestError as error:
            raise PreparationError(f"split {spec.name!r}: {error}") from None
        splits[spec.name] = attach_transcripts(spec.name, manifest)

    refuse_stale_manifests(dest, {name: split.manifest for name, split in splits.items()})
    outputs: dict[Path, str] = {}
    for name, split in splits.items():
        outputs[dest / f"{name}.tsv"] = split.manifest.to_text()
        outputs[dest / f"{name}.wrd"] = "".join(f"{text}\n" for text in split.transcripts)

    if "letter" in units:
        letters = {name: [letter_labels(text) for text in split.transcripts] for name, split in splits.items()}
        for name, lines in letters.items():
            outputs[dest / f"{name}.ltr"] = "".join(f"{line}\n" for line in lines)
        outputs[dest / "dict.ltr.txt"] = dictionary_text(count_symbols(letters[dict_split]))

    binary_outputs: dict[Path, bytes] = {}  # written with the text files, as one set
    if "spm" in units:
        spm = train_sentencepiece(splits[dict_split].transcripts, args.spm_vocab)
        pieces = {name: [spm.encode(text) for text in split.transcripts] for name, split in splits.items()}
        for name, lines in pieces.items():
            outputs[dest / f"{name}.spm"] = "".join(f"{line}\n" for line in lines)
        outputs[dest / "dict.spm.txt"] = dictionary_text(count_symbols(pieces[dict_split]), order=spm.pieces)
        model_stem = f"spm_unigram{args.spm_vocab}"
        binary_outputs[dest / f"{model_stem}.model"] = spm.model_bytes
        outputs[dest / f"{model_stem}.vocab"] = spm.vocab_text

    dest.mkdir(parents=True, exist_ok=True)
    # Every file in full first, then the renames: an interrupted run cannot leave a new
    # train.tsv beside an old train.ltr.
    write_files_atomically({**binary_outputs, **outputs})

    for name, split in splits.items():
        print(f"{describe(name, split.manifest, args.sample_rate)} -> {dest}/{name}.*", file=sys.stderr)
    print(f"dictionaries from split {dict_split!r}; units: {', '.join(units)}", file=sys.stderr)
    note = validation_split_note(names)
    if note:
        print(note, file=sys.stderr)
    return splits


def main(argv: Sequence[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        run(args)
    except ManifestError as error:
        raise SystemExit(f"knnvq-prepare-librispeech: error: {error}") from None


if __name__ == "__main__":
    main()
