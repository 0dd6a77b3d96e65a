"""Tests of ``knnvq-report`` (fairseq_knnvq.cli.report).

The logs are written by fairseq's own ``JsonProgressBar`` through Python logging with
the formats of ``fairseq-hydra-train`` (hydra's job logging) and ``fairseq-train``, the
way ``fairseq_cli/train.py`` calls it: ``log`` for ``train_inner``, ``print`` with a tag
for the end of an epoch and for validation. The images are opened with Pillow.
"""

from __future__ import annotations

import json
import logging
from collections import OrderedDict
from pathlib import Path
from typing import Dict, List, Sequence

import pytest
from PIL import Image

from fairseq.logging import progress_bar

from fairseq_knnvq import code_histograms, report
from fairseq_knnvq.cli import report as report_cli
from fairseq_knnvq.preparation.manifest import read_manifest

HYDRA_FORMAT = "[%(asctime)s][%(name)s][%(levelname)s] - %(message)s"  # hydra/job_logging/default
FAIRSEQ_TRAIN_FORMAT = "%(asctime)s | %(levelname)s | %(name)s | %(message)s"  # fairseq_cli/train.py
# matplotlib's first two colours: one line per run.
RUN_COLORS = [(0x1F, 0x77, 0xB4), (0xFF, 0x7F, 0x0E)]


def training_stats(step: int, regularizer: str) -> Dict[str, float]:
    """Values of the kind the KNN / diversity criteria log (exact in fairseq's "{:g}")."""
    stats = OrderedDict(
        loss=6.5 - 0.25 * step,
        code_usage=(0.5 + 0.0625 * step) if regularizer == "knn" else 0.25,
        used_codes=32 + 4 * step,
        pooled_code_perplexity=20.0 + step,
        pooled_prob_perplexity=60.0 - step,
        tightness_max_prob=0.5 + 0.03125 * step,
        temp=2.0 - 0.125 * step,
    )
    stats["knn_loss" if regularizer == "knn" else "diversity_loss"] = 1.0 / (step + 1)
    stats["loss_1"] = 0.5  # fairseq's numbered extra loss: a different term per variant
    return stats


def write_fairseq_log(
    path: Path,
    regularizer: str,
    num_updates: int = 8,
    log_interval: int = 2,
    fmt: str = HYDRA_FORMAT,
    valid_every: int = 4,
) -> List[Dict[str, Dict[str, float]]]:
    """Logs like one fairseq training run (one epoch of ``num_updates`` updates) and
    returns what was logged: ``[{"train_inner": ..., "valid": ...}]`` per event."""
    logger = logging.getLogger(progress_bar.__name__)
    handler = logging.FileHandler(path, mode="a", encoding="utf-8")
    handler.setFormatter(logging.Formatter(fmt))
    old_level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logged: List[Dict[str, Dict[str, float]]] = []
    try:
        # What else such a log holds: the config as a Python dict repr.
        logging.getLogger(progress_bar.__name__).info("{'_name': None, 'common': {'log_format': 'json'}}")
        bar = progress_bar.JsonProgressBar(range(num_updates), epoch=1, log_interval=log_interval)
        for i in bar:
            step = i + 1
            stats = training_stats(step, regularizer)
            stats.update(num_updates=step, lr=0.0005, wall=float(step))
            bar.log(stats, tag="train_inner", step=step)
            if step % log_interval == 0:
                logged.append({"train_inner": dict(stats)})
            if step % valid_every == 0:
                valid = training_stats(step, regularizer)
                valid["code_usage"] = valid["code_usage"] - 0.125
                valid["num_updates"] = step
                bar.print(OrderedDict(valid), tag="valid", step=step)
                logged.append({"valid": dict(valid)})
        bar.print(OrderedDict(training_stats(num_updates, regularizer)), tag="train", step=num_updates)
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)
        handler.close()
    return logged


def last(logged: Sequence[Dict[str, Dict[str, float]]], kind: str) -> Dict[str, float]:
    return [event[kind] for event in logged if kind in event][-1]


def has_color(image: Image.Image, rgb, tolerance: int = 8) -> bool:
    pixels = image.convert("RGB").getdata()
    return any(all(abs(p[c] - rgb[c]) <= tolerance for c in range(3)) for p in pixels)


