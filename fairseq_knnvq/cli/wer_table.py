"""``knnvq-wer-table``: the WER table of one fine-tuning run or of a comparison of runs, in
the wav2vec 2.0 paper's layout (a row per run and LM, a column per split), as Markdown and
CSV.

::

    knnvq-wer-table 10h_knn=/exp/ft_10h_knn/decode 10h_stock=/exp/ft_10h_stock/decode \\
        --output /exp/wer_10h

reads every ``wer.<subset>.json`` (greedy) and ``wer.<subset>.beam.json`` (beam search)
that ``knnvq-infer`` wrote into each decode folder (``LABEL=FOLDER``, or a folder alone:
its parent's name is the label) and writes ``<output>.md`` and ``<output>.csv``
atomically; the Markdown table is also printed.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Sequence

from fairseq_knnvq.cli.outputs import output_file_problem
from fairseq_knnvq.evaluation.wer_table import WerTableError, build_table, csv_text, markdown
from fairseq_knnvq.files import write_files_atomically


def parse_run(spec: str) -> tuple[str, Path]:
    label, sep, folder = spec.partition("=")
    if not sep:
        path = Path(spec)
        return path.resolve().parent.name, path
    return label, Path(folder)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="knnvq-wer-table", description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", help="LABEL=DECODE_FOLDER (or DECODE_FOLDER) of each run")
    parser.add_argument("--output", type=Path, required=True, help="writes OUTPUT.md and OUTPUT.csv")
    args = parser.parse_args(argv)
    runs = [parse_run(spec) for spec in args.runs]
    try:
        for label, folder in runs:
            if not folder.is_dir():
                raise WerTableError(f"decode folder {folder} (run {label}) does not exist")
        problem = output_file_problem(args.output.with_name(args.output.name + ".md"), "--output")
        if problem:
            raise WerTableError(problem)
        columns, rows = build_table(runs)
    except WerTableError as error:
        raise SystemExit(f"knnvq-wer-table: error: {error}") from None
    table = markdown(columns, rows)
    write_files_atomically(
        {
            args.output.with_name(args.output.name + ".md"): table,
            args.output.with_name(args.output.name + ".csv"): csv_text(columns, rows),
        }
    )
    print(table, end="")


if __name__ == "__main__":
    main()
