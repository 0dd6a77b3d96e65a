"""``python scripts/demo.py`` (what ``make demo`` runs): collapse and its cure, on a CPU.

A script of the repository, not of the installed package: it trains the repository's
``configs/`` on the shipped ``examples/tiny_corpus``, so it runs from a clone. It
orchestrates; the work is done by the package (``fairseq_knnvq.study``, the console
scripts' library code) and by stock ``fairseq-hydra-train``.

It trains, side by side with stock ``fairseq-hydra-train``, the three criteria that matter:
no regulariser (plain Gumbel), the wav2vec 2.0 diversity loss, and the KNN-to-vertex loss
with the cross-entropy distance (KNN-CE), on

1. **images**: the tiny discrete image autoencoder on a generated folder of structured
   images (``configs/image/tiny_*.yaml``), where plain Gumbel collapses onto a few codes
   and the diversity loss spreads its soft codes without making them tight;
2. **speech**: wav2vec 2.0 pretraining on the shipped tiny corpus
   (``examples/tiny_corpus/LibriSpeech``, ``configs/pretraining/tiny_*.yaml``) with the
   codebook of wav2vec 2.0 BASE (2 x 320 entries) and K = 1, where plain Gumbel leaves a
   quarter of the codebook unused and no criterion reaches full use at this size (see
   docs/study.md).

Then it fine-tunes each speech model with CTC, decodes the test split (``knnvq-infer``)
and adds the WER (``--no-finetune`` skips this, about 7 of the demo's 9 minutes on 2 cores).

It prints a line when each run starts and ends, then one table per task with the final
pooled validation metrics of each variant and a verdict in plain words ("collapsed: 11 of
64 codes", "loose: mean max p 0.40", "full use, tight"). Everything goes under ``--out``
(default ``demo_out``)::

    data/speech/, data/images/   manifests and labels; the generated images
    speech/runs/<variant>/...    hydra run folders (console.log, checkpoints/)
    image/runs/<variant>/...
    finetune/, decode/           CTC fine-tuning and decoding of the speech models
    report/                      PNG curves per task, code histograms of the speech models
    summary.md, summary.json     the tables

The summary files are written last, each at once. A second run into the same folder
starts afresh. ``--quick`` trains a few updates only (checks the pipeline; its numbers
mean nothing).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import json
import logging
import os
import shutil
import sys
import warnings
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from fairseq_knnvq import study
from fairseq_knnvq import code_histograms, report
from fairseq_knnvq.files import atomic_write_text

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CORPUS = REPO_ROOT / "examples" / "tiny_corpus" / "LibriSpeech"
DEFAULT_CONFIGS = REPO_ROOT / "configs"
SPEECH_VARIANTS = ("tiny_gumbel", "tiny_diversity", "tiny_knn_ce")
IMAGE_VARIANTS = ("tiny_gumbel", "tiny_gumbel_diversity", "tiny_knn_ce")
# The settings of the study (docs/study.md), on top of the tiny configs: wav2vec 2.0
# BASE's codebook (2 x 320) with K = 1 (about 300 quantized frames per batch: M * K must
# not exceed them), and the image runs at 300 updates.
SPEECH_OVERRIDES = ("model.latent_vars=320", "model.knn_k=1")
IMAGE_UPDATES = 300
IMAGE_SPLITS = {"train": 256, "val": 64}
IMAGE_SIZE = 40
FINETUNE_CONFIG = "tiny"
# fairseq subset name -> corpus folder; "valid" is the split every shipped speech config
# validates on, so no dataset.valid_subset override is needed.
SPLITS = {"train": "train", "valid": "dev", "test": "test"}
# Marks a folder as the demo's own, so that a rerun may clear it.
MARKER = ".knnvq-demo"
QUICK_UPDATES = {"speech": 8, "image": 8, "finetune": 8}
MIN_FINETUNE_UPDATES = 4
SEED = 1


class DemoError(Exception):
    """Something the user has to fix; the message says what and how."""


def prepare_speech(corpus: Path, data_dir: Path, progress: study.Progress) -> None:
    from fairseq_knnvq.cli import prepare_librispeech

    missing = [folder for folder in SPLITS.values() if not (corpus / folder).is_dir()]
    if missing:
        raise DemoError(
            f"the tiny corpus is not at {corpus} (no {', '.join(missing)} folder). Run the demo "
            "from a clone of the repository (it ships examples/tiny_corpus/LibriSpeech), pass "
            "--corpus DIR (a LibriSpeech-layout folder with train/, dev/ and test/), or rebuild it "
            "with `python examples/tiny_corpus/make_corpus.py` (needs espeak-ng and sox)."
        )
    argv = [str(corpus), "--dest", str(data_dir), "--no-progress"]
    for subset, folder in SPLITS.items():
        argv += ["--split", f"{subset}={folder}"]
    progress(f"data: knnvq-prepare-librispeech {corpus} -> {data_dir}")
    try:
        with quiet(data_dir.parent / "logs" / "prepare_speech.log"):
            prepare_librispeech.main(argv)
    except SystemExit as e:
        if e.code not in (None, 0):
            raise DemoError(str(e)) from None


def prepare_images(data_dir: Path, progress: study.Progress) -> None:
    from fairseq_knnvq.preparation.synthetic_images import write_synthetic_image_folder

    progress(f"data: {sum(IMAGE_SPLITS.values())} generated {IMAGE_SIZE}x{IMAGE_SIZE} structured images -> {data_dir}")
    write_synthetic_image_folder(str(data_dir), IMAGE_SPLITS, size=IMAGE_SIZE, seed=0)


@contextlib.contextmanager
def quiet(log_file: Path):
    """Runs an in-process step with its prints, warnings and INFO logging sent to
    ``log_file`` instead of the console, so that the console shows the progress lines."""
    log_file.parent.mkdir(parents=True, exist_ok=True)
    root = logging.getLogger()
    old_level = root.level
    handler = logging.FileHandler(log_file, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s | %(levelname)s | %(name)s | %(message)s"))
    console_handlers = [
        h for h in root.handlers if isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler)
    ]
    old_handler_levels = [h.level for h in console_handlers]
    with (
        open(log_file, "a", encoding="utf-8") as stream,
        contextlib.redirect_stdout(stream),
        contextlib.redirect_stderr(stream),
        warnings.catch_warnings(),
    ):
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


def fresh_output_folder(out: Path) -> None:
    """Creates ``out``; clears it first if an earlier demo made it."""
    if out.exists():
        if not out.is_dir():
            raise DemoError(f"--out {out} is a file: pass a folder")
        if any(out.iterdir()):
            if not (out / MARKER).is_file():
                raise DemoError(f"--out {out} is not empty and was not made by the demo: pass a new or empty folder")
            shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    if not os.access(out, os.W_OK):
        raise DemoError(f"--out {out} is not writable")
    (out / MARKER).write_text("made by scripts/demo.py; a rerun clears this folder\n")


def run_all(jobs: Sequence[tuple], workers: int, progress: study.Progress) -> List[dict]:
    """Trains ``(Study, Point)`` pairs, ``workers`` at a time; the first failure stops the
    others and is raised."""
    with concurrent.futures.ThreadPoolExecutor(max_workers=workers) as pool:
        futures = [pool.submit(s.run_point, p, i + 1, len(jobs), progress) for i, (s, p) in enumerate(jobs)]
        try:
            concurrent.futures.wait(futures, return_when=concurrent.futures.FIRST_EXCEPTION)
            failed = [f for f in futures if f.done() and not f.cancelled() and f.exception()]
            if failed:
                raise failed[0].exception()
            return [f.result() for f in futures]
        except BaseException:
            for f in futures:
                f.cancel()
            progress.stop_all()
            raise


def finetune(
    name: str,
    pretrained: Path,
    data_dir: Path,
    out: Path,
    config_dir: Path,
    updates: Optional[int],
    progress: study.Progress,
    threads: int,
) -> None:
    """CTC fine-tuning of one pretrained model (a subprocess: safe from several threads)."""
    run_dir = out / "finetune" / name
    overrides = [f"task.data={data_dir}", f"model.w2v_path={pretrained}"]
    if updates is not None:
        overrides.append(f"optimization.max_update={updates}")
    cmd = study.train_command(config_dir / "finetuning", FINETUNE_CONFIG, run_dir, overrides)
    progress(f"finetune {name}: fairseq-hydra-train --config-name {FINETUNE_CONFIG} (log {run_dir / 'console.log'})")
    code = study.run_training(cmd, run_dir, progress, threads)
    if code != 0:
        raise DemoError(
            f"fine-tuning {name} failed (exit code {code}). Last lines of "
            f"{run_dir / 'console.log'}:\n{study.tail(run_dir / 'console.log')}"
        )


def decode(name: str, data_dir: Path, out: Path) -> Dict[str, object]:
    """Greedy CTC decoding of the test split, in this process (one at a time: it
    redirects the console)."""
    from fairseq_knnvq.cli import infer_ctc

    decode_dir = out / "decode" / name
    checkpoint = out / "finetune" / name / "checkpoints" / "checkpoint_best.pt"
    argv = [
        str(checkpoint),
        "--data",
        str(data_dir),
        "--subset",
        "test",
        "--output-dir",
        str(decode_dir),
        "--cpu",
        "--no-progress",
    ]
    try:
        with quiet(decode_dir / "infer.log"):
            infer_ctc.main(argv)
    except SystemExit as e:
        if e.code not in (None, 0):
            raise DemoError(f"decoding {name} failed: {e} (log: {decode_dir / 'infer.log'})") from None
    return json.loads((decode_dir / "wer.test.json").read_text(encoding="utf-8"))


def summary_table(
    rows: Sequence[Dict[str, object]], task_metric: str, task_title: str, extra: Sequence[tuple] = ()
) -> str:
    columns = [
        ("variant", "variant"),
        ("codes", "codes used"),
        ("ceiling", "expected under uniform use"),
        ("code_perplexity", "code perplexity (hard)"),
        ("prob_perplexity", "prob perplexity (soft)"),
        ("max_p", "mean max p"),
        (task_metric, task_title),
        *extra,
        ("verdict", "verdict"),
    ]

    def cell(key, value) -> str:
        if isinstance(value, float):
            return f"{value:.3f}" if key in ("max_p", "accuracy") else f"{value:.2f}"
        return str(value)

    lines = ["| " + " | ".join(title for _, title in columns) + " |", "|---|" + "---:|" * (len(columns) - 2) + "---|"]
    for row in rows:
        lines.append("| " + " | ".join(cell(k, row.get(k, "-")) for k, _ in columns) + " |")
    return "\n".join(lines) + "\n"


def row_of(result: dict) -> Dict[str, object]:
    m = result["metrics"]
    total = round(m["used_codes"] / m["code_usage"]) if m.get("code_usage") else 0
    return {
        "variant": result["config"],
        "codes": f"{m['used_codes']:.0f} / {total}",
        "ceiling": f"{m['used_codes_ceiling']:.0f}" if "used_codes_ceiling" in m else "-",
        "used_codes_ceiling": m.get("used_codes_ceiling"),
        "used_codes": m["used_codes"],
        "num_codes": total,
        "code_usage": m["code_usage"],
        "code_perplexity": m["pooled_code_perplexity"],
        "prob_perplexity": m["pooled_prob_perplexity"],
        "max_p": m["tightness_max_prob"],
        **{k: m[k] for k in ("accuracy", "psnr") if k in m},
        "verdict": study.verdict(m),
    }


def run_demo(args: argparse.Namespace) -> Dict[str, object]:
    progress = study.Progress()
    out, corpus, config_dir = args.out.resolve(), args.corpus.resolve(), args.config_dir.resolve()
    args.finetune = args.finetune and bool(args.speech_variants)  # fine-tuning is for the speech models
    needed = [config_dir / "pretraining" / f"{v}.yaml" for v in args.speech_variants]
    needed += [config_dir / "image" / f"{v}.yaml" for v in args.image_variants]
    if args.finetune:
        needed.append(config_dir / "finetuning" / f"{FINETUNE_CONFIG}.yaml")
    for path in needed:
        if not path.is_file():
            raise DemoError(f"config {path} is missing: run from a clone of the repository or pass --config-dir")
    if not args.speech_variants and not args.image_variants:
        raise DemoError("--speech-variants and --image-variants are both empty: nothing to train")
    if args.finetune_updates is not None and args.finetune_updates < MIN_FINETUNE_UPDATES:
        # fairseq's tri_stage schedule divides by its decay steps, int(0.3 * updates)
        raise DemoError(
            f"--finetune-updates must be at least {MIN_FINETUNE_UPDATES} (the tri-stage "
            f"learning-rate schedule of configs/finetuning/{FINETUNE_CONFIG}.yaml needs a decay phase)"
        )
    if args.jobs < 1:
        raise DemoError("--jobs must be at least 1")
    fresh_output_folder(out)

    quick = QUICK_UPDATES if args.quick else {}
    speech_updates = args.speech_updates or quick.get("speech")
    image_updates = args.image_updates or quick.get("image") or IMAGE_UPDATES
    finetune_updates = args.finetune_updates or quick.get("finetune")
    speech_data, image_data = out / "data" / "speech", out / "data" / "images"
    studies: Dict[str, study.Study] = {}
    if args.speech_variants:
        prepare_speech(corpus, speech_data, progress)
        fixed = [f"task.data={speech_data}", *SPEECH_OVERRIDES]
        if speech_updates:
            fixed += [
                f"optimization.max_update={speech_updates}",
                f"common.log_interval={max(1, speech_updates // 30)}",
            ]
        studies["speech"] = study.Study(
            config_dir / "pretraining",
            list(args.speech_variants),
            [],
            [SEED],
            out / "speech",
            fixed,
            study.DEFAULT_METRICS["speech"],
        )
    if args.image_variants:
        prepare_images(image_data, progress)
        fixed = [f"task.data={image_data}", "dataset.validate_interval_updates=1000000"]
        if image_updates:
            fixed += [f"optimization.max_update={image_updates}", f"common.log_interval={max(1, image_updates // 30)}"]
        studies["image"] = study.Study(
            config_dir / "image",
            list(args.image_variants),
            [],
            [SEED],
            out / "image",
            fixed,
            study.DEFAULT_METRICS["image"],
        )

    # Speech first (its checkpoints feed fine-tuning), then the images; one torch thread
    # per run and as many runs as cores.
    jobs = [(s, p) for s in studies.values() for p in s.points()]
    progress(f"{len(jobs)} training runs, {args.jobs} at a time, one torch thread each")
    results = run_all(jobs, args.jobs, progress)
    by_task = {task: [r for (s, _), r in zip(jobs, results) if s is studies[task]] for task in studies}

    decoded: Dict[str, dict] = {}
    if args.finetune:

        def pretrained(name: str) -> Path:
            return study.Point(name, (), SEED).folder(out / "speech") / "checkpoints" / "checkpoint_last.pt"

        with concurrent.futures.ThreadPoolExecutor(max_workers=args.jobs) as pool:
            futures = [
                pool.submit(
                    finetune, name, pretrained(name), speech_data, out, config_dir, finetune_updates, progress, 1
                )
                for name in args.speech_variants
            ]
            try:
                for future in futures:
                    future.result()
            except BaseException:
                for future in futures:
                    future.cancel()
                progress.stop_all()
                raise
        for name in args.speech_variants:
            progress(f"decode {name}: knnvq-infer --subset test")
            decoded[name] = result = decode(name, speech_data, out)
            progress(
                f"  decode {name}: test WER {result['wer']:.2f}% ({result['num_word_errors']}/"
                f"{result['num_words']} words), CER {result['cer']:.2f}%"
            )

    report_dir = out / "report"
    progress(f"report: curves and code histograms -> {report_dir}")
    code_counts = {}
    with quiet(out / "logs" / "report.log"):
        for task, task_study in studies.items():
            logs = [
                report.read_run(study.Point(name, (), SEED).folder(task_study.out) / "console.log", name=name)
                for name in task_study.configs
            ]
            report.write_curves_report(logs, report_dir / task)
        for name in args.speech_variants:
            checkpoint = study.Point(name, (), SEED).folder(out / "speech") / "checkpoints" / "checkpoint_last.pt"
            code_counts[name] = code_histograms.write_code_report(
                checkpoint, speech_data / "test.tsv", report_dir / "speech", name=name
            )["stats"]

    tables, summary = (
        [],
        {
            "quick": bool(args.quick),
            "speech_updates": speech_updates,
            "image_updates": image_updates,
            "finetune_updates": finetune_updates if args.finetune else None,
        },
    )
    if "image" in by_task:
        rows = [row_of(r) for r in by_task["image"]]
        summary["image"] = rows
        tables.append(
            (
                "Images: tiny autoencoder, generated structured images (validation split)",
                summary_table(rows, "psnr", "PSNR (dB)"),
            )
        )
    if "speech" in by_task:
        rows = [row_of(r) for r in by_task["speech"]]
        for row in rows:
            if row["variant"] in decoded:
                row["test_wer"] = decoded[row["variant"]]["wer"]
                row["test_cer"] = decoded[row["variant"]]["cer"]
        summary["speech"] = rows
        summary["speech_test_code_counts"] = code_counts
        extra = (("test_wer", "test WER (%)"), ("test_cer", "test CER (%)")) if decoded else ()
        tables.append(
            (
                "Speech: tiny wav2vec 2.0, shipped tiny corpus (validation: its dev/ folder)",
                summary_table(rows, "accuracy", "contrastive accuracy", extra),
            )
        )
    elapsed = progress.elapsed()
    summary["wall_seconds"] = round(elapsed, 1)
    body = "".join(f"## {title}\n\n{table}\n" for title, table in tables)
    markdown = (
        "# Demo summary\n\n"
        "Final validation metrics, pooled over the whole validation split: codes used (hard argmax), "
        "code perplexity (hard) and prob perplexity (soft) side by side, tightness (mean max p of the "
        f"smoothed vectors). A validation pass quantizes a limited number of vectors, so even uniform use "
        f"shows fewer than all codes: the column 'expected under uniform use' is that number, M (1 - (1 - 1/M)^n) "
        f"per group for the n vectors counted. Verdict, against that expectation: full use from "
        f"{study.FULL_USE:.0%}, partial use from {study.COLLAPSED:.0%}, collapsed below; loose below a mean max p "
        f"of {study.TIGHT}.\n\n"
        + body
        + f"{'Quick run (a smoke test: too few updates to mean anything). ' if args.quick else ''}"
        f"Wall time {elapsed / 60:.1f} min. Plots: report/.\n"
    )
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=2) + "\n")
    atomic_write_text(out / "summary.md", markdown)
    progress(f"done in {elapsed / 60:.1f} min; summary {out / 'summary.md'}")
    print()
    for title, table in tables:
        print(f"{title}\n{table}", flush=True)
    return summary


def _names(text: str) -> List[str]:
    return [v for v in text.split(",") if v]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python scripts/demo.py",
        description="No regulariser vs diversity loss vs KNN-CE on images and speech, side by side, on a CPU.",
    )
    parser.add_argument("--out", type=Path, default=Path("demo_out"), help="output folder (default: demo_out)")
    parser.add_argument(
        "--quick",
        action="store_true",
        help=f"a few updates per run ({QUICK_UPDATES}): checks the pipeline, numbers mean nothing",
    )
    parser.add_argument(
        "--corpus",
        type=Path,
        default=DEFAULT_CORPUS,
        help="LibriSpeech-layout corpus with train/, dev/, test/ (default: the shipped tiny corpus)",
    )
    parser.add_argument("--config-dir", type=Path, default=DEFAULT_CONFIGS, help="the repository's configs/ folder")
    parser.add_argument(
        "--speech-variants",
        type=_names,
        default=list(SPEECH_VARIANTS),
        help=f"pretraining configs (default {','.join(SPEECH_VARIANTS)}; '' for none)",
    )
    parser.add_argument(
        "--image-variants",
        type=_names,
        default=list(IMAGE_VARIANTS),
        help=f"image configs (default {','.join(IMAGE_VARIANTS)}; '' for none)",
    )
    parser.add_argument(
        "--jobs",
        type=int,
        default=os.cpu_count() or 1,
        help="training runs at the same time, one torch thread each (default: one per core)",
    )
    parser.add_argument(
        "--speech-updates",
        type=int,
        default=None,
        help="optimization.max_update of speech pretraining (default: the config's)",
    )
    parser.add_argument(
        "--image-updates",
        type=int,
        default=None,
        help=f"optimization.max_update of the image runs (default {IMAGE_UPDATES})",
    )
    parser.add_argument(
        "--finetune",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="fine-tune each speech model with CTC and report its test WER (default; --no-finetune skips it)",
    )
    parser.add_argument(
        "--finetune-updates",
        type=int,
        default=None,
        help="optimization.max_update of fine-tuning (default: the config's)",
    )
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        run_demo(args)
    except (DemoError, study.StudyError, report.ReportError) as e:
        print(f"demo: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("demo: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
