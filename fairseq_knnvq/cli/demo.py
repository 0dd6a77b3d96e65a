"""``python -m fairseq_knnvq.cli.demo`` (what ``make demo`` runs): the whole story on a CPU.

On the shipped tiny corpus (``examples/tiny_corpus/LibriSpeech``) it

1. writes the fairseq data: manifests and letter labels (``knnvq-prepare-librispeech``);
2. pretrains wav2vec 2.0 twice with ``fairseq-hydra-train``: ``tiny_knn_ce`` (the KNN
   vertex regulariser) and ``tiny_diversity`` (stock wav2vec 2.0's diversity loss);
3. fine-tunes both with CTC on letters (``configs/finetuning/tiny.yaml``);
4. decodes the test split (``knnvq-infer``, greedy CTC) and scores the WER;
5. counts the codes that each pretrained quantizer picks on the test split and plots
   the training curves (``knnvq-report``);
6. prints one table: per variant the code usage, code perplexity and tightness of the
   pretrained quantizer on the test split, and the test WER after fine-tuning.

Everything is written under ``--out`` (default ``demo_out``)::

    data/                       manifests, labels, dictionary
    pretrain/<variant>/         hydra run folder: hydra_train.log, checkpoints/
    finetune/<variant>/         the same for fine-tuning
    decode/<variant>/           hypotheses, references and the WER
    report/                     PNG curves, final-value tables, code histograms
    summary.md, summary.json    the table

The summary files are written last, each at once (temporary file, then rename). A
second run into the same folder starts afresh. ``--quick`` trains for a few updates
only (a smoke test of the pipeline; its numbers mean nothing).
"""
from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import json
import logging
import os
import shutil
import subprocess
import sys
import threading
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from . import report

import fairseq_knnvq

REPO_ROOT = Path(fairseq_knnvq.PLUGIN_DIR).parent
DEFAULT_CORPUS = REPO_ROOT / "examples" / "tiny_corpus" / "LibriSpeech"
DEFAULT_CONFIGS = REPO_ROOT / "configs"
VARIANTS = ("tiny_knn_ce", "tiny_diversity")
FINETUNE_CONFIG = "tiny"
SPLITS = {"train": "train", "dev": "dev", "test": "test"}  # fairseq subset name -> corpus folder
# Marks a folder as the demo's own, so that a rerun may clear it.
MARKER = ".knnvq-demo"
QUICK_UPDATES = {"pretrain": 8, "finetune": 8}
MIN_FINETUNE_UPDATES = 4


class DemoError(Exception):
    """Something the user has to fix; the message says what and how."""


class Progress:
    """Progress lines with the time since the demo started (from several threads), and
    the training processes running, so that a failure or Ctrl-C stops all of them."""

    def __init__(self) -> None:
        self.start = time.monotonic()
        self.lock = threading.Lock()
        self.processes: set = set()

    def elapsed(self) -> float:
        return time.monotonic() - self.start

    def __call__(self, message: str) -> None:
        minutes, seconds = divmod(int(self.elapsed()), 60)
        with self.lock:
            print(f"[{minutes:2d}:{seconds:02d}] {message}", flush=True)

    def stop_all(self) -> None:
        with self.lock:
            for proc in list(self.processes):
                if proc.poll() is None:
                    proc.kill()


@dataclass
class Variant:
    name: str
    pretrain_dir: Path
    finetune_dir: Path
    decode_dir: Path

    @property
    def pretrained_checkpoint(self) -> Path:
        return self.pretrain_dir / "checkpoints" / "checkpoint_last.pt"

    @property
    def finetuned_checkpoint(self) -> Path:
        return self.finetune_dir / "checkpoints" / "checkpoint_best.pt"


def _fairseq_hydra_train() -> str:
    """The fairseq-hydra-train of this Python environment (else the one on PATH)."""
    local = Path(sys.executable).parent / "fairseq-hydra-train"
    if local.is_file():
        return str(local)
    found = shutil.which("fairseq-hydra-train")
    if found is None:
        raise DemoError("fairseq-hydra-train is not installed: run `make install` (or pip install -e .)")
    return found


