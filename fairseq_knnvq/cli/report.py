"""``knnvq-report``: plots and tables from fairseq training logs, and code histograms.

Two subcommands::

    # One PNG per metric (one line per run, x = update) and a Markdown table of the
    # final values, from fairseq JSON logs (common.log_format=json):
    knnvq-report curves outputs/knn/hydra_train.log outputs/div --name knn --name diversity --out report/

    # How often each codebook entry is chosen (per group, sorted), from a pretraining
    # checkpoint and a fairseq manifest:
    knnvq-report codes --checkpoint outputs/knn/checkpoints/checkpoint_last.pt \\
        --manifest manifests/test.tsv --out report/

A run is a log file or a hydra run folder (``hydra_train.log``). The work is done by
:mod:`fairseq_knnvq.report`, which says which records are read and how they are drawn;
every file is written to a temporary name and renamed, so an interrupted report never
leaves a half-written PNG or table behind.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional, Sequence

from .. import code_histograms, report
from .outputs import output_folder_problem


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="knnvq-report", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    curves = sub.add_parser("curves", help="plots and a table of final values from fairseq JSON logs")
    curves.add_argument(
        "runs", nargs="+", type=Path, help="fairseq log files (common.log_format=json) or hydra run folders"
    )
    curves.add_argument(
        "--name",
        action="append",
        default=None,
        help="label of a run, once per run in the same order (default: folder name)",
    )
    curves.add_argument(
        "--metrics",
        default=None,
        help="comma-separated metrics to plot, e.g. loss_0,loss_1 (default: the "
        "code-usage metrics, losses, temperature, WER and PSNR that the logs contain)",
    )
    curves.add_argument("--out", type=Path, required=True, help="folder for the PNGs and tables")

    codes = sub.add_parser("codes", help="histogram of code counts per group from a checkpoint")
    codes.add_argument("--checkpoint", type=Path, required=True, help="a wav2vec 2.0 pretraining checkpoint")
    codes.add_argument("--manifest", type=Path, required=True, help="a fairseq manifest (.tsv) of the audio")
    codes.add_argument("--out", type=Path, required=True, help="folder for the PNG and the JSON counts")
    codes.add_argument("--name", default=None, help="label for the titles and file names")
    codes.add_argument("--max-files", type=int, default=None, help="only the first N files of the manifest")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        problem = output_folder_problem(args.out, "--out")
        if problem:
            raise report.ReportError(problem)
        if args.command == "curves":
            if args.name is not None and len(args.name) != len(args.runs):
                raise report.ReportError(
                    f"got {len(args.runs)} runs but {len(args.name)} --name labels: pass one per run"
                )
            names = args.name or [None] * len(args.runs)
            runs = [report.read_run(path, name) for path, name in zip(args.runs, names)]
            metrics = [m.strip() for m in args.metrics.split(",") if m.strip()] if args.metrics else None
            written = report.write_curves_report(runs, args.out, metrics)
            print(Path(args.out / "final_values.md").read_text(encoding="utf-8"))
            print(f"wrote {len(written)} files to {args.out}: {', '.join(sorted(written))}")
        else:
            codes = code_histograms.write_code_report(
                args.checkpoint, args.manifest, args.out, args.name, args.max_files
            )
            stats = codes["stats"]
            print(
                f"{codes['name']}: {codes['frames']} frames from {codes['files']} files; "
                f"{int(stats['used_codes'])}/{int(stats['num_codes'])} entries used "
                f"(usage {stats['code_usage']:.3f}), code perplexity {stats['code_perplexity']:.2f}"
            )
            for g, group in enumerate(codes["per_group"]):
                print(
                    f"  group {g}: {int(group['used_codes'])}/{codes['num_vars']} used, "
                    f"code perplexity {group['code_perplexity']:.2f}"
                )
            print(f"wrote {args.out / (codes['name'] + '_code_counts.png')}")
    except report.ReportError as e:
        print(f"knnvq-report: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