@pytest.fixture()
def two_runs(tmp_path: Path):
    """A hydra run folder (KNN) and a fairseq-train log file (diversity)."""
    knn_dir = tmp_path / "outputs" / "knn"
    knn_dir.mkdir(parents=True)
    knn = write_fairseq_log(knn_dir / "hydra_train.log", "knn")
    div_log = tmp_path / "div.log"
    div = write_fairseq_log(div_log, "diversity", fmt=FAIRSEQ_TRAIN_FORMAT)
    return knn_dir, knn, div_log, div


def test_parse_keeps_record_kinds_apart(two_runs) -> None:
    knn_dir, knn, _, _ = two_runs
    run = report.read_run(knn_dir)
    assert run.name == "knn"
    assert run.path == knn_dir / "hydra_train.log"
    assert [r["num_updates"] for r in run.train_inner] == [2, 4, 6, 8]
    assert [r["num_updates"] for r in run.valid["valid"]] == [4, 8]
    assert list(run.valid) == ["valid"]
    assert len(run.train) == 1 and run.train[0]["code_usage"] == 1.0  # end-of-epoch, prefix removed
    # Values come back as the floats that were logged (fairseq writes them as strings).
    for record, event in zip(run.train_inner, [e["train_inner"] for e in knn if "train_inner" in e]):
        for key, value in event.items():
            assert record[key] == pytest.approx(value, rel=1e-5), key
    assert run.last_valid()["code_usage"] == pytest.approx(last(knn, "valid")["code_usage"])
    assert "valid_code_usage" not in run.valid["valid"][-1]


def test_curves_plots_and_table(two_runs, tmp_path: Path) -> None:
    knn_dir, knn, div_log, div = two_runs
    out = tmp_path / "report"
    code = report_cli.main(
        ["curves", str(knn_dir), str(div_log), "--name", "knn_ce", "--name", "diversity", "--out", str(out)]
    )
    assert code == 0

    pngs = {p.name for p in out.glob("*.png")}
    expected = {
        "code_usage",
        "used_codes",
        "pooled_code_perplexity",
        "pooled_prob_perplexity",
        "tightness_max_prob",
        "knn_loss",
        "diversity_loss",
        "temp",
        "loss",
    }
    assert pngs == {f"{m}.png" for m in expected}  # nothing for metrics no run logged, nor loss_N
    for name in pngs:
        with Image.open(out / name) as image:
            image.verify()
        with Image.open(out / name) as image:
            assert image.format == "PNG" and image.width > 300 and image.height > 200
    # One line per run: both runs' colours in a shared metric, one in a metric only one run has.
    with Image.open(out / "code_usage.png") as image:
        assert all(has_color(image, c) for c in RUN_COLORS)
    with Image.open(out / "diversity_loss.png") as image:
        assert has_color(image, RUN_COLORS[1]) and not has_color(image, RUN_COLORS[0])
    assert not list(out.glob(".*"))  # no temporary files left

    finals = json.loads((out / "final_values.json").read_text())
    for name, logged in (("knn_ce", knn), ("diversity", div)):
        for kind, source in (("train", "train_inner"), ("valid", "valid")):
            expected_record = last(logged, source)
            for metric, value in finals[name][kind].items():
                assert value == pytest.approx(expected_record[metric], rel=1e-5), (name, kind, metric)
            assert finals[name][kind]["num_updates"] == 8
    assert "diversity_loss" not in finals["knn_ce"]["train"]

    table = (out / "final_values.md").read_text()
    assert "| metric | knn_ce | diversity |" in table
    train_part, valid_part = table.split("## Last validation record")
    assert "| code_usage | 1 | 0.25 |" in train_part  # last train_inner: 0.5 + 0.0625 * 8
    assert "| code_usage | 0.875 | 0.125 |" in valid_part  # last valid record
    assert "| knn_loss | 0.1111 | - |" in train_part
    assert "| update | 8 | 8 |" in valid_part


