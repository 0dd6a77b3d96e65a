"""Reading fairseq's JSON training logs, plotting and tabulating them: the library of
``knnvq-report curves`` (the command line is :mod:`fairseq_knnvq.cli.report`), also used
by :mod:`fairseq_knnvq.study`; ``knnvq-report codes`` is :mod:`fairseq_knnvq.code_histograms`.

A run is a log file or a hydra run folder (``hydra_train.log`` is what
``fairseq-hydra-train`` writes there; a captured stdout works too). fairseq logs three
kinds of JSON records, told apart by the logger name: ``train_inner`` (every
``log_interval`` updates), ``train`` (end of epoch, keys ``train_*``) and one per
validation subset (``valid``: keys ``valid_*``). Curves show ``train_inner`` as solid
lines and validation as dashed lines with markers; the table has the last record of
each.

Every file is written through :mod:`fairseq_knnvq.files`, so an interrupted report never
leaves a half-written PNG or table behind.
"""

from __future__ import annotations

import json
import logging
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

from .files import atomic_path, atomic_write_text

# Metrics plotted by default, in this order, with the axis label of each. The code
# metrics are those of fairseq_knnvq.criterions.usage_logging (pooled over the log interval
# or the whole validation subset) and of fairseq's quantizer (per batch).
DEFAULT_METRICS: Dict[str, str] = {
    "code_usage": "code usage (share of entries chosen)",
    "used_codes": "entries chosen at least once",
    "pooled_code_perplexity": "code perplexity (hard, pooled)",
    "pooled_prob_perplexity": "prob perplexity (soft, pooled)",
    "code_perplexity": "code perplexity (hard, per batch)",
    "prob_perplexity": "prob perplexity (soft, per batch)",
    "tightness_max_prob": "tightness: mean max_m p",
    "tightness_vertex_l2": "tightness: L2 to nearest vertex",
    "knn_loss": "KNN vertex loss",
    "diversity_loss": "diversity loss",
    "temp": "Gumbel temperature",
    "loss": "loss (bits)",
    "accuracy": "contrastive accuracy",
    "psnr": "PSNR (dB)",
    "wer": "WER (%)",
    "uer": "UER (%)",
}
# hydra: "[2026-01-01 10:00:00,000][train_inner][INFO] - {...}"
_HYDRA_PREFIX = re.compile(r"\]\[([^\[\]]+)\]\[[A-Z]+\] - $")
# fairseq-train: "2026-01-01 10:00:00 | INFO | train_inner | {...}"
_PLAIN_PREFIX = re.compile(r"\|\s*([^|\s]+)\s*\|\s*$")
LOG_FILE_NAMES = ("hydra_train.log", "train.log")


class ReportError(Exception):
    """A problem with the input that the user has to fix; the message says how."""


@dataclass
class RunLog:
    """The JSON records of one training run, values as floats."""

    name: str
    path: Path
    train_inner: List[Dict[str, float]] = field(default_factory=list)
    train: List[Dict[str, float]] = field(default_factory=list)
    # subset name ("valid", "dev_other", ...) -> records, keys without the subset prefix
    valid: Dict[str, List[Dict[str, float]]] = field(default_factory=dict)

    def has_records(self) -> bool:
        return bool(self.train_inner or self.train or self.valid)

    def last_train_inner(self) -> Dict[str, float]:
        return self.train_inner[-1] if self.train_inner else {}

    def last_valid(self, subset: Optional[str] = None) -> Dict[str, float]:
        subset = subset or self.default_valid_subset()
        records = self.valid.get(subset or "", [])
        return records[-1] if records else {}

    def default_valid_subset(self) -> Optional[str]:
        if "valid" in self.valid:
            return "valid"
        return next(iter(self.valid), None)


def _numeric(value) -> Optional[float]:
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return None
    return None


def _logger_name(prefix: str) -> Optional[str]:
    for pattern in (_HYDRA_PREFIX, _PLAIN_PREFIX):
        match = pattern.search(prefix)
        if match:
            return match.group(1)
    return None


def _strip_prefix(record: Mapping[str, object], tag: str) -> Dict[str, object]:
    head = tag + "_"
    return {(k[len(head) :] if k.startswith(head) else k): v for k, v in record.items()}


