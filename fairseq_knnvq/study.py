"""Study runner: pretraining configs x a grid of overrides x seeds, each point trained by
stock ``fairseq-hydra-train``, summarised as tables and plots of the final validation
metrics (``knnvq-study`` is its command line).

A *point* is one config, one value for each grid key and one seed. Each point trains in
``OUT/runs/<config>/<key-value_...>/seed<N>/`` and, once its run has finished, writes
``result.json`` there (at once, by rename): the final pooled validation record. A rerun
skips the points that have a ``result.json`` made by the same command line and starts the
others afresh, so an interrupted study resumes where it stopped. A failed run is reported
with its log and the study goes on with the other points.

Outputs, all written at the end (each file at once):

    runs.csv       one row per point: config, grid values, seed, every metric
    summary.csv    one row per (config, grid values): mean, standard deviation, seeds
    summary.md     the same as a Markdown table ("mean ± sd"), hard and soft perplexity
                   side by side
    plots/         <metric>_vs_<grid key>.png: the metric against the swept value, one
                   line per config (and per value of the other grid keys), sd as bars

The final validation record is the last one fairseq logged for the validation subset
(``dataset.valid_subset``): the plugin's metrics there are pooled over the whole subset.
"""

from __future__ import annotations

import concurrent.futures
import csv
import errno
import io
import itertools
import json
import math
import os
import re
import shutil
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

from . import preflight, report
from .files import atomic_write_text
from .folder_lock import FolderInUseError, FolderLock
from .verdict import COLLAPSED, FULL_USE, TIGHT, verdict  # noqa: F401 (the study's verdict column)

# Metrics reported by default, per task: usage, hard and soft perplexity side by side,
# tightness, and the task's own measure.
USAGE_METRICS = (
    "code_usage",
    "used_codes",
    "used_codes_ceiling",
    "pooled_code_perplexity",
    "pooled_prob_perplexity",
    "tightness_max_prob",
)
DEFAULT_METRICS = {"speech": (*USAGE_METRICS, "accuracy", "loss"), "image": (*USAGE_METRICS, "psnr")}
RESULT_FILE = "result.json"
# The image task, whose data folder holds a folder (or a file list) per split.
IMAGE_TASKS = ("image_autoencoding",)
MARKER = ".knnvq-study"
# Held while a study runs: a second knnvq-study into the same --out stops.
STUDY_LOCK = "study.lock"


class StudyError(Exception):
    """Something the user has to fix; the message says what and how."""


# -- the grid --------------------------------------------------------------------------


def split_values(text: str) -> List[str]:
    """``"1,4,[2.0,0.5,0.995]"`` -> ``["1", "4", "[2.0,0.5,0.995]"]``: commas inside
    brackets or quotes belong to the value."""
    values, depth, quote, current = [], 0, None, ""
    for char in text:
        if quote:
            quote = None if char == quote else quote
        elif char in "'\"":
            quote = char
        elif char in "[(":
            depth += 1
        elif char in "])":
            depth -= 1
        elif char == "," and depth == 0:
            values.append(current)
            current = ""
            continue
        current += char
    values.append(current)
    return [v.strip() for v in values]


def parse_assignment(spec: str, what: str) -> Tuple[str, str]:
    key, sep, value = spec.partition("=")
    key = key.strip()
    if not sep or not re.fullmatch(r"\+?[A-Za-z_][\w.]*", key) or not value.strip():
        raise StudyError(f"{what} {spec!r} is not KEY=VALUE (e.g. model.knn_k=1,4,8)")
    return key, value.strip()


def parse_grid(specs: Sequence[str]) -> List[Tuple[str, List[str]]]:
    """``["model.knn_k=1,4", "dataset.max_tokens=80000,160000"]`` -> keys with their values."""
    grid, seen = [], set()
    for spec in specs:
        key, text = parse_assignment(spec, "--grid")
        if key in seen:
            raise StudyError(f"--grid names {key} twice: give all its values in one --grid {key}=A,B,...")
        seen.add(key)
        values = split_values(text)
        if any(not v for v in values) or len(set(values)) != len(values):
            raise StudyError(f"--grid {spec!r}: empty or repeated values")
        grid.append((key, values))
    return grid