def _tail(path: Path, lines: int = 25) -> str:
    try:
        return "".join(path.read_text(encoding="utf-8", errors="replace").splitlines(True)[-lines:])
    except OSError:
        return ""


def _summary_of(values: Dict[str, float], keys: Sequence[str]) -> str:
    parts = []
    for key in keys:
        if key in values:
            parts.append(f"{key} {report._format_value(values[key])}")
    return "  ".join(parts)


def train(
    config_dir: Path,
    config_name: str,
    run_dir: Path,
    overrides: Sequence[str],
    label: str,
    max_update: int,
    progress: Progress,
    shown_keys: Sequence[str],
    threads: int,
) -> report.RunLog:
    """Runs ``fairseq-hydra-train`` in ``run_dir``, shows progress from its JSON log
    lines and returns the parsed log. The console output goes to ``run_dir/console.log``."""
    run_dir.mkdir(parents=True)
    cmd = [
        _fairseq_hydra_train(),
        "--config-dir", str(config_dir),
        "--config-name", config_name,
        f"hydra.run.dir={run_dir}",
        f"checkpoint.save_dir={run_dir / 'checkpoints'}",
        f"common.user_dir={fairseq_knnvq.PLUGIN_DIR}",
        *overrides,
    ]
    (run_dir / "command.txt").write_text(" ".join(cmd) + "\n", encoding="utf-8")
    console = run_dir / "console.log"
    every = max(1, max_update // 10)
    # torch's intra-op threads: the cores shared among the runs at the same time.
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    progress(f"{label}: fairseq-hydra-train --config-name {config_name} ({max_update} updates), log {console}")
    with open(console, "w", encoding="utf-8") as log:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                env=env, cwd=run_dir)
        with progress.lock:
            progress.processes.add(proc)
        try:
            for line in proc.stdout:
                log.write(line)
                parsed = report.parse_log_line(line)
                if parsed is None:
                    continue
                kind, values = parsed
                update = int(values.get("num_updates", 0))
                if kind == "train_inner" and update % every == 0:
                    progress(f"  {label}: update {update}/{max_update}  {_summary_of(values, shown_keys)}")
                elif kind not in ("train_inner", "train"):
                    progress(f"  {label}: {kind} at update {update}  {_summary_of(values, shown_keys)}")
            code = proc.wait()
        except BaseException:
            proc.kill()
            proc.wait()
            raise
        finally:
            with progress.lock:
                progress.processes.discard(proc)
    if code != 0:
        raise DemoError(
            f"{label} failed (exit code {code}). Last lines of {console}:\n{_tail(console)}"
        )
    return report.read_run(run_dir, name=label.split()[-1])


def prepare_data(corpus: Path, data_dir: Path, progress: Progress) -> None:
    from . import prepare_librispeech

    missing = [folder for folder in SPLITS.values() if not (corpus / folder).is_dir()]
    if missing:
        raise DemoError(
            f"the tiny corpus is not at {corpus} (no {', '.join(missing)} folder). Run the demo "
            "from a clone of the repository (it ships examples/tiny_corpus/LibriSpeech), pass "
            "--corpus DIR (a LibriSpeech-layout folder with train/, dev/ and test/), or rebuild it "
            "with `python examples/tiny_corpus/make_corpus.py` (needs espeak-ng and sox)."
        )
    argv = [str(corpus), "--dest", str(data_dir)]
    for subset, folder in SPLITS.items():
        argv += ["--split", f"{subset}={folder}"]
    progress(f"data: knnvq-prepare-librispeech {corpus} -> {data_dir}")
    try:
        with quiet(data_dir.parent / "logs" / "prepare_data.log"):
            prepare_librispeech.main(argv)
    except SystemExit as e:
        if e.code not in (None, 0):
            raise DemoError(str(e)) from None


