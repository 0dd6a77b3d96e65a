"""Preparation refuses audio that breaks training (NaN or inf samples) naming the file
and writing nothing, and writes its files as one set (issue 24)."""

from pathlib import Path

import numpy as np
import pytest
import soundfile

from fairseq_knnvq import files
from fairseq_knnvq.cli import manifest, prepare_librispeech


def write_corpus(root: Path, bad_value: float) -> Path:
    """LibriSpeech layout, one chapter of three float WAVs; the second holds ``bad_value``
    at frame 1234."""
    chapter = root / "1" / "2"
    chapter.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for index in range(3):
        audio = rng.uniform(-0.5, 0.5, 8000).astype(np.float32)
        if index == 1:
            audio[1234] = bad_value
        soundfile.write(str(chapter / f"1-2-{index:04d}.wav"), audio, 16000, subtype="FLOAT")
    (chapter / "1-2.trans.txt").write_text("".join(f"1-2-{index:04d} HELLO WORLD\n" for index in range(3)))
    return chapter / "1-2-0001.wav"


@pytest.mark.parametrize("bad_value", [np.nan, np.inf, -np.inf])
def test_non_finite_audio_is_refused_by_both_tools(bad_value, tmp_path, capsys):
    bad = write_corpus(tmp_path / "corpus", bad_value)
    dest = tmp_path / "out"
    expected = (
        f"  {bad}: holds non-finite samples (NaN or inf), the first at frame 1234; training on it makes every loss NaN"
    )
    with pytest.raises(SystemExit) as refused:
        manifest.main([str(tmp_path / "corpus"), "--dest", str(dest), "--ext", "wav", "--no-progress"])
    message = str(refused.value.code)
    assert message.startswith("knnvq-manifest: error: 1 of 3 audio files cannot be read:\n") and expected in message
    with pytest.raises(SystemExit) as refused:
        prepare_librispeech.main(
            [str(tmp_path / "corpus"), "--dest", str(dest), "--split", "train=.", "--ext", "wav", "--no-progress"]
        )
    message = str(refused.value.code)
    assert message.startswith("knnvq-prepare-librispeech: error: split 'train': 1 of 3 audio files cannot be read:\n")
    assert expected in message and message.endswith("Nothing was written.")
    assert not dest.exists() or not list(dest.iterdir())


def test_finite_float_audio_is_accepted(tmp_path):
    write_corpus(tmp_path / "corpus", 0.25)
    prepare_librispeech.main(
        [
            str(tmp_path / "corpus"),
            "--dest",
            str(tmp_path / "out"),
            "--split",
            "train=.",
            "--ext",
            "wav",
            "--no-progress",
        ]
    )
    assert (tmp_path / "out" / "train.tsv").read_text().splitlines()[1:] == [
        f"1/2/1-2-{index:04d}.wav\t8000" for index in range(3)
    ]


def test_a_file_set_is_written_in_full_before_any_target_changes(tmp_path, monkeypatch):
    """An interruption while the set is written (here: the third file's write fails)
    leaves every old file as it was: no new train.tsv beside an old train.ltr."""
    old = {tmp_path / "train.tsv": "old manifest\n", tmp_path / "train.ltr": "O L D |\n"}
    for path, text in old.items():
        path.write_text(text)
    new = {
        tmp_path / "train.tsv": "new manifest\n",
        tmp_path / "train.ltr": "N E W |\n",
        tmp_path / "spm.model": b"\x00" * 10,
    }
    real_write_bytes = Path.write_bytes

    def failing_write_bytes(self, data):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Path, "write_bytes", failing_write_bytes)
    with pytest.raises(OSError, match="No space left"):
        files.write_files_atomically(new)
    assert {path: path.read_text() for path in old} == old
    assert sorted(p.name for p in tmp_path.iterdir()) == ["train.ltr", "train.tsv"]
    monkeypatch.setattr(Path, "write_bytes", real_write_bytes)
    files.write_files_atomically(new)
    assert (tmp_path / "train.tsv").read_text() == "new manifest\n" and (
        tmp_path / "spm.model"
    ).read_bytes() == b"\x00" * 10