@dataclass(frozen=True)
class Point:
    config: str
    grid: Tuple[Tuple[str, str], ...]  # (key, value) in the order of the --grid options
    seed: int

    @property
    def grid_label(self) -> str:
        return " ".join(f"{k}={v}" for k, v in self.grid) or "-"

    @property
    def label(self) -> str:
        return f"{self.config} {self.grid_label} seed {self.seed}"

    def folder(self, out: Path) -> Path:
        # "knn_k-8_max_tokens-80000": hydra's override grammar allows no "=" or "," in
        # the unquoted hydra.run.dir value
        grid = "_".join(f"{k.lstrip('+').split('.')[-1]}-{v}" for k, v in self.grid) or "default"
        return out / "runs" / self.config / re.sub(r"[^\w.+-]", "_", grid) / f"seed{self.seed}"

    def overrides(self) -> List[str]:
        return [f"{k}={v}" for k, v in self.grid] + [f"common.seed={self.seed}"]


def expand(configs: Sequence[str], grid: Sequence[Tuple[str, List[str]]], seeds: Sequence[int]) -> List[Point]:
    """Every config x every combination of grid values x every seed."""
    keys = [k for k, _ in grid]
    combos = list(itertools.product(*[values for _, values in grid])) or [()]
    return [Point(c, tuple(zip(keys, combo)), s) for c in configs for combo in combos for s in seeds]


# -- running ---------------------------------------------------------------------------


def fairseq_hydra_train() -> str:
    """The fairseq-hydra-train of this Python environment (else the one on PATH)."""
    local = Path(sys.executable).parent / "fairseq-hydra-train"
    if local.is_file():
        return str(local)
    found = shutil.which("fairseq-hydra-train")
    if found is None:
        raise StudyError("fairseq-hydra-train is not installed: run `make install` (or pip install -e .)")
    return found


def train_command(config_dir: Path, config_name: str, run_dir: Path, overrides: Sequence[str]) -> List[str]:
    import fairseq_knnvq

    return [
        fairseq_hydra_train(),
        "--config-dir",
        str(config_dir),
        "--config-name",
        config_name,
        f"hydra.run.dir={run_dir}",
        f"checkpoint.save_dir={run_dir / 'checkpoints'}",
        f"common.user_dir={fairseq_knnvq.PLUGIN_DIR}",
        *overrides,
    ]


class Progress:
    """Progress lines with the time since the start, safe from several threads; keeps the
    running processes so that a failure or Ctrl-C can stop them."""

    def __init__(self, stream=None) -> None:
        self.start = time.monotonic()
        self.lock = threading.Lock()
        self.processes: set = set()
        self.stream = stream or sys.stdout
        # The signal that stops the study (set by forward_signal): no run starts after it.
        self.stopping: Optional[str] = None

    def elapsed(self) -> float:
        return time.monotonic() - self.start

    def __call__(self, message: str) -> None:
        minutes, seconds = divmod(int(self.elapsed()), 60)
        with self.lock:
            print(f"[{minutes:2d}:{seconds:02d}] {message}", file=self.stream, flush=True)

    def stop_all(self) -> None:
        with self.lock:
            for proc in list(self.processes):
                if proc.poll() is None:
                    proc.kill()

    def forward_signal(self, signum: int) -> None:
        """Passes SIGTERM / SIGUSR1 on to the running trainings, which finish their update,
        save ``checkpoint_last.pt`` and exit; no further run starts. A second signal
        kills them."""
        import signal

        if self.stopping is not None:
            self.stop_all()
            return
        self.stopping = signal.Signals(signum).name
        with self.lock:
            running = [proc for proc in self.processes if proc.poll() is None]
        for proc in running:
            proc.send_signal(signum)
        self(f"{self.stopping}: passed on to {len(running)} running training(s); they save and stop, no new run starts")


