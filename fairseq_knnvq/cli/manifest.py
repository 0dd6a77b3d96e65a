"""``knnvq-manifest``: write fairseq audio manifests (``*.tsv``) for a folder of audio.

A manifest is what fairseq's ``audio_pretraining`` / ``audio_finetuning`` tasks read
(``{data}/{split}.tsv``)::

    /absolute/root
    relative/path/to/file.flac<TAB>num_frames
    ...

This is fairseq's ``examples/wav2vec/wav2vec_manifest.py`` with the same options and
the same seeded train/valid split, plus what that script leaves to the user:

* files are checked before anything is written: every file is decoded to its end (in
  parallel over the CPUs, ``--workers``, with a progress bar), and a file that does not
  decode (truncated, corrupt, empty), a sample rate other than ``--sample-rate`` or more
  than one channel stops with a message naming the files and the fix, instead of a
  training run failing (or silently training on wrong-rate audio) hours later;
* ``--resample`` converts such files to ``--sample-rate`` mono 16-bit audio under
  ``--dest`` (polyphase filtering, ``scipy.signal.resample_poly``), and the manifest
  then points at that folder;
* ``--split-name NAME`` writes one ``NAME.tsv`` for a whole folder (e.g. ``valid.tsv``
  from LibriSpeech's ``dev-other``), the usual way to get a fixed validation set;
* output is sorted and deterministic, and written atomically (temporary file, then
  rename: :mod:`fairseq_knnvq.files`), so an interrupted or failed run never leaves
  half a manifest behind.

The work is done by :mod:`fairseq_knnvq.preparation.manifest`; the checks of ``--dest`` here are
reused by ``knnvq-prepare-librispeech``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Mapping, Sequence

from fairseq_knnvq.cli.help_format import DefaultsHelpFormatter
from fairseq_knnvq.cli.outputs import output_folder_problem
from fairseq_knnvq.preparation.manifest import (
    DEFAULT_SAMPLE_RATE,
    Manifest,
    ManifestError,
    build_manifest,
    list_problems,
    split_train_valid,
    stale_manifest_problems,
)
from fairseq_knnvq.files import write_files_atomically


def check_dest(dest: Path) -> None:
    """Stops before any work when ``--dest`` cannot be written."""
    problem = output_folder_problem(dest, "--dest")
    if problem:
        raise ManifestError(problem)


def refuse_stale_manifests(dest: Path, new: Mapping[str, Manifest]) -> None:
    problems = stale_manifest_problems(dest, new)
    if problems:
        raise ManifestError(
            "this run would leave manifests of an earlier run that share audio with the new ones "
            "(training audio in another split):\n"
            + list_problems(problems)
            + "\nDelete them (with their .ltr/.wrd/.spm labels), or choose another --dest. "
            "Nothing was written."
        )


def describe(name: str, manifest: Manifest, sample_rate: int) -> str:
    hours = manifest.total_frames / sample_rate / 3600
    return f"{name}: {len(manifest.entries)} files, {hours:.3f} h"


def resample_folder(dest: Path, sample_rate: int, name: str | None = None) -> Path:
    """Where converted audio goes under ``dest``: one folder per rate (and per split)."""
    folder = Path(dest) / f"resampled_{sample_rate}hz"
    return folder / name if name else folder


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="knnvq-manifest",
        description=(
            "Write fairseq audio manifests (train.tsv/valid.tsv, or one NAME.tsv) for "
            "all audio files under ROOT: line 1 the absolute root, then "
            "'relative/path<TAB>num_frames'."
        ),
        formatter_class=DefaultsHelpFormatter,
    )
    parser.add_argument("root", type=Path, help="folder searched recursively for audio files")
    parser.add_argument("--dest", type=Path, default=Path("."), help="output folder")
    parser.add_argument("--ext", default="flac", help="audio extension(s), e.g. flac, wav or flac,wav")
    which = parser.add_mutually_exclusive_group()
    which.add_argument(
        "--valid-percent",
        type=float,
        default=0.01,
        help="share of files (0-1) drawn at random into valid.tsv; the rest go to train.tsv",
    )
    which.add_argument(
        "--split-name",
        default=None,
        help="write every file into one NAME.tsv instead of a train/valid split",
    )
    parser.add_argument("--seed", type=int, default=42, help="seed of the train/valid draw")
    parser.add_argument("--path-must-contain", default=None, help="keep only files whose path contains this")
    parser.add_argument("--sample-rate", type=int, default=DEFAULT_SAMPLE_RATE, help="required sample rate (Hz)")
    parser.add_argument(
        "--resample",
        action="store_true",
        help="convert files at another rate or with several channels into DEST/resampled_<rate>hz/",
    )
    add_check_arguments(parser)
    return parser


def add_check_arguments(parser: argparse.ArgumentParser) -> None:
    """``--workers`` and ``--no-progress``: how the audio files are checked."""
    parser.add_argument(
        "--workers",
        type=int,
        default=None,
        help="threads that decode the audio files to check them (default: every CPU)",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar while checking the audio")


def run(args: argparse.Namespace) -> dict[str, Manifest]:
    """Build and write the manifests that ``args`` ask for; returns them by split name."""
    dest: Path = args.dest.resolve()
    if args.sample_rate <= 0:
        raise ManifestError(f"--sample-rate must be positive, got {args.sample_rate}")
    check_dest(dest)
    manifest = build_manifest(
        args.root,
        extensions=args.ext,
        path_must_contain=args.path_must_contain,
        sample_rate=args.sample_rate,
        resample_dir=resample_folder(dest, args.sample_rate, args.split_name) if args.resample else None,
        # Converted copies of earlier runs (any split name) are output, never input.
        exclude_dirs=[resample_folder(dest, args.sample_rate)],
        workers=args.workers,
        progress=not args.no_progress,
    )
    if args.split_name:
        manifests = {args.split_name: manifest}
    else:
        train, valid = split_train_valid(manifest, args.valid_percent, args.seed)
        # Like fairseq's script: no valid.tsv at all when nothing is asked for.
        manifests = {"train": train, "valid": valid} if args.valid_percent > 0 else {"train": train}
    refuse_stale_manifests(dest, manifests)
    write_files_atomically({dest / f"{name}.tsv": m.to_text() for name, m in manifests.items()})
    for name, written in manifests.items():
        print(f"wrote {dest / f'{name}.tsv'} ({describe(name, written, args.sample_rate)})", file=sys.stderr)
    return manifests


def main(argv: Sequence[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        run(args)
    except ManifestError as error:
        raise SystemExit(f"knnvq-manifest: error: {error}") from None


if __name__ == "__main__":
    main()
