"""``knnvq-ngram-lm``: an n-gram language model from transcripts, as an ARPA file for
``knnvq-infer --lm``.

::

    knnvq-ngram-lm /data/train.wrd --order 4 --output /data/lm/train.4gram.arpa

counts the whitespace-separated tokens of every line of the given files (words of
``.wrd`` files for a lexicon search; the letters and ``|`` of ``.ltr`` files give a unit
LM for a lexicon-free search) and writes the interpolated absolute-discounting model of
:mod:`fairseq_knnvq.evaluation.ngram` atomically. For LibriSpeech, use the published
4-gram or KenLM's ``lmplz`` (modified Kneser-Ney) instead: this tool is for small text.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence

from fairseq_knnvq.cli.outputs import output_file_problem
from fairseq_knnvq.evaluation.ngram import NGramModel, read_sentences
from fairseq_knnvq.files import atomic_write_text


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="knnvq-ngram-lm",
        description="Write an ARPA n-gram LM (interpolated absolute discounting) from transcripts.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("transcripts", type=Path, nargs="+", help="text files, one sentence per line (e.g. train.wrd)")
    parser.add_argument("--order", type=int, default=4, help="n-gram order (KenLM loads orders from 2)")
    parser.add_argument("--output", type=Path, required=True, help="the ARPA file to write")
    return parser


def run(args: argparse.Namespace) -> NGramModel:
    if args.order < 2:
        raise ValueError(
            f"--order must be at least 2 (KenLM, and so knnvq-infer --lm, loads only bigram "
            f"models and up), got {args.order}"
        )
    for path in args.transcripts:
        if not path.is_file():
            raise ValueError(f"transcript file {path} does not exist")
    problem = output_file_problem(args.output, "--output")
    if problem:
        raise ValueError(problem)
    lines = []
    for path in args.transcripts:
        with open(path, encoding="utf-8") as text:
            lines.extend(text)
    sentences = read_sentences(lines)
    if not sentences:
        raise ValueError(f"{', '.join(map(str, args.transcripts))} hold no text: nothing to count")
    model = NGramModel(sentences, args.order)
    atomic_write_text(args.output, model.arpa())
    return model


def main(argv: Sequence[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        model = run(args)
    except ValueError as error:
        raise SystemExit(f"knnvq-ngram-lm: error: {error}") from None
    sizes = ", ".join(f"{len(entries)} {n}-grams" for n, entries in enumerate(model.arpa_entries(), start=1))
    print(f"{args.output}: {sizes}", file=sys.stderr)


if __name__ == "__main__":
    main()