def run_training(
    cmd: Sequence[str],
    run_dir: Path,
    progress: Progress,
    threads: int = 1,
    on_record: Optional[Callable[[str, Dict[str, float]], None]] = None,
) -> int:
    """Runs one training command in ``run_dir`` (created), its output into
    ``run_dir/console.log``; ``on_record(kind, values)`` sees every JSON log record.
    Returns the exit code."""
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "command.txt").write_text(" ".join(cmd) + "\n", encoding="utf-8")
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    with open(run_dir / "console.log", "a", encoding="utf-8") as log:  # a resumed run adds to it
        proc = subprocess.Popen(
            list(cmd), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=run_dir
        )
        with progress.lock:
            progress.processes.add(proc)
        try:
            for line in proc.stdout:
                log.write(line)
                log.flush()  # console.log can be followed while the run trains
                if on_record is not None:
                    parsed = report.parse_log_line(line)
                    if parsed is not None:
                        on_record(*parsed)
            return proc.wait()
        except BaseException:
            proc.kill()
            proc.wait()
            raise
        finally:
            proc.stdout.close()
            with progress.lock:
                progress.processes.discard(proc)


def tail(path: Path, lines: int = 20) -> str:
    try:
        return "".join(path.read_text(encoding="utf-8", errors="replace").splitlines(True)[-lines:])
    except OSError:
        return ""