def test_metrics_option_and_fresh_run_appended(tmp_path: Path) -> None:
    log = tmp_path / "hydra_train.log"
    write_fairseq_log(log, "diversity", num_updates=12)
    logged = write_fairseq_log(log, "knn", num_updates=4)  # hydra appends a rerun in the same folder
    run = report.read_run(log, "again")
    assert [r["num_updates"] for r in run.train_inner] == [2, 4]
    assert run.last_train_inner()["knn_loss"] == pytest.approx(last(logged, "train_inner")["knn_loss"])
    assert "diversity_loss" not in run.last_train_inner()

    out = tmp_path / "out"
    assert report_cli.main(["curves", str(log), "--metrics", "temp,accuracy,loss_1", "--out", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["final_values.json", "final_values.md", "loss_1.png", "temp.png"]


def test_bad_input_is_named(tmp_path: Path, capsys) -> None:
    no_json = tmp_path / "plain.log"
    no_json.write_text("[2026-01-01 00:00:00,000][fairseq_cli.train][INFO] - training\n")
    assert report_cli.main(["curves", str(no_json), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert str(no_json) in err and "common.log_format=json" in err

    empty_dir = tmp_path / "run"
    empty_dir.mkdir()
    assert report_cli.main(["curves", str(empty_dir), "--out", str(tmp_path / "o")]) == 2
    assert "hydra_train.log" in capsys.readouterr().err

    log = tmp_path / "a.log"
    write_fairseq_log(log, "knn")
    assert report_cli.main(["curves", str(log), str(log), "--name", "x", "--out", str(tmp_path / "o")]) == 2
    assert "2 runs but 1 --name" in capsys.readouterr().err
    assert report_cli.main(["curves", str(log), str(log), "--out", str(tmp_path / "o")]) == 2
    assert "run names must differ" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()

    assert (
        report_cli.main(
            [
                "codes",
                "--checkpoint",
                str(tmp_path / "missing.pt"),
                "--manifest",
                str(tmp_path / "missing.tsv"),
                "--out",
                str(tmp_path / "o"),
            ]
        )
        == 2
    )
    assert "missing.tsv" in capsys.readouterr().err


def test_missing_matplotlib_says_how_to_install(tmp_path: Path, monkeypatch) -> None:
    log = tmp_path / "a.log"
    write_fairseq_log(log, "knn")
    import sys

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # what an environment without it gives
    with pytest.raises(report.ReportError, match=r"fairseq-knnvq\[plots\]"):
        report.write_curves_report([report.read_run(log)], tmp_path / "o")


@pytest.mark.slow
def test_code_histogram_of_a_pretrained_checkpoint(tiny_manifests: Path, tmp_path: Path, capsys) -> None:
    """``codes`` on a checkpoint that fairseq-hydra-train wrote: its counts equal those
    of fairseq's own ``Wav2Vec2Model.quantize`` over the same files."""
    import soundfile
    import torch
    from fairseq_run import CONFIG_DIR, run_hydra_train

    run_dir = tmp_path / "pretrain"
    run_hydra_train(
        CONFIG_DIR / "pretraining",
        "tiny_knn_ce",
        [f"task.data={tiny_manifests}", "optimization.max_update=2", f"checkpoint.save_dir={run_dir / 'checkpoints'}"],
        run_dir=run_dir,
    )
    checkpoint = run_dir / "checkpoints" / "checkpoint_last.pt"
    manifest = tiny_manifests / "valid.tsv"
    out = tmp_path / "report"
    assert (
        report_cli.main(
            [
                "codes",
                "--checkpoint",
                str(checkpoint),
                "--manifest",
                str(manifest),
                "--out",
                str(out),
                "--name",
                "knn",
                "--max-files",
                "12",
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    result = json.loads((out / "knn_code_counts.json").read_text())
    with Image.open(out / "knn_code_counts.png") as image:
        assert image.format == "PNG"

    model, _ = code_histograms.load_pretrained(checkpoint)
    files = [entry.source_path for entry in read_manifest(manifest).entries][:12]
    expected = torch.zeros(result["groups"], result["num_vars"], dtype=torch.long)
    frames = 0
    with torch.no_grad():
        for path in files:
            wav, _ = soundfile.read(str(path), dtype="float32")
            _, targets = model.quantize(torch.from_numpy(wav).unsqueeze(0))  # (1, T, G)
            frames += targets.shape[1]
            for g in range(result["groups"]):
                expected[g] += torch.bincount(targets[0, :, g], minlength=result["num_vars"])
    assert result["files"] == 12 and result["frames"] == frames
    assert result["counts"] == expected.tolist()
    used = int((expected > 0).sum())
    assert result["stats"]["used_codes"] == used
    assert f"{used}/{result['groups'] * result['num_vars']} entries used" in printed
    # The model was loaded at its trained update count (fairseq sets it on load).
    assert result["temperature"] == pytest.approx(model.quantizer.curr_temp) and result["temperature"] < 2.0

    assert (
        report_cli.main(["codes", "--checkpoint", str(manifest), "--manifest", str(manifest), "--out", str(out)]) == 2
    )
    assert "cannot load" in capsys.readouterr().err
