"""``knnvq-study``: compare pretraining configs over a grid of overrides and seeds.

    knnvq-study --task speech --config-dir configs/pretraining \\
        --configs tiny_gumbel,tiny_diversity,tiny_knn_ce \\
        --grid model.knn_k=1,4,8,16 --grid dataset.max_tokens=80000,160000 \\
        --seeds 1,2,3 --data manifests/ --out study_knn_k --jobs 2

Every point runs through stock ``fairseq-hydra-train`` (``--jobs`` at a time, one torch
thread each by default); a rerun skips the finished points. The results are the final
pooled validation metrics: ``runs.csv``, ``summary.csv``, ``summary.md`` and
``plots/<metric>_vs_<key>.png`` under ``--out``. See :mod:`fairseq_knnvq.study`.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from pathlib import Path
from typing import Optional, Sequence

from .. import study, study_launchers


def _int_list(text: str):
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected integers separated by commas, got {text!r}") from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="knnvq-study",
        description="Train pretraining configs over a grid of overrides and seeds with fairseq-hydra-train "
        "and tabulate and plot the final pooled validation metrics.",
    )
    parser.add_argument(
        "--task",
        choices=sorted(study.DEFAULT_METRICS),
        required=True,
        help="speech (wav2vec 2.0 configs) or image (image autoencoder configs): sets the default metrics",
    )
    parser.add_argument(
        "--config-dir",
        type=Path,
        required=True,
        help="folder of the configs, e.g. configs/pretraining or configs/image",
    )
    parser.add_argument(
        "--configs",
        required=True,
        type=lambda s: [c for c in s.split(",") if c],
        help="config names to compare, comma-separated (e.g. tiny_gumbel,tiny_knn_ce)",
    )
    parser.add_argument(
        "--grid",
        action="append",
        default=[],
        metavar="KEY=V1,V2,...",
        help="a swept override (repeatable; the grid is their product). Commas inside "
        "brackets stay in the value: model.latent_temp=[2,0.5,0.995],[2,0.1,0.995]",
    )
    parser.add_argument("--seeds", type=_int_list, default=[1, 2, 3], help="common.seed values (default 1,2,3)")
    parser.add_argument(
        "--data", type=Path, required=True, help="task.data: the manifest folder (speech) or the image folder (image)"
    )
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a fixed override for every run (repeatable), e.g. optimization.max_update=300",
    )
    parser.add_argument(
        "--metrics",
        type=lambda s: [m for m in s.split(",") if m],
        default=None,
        help="validation metrics to report (default for speech: "
        f"{','.join(study.DEFAULT_METRICS['speech'])}; image: "
        f"{','.join(study.DEFAULT_METRICS['image'])})",
    )
    parser.add_argument(
        "--out",
        type=Path,
        required=True,
        help="output folder (new, or one an earlier knnvq-study made: finished runs are skipped)",
    )
    parser.add_argument(
        "--jobs", type=int, default=os.cpu_count() or 1, help="runs at the same time (default: one per CPU core)"
    )
    parser.add_argument("--threads", type=int, default=1, help="torch threads per run (default 1)")
    parser.add_argument(
        "--launcher",
        choices=study_launchers.LAUNCHERS,
        default="local",
        help="local: runs here, --jobs at a time; slurm: each point is a SLURM job submitted "
        "through submitit (--jobs of them queued at a time; needs 'fairseq-knnvq[slurm]')",
    )
    parser.add_argument(
        "--partition", default=None, help="--launcher slurm: the partition (default: the cluster's default partition)"
    )
    parser.add_argument(
        "--gpus-per-run",
        type=int,
        default=0,
        help="--launcher slurm: GPUs of each job (default 0); one task, fairseq starts one "
        "process per GPU (set distributed_training.distributed_world_size with --set)",
    )
    parser.add_argument(
        "--time-limit",
        type=int,
        default=60,
        metavar="MINUTES",
        help="--launcher slurm: time limit of each job in minutes (default 60)",
    )
    parser.add_argument(
        "--no-compose-check", action="store_true", help="skip composing each config before the first run"
    )
    return parser


def make_study(args: argparse.Namespace) -> study.Study:
    grid = study.parse_grid(args.grid)
    fixed = []
    for spec in args.set:
        key, value = study.parse_assignment(spec, "--set")
        if key in dict(grid):
            raise study.StudyError(f"{key} is both in --set and in --grid: keep one")
        fixed.append(f"{key}={value}")
    if not args.data.is_dir() or not any(args.data.iterdir()):
        what = "is empty" if args.data.is_dir() else "is not a folder" if args.data.exists() else "does not exist"
        raise study.StudyError(
            f"--data {args.data} {what}: pass the manifest folder (speech; "
            "knnvq-prepare-librispeech writes one) or the image folder (image)"
        )
    fixed.insert(0, f"task.data={args.data.resolve()}")
    return study.Study(
        config_dir=args.config_dir.resolve(),
        configs=args.configs,
        grid=grid,
        seeds=args.seeds,
        out=args.out.resolve(),
        fixed=fixed,
        metrics=args.metrics or study.DEFAULT_METRICS[args.task],
        jobs=args.jobs,
        threads=args.threads,
        launcher=make_launcher(args),
    )


def make_launcher(args: argparse.Namespace) -> Optional[study_launchers.SlurmLauncher]:
    """None (runs here) or the SLURM launcher, checked: SLURM answers, the partition exists."""
    slurm_only = [
        f"--{name.replace('_', '-')}"
        for name, default in (("partition", None), ("gpus_per_run", 0), ("time_limit", 60))
        if getattr(args, name) != default
    ]
    if args.launcher == "local":
        if slurm_only:
            raise study.StudyError(f"{', '.join(slurm_only)} only apply with --launcher slurm")
        return None
    launcher = study_launchers.SlurmLauncher(args.partition, args.gpus_per_run, args.time_limit)
    try:
        launcher.check()
    except study_launchers.LauncherError as error:
        raise study.StudyError(str(error)) from None
    return launcher


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    progress = study.Progress()
    for name in ("SIGTERM", "SIGUSR1"):  # a cluster's preemption: the runs save and stop
        signal.signal(getattr(signal, name), lambda signum, frame: progress.forward_signal(signum))
    runner = None
    try:
        runner = make_study(args)
        runner.check()
        if not args.no_compose_check:
            runner.compose_check(progress)
        results, failures = runner.run(progress)
        if results:
            written: list = []
            table = study.write_summaries(results, [k for k, _ in runner.grid], runner.metrics, runner.out, written)
            print()
            print(table, flush=True)
            tables = [p.name for p in written if p.parent == runner.out]
            plots = [p.name for p in written if p.parent != runner.out]
            progress(
                f"wrote {', '.join(tables)} in {runner.out}"
                + (
                    f" and {len(plots)} plot(s) in {runner.out / 'plots'}: {', '.join(plots)}"
                    if plots
                    else "; no plot (no metric was logged)"
                )
            )
        if progress.stopping:
            from fairseq_knnvq.tasks.run_folder import PREEMPTED_EXIT_STATUS

            print(
                f"knnvq-study: stopped by {progress.stopping}; the runs in progress saved their "
                "checkpoint_last.pt: rerun the same command to continue them",
                file=sys.stderr,
            )
            return PREEMPTED_EXIT_STATUS
        if failures:
            print(
                f"knnvq-study: {len(failures)} run(s) failed; rerun the same command to retry them "
                "(finished runs are skipped)",
                file=sys.stderr,
            )
            return 1
    except study.StudyError as e:
        print(f"knnvq-study: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("knnvq-study: interrupted; rerun the same command to continue", file=sys.stderr)
        return 130
    finally:
        if runner is not None:
            runner.release()
    return 0


if __name__ == "__main__":
    sys.exit(main())