def parse_log_line(line: str) -> Optional[Tuple[str, Dict[str, float]]]:
    """``(kind, values)`` of one fairseq JSON log line, else None. ``kind`` is
    ``train_inner``, ``train`` or the validation subset; the values are floats, keys
    without the ``<kind>_`` prefix of tagged records."""
    start = line.find("{")
    if start < 0:
        return None
    try:
        record = json.loads(line[start:].strip())
    except ValueError:
        return None  # e.g. the config dump, which is a Python repr, not JSON
    if not isinstance(record, dict):
        return None
    tag = _logger_name(line[:start])
    if tag is None:  # bare JSON lines: tell the kinds apart by their keys
        if any(k.startswith("train_") for k in record):
            tag = "train"
        elif "num_updates" in record:
            tag = "train_inner"
        else:
            tag = next((k[: -len("_num_updates")] for k in record if k.endswith("_num_updates")), None)
    if tag is None:
        return None
    if tag == "train_inner":
        values = record
    elif any(k.startswith(tag + "_") for k in record):
        values = _strip_prefix(record, tag)
    else:
        return None  # some other JSON the program logged
    return tag, {k: v for k, v in ((k, _numeric(v)) for k, v in values.items()) if v is not None}


def parse_log_lines(lines: Iterable[str], name: str = "run", path: Path = Path("-")) -> RunLog:
    """Reads fairseq's JSON records from log lines; other lines are ignored.

    When the update count goes backwards (a second, fresh run appended to the same
    log), only the last run is kept, since hydra appends to ``hydra_train.log``."""
    run = RunLog(name=name, path=path)
    last_update = -math.inf
    for line in lines:
        parsed = parse_log_line(line)
        if parsed is None:
            continue
        tag, numeric = parsed
        update = numeric.get("num_updates")
        if update is not None:
            if update < last_update and tag == "train_inner":
                run.train_inner, run.train, run.valid = [], [], {}
            last_update = update
        if tag == "train_inner":
            run.train_inner.append(numeric)
        elif tag == "train":
            run.train.append(numeric)
        else:
            run.valid.setdefault(tag, []).append(numeric)
    return run


def find_log_file(path: Path) -> Path:
    """A log file, or the log of a hydra run folder."""
    if path.is_file():
        return path
    if path.is_dir():
        for file_name in LOG_FILE_NAMES:
            if (path / file_name).is_file():
                return path / file_name
        logs = sorted(path.glob("*.log"))
        if len(logs) == 1:
            return logs[0]
        raise ReportError(
            f"{path} is a folder without {' or '.join(LOG_FILE_NAMES)}"
            + (f" and with several .log files ({', '.join(p.name for p in logs)}); name one" if logs else "")
            + ". Pass the log file itself, or the hydra run folder (hydra.run.dir) of the training run."
        )
    raise ReportError(f"{path} does not exist: pass a fairseq log file or a hydra run folder")


def read_run(path: Path, name: Optional[str] = None) -> RunLog:
    log_file = find_log_file(Path(path))
    with open(log_file, encoding="utf-8", errors="replace") as f:
        run = parse_log_lines(f, name=name or _default_name(Path(path)), path=log_file)
    if not run.has_records():
        raise ReportError(
            f"{log_file} has no fairseq JSON records: train with common.log_format=json "
            "(and a common.log_interval smaller than the number of updates)"
        )
    return run


def _default_name(path: Path) -> str:
    path = path.resolve()
    return path.parent.name if path.is_file() and path.name in LOG_FILE_NAMES else path.stem or path.name


def metrics_to_plot(runs: Sequence[RunLog], requested: Optional[Sequence[str]] = None) -> List[str]:
    """The requested metrics (default :data:`DEFAULT_METRICS`) that at least one run
    logged. fairseq's ``loss_0``, ``loss_1``, ... are left out by default: the wav2vec
    criterion numbers only the terms a run trains, so ``loss_1`` of one variant can be
    another term than ``loss_1`` of the next."""
    present = set()
    for run in runs:
        for record in run.train_inner + [r for rs in run.valid.values() for r in rs]:
            present.update(record)
    if requested:
        return [m for m in requested if m in present]
    return [m for m in DEFAULT_METRICS if m in present]


def _series(records: Sequence[Mapping[str, float]], metric: str) -> Tuple[List[float], List[float]]:
    xs, ys = [], []
    for i, record in enumerate(records):
        if metric in record and math.isfinite(record[metric]):
            xs.append(record.get("num_updates", float(i + 1)))
            ys.append(record[metric])
    return xs, ys


# ---------------------------------------------------------------------------- output


def pyplot():
    # fairseq may have set the root logger to DEBUG; matplotlib's start-up and font
    # search are noise there.
    logging.getLogger("matplotlib").setLevel(logging.WARNING)
    try:
        import matplotlib
    except ImportError:
        raise ReportError(
            "knnvq-report needs matplotlib for its plots: pip install 'fairseq-knnvq[plots]' "
            "(or pip install matplotlib)"
        ) from None
    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: Path) -> None:
    with atomic_path(path) as partial:
        fig.savefig(partial, format="png", dpi=110, bbox_inches="tight")


