"""knnvq-wer-table: knnvq-infer summaries as the wav2vec 2.0 paper's table (a row per run
and LM, the four LibriSpeech splits first), in Markdown and CSV."""

import csv
import json
from pathlib import Path

import pytest

from fairseq_knnvq.cli import wer_table


def summary(subset: str, wer: float, lm: str | None = None, beam: bool = False) -> dict:
    record = {"subset": subset, "wer": wer, "cer": 1.0, "decoding": "ctc_beam_search" if beam else "ctc_greedy"}
    if beam:
        record["beam_search"] = {"lm": lm, "lexicon": None, "beam": 50}
    return record


def write(folder: Path, name: str, record: dict) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / name).write_text(json.dumps(record))


def test_two_runs_with_and_without_lm(tmp_path: Path, capsys):
    a, b = tmp_path / "a" / "decode", tmp_path / "b" / "decode"
    for subset, wer in (("test_other", 17.6), ("dev_clean", 10.9), ("train_check", 1.5), ("test_clean", 11.1)):
        write(a, f"wer.{subset}.json", summary(subset, wer))
        write(a, f"wer.{subset}.beam.json", summary(subset, wer / 2, lm="/lm/4-gram.bin", beam=True))
    write(b, "wer.test_clean.json", summary("test_clean", 12.25))
    (b / "notes.json").write_text("{}")  # not a summary: ignored
    wer_table.main([f"10h KNN={a}", str(b), "--output", str(tmp_path / "out" / "table")])
    expected = (
        "| run | LM | dev-clean | test-clean | test-other | train-check |\n"
        "|---|---|---:|---:|---:|---:|\n"
        "| 10h KNN | none | 10.90 | 11.10 | 17.60 | 1.50 |\n"
        "| 10h KNN | 4-gram.bin | 5.45 | 5.55 | 8.80 | 0.75 |\n"
        "| b | none |  | 12.25 |  |  |\n"
    )
    assert (tmp_path / "out" / "table.md").read_text() == expected
    assert capsys.readouterr().out == expected
    with open(tmp_path / "out" / "table.csv", newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["run", "lm", "dev_clean", "test_clean", "test_other", "train_check"]
    assert rows[2] == ["10h KNN", "4-gram.bin", "5.45", "5.55", "8.8", "0.75"]
    assert rows[3] == ["b", "none", "", "12.25", "", ""]


def test_errors(tmp_path: Path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(SystemExit, match=f"{empty} holds no knnvq-infer summary"):
        wer_table.main([str(empty), "--output", str(tmp_path / "t")])
    with pytest.raises(SystemExit, match="decode folder .*nowhere .run x. does not exist"):
        wer_table.main([f"x={tmp_path / 'nowhere'}", "--output", str(tmp_path / "t")])
    twice = tmp_path / "twice"
    write(twice, "wer.dev.json", summary("dev", 1.0))
    write(twice, "wer.dev.copy.json", summary("dev", 2.0))
    with pytest.raises(SystemExit, match="both decode dev of run r with LM none"):
        wer_table.main([f"r={twice}", "--output", str(tmp_path / "t")])
    assert not (tmp_path / "t.md").exists() and not (tmp_path / "t.csv").exists()