@dataclass
class Study:
    config_dir: Path
    configs: List[str]
    grid: List[Tuple[str, List[str]]]
    seeds: List[int]
    out: Path
    fixed: List[str]  # overrides for every run (task.data=..., ...)
    metrics: Sequence[str]
    jobs: int = 1
    threads: int = 1
    # How a point's training runs: run_training (here) or a study_launchers.SlurmLauncher
    launcher: Optional[Callable[..., int]] = None

    def points(self) -> List[Point]:
        return expand(self.configs, self.grid, self.seeds)

    def command(self, point: Point) -> List[str]:
        run_dir = point.folder(self.out)
        return train_command(self.config_dir, point.config, run_dir, [*self.fixed, *point.overrides()])

    def check(self) -> None:
        """Everything that can be checked before the first run starts."""
        missing = [c for c in self.configs if not (self.config_dir / f"{c}.yaml").is_file()]
        if missing:
            # <scale>_recipe.yaml files hold the settings the variants share; not listed
            found = preflight.variant_configs(self.config_dir)
            close = "".join(preflight.did_you_mean(name, found) for name in missing)
            raise StudyError(f"no config {', '.join(missing)} in {self.config_dir}{close} (there: {', '.join(found)})")
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise StudyError("--seeds needs distinct integers, e.g. --seeds 1,2,3")
        if self.jobs < 1 or self.threads < 1:
            raise StudyError("--jobs and --threads must be at least 1")
        if self.out.exists() and not self.out.is_dir():
            raise StudyError(f"--out {self.out} is a file: pass a folder")
        if self.out.is_dir() and any(self.out.iterdir()) and not (self.out / MARKER).is_file():
            raise StudyError(f"--out {self.out} is not empty and was not made by knnvq-study: pass a new folder")
        try:
            self.out.mkdir(parents=True, exist_ok=True)
            if not os.access(self.out, os.W_OK):
                raise PermissionError(errno.EACCES, "Permission denied")
            self.out_lock = FolderLock(
                self.out, STUDY_LOCK, "running knnvq-study into this --out", "Wait for it to end, or pass another --out"
            )
            self.out_lock.acquire()
            (self.out / MARKER).write_text("made by knnvq-study; a rerun skips the finished points\n")
        except FolderInUseError as error:
            raise StudyError(str(error)) from None
        except OSError as error:
            raise StudyError(
                f"--out {self.out} cannot be written ({error.strerror or error}): pass a folder "
                "you can write to, or fix its permissions"
            ) from None
        fairseq_hydra_train()

    def release(self) -> None:
        """Gives up ``--out`` (:meth:`check` takes it; the process's exit also does this)."""
        lock = getattr(self, "out_lock", None)
        if lock is not None:
            lock.release()

    def compose_check(self, progress: Progress) -> None:
        """Composes every config with the grid's first values (``--cfg job``): a key that
        hydra does not know stops the study here (with the nearest valid names), not after
        hours; then checks that the data folder holds every split the composed config
        reads (:meth:`check_data`)."""

        def compose(config: str) -> Tuple[str, subprocess.CompletedProcess]:
            point = Point(config, tuple((k, v[0]) for k, v in self.grid), self.seeds[0])
            cmd = self.command(point) + ["--cfg", "job"]
            return config, subprocess.run(
                cmd,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                cwd=self.out,
                env=dict(os.environ, OMP_NUM_THREADS="1"),
            )

        progress(f"checking that {len(self.configs)} config(s) compose with the grid's overrides")
        overrides = self.fixed + [k + "=" + v[0] for k, v in self.grid]
        with concurrent.futures.ThreadPoolExecutor(max_workers=self.jobs) as pool:
            for config, result in pool.map(compose, self.configs):
                if result.returncode != 0:
                    message = (result.stdout + result.stderr).strip().splitlines()
                    raise StudyError(
                        f"config {config} does not compose with {' '.join(overrides)}:\n"
                        + "\n".join(message[-8:])
                        + self.nearest_fields(config, overrides)
                    )
                self.check_data(config, result.stdout)

    def nearest_fields(self, config: str, overrides: Sequence[str]) -> str:
        """For a compose failure: the overrides whose field the config lacks, with the
        nearest valid names (knnvq-train's check), as extra lines of the message."""
        from .launch_checks import override_problems

        try:
            problems = override_problems(self.config_dir, config, overrides)
        except Exception:  # the check is a hint; hydra's message above stands alone
            return ""
        return "".join(f"\n{problem}" for problem in problems)

    def check_data(self, config: str, job_yaml: str) -> None:
        """The data folder of a composed config (``--cfg job`` output) holds the splits it
        reads: ``<split>.tsv`` manifests for the audio tasks, image folders or file lists
        for the image task."""
        import yaml

        from . import preflight

        try:
            job = yaml.safe_load(job_yaml)
        except yaml.YAMLError:
            return  # not a config printout; the runs report their own errors
        if not isinstance(job, dict):
            return
        task, dataset = job.get("task") or {}, job.get("dataset") or {}
        data = task.get("data")
        if not isinstance(data, str) or "${" in data:
            return
        splits = preflight.audio_splits_of(dataset)
        if task.get("_name") in preflight.AUDIO_TASKS:
            try:
                preflight.check_manifest_splits(Path(data), splits)
            except preflight.RunConfigError as error:
                raise StudyError(f"config {config}: {error}") from None
        elif task.get("_name") in IMAGE_TASKS:
            from .data.image_folder import find_split

            for names in splits.values():
                for split in names:
                    try:
                        find_split(data, split)
                    except FileNotFoundError as error:
                        raise StudyError(f"config {config}: {error}") from None

    def finished(self, point: Point) -> Optional[dict]:
        path = point.folder(self.out) / RESULT_FILE
        try:
            result = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        return result if result.get("command") == self.command(point) else None

    def run_point(self, point: Point, index: int, total: int, progress: Progress) -> dict:
        run_dir = point.folder(self.out)
        cmd = self.command(point)
        if progress.stopping:
            raise StudyError(f"[{index}/{total}] {point.label}: not started ({progress.stopping} received)")
        command_file = run_dir / "command.txt"
        if run_dir.exists() and not (
            command_file.is_file() and command_file.read_text(encoding="utf-8") == " ".join(cmd) + "\n"
        ):
            shutil.rmtree(run_dir)  # a run of another command: start again
        # A run of the same command (stopped by a signal, or failed) resumes from its
        # checkpoint_last.pt: fairseq's resume.
        started = time.monotonic()
        tag = f"[{index}/{total}] {point.label}"
        progress(f"{tag}: started (log {run_dir / 'console.log'})")
        code = (self.launcher or run_training)(cmd, run_dir, progress, self.threads)
        log = run_dir / "console.log"
        if code != 0:
            raise StudyError(f"{tag} failed (exit code {code}). Last lines of {log}:\n{tail(log)}")
        run = report.read_run(log, name=point.config)
        final = run.last_valid()
        if not final:
            raise StudyError(
                f"{tag}: the log {log} has no validation record (check dataset.valid_subset "
                "and that validation runs, e.g. at the end of training)"
            )
        result = {
            "config": point.config,
            "grid": dict(point.grid),
            "seed": point.seed,
            "valid_subset": run.default_valid_subset(),
            "metrics": final,
            "wall_seconds": round(time.monotonic() - started, 1),
            "command": cmd,
        }
        atomic_write_text(run_dir / RESULT_FILE, json.dumps(result, indent=2) + "\n")
        shown = "  ".join(f"{m} {report.format_value(final[m])}" for m in self.metrics if m in final)
        progress(f"{tag}: done in {result['wall_seconds']:.0f} s: {shown}")
        return result

    def run(self, progress: Progress) -> Tuple[List[dict], List[str]]:
        """Runs the unfinished points; returns every finished point's result and the
        failures' messages."""
        points = self.points()
        results: Dict[Point, dict] = {}
        todo = []
        for point in points:
            done = self.finished(point)
            if done is not None:
                results[point] = done
            else:
                todo.append(point)
        progress(
            f"{len(points)} runs: {len(points) - len(todo)} already finished, {len(todo)} to train, "
            f"{self.jobs} at a time, {self.threads} torch thread(s) each"
        )
        failures: List[str] = []
        with concurrent.futures.ThreadPoolExecutor(max_workers=self.jobs) as pool:
            futures = {pool.submit(self.run_point, p, i + 1, len(todo), progress): p for i, p in enumerate(todo)}
            try:
                for future in concurrent.futures.as_completed(futures):
                    try:
                        results[futures[future]] = future.result()
                    except StudyError as e:
                        failures.append(str(e))
                        progress(f"FAILED: {e}")
            except BaseException:
                for f in futures:
                    f.cancel()
                progress.stop_all()
                raise
        return [results[p] for p in points if p in results], failures