def plot_metric(runs: Sequence[RunLog], metric: str, path: Path) -> bool:
    """One PNG: ``metric`` over updates, one colour per run. False when no run has it."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    drawn = False
    try:
        for i, run in enumerate(runs):
            color = f"C{i % 10}"
            xs, ys = _series(run.train_inner, metric)
            if xs:
                ax.plot(xs, ys, color=color, linewidth=1.6, label=f"{run.name} (train)")
                drawn = True
            for j, (subset, records) in enumerate(run.valid.items()):
                xs, ys = _series(records, metric)
                if xs:
                    ax.plot(
                        xs,
                        ys,
                        color=color,
                        linestyle=("--", ":", "-.")[j % 3],
                        marker="o",
                        markersize=4,
                        linewidth=1.2,
                        label=f"{run.name} ({subset})",
                    )
                    drawn = True
        if drawn:
            ax.set_xlabel("update")
            ax.set_ylabel(DEFAULT_METRICS.get(metric, metric))
            ax.set_title(metric)
            ax.grid(True, alpha=0.3)
            ax.legend(fontsize="small")
            save_figure(fig, path)
    finally:
        plt.close(fig)
    return drawn


def format_value(value: Optional[float]) -> str:
    if value is None:
        return "-"
    if math.isnan(value):
        return "nan"
    if float(value).is_integer() and abs(value) < 1e15:
        return str(int(value))
    return f"{value:.4g}"


def final_values(runs: Sequence[RunLog], metrics: Sequence[str]) -> Dict[str, Dict[str, Dict[str, float]]]:
    """``{run: {"train": {...}, "valid": {...}}}``: the last ``train_inner`` record and the
    last record of the validation subset (``valid`` if present), ``metrics`` plus the
    update number."""
    out = {}
    for run in runs:
        entry = {}
        for kind, record in (("train", run.last_train_inner()), ("valid", run.last_valid())):
            keep = {k: record[k] for k in ["num_updates", *metrics] if k in record}
            if keep:
                entry[kind] = keep
        out[run.name] = entry
    return out


def markdown_table(runs: Sequence[RunLog], metrics: Sequence[str]) -> str:
    """Rows = metrics, columns = runs; one table for the last training record and one
    for the last validation record."""
    finals = final_values(runs, metrics)
    lines = ["# Final values", ""]
    lines += [f"- `{run.name}`: {run.path}" for run in runs]
    for kind, title in (("train", "Last training record (`train_inner`)"), ("valid", "Last validation record")):
        if not any(kind in finals[run.name] for run in runs):
            continue
        rows = [m for m in ["num_updates", *metrics] if any(m in finals[r.name].get(kind, {}) for r in runs)]
        subsets = sorted({r.default_valid_subset() for r in runs if r.valid})
        if kind == "valid" and subsets:
            title += f" (subset {', '.join(f'`{s}`' for s in subsets)})"
        lines += ["", f"## {title}", ""]
        lines.append("| metric | " + " | ".join(run.name for run in runs) + " |")
        lines.append("|---|" + "---:|" * len(runs))
        for metric in rows:
            label = "update" if metric == "num_updates" else metric
            cells = [format_value(finals[run.name].get(kind, {}).get(metric)) for run in runs]
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_curves_report(runs: Sequence[RunLog], out: Path, metrics: Optional[Sequence[str]] = None) -> Dict[str, Path]:
    """Writes ``<metric>.png`` for every metric some run logged, ``final_values.md`` and
    ``final_values.json`` under ``out``; returns the written files by name."""
    names = [run.name for run in runs]
    if len(set(names)) != len(names):
        raise ReportError(f"run names must differ, got {names}: pass one --name per run")
    chosen = metrics_to_plot(runs, metrics)
    if not chosen:
        wanted = ", ".join(metrics or DEFAULT_METRICS)
        raise ReportError(f"none of the runs logged any of: {wanted}")
    out = Path(out)
    written: Dict[str, Path] = {}
    for metric in chosen:
        path = out / f"{metric}.png"
        if plot_metric(runs, metric, path):
            written[path.name] = path
    atomic_write_text(out / "final_values.md", markdown_table(runs, chosen))
    atomic_write_text(out / "final_values.json", json.dumps(final_values(runs, chosen), indent=2) + "\n")
    written["final_values.md"] = out / "final_values.md"
    written["final_values.json"] = out / "final_values.json"
    return written
