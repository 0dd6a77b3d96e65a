"""Tests of the demo (``make demo``: fairseq_knnvq.cli.demo).

The slow test runs the whole pipeline for real (data preparation, two pretraining and
two fine-tuning runs through ``fairseq-hydra-train``, decoding, report) with a few
updates per run, and checks that the table it prints is what its parts wrote.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from PIL import Image

from fairseq_knnvq.cli import demo

VARIANTS = ["tiny_knn_ce", "tiny_diversity"]


def test_missing_corpus_is_named(tmp_path: Path, capsys) -> None:
    missing = tmp_path / "no_corpus"
    assert demo.main(["--out", str(tmp_path / "out"), "--corpus", str(missing)]) == 1
    err = capsys.readouterr().err
    assert str(missing) in err and "--corpus" in err and "make_corpus.py" in err
    assert not (tmp_path / "out" / "pretrain").exists()  # nothing trained


def test_refuses_a_folder_it_did_not_make(tmp_path: Path, capsys) -> None:
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me\n")
    assert demo.main(["--out", str(out), "--quick"]) == 1
    assert "not made by the demo" in capsys.readouterr().err
    assert (out / "notes.txt").read_text() == "keep me\n"


@pytest.mark.slow
def test_quick_demo_end_to_end(tmp_path: Path, capsys) -> None:
    out = tmp_path / "demo_out"
    code = demo.main(["--out", str(out), "--quick", "--pretrain-updates", "4", "--finetune-updates", "4"])
    printed = capsys.readouterr().out
    assert code == 0, printed[-3000:]

    summary = json.loads((out / "summary.json").read_text())
    assert [row["variant"] for row in summary["rows"]] == VARIANTS
    assert summary["quick"] is True and summary["pretrain_updates"] == 4
    for row in summary["rows"]:
        name = row["variant"]
        # The code statistics are those of the counts the quantizer produced on test.
        counts = json.loads((out / "report" / f"{name}_code_counts.json").read_text())
        used = sum(c > 0 for group in counts["counts"] for c in group)
        assert row["code_usage"]["used_entries"] == used
        assert row["code_usage"]["num_entries"] == counts["groups"] * counts["entries"] == 64
        assert row["code_usage"]["usage"] == pytest.approx(used / 64)
        assert sum(counts["counts"][0]) == counts["frames"] > 0
        assert 1.0 <= row["code_perplexity"] <= 64.0
        assert 1.0 / 32 <= row["tightness_max_prob"] <= 1.0
        # The WER is the decoder's, whose hypotheses are on disk.
        decoded = json.loads((out / "decode" / name / "wer.test.json").read_text())
        assert row["test_wer"] == decoded["wer"] and math.isfinite(row["test_wer"]) and row["test_wer"] >= 0
        assert row["test_cer"] == decoded["cer"] and math.isfinite(row["test_cer"]) and row["test_cer"] >= 0
        assert len((out / "decode" / name / "hypo.test.txt").read_text().splitlines()) == 40
        # Both training stages ran for the asked number of updates.
        assert summary["pretraining_final"][name]["train"]["num_updates"] == 4
        assert summary["finetuning_final"][name]["train"]["num_updates"] == 4

    table = (out / "summary.md").read_text()
    for row in summary["rows"]:
        line = next(l for l in table.splitlines() if l.startswith(f"| {row['variant']} |"))
        assert f"| {row['test_wer']:.2f} | {row['test_cer']:.2f} |" in line
        assert f"{row['code_perplexity']:.2f}" in line
        assert line in printed  # the table printed at the end is the one written
    for png in [out / "report" / "pretraining" / "code_usage.png", out / "report" / "finetuning" / "loss.png",
                *(out / "report" / f"{v}_code_counts.png" for v in VARIANTS)]:
        with Image.open(png) as image:
            assert image.format == "PNG"
    assert "update 4/4" in printed and "decode tiny_diversity" in printed  # progress was shown


def test_too_few_finetune_updates_is_a_clear_error(tmp_path: Path, capsys) -> None:
    assert demo.main(["--out", str(tmp_path / "out"), "--finetune-updates", "2"]) == 1
    assert "--finetune-updates must be at least" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