# -- summaries -------------------------------------------------------------------------


def _cell(value) -> str:
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)


def _csv(rows: Sequence[Sequence[object]]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    for row in rows:
        writer.writerow([_cell(v) for v in row])
    return buffer.getvalue()


def aggregate(results: Sequence[dict], grid_keys: Sequence[str], metrics: Sequence[str]) -> List[dict]:
    """Groups the runs by (config, grid values): per metric the mean, the sample standard
    deviation over seeds (0 with one seed) and the number of seeds that logged it."""
    groups: Dict[Tuple, List[dict]] = {}
    for result in results:
        key = (result["config"], *(result["grid"].get(k) for k in grid_keys))
        groups.setdefault(key, []).append(result)
    rows = []
    for key, members in groups.items():
        members = sorted(members, key=lambda m: m["seed"])
        row = {
            "config": key[0],
            "grid": dict(zip(grid_keys, key[1:])),
            "seeds": [m["seed"] for m in members],
            "verdicts": [verdict(m["metrics"]) for m in members],
        }
        for metric in metrics:
            values = [m["metrics"][metric] for m in members if metric in m["metrics"]]
            row[metric] = {
                "mean": statistics.fmean(values) if values else math.nan,
                "sd": statistics.stdev(values) if len(values) > 1 else 0.0,
                "n": len(values),
            }
        rows.append(row)
    return rows


def _format_mean_sd(metric: str, stats: dict) -> str:
    if not stats["n"]:
        return "-"
    digits = (
        1
        if metric in ("used_codes",)
        else 3
        if "usage" in metric or "tightness" in metric or metric == "accuracy"
        else 2
    )
    text = f"{stats['mean']:.{digits}f}"
    if stats["n"] > 1:
        text += f" ± {stats['sd']:.{digits}f}"
    return text


def seed_verdicts(verdicts: Sequence[str]) -> str:
    """The :func:`verdict` of each seed's run, in one cell: the verdict when all seeds
    agree, else each verdict with its count, most seeds first (``"full use, tight in 1 of
    2 seeds; partial use: 58 of 64 codes in 1 of 2 seeds"``)."""
    judged = [v for v in verdicts if v != "-"]
    if not judged:
        return "-"
    counts: Dict[str, int] = {}
    for words in judged:
        counts[words] = counts.get(words, 0) + 1
    if len(counts) == 1:
        return judged[0]
    ranked = sorted(counts.items(), key=lambda item: (-item[1], judged.index(item[0])))
    return "; ".join(f"{words} in {n} of {len(judged)} seeds" for words, n in ranked)


def markdown_summary(rows: Sequence[dict], grid_keys: Sequence[str], metrics: Sequence[str]) -> str:
    """The summary table; with usage among the metrics, a last column gives the
    :func:`verdict` of every seed's run (:func:`seed_verdicts`): a mean can hide a seed
    whose codebook collapsed."""
    judged = "code_usage" in metrics
    header = ["config", *grid_keys, "seeds", *metrics] + (["verdict (per seed)"] if judged else [])
    lines = [
        "| " + " | ".join(header) + " |",
        "|---|" + "---|" * len(grid_keys) + "---:|" * (len(metrics) + 1) + ("---|" if judged else ""),
    ]
    for row in rows:
        cells = [row["config"], *(str(row["grid"][k]) for k in grid_keys), str(len(row["seeds"]))]
        cells += [_format_mean_sd(m, row[m]) for m in metrics]
        if judged:
            cells.append(seed_verdicts(row["verdicts"]))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _as_number(value: str) -> Optional[float]:
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def write_config_plots(rows: Sequence[dict], metrics: Sequence[str], folder: Path) -> List[Path]:
    """``<metric>_by_config.png``: one point per row (config, and the grid values when
    there are any), the mean over seeds with the standard deviation as bars; for a
    study without a swept grid key."""
    plt = report.pyplot()
    written = []
    labels = [row["config"] + "".join(f"\n{k.split('.')[-1]}={v}" for k, v in row["grid"].items()) for row in rows]
    for metric in metrics:
        shown = [(i, row) for i, row in enumerate(rows) if row[metric]["n"]]
        if not shown:
            continue
        fig, ax = plt.subplots(figsize=(max(4.0, 1.2 * len(rows) + 2), 4.0))
        try:
            for i, row in shown:
                ax.errorbar(
                    [i],
                    [row[metric]["mean"]],
                    yerr=[row[metric]["sd"]],
                    marker="o",
                    capsize=4,
                    color=f"C{i % 10}",
                    linestyle="none",
                )
            ax.set_xticks(range(len(rows)))
            ax.set_xticklabels(labels, fontsize=8)
            ax.set_xlim(-0.5, len(rows) - 0.5)
            ax.set_ylabel(metric)
            ax.set_title(f"{metric} (final validation; mean ± sd over seeds)")
            ax.grid(alpha=0.3, axis="y")
            path = folder / f"{metric}_by_config.png"
            report.save_figure(fig, path)
            written.append(path)
        finally:
            plt.close(fig)
    return written


def write_plots(rows: Sequence[dict], grid_keys: Sequence[str], metrics: Sequence[str], folder: Path) -> List[Path]:
    """``<metric>_vs_<key>.png`` for every grid key with at least two values: one line per
    config and values of the other grid keys, the standard deviation over seeds as bars.
    Numeric values go on a numeric axis (log scale when they span a factor of 8 or more).
    Without such a key, :func:`write_config_plots` (one point per config)."""
    swept = [key for key in grid_keys if len({row["grid"][key] for row in rows}) >= 2]
    if not swept:
        return write_config_plots(rows, metrics, folder)
    plt = report.pyplot()
    written = []
    for key in grid_keys:
        values = list(dict.fromkeys(row["grid"][key] for row in rows))
        if len(values) < 2:
            continue
        numeric = all(_as_number(v) is not None for v in values)
        others = [k for k in grid_keys if k != key]
        lines: Dict[Tuple, List[dict]] = {}
        for row in rows:
            lines.setdefault((row["config"], *(row["grid"][k] for k in others)), []).append(row)
        for metric in metrics:
            fig, ax = plt.subplots(figsize=(6.4, 4.0))
            drawn = False
            try:
                for i, (line_key, members) in enumerate(lines.items()):
                    members = [m for m in members if m[metric]["n"]]
                    if numeric:
                        members.sort(key=lambda m: _as_number(m["grid"][key]))
                        xs = [_as_number(m["grid"][key]) for m in members]
                    else:
                        xs = [values.index(m["grid"][key]) for m in members]
                    if not xs:
                        continue
                    label = line_key[0] + "".join(f", {k.split('.')[-1]}={v}" for k, v in zip(others, line_key[1:]))
                    ax.errorbar(
                        xs,
                        [m[metric]["mean"] for m in members],
                        yerr=[m[metric]["sd"] for m in members],
                        marker="o",
                        capsize=3,
                        color=f"C{i % 10}",
                        label=label,
                    )
                    drawn = True
                if not drawn:
                    continue
                if numeric:
                    nums = [_as_number(v) for v in values]
                    if min(nums) > 0 and max(nums) / min(nums) >= 8:
                        ax.set_xscale("log")
                    ax.set_xticks(sorted(nums))
                    ax.set_xticklabels([v for _, v in sorted(zip(nums, values))])
                else:
                    ax.set_xticks(range(len(values)))
                    ax.set_xticklabels(values)
                ax.set_xlabel(key)
                ax.set_ylabel(metric)
                ax.set_title(f"{metric} (final validation; mean ± sd over seeds)")
                ax.grid(alpha=0.3)
                ax.legend(fontsize=7)
                path = folder / f"{metric}_vs_{key.lstrip('+').replace('.', '_')}.png"
                report.save_figure(fig, path)
                written.append(path)
            finally:
                plt.close(fig)
    return written


def write_summaries(
    results: Sequence[dict],
    grid_keys: Sequence[str],
    metrics: Sequence[str],
    out: Path,
    written: Optional[List[Path]] = None,
) -> str:
    """runs.csv, summary.csv, summary.md and plots/; returns the Markdown table. The
    paths of the files written are appended to ``written`` when given."""
    runs_rows = [["config", *grid_keys, "seed", *metrics]]
    for r in results:
        runs_rows.append(
            [
                r["config"],
                *(r["grid"].get(k, "") for k in grid_keys),
                r["seed"],
                *(r["metrics"].get(m, "") for m in metrics),
            ]
        )
    atomic_write_text(out / "runs.csv", _csv(runs_rows))
    rows = aggregate(results, grid_keys, metrics)
    summary_rows = [["config", *grid_keys, "seeds", *(f"{m}_{s}" for m in metrics for s in ("mean", "sd"))]]
    for row in rows:
        summary_rows.append(
            [
                row["config"],
                *(row["grid"][k] for k in grid_keys),
                len(row["seeds"]),
                *(row[m][s] for m in metrics for s in ("mean", "sd")),
            ]
        )
    atomic_write_text(out / "summary.csv", _csv(summary_rows))
    table = markdown_summary(rows, grid_keys, metrics)
    atomic_write_text(out / "summary.md", table)
    plots = write_plots(rows, grid_keys, metrics, out / "plots")
    if written is not None:
        written += [out / "runs.csv", out / "summary.csv", out / "summary.md", *plots]
    return table