@contextlib.contextmanager
def quiet(log_file: Path):
    """Runs an in-process step with its prints, warnings and INFO logging sent to
    ``log_file`` instead of the console, so that the console shows the progress lines."""
    log_file.parent.mkdir(parents=True, exist_ok=True)
    root = logging.getLogger()
    old_level = root.level
    handler = logging.FileHandler(log_file, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s | %(levelname)s | %(name)s | %(message)s"))
    console_handlers = [h for h in root.handlers if isinstance(h, logging.StreamHandler)
                        and not isinstance(h, logging.FileHandler)]
    old_handler_levels = [h.level for h in console_handlers]
    with open(log_file, "a", encoding="utf-8") as stream, contextlib.redirect_stdout(stream), \
            contextlib.redirect_stderr(stream), warnings.catch_warnings():
        warnings.simplefilter("always")  # shown, but in the log file (stderr is redirected)
        root.addHandler(handler)
        root.setLevel(logging.INFO)
        for h in console_handlers:
            h.setLevel(logging.WARNING)
        try:
            yield
        finally:
            root.removeHandler(handler)
            handler.close()
            root.setLevel(old_level)
            for h, level in zip(console_handlers, old_handler_levels):
                h.setLevel(level)


def decode(variant: Variant, data_dir: Path, progress: Progress) -> Dict[str, object]:
    """Greedy CTC decoding of the test split with ``knnvq-infer``; returns its summary."""
    from . import infer_ctc

    checkpoint = variant.finetuned_checkpoint
    progress(f"decode {variant.name}: knnvq-infer {checkpoint.name} --subset test")
    argv = [str(checkpoint), "--data", str(data_dir), "--subset", "test",
            "--output-dir", str(variant.decode_dir), "--cpu", "--no-progress"]
    log_file = variant.decode_dir / "infer.log"
    try:
        with quiet(log_file):
            infer_ctc.main(argv)
    except SystemExit as e:
        if e.code not in (None, 0):
            raise DemoError(f"decoding {variant.name} failed: {e} (log: {log_file})") from None
    result = json.loads((variant.decode_dir / "wer.test.json").read_text(encoding="utf-8"))
    progress(f"  decode {variant.name}: test WER {result['wer']:.2f}% "
             f"({result['num_word_errors']}/{result['num_words']} words), CER {result['cer']:.2f}%")
    return result


def fresh_output_folder(out: Path) -> None:
    """Creates ``out``; clears it first if an earlier demo made it."""
    if out.exists():
        if not out.is_dir():
            raise DemoError(f"--out {out} is a file: pass a folder")
        if any(out.iterdir()):
            if not (out / MARKER).is_file():
                raise DemoError(
                    f"--out {out} is not empty and was not made by the demo: pass a new or empty folder"
                )
            shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / MARKER).write_text("made by python -m fairseq_knnvq.cli.demo; a rerun clears this folder\n")


SUMMARY_COLUMNS = [
    ("variant", "variant"),
    ("code_usage", "code usage"),
    ("code_perplexity", "code perplexity"),
    ("tightness_max_prob", "tightness (mean max p)"),
    ("test_wer", "test WER (%)"),
    ("test_cer", "test CER (%)"),
]


def summary_table(rows: Sequence[Dict[str, object]]) -> str:
    def cell(key: str, value) -> str:
        if key == "code_usage":
            return f"{value['usage']:.3f} ({int(value['used_entries'])}/{int(value['num_entries'])})"
        if isinstance(value, (int, float)):
            return f"{value:.2f}" if key != "tightness_max_prob" else f"{value:.3f}"
        return str(value)

    lines = ["| " + " | ".join(title for _, title in SUMMARY_COLUMNS) + " |",
             "|---|" + "---:|" * (len(SUMMARY_COLUMNS) - 1)]
    for row in rows:
        lines.append("| " + " | ".join(cell(key, row[key]) for key, _ in SUMMARY_COLUMNS) + " |")
    return "\n".join(lines) + "\n"


