#!/usr/bin/env python3
"""The K-rule study of docs/study.md ("Speech: the K rule"): the tiny wav2vec 2.0 with
BASE's codebook (2 x 320) on the shipped corpus, KNN-CE at several K against the
diversity loss, with the rows of each KNN search changed through K and through global
KNN over 2 gloo workers (torchrun on CPU), and the soft smoothings (gumbel, softmax).

    python scripts/k_rule_study.py --data study_data/speech --out study_k_rule --jobs 2

``--data`` is a folder made by ``knnvq-prepare-librispeech`` with train and dev splits.
Each run trains in ``OUT/runs/<point>/seed<N>/`` and writes ``result.json`` there (its
final pooled dev record and the mean training ``knn_rows_per_vertex``); a rerun skips
finished runs. At the end: ``runs.csv`` (one row per run) and ``summary.md`` (per point:
mean and 95 % t-interval; per comparison planned in docs/study.md: the difference, its
95 % Welch interval, Welch's p and Holm's adjusted p over the primary family).

The analysis is the one written in docs/study.md before the runs; this script does
nothing else. Points are defined below, not chosen from results.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import csv
import io
import json
import math
import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

ROOT = Path(__file__).resolve().parents[1]
CONFIG_DIR = ROOT / "configs" / "pretraining"
sys.path.insert(0, str(ROOT))

from fairseq_knnvq.files import atomic_write_text  # noqa: E402
from fairseq_knnvq.report import parse_log_line  # noqa: E402

SUBSET = "dev"
METRICS = (
    "used_codes",
    "used_codes_ceiling",
    "code_usage_of_ceiling",
    "pooled_code_perplexity",
    "pooled_prob_perplexity",
    "tightness_max_prob",
    "accuracy",
    "loss_0",
)


@dataclass(frozen=True)
class Point:
    name: str
    config: str
    workers: int = 1
    overrides: Tuple[str, ...] = ()


# Block R (rows per vertex): one worker at max_tokens 160000 (about 180 masked frames a
# batch), K = 1, 2, 4, 8, and two gloo workers (about 360 frames over both) with
# per-worker and global KNN.
ROWS_BLOCK = (
    Point("w1_diversity", "tiny_diversity"),
    Point("w1_knn_k1", "tiny_knn_ce", overrides=("model.knn_k=1",)),
    Point("w1_knn_k2", "tiny_knn_ce", overrides=("model.knn_k=2",)),
    Point("w1_knn_k4", "tiny_knn_ce", overrides=("model.knn_k=4",)),
    Point("w1_knn_k8", "tiny_knn_ce", overrides=("model.knn_k=8",)),
    Point("w2_diversity", "tiny_diversity", workers=2),
    Point("w2_knn_k1_global", "tiny_knn_ce", workers=2, overrides=("model.knn_k=1", "model.knn_global=true")),
    Point("w2_knn_k8_local", "tiny_knn_ce", workers=2, overrides=("model.knn_k=8",)),
    Point("w2_knn_k8_global", "tiny_knn_ce", workers=2, overrides=("model.knn_k=8", "model.knn_global=true")),
)
# Block S (soft smoothings, one worker): the forward pass uses the soft vector itself.
SOFT_BLOCK = tuple(
    Point(f"w1_{smoothing}_{name}", config, overrides=(f"model.smoothing={smoothing}", *extra))
    for smoothing in ("gumbel", "softmax")
    for name, config, extra in (("diversity", "tiny_diversity", ()), ("knn_k1", "tiny_knn_ce", ("model.knn_k=1",)))
)
# Block G (one group, 1 x 320; planned in docs/study.md's addendum before its runs):
# the same rows per vertex as two groups, since each group searches the same rows.
GROUP_BLOCK = (
    Point("g1_diversity", "tiny_diversity", overrides=("+model.latent_groups=1",)),
    Point("g1_knn_k1", "tiny_knn_ce", overrides=("+model.latent_groups=1", "model.knn_k=1")),
    Point("g1_knn_k8", "tiny_knn_ce", overrides=("+model.latent_groups=1", "model.knn_k=8")),
)
POINTS = ROWS_BLOCK + SOFT_BLOCK + GROUP_BLOCK

# The planned comparisons (docs/study.md): (label, point a, point b), difference a - b.
PRIMARY = (
    ("K=1 vs diversity, 1 worker", "w1_knn_k1", "w1_diversity"),
    ("K=8 vs diversity, 1 worker", "w1_knn_k8", "w1_diversity"),
    ("K=1 global vs diversity, 2 workers", "w2_knn_k1_global", "w2_diversity"),
    ("K=8 per-worker vs diversity, 2 workers", "w2_knn_k8_local", "w2_diversity"),
    ("K=8 global vs K=8 per-worker, 2 workers", "w2_knn_k8_global", "w2_knn_k8_local"),
    ("gumbel: KNN-CE K=1 vs diversity", "w1_gumbel_knn_k1", "w1_gumbel_diversity"),
    ("softmax: KNN-CE K=1 vs diversity", "w1_softmax_knn_k1", "w1_softmax_diversity"),
)
# The addendum's own family (Holm over its two comparisons).
ADDENDUM = (
    ("one group: K=1 vs diversity", "g1_knn_k1", "g1_diversity"),
    ("one group: K=8 vs diversity", "g1_knn_k8", "g1_diversity"),
)
SECONDARY = (
    ("K=2 vs diversity, 1 worker", "w1_knn_k2", "w1_diversity"),
    ("K=4 vs diversity, 1 worker", "w1_knn_k4", "w1_diversity"),
    ("K=1 vs K=8, 1 worker", "w1_knn_k1", "w1_knn_k8"),
    ("K=1 global (2 workers) vs K=1 (1 worker)", "w2_knn_k1_global", "w1_knn_k1"),
)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def tool(name: str) -> str:
    candidate = Path(sys.executable).parent / name
    return str(candidate) if candidate.exists() else name


def command(point: Point, seed: int, data: Path, run_dir: Path, max_update: int) -> List[str]:
    train = [
        tool("fairseq-hydra-train"),
        "--config-dir",
        str(CONFIG_DIR),
        "--config-name",
        point.config,
        f"task.data={data}",
        f"common.user_dir={ROOT / 'fairseq_knnvq'}",
        f"hydra.run.dir={run_dir}",
        f"dataset.valid_subset={SUBSET}",
        "model.latent_vars=320",
        f"optimization.max_update={max_update}",
        f"common.seed={seed}",
        "common.log_interval=25",
        "checkpoint.no_save=true",
        *point.overrides,
    ]
    if point.workers == 1:
        return train
    return [
        tool("torchrun"),
        f"--nproc_per_node={point.workers}",
        "--master_addr=127.0.0.1",
        f"--master_port={free_port()}",
        *train,
        f"distributed_training.distributed_world_size={point.workers}",
        "distributed_training.distributed_backend=gloo",
        "distributed_training.distributed_init_method=env://",
        "distributed_training.distributed_no_spawn=true",
        "distributed_training.distributed_rank=${oc.env:RANK}",
    ]


def result_of(log_text: str) -> Dict[str, float]:
    """The last pooled dev record and the mean training rows per vertex."""
    final: Optional[Dict[str, float]] = None
    rows = []
    for line in log_text.splitlines():
        parsed = parse_log_line(line)
        if parsed is None:
            continue
        logger, record = parsed
        if logger == SUBSET:
            final = dict(record)  # keys without the "dev_" prefix
        elif logger == "train_inner" and "knn_rows_per_vertex" in record:
            rows.append(record["knn_rows_per_vertex"])
    if final is None:
        raise RuntimeError("no dev record in the log")
    if rows:
        final["train_knn_rows_per_vertex"] = sum(rows) / len(rows)
    return final


def run_one(point: Point, seed: int, data: Path, out: Path, max_update: int) -> Tuple[Point, int, Optional[dict], str]:
    run_dir = out / "runs" / point.name / f"seed{seed}"
    result_file = run_dir / "result.json"
    if result_file.exists():
        return point, seed, json.loads(result_file.read_text()), "skipped (finished)"
    run_dir.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    started = time.time()
    with open(run_dir / "console.log", "w", encoding="utf-8") as log:
        code = subprocess.run(
            command(point, seed, data, run_dir, max_update),
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=str(run_dir),
        ).returncode
    text = (run_dir / "console.log").read_text(encoding="utf-8", errors="replace")
    if code != 0:
        return point, seed, None, f"FAILED (exit {code}); see {run_dir / 'console.log'}"
    result = result_of(text)
    result["wall_seconds"] = round(time.time() - started, 1)
    atomic_write_text(result_file, json.dumps(result, indent=2) + "\n")
    return point, seed, result, f"done in {result['wall_seconds']:.0f} s"


# -- statistics -------------------------------------------------------------------------


def mean_ci(values: Sequence[float]) -> Tuple[float, float, float]:
    """Mean and the half-width of its 95 % t-interval."""
    from scipy import stats

    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, float("nan"), float("nan")
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    return mean, sd, stats.t.ppf(0.975, n - 1) * sd / math.sqrt(n)


def welch(a: Sequence[float], b: Sequence[float]) -> Tuple[float, float, float, float]:
    """Difference of means, its 95 % Welch interval (low, high) and Welch's two-sided p."""
    from scipy import stats

    ma, mb = sum(a) / len(a), sum(b) / len(b)
    va = sum((v - ma) ** 2 for v in a) / (len(a) - 1)
    vb = sum((v - mb) ** 2 for v in b) / (len(b) - 1)
    se2 = va / len(a) + vb / len(b)
    diff = ma - mb
    if se2 == 0:
        return diff, diff, diff, (1.0 if diff == 0 else 0.0)
    df = se2**2 / ((va / len(a)) ** 2 / (len(a) - 1) + (vb / len(b)) ** 2 / (len(b) - 1))
    half = stats.t.ppf(0.975, df) * math.sqrt(se2)
    p = 2 * stats.t.sf(abs(diff) / math.sqrt(se2), df)
    return diff, diff - half, diff + half, p


