"""Tests of the demo (``make demo``: scripts/demo.py).

The slow test runs the whole pipeline for real (data preparation, three speech and three
image training runs and three fine-tuning runs through ``fairseq-hydra-train``,
decoding, report) with a few updates per run, and checks that the tables it prints are
what its parts wrote.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from fairseq_knnvq import study
from fairseq_run import last_record, load_script, parse_json_log

demo = load_script("scripts/demo.py")

SPEECH_VARIANTS = list(demo.SPEECH_VARIANTS)
IMAGE_VARIANTS = list(demo.IMAGE_VARIANTS)


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
    code = demo.main(["--out", str(out), "--quick", "--finetune", "--finetune-updates", "4"])
    printed = capsys.readouterr().out
    assert code == 0, printed[-3000:]

    summary = json.loads((out / "summary.json").read_text())
    assert summary["quick"] is True and summary["speech_updates"] == 8 and summary["image_updates"] == 8
    assert [row["variant"] for row in summary["speech"]] == SPEECH_VARIANTS
    assert [row["variant"] for row in summary["image"]] == IMAGE_VARIANTS
    table = (out / "summary.md").read_text()
    for task, folder, subset in (("speech", "speech", "valid"), ("image", "image", "valid")):
        for row in summary[task]:
            name = row["variant"]
            run_dir = out / folder / "runs" / name / "default" / "seed1"
            # The row is the last pooled validation record fairseq logged for the run.
            valid = last_record(parse_json_log((run_dir / "console.log").read_text()), subset)
            assert valid[f"{subset}_num_updates"] == 8
            assert row["used_codes"] == valid[f"{subset}_used_codes"]
            assert row["code_usage"] == pytest.approx(valid[f"{subset}_code_usage"], abs=1e-9)
            assert row["code_perplexity"] == pytest.approx(valid[f"{subset}_pooled_code_perplexity"], abs=1e-9)
            assert row["prob_perplexity"] == pytest.approx(valid[f"{subset}_pooled_prob_perplexity"], abs=1e-9)
            assert row["max_p"] == pytest.approx(valid[f"{subset}_tightness_max_prob"], abs=1e-9)
            metric = "accuracy" if task == "speech" else "psnr"
            assert row[metric] == pytest.approx(valid[f"{subset}_{metric}"], abs=1e-9)
            assert row["num_codes"] == (2 * 320 if task == "speech" else 64)
            assert row["used_codes_ceiling"] == pytest.approx(valid[f"{subset}_used_codes_ceiling"], abs=1e-9)
            assert row["verdict"] == study.verdict(
                {k[len(subset) + 1 :]: v for k, v in valid.items() if isinstance(v, float)}
            )
            line = next(
                text
                for text in table.splitlines()
                if text.startswith(f"| {name} |") and row["verdict"] in text and f"{row['code_perplexity']:.2f}" in text
            )
            assert line in printed  # the tables printed at the end are the ones written
        for png in ("code_usage.png", "final_values.md"):
            assert (out / "report" / task / png).is_file()
    for row in summary["speech"]:
        name = row["variant"]
        # The WER is the decoder's, whose hypotheses are on disk.
        decoded = json.loads((out / "decode" / name / "wer.test.json").read_text())
        assert row["test_wer"] == decoded["wer"] and row["test_cer"] == decoded["cer"]
        assert len((out / "decode" / name / "hypo.test.txt").read_text().splitlines()) == 40
        # The code histogram counts every frame of the test split in each group.
        counts = json.loads((out / "report" / "speech" / f"{name}_code_counts.json").read_text())
        assert sum(counts["counts"][0]) == sum(counts["counts"][1]) == counts["frames"] > 0
        with Image.open(out / "report" / "speech" / f"{name}_code_counts.png") as image:
            assert image.format == "PNG"
    assert "[6/6]" in printed and "decode tiny_knn_ce" in printed  # progress was shown


def test_verdicts_judge_usage_against_its_ceiling() -> None:
    # 1,000 vectors of a 2 x 320 codebook: uniform use would show about 612 codes, so 590
    # is full use (96 %) although it is 92 % of M; 400 is partial use, 300 collapsed
    ceiling = 2 * 320 * (1 - (1 - 1 / 320) ** 1000)
    metrics = {"code_usage": 590 / 640, "used_codes": 590.0, "used_codes_ceiling": ceiling, "tightness_max_prob": 0.8}
    assert study.verdict(metrics) == "full use, tight"
    assert (
        study.verdict(dict(metrics, code_usage=400 / 640, used_codes=400.0))
        == "partial use: 400 of 640 codes (expected 612 under uniform use)"
    )
    assert (
        study.verdict(dict(metrics, code_usage=300 / 640, used_codes=300.0, tightness_max_prob=0.3))
        == "collapsed: 300 of 640 codes (expected 612 under uniform use); loose: mean max p 0.30"
    )


def test_verdicts_name_collapse_and_looseness() -> None:
    assert (
        study.verdict({"code_usage": 11 / 64, "used_codes": 11.0, "tightness_max_prob": 0.9})
        == "collapsed: 11 of 64 codes"
    )
    assert (
        study.verdict({"code_usage": 1.0, "used_codes": 64.0, "tightness_max_prob": 0.40}) == "loose: mean max p 0.40"
    )
    assert study.verdict({"code_usage": 0.96, "used_codes": 615.0, "tightness_max_prob": 0.5}) == "full use, tight"
    assert (
        study.verdict({"code_usage": 0.5, "used_codes": 320.0, "tightness_max_prob": 0.3})
        == "partial use: 320 of 640 codes; loose: mean max p 0.30"
    )
    assert (
        study.verdict({"code_usage": 0.49, "used_codes": 49.0, "tightness_max_prob": 0.9})
        == "collapsed: 49 of 100 codes"
    )


def test_too_few_finetune_updates_is_a_clear_error(tmp_path: Path, capsys) -> None:
    assert demo.main(["--out", str(tmp_path / "out"), "--finetune", "--finetune-updates", "2"]) == 1
    assert "--finetune-updates must be at least" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