def run_demo(args: argparse.Namespace) -> Dict[str, object]:
    progress = Progress()
    out = args.out.resolve()
    corpus = args.corpus.resolve()
    config_dir = args.config_dir.resolve()
    for needed in [config_dir / "pretraining" / f"{v}.yaml" for v in args.variants] + [
        config_dir / "finetuning" / f"{FINETUNE_CONFIG}.yaml"
    ]:
        if not needed.is_file():
            raise DemoError(f"config {needed} is missing: run from a clone of the repository or pass --config-dir")
    if args.finetune_updates is not None and args.finetune_updates < MIN_FINETUNE_UPDATES:
        # fairseq's tri_stage schedule divides by its decay steps, int(0.3 * updates)
        raise DemoError(
            f"--finetune-updates must be at least {MIN_FINETUNE_UPDATES} (the tri-stage "
            f"learning-rate schedule of configs/finetuning/{FINETUNE_CONFIG}.yaml needs a decay phase)"
        )
    fresh_output_folder(out)
    data_dir = out / "data"
    prepare_data(corpus, data_dir, progress)

    pretrain_updates, finetune_updates = args.pretrain_updates, args.finetune_updates
    if args.quick:
        pretrain_updates = pretrain_updates or QUICK_UPDATES["pretrain"]
        finetune_updates = finetune_updates or QUICK_UPDATES["finetune"]
    variants = [Variant(v, out / "pretrain" / v, out / "finetune" / v, out / "decode" / v) for v in args.variants]

    jobs = max(1, min(args.jobs, len(variants)))
    threads = max(1, (os.cpu_count() or 1) // jobs)

    def pretrain_and_finetune(variant: Variant):
        overrides = [f"task.data={data_dir}", "dataset.valid_subset=dev"]
        if pretrain_updates is not None:
            overrides.append(f"optimization.max_update={pretrain_updates}")
        max_update = pretrain_updates or _config_max_update(config_dir / "pretraining" / f"{variant.name}.yaml")
        overrides.append(f"common.log_interval={max(1, max_update // 50)}")
        pretrain_log = train(
            config_dir / "pretraining", variant.name, variant.pretrain_dir, overrides,
            f"pretrain {variant.name}", max_update, progress,
            ("loss", "code_usage", "pooled_code_perplexity", "tightness_max_prob", "temp"), threads,
        )
        overrides = [f"task.data={data_dir}", f"model.w2v_path={variant.pretrained_checkpoint}"]
        if finetune_updates is not None:
            overrides.append(f"optimization.max_update={finetune_updates}")
        max_update = finetune_updates or _config_max_update(config_dir / "finetuning" / f"{FINETUNE_CONFIG}.yaml")
        overrides.append(f"common.log_interval={max(1, max_update // 50)}")
        finetune_log = train(
            config_dir / "finetuning", FINETUNE_CONFIG, variant.finetune_dir, overrides,
            f"finetune {variant.name}", max_update, progress, ("loss", "wer", "uer"), threads,
        )
        return pretrain_log, finetune_log

    if jobs > 1:
        progress(f"{jobs} variants at a time, {threads} torch thread(s) each")
    with concurrent.futures.ThreadPoolExecutor(max_workers=jobs) as pool:
        futures = [pool.submit(pretrain_and_finetune, v) for v in variants]
        try:
            concurrent.futures.wait(futures, return_when=concurrent.futures.FIRST_EXCEPTION)
            failed = [f for f in futures if f.done() and not f.cancelled() and f.exception()]
            if failed:
                raise failed[0].exception()
            results = [f.result() for f in futures]
        except BaseException:
            for f in futures:
                f.cancel()
            progress.stop_all()  # the other variant's run, if any: the demo has failed
            raise
    pretrain_logs = [r[0] for r in results]
    finetune_logs = [r[1] for r in results]

    wers = {variant.name: decode(variant, data_dir, progress) for variant in variants}

    report_dir = out / "report"
    progress(f"report: curves and code histograms -> {report_dir}")
    codes = {}
    with quiet(out / "logs" / "report.log"):
        report.write_curves_report(pretrain_logs, report_dir / "pretraining")
        report.write_curves_report(finetune_logs, report_dir / "finetuning")
        for variant in variants:
            codes[variant.name] = report.write_code_report(
                variant.pretrained_checkpoint, data_dir / "test.tsv", report_dir, name=variant.name
            )

    rows = []
    for variant, pre_log in zip(variants, pretrain_logs):
        stats = codes[variant.name]["stats"]
        rows.append({
            "variant": variant.name,
            "code_usage": {k: stats[k] for k in ("usage", "used_entries", "num_entries")},
            "code_perplexity": stats["code_perplexity"],
            "tightness_max_prob": stats.get("tightness_max_prob", float("nan")),
            "test_wer": wers[variant.name]["wer"],
            "test_cer": wers[variant.name]["cer"],
        })
    table = summary_table(rows)
    elapsed = progress.elapsed()
    summary = {
        "quick": bool(args.quick),
        "pretrain_updates": pretrain_updates,
        "finetune_updates": finetune_updates,
        "wall_seconds": round(elapsed, 1),
        "rows": rows,
        "code_counts": {name: {k: v for k, v in c.items() if k != "counts"} for name, c in codes.items()},
        "decoding": wers,
        "pretraining_final": report.final_values(pretrain_logs, report.metrics_to_plot(pretrain_logs)),
        "finetuning_final": report.final_values(finetune_logs, report.metrics_to_plot(finetune_logs)),
    }
    markdown = (
        "# Demo summary\n\n"
        "Code usage, code perplexity and tightness: the pretrained quantizer on the test split "
        "(hard argmax codes, eval mode); test WER and CER: greedy CTC decoding after fine-tuning.\n\n"
        + table
        + f"\n{'Quick run (a smoke test: too few updates to mean anything). ' if args.quick else ''}"
        f"Wall time {elapsed / 60:.1f} min. Plots: report/.\n"
    )
    report.write_text(out / "summary.json", json.dumps(summary, indent=2) + "\n")
    report.write_text(out / "summary.md", markdown)
    progress(f"done in {elapsed / 60:.1f} min; summary {out / 'summary.md'}")
    print()
    print(table, flush=True)
    return summary


def _config_max_update(path: Path) -> int:
    from omegaconf import OmegaConf

    return int(OmegaConf.load(path).optimization.max_update)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m fairseq_knnvq.cli.demo",
        description="Pretrain (KNN-CE vs diversity), fine-tune, decode and report on the tiny corpus.",
    )
    parser.add_argument("--out", type=Path, default=Path("demo_out"), help="output folder (default: demo_out)")
    parser.add_argument("--quick", action="store_true",
                        help=f"a few updates per run ({QUICK_UPDATES}): checks the pipeline, numbers mean nothing")
    parser.add_argument("--corpus", type=Path, default=DEFAULT_CORPUS,
                        help="LibriSpeech-layout corpus with train/, dev/, test/ (default: the shipped tiny corpus)")
    parser.add_argument("--config-dir", type=Path, default=DEFAULT_CONFIGS,
                        help="the repository's configs/ folder")
    parser.add_argument("--variants", type=lambda s: [v for v in s.split(",") if v], default=list(VARIANTS),
                        help="pretraining configs to compare (default: tiny_knn_ce,tiny_diversity)")
    parser.add_argument("--jobs", type=int, default=min(len(VARIANTS), os.cpu_count() or 1),
                        help="variants trained at the same time, sharing the CPU cores "
                             "(default: one per core, at most one per variant)")
    parser.add_argument("--pretrain-updates", type=int, default=None,
                        help="optimization.max_update of pretraining (default: the config's)")
    parser.add_argument("--finetune-updates", type=int, default=None,
                        help="optimization.max_update of fine-tuning (default: the config's)")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        run_demo(args)
    except (DemoError, report.ReportError) as e:
        print(f"demo: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("demo: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