def holm(pvalues: Sequence[float]) -> List[float]:
    order = sorted(range(len(pvalues)), key=lambda i: pvalues[i])
    adjusted = [0.0] * len(pvalues)
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (len(pvalues) - rank) * pvalues[i]))
        adjusted[i] = running
    return adjusted


def summarise(results: Dict[str, Dict[int, dict]]) -> str:
    out = io.StringIO()
    out.write("## Points (mean ± 95 % t-interval half-width over seeds)\n\n")
    shown = (
        "used_codes",
        "used_codes_ceiling",
        "code_usage_of_ceiling",
        "pooled_code_perplexity",
        "tightness_max_prob",
        "accuracy",
        "train_knn_rows_per_vertex",
    )
    out.write("| point | seeds | " + " | ".join(shown) + " |\n|---|---:|" + "---:|" * len(shown) + "\n")
    for point in POINTS:
        runs = results.get(point.name, {})
        if not runs:
            continue
        cells = []
        for metric in shown:
            values = [r[metric] for r in runs.values() if metric in r]
            if not values:
                cells.append("-")
                continue
            mean, _, half = mean_ci(values)
            cells.append(f"{mean:.3f} ± {half:.3f}" if mean < 10 else f"{mean:.1f} ± {half:.1f}")
        out.write(f"| {point.name} | {len(runs)} | " + " | ".join(cells) + " |\n")
    for title, family in (
        ("Primary comparisons (Holm-adjusted over the family)", PRIMARY),
        ("Addendum, one group (Holm-adjusted over its two)", ADDENDUM),
        ("Secondary comparisons (unadjusted, exploratory)", SECONDARY),
    ):
        for metric in ("used_codes", "tightness_max_prob"):
            rows = []
            for label, a, b in family:
                va = [r[metric] for r in results.get(a, {}).values()]
                vb = [r[metric] for r in results.get(b, {}).values()]
                if len(va) >= 2 and len(vb) >= 2:
                    rows.append((label, len(va), len(vb), *welch(va, vb)))
            if not rows:
                continue
            adjusted = holm([r[-1] for r in rows]) if family is not SECONDARY else [r[-1] for r in rows]
            out.write(
                f"\n## {title}: {metric}\n\n| comparison | n | difference | 95 % interval | p | p (Holm) |\n"
                "|---|---:|---:|---|---:|---:|\n"
            )
            for (label, na, nb, diff, low, high, p), padj in zip(rows, adjusted):
                holm_cell = f"{padj:.3f}" if family is not SECONDARY else "-"
                out.write(
                    f"| {label} | {na}+{nb} | {diff:+.3f} | [{low:+.3f}, {high:+.3f}] | {p:.3f} | {holm_cell} |\n"
                )
    return out.getvalue()


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, required=True, help="prepared speech data with train and dev splits")
    parser.add_argument("--out", type=Path, required=True, help="output folder (a rerun skips finished runs)")
    parser.add_argument("--seeds", default="1,2,3,4,5", help="seeds (default 1,2,3,4,5)")
    parser.add_argument("--jobs", type=int, default=2, help="runs at once (a 2-worker run counts as one)")
    parser.add_argument("--max-update", type=int, default=300, help="updates per run (default 300)")
    parser.add_argument("--points", default="", help="only these points, comma-separated (default: all)")
    args = parser.parse_args(argv)
    for split in ("train", SUBSET):
        if not (args.data / f"{split}.tsv").is_file():
            parser.error(
                f"{args.data} has no {split}.tsv: prepare it with knnvq-prepare-librispeech "
                f"--split train=train --split dev=dev"
            )
    seeds = [int(s) for s in args.seeds.split(",") if s]
    wanted = {p for p in args.points.split(",") if p}
    unknown = wanted - {p.name for p in POINTS}
    if unknown:
        parser.error(f"unknown points {sorted(unknown)}; the points are {[p.name for p in POINTS]}")
    points = [p for p in POINTS if not wanted or p.name in wanted]
    args.out.mkdir(parents=True, exist_ok=True)
    jobs = [(p, s) for s in seeds for p in points]  # seed-major: every point gets seeds early
    results: Dict[str, Dict[int, dict]] = {}
    failed = 0
    with concurrent.futures.ThreadPoolExecutor(max_workers=args.jobs) as pool:
        futures = [pool.submit(run_one, p, s, args.data.resolve(), args.out, args.max_update) for p, s in jobs]
        for done, future in enumerate(concurrent.futures.as_completed(futures), 1):
            point, seed, result, status = future.result()
            print(f"[{done}/{len(jobs)}] {point.name} seed {seed}: {status}", flush=True)
            if result is None:
                failed += 1
            else:
                results.setdefault(point.name, {})[seed] = result
    rows = [["point", "seed", *METRICS, "train_knn_rows_per_vertex"]]
    for point in POINTS:
        for seed, r in sorted(results.get(point.name, {}).items()):
            rows.append([point.name, seed, *[r.get(m, "") for m in METRICS], r.get("train_knn_rows_per_vertex", "")])
    buffer = io.StringIO()
    csv.writer(buffer, lineterminator="\n").writerows(rows)
    atomic_write_text(args.out / "runs.csv", buffer.getvalue())
    atomic_write_text(args.out / "summary.md", summarise(results))
    print(f"wrote {args.out / 'runs.csv'} and {args.out / 'summary.md'}; {failed} run(s) failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
