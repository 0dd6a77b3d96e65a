"""Tests of ``knnvq-manifest`` (fairseq_knnvq.cli.manifest) and the manifest building of
fairseq_knnvq.preparation.manifest on real audio files."""

from __future__ import annotations

import math
import random
from pathlib import Path

import numpy as np
import pytest
import soundfile

from fairseq_knnvq.cli import manifest as manifest_cli
from fairseq_knnvq.preparation.manifest import (
    ManifestError,
    build_manifest,
    check_audio_files,
    find_audio_files,
    read_manifest,
)
from fairseq_knnvq.files import atomic_write_text

REPO_ROOT = Path(__file__).resolve().parents[2]
TINY_CORPUS = REPO_ROOT / "examples" / "tiny_corpus" / "LibriSpeech"


def write_tone(path: Path, num_frames: int, sample_rate: int = 16000, channels: int = 1) -> Path:
    """A short sine (different per channel) as 16-bit PCM; the format follows the extension."""
    path.parent.mkdir(parents=True, exist_ok=True)
    t = np.arange(num_frames) / sample_rate
    audio = np.stack([0.3 * np.sin(2 * np.pi * 220.0 * (c + 1) * t) for c in range(channels)], axis=1)
    soundfile.write(str(path), audio if channels > 1 else audio[:, 0], sample_rate, subtype="PCM_16")
    return path


def read_tsv(path: Path) -> tuple[str, list[tuple[str, int]]]:
    lines = path.read_text(encoding="utf-8").splitlines()
    entries = []
    for line in lines[1:]:
        relative_path, frames = line.split("\t")
        entries.append((relative_path, int(frames)))
    return lines[0], entries


@pytest.fixture()
def audio_tree(tmp_path: Path) -> Path:
    """Nested folders of 16 kHz mono FLAC and WAV files, plus things to be ignored."""
    root = tmp_path / "audio"
    frames = [1600, 2401, 3333, 4000, 5120, 800]
    for i, n in enumerate(frames):
        write_tone(root / f"spk{i % 2}" / f"chap{i % 3}" / f"utt{i}.flac", n)
    write_tone(root / "wavs" / "a.wav", 1234)
    write_tone(root / "wavs" / "b.WAV", 4321)
    write_tone(root / "spk0" / ".hidden.flac", 999)  # e.g. a half-written temp file
    (root / "spk0" / "notes.txt").write_text("not audio\n")
    return root


def test_manifest_format_and_frame_counts(audio_tree: Path, tmp_path: Path) -> None:
    dest = tmp_path / "manifests"
    manifest_cli.main([str(audio_tree), "--dest", str(dest), "--split-name", "all"])

    assert sorted(p.name for p in dest.iterdir()) == ["all.tsv"]
    text = (dest / "all.tsv").read_text(encoding="utf-8")
    assert text.endswith("\n") and "\r" not in text
    root_line, entries = read_tsv(dest / "all.tsv")
    assert root_line == str(audio_tree.resolve())
    assert Path(root_line).is_absolute()
    relative_paths = [rel for rel, _ in entries]
    assert relative_paths == sorted(relative_paths)
    # Only the six visible .flac files (default --ext flac), no hidden file.
    assert len(entries) == 6
    assert all(rel.endswith(".flac") and not Path(rel).name.startswith(".") for rel in relative_paths)
    for rel, frames in entries:
        assert frames == soundfile.info(str(Path(root_line) / rel)).frames


def test_extensions_and_path_filter(audio_tree: Path, tmp_path: Path) -> None:
    dest = tmp_path / "m"
    manifest_cli.main([str(audio_tree), "--dest", str(dest), "--ext", "wav", "--split-name", "wav"])
    _, wav_entries = read_tsv(dest / "wav.tsv")
    assert [rel for rel, _ in wav_entries] == ["wavs/a.wav", "wavs/b.WAV"]
    assert [frames for _, frames in wav_entries] == [1234, 4321]

    manifest_cli.main([str(audio_tree), "--dest", str(dest), "--ext", "flac,wav", "--split-name", "both"])
    assert len(read_tsv(dest / "both.tsv")[1]) == 8

    manifest_cli.main([str(audio_tree), "--dest", str(dest), "--path-must-contain", "spk1", "--split-name", "spk1"])
    assert [rel for rel, _ in read_tsv(dest / "spk1.tsv")[1]] == [
        "spk1/chap0/utt3.flac",
        "spk1/chap1/utt1.flac",
        "spk1/chap2/utt5.flac",
    ]


def test_valid_split_is_seeded_like_fairseq(tmp_path: Path) -> None:
    root = tmp_path / "audio"
    for i in range(40):
        write_tone(root / f"{i:02d}.flac", 160 + i)
    dest = tmp_path / "m"
    manifest_cli.main([str(root), "--dest", str(dest), "--valid-percent", "0.3", "--seed", "7"])
    train_root, train = read_tsv(dest / "train.tsv")
    valid_root, valid = read_tsv(dest / "valid.tsv")
    assert train_root == valid_root == str(root.resolve())

    # The draw of fairseq's wav2vec_manifest.py, over the files in sorted order.
    rand = random.Random(7)
    expected_valid = [f"{i:02d}.flac" for i in range(40) if not rand.random() > 0.3]
    assert [rel for rel, _ in valid] == expected_valid
    assert sorted(rel for rel, _ in train + valid) == [f"{i:02d}.flac" for i in range(40)]
    assert 0 < len(valid) < 40

    # Same seed, same split: byte-identical files.
    before = (dest / "train.tsv").read_bytes(), (dest / "valid.tsv").read_bytes()
    manifest_cli.main([str(root), "--dest", str(dest), "--valid-percent", "0.3", "--seed", "7"])
    assert ((dest / "train.tsv").read_bytes(), (dest / "valid.tsv").read_bytes()) == before

    # --valid-percent 0 writes only train.tsv, as fairseq's script does.
    dest0 = tmp_path / "m0"
    manifest_cli.main([str(root), "--dest", str(dest0), "--valid-percent", "0"])
    assert sorted(p.name for p in dest0.iterdir()) == ["train.tsv"]
    assert len(read_tsv(dest0 / "train.tsv")[1]) == 40


def test_valid_percent_and_split_name_are_exclusive(audio_tree: Path, tmp_path: Path) -> None:
    with pytest.raises(SystemExit):
        manifest_cli.main([str(audio_tree), "--dest", str(tmp_path), "--valid-percent", "0.1", "--split-name", "x"])


def test_unreadable_file_error_names_the_file_and_writes_nothing(audio_tree: Path, tmp_path: Path) -> None:
    dest = tmp_path / "m"
    manifest_cli.main([str(audio_tree), "--dest", str(dest), "--split-name", "valid"])
    previous = (dest / "valid.tsv").read_bytes()

    broken = audio_tree / "spk1" / "chap1" / "broken.flac"
    broken.write_bytes(b"this is not a FLAC file at all" * 10)
    with pytest.raises(SystemExit) as raised:
        manifest_cli.main([str(audio_tree), "--dest", str(dest), "--split-name", "valid"])
    message = str(raised.value)
    assert str(broken) in message
    assert "cannot be read" in message
    # The old manifest is untouched and no temporary file is left behind.
    assert (dest / "valid.tsv").read_bytes() == previous
    assert sorted(p.name for p in dest.iterdir()) == ["valid.tsv"]


def test_wrong_sample_rate_and_stereo_are_errors_without_resample(tmp_path: Path) -> None:
    root = tmp_path / "audio"
    write_tone(root / "ok.flac", 1600)
    low_rate = write_tone(root / "low.flac", 8000, sample_rate=8000)
    stereo = write_tone(root / "stereo.wav", 1600, channels=2)
    dest = tmp_path / "m"
    with pytest.raises(SystemExit) as raised:
        manifest_cli.main([str(root), "--dest", str(dest), "--ext", "flac,wav", "--split-name", "x"])
    message = str(raised.value)
    assert str(low_rate) in message and "8000 Hz" in message
    assert str(stereo) in message and "2 channels" in message
    assert "--resample" in message
    assert not dest.exists()

    # The library function raises a typed error with the same message.
    with pytest.raises(ManifestError, match="--resample"):
        build_manifest(root, extensions="flac,wav")


def test_resample_converts_to_16k_mono_with_the_right_length(tmp_path: Path) -> None:
    root = tmp_path / "audio"
    ok = write_tone(root / "a" / "ok.flac", 1600)
    write_tone(root / "a" / "rate22k.flac", 22050, sample_rate=22050)
    write_tone(root / "b" / "rate8k.wav", 12345, sample_rate=8000)
    write_tone(root / "b" / "stereo44k.wav", 4410, sample_rate=44100, channels=2)
    # dest inside root: the converted copies must not be picked up as input next time.
    dest = root / "manifests"
    manifest_cli.main([str(root), "--dest", str(dest), "--ext", "flac,wav", "--split-name", "train", "--resample"])

    root_line, entries = read_tsv(dest / "train.tsv")
    converted_root = Path(root_line)
    assert converted_root == (dest / "resampled_16000hz" / "train").resolve()
    expected_frames = {
        "a/ok.flac": 1600,
        "a/rate22k.flac": math.ceil(22050 * 16000 / 22050),
        "b/rate8k.wav": math.ceil(12345 * 16000 / 8000),
        "b/stereo44k.wav": math.ceil(4410 * 16000 / 44100),
    }
    assert dict(entries) == expected_frames
    for rel, frames in entries:
        info = soundfile.info(str(converted_root / rel))
        assert (info.samplerate, info.channels, info.frames) == (16000, 1, frames)
        assert info.subtype == "PCM_16"
    # Files that already fit are linked, not converted.
    assert (converted_root / "a" / "ok.flac").resolve() == ok.resolve()
    # The 8 kHz tone keeps its pitch (220 Hz) after resampling.
    audio, rate = soundfile.read(str(converted_root / "b" / "rate8k.wav"))
    spectrum = np.abs(np.fft.rfft(audio))
    assert abs(np.argmax(spectrum) * rate / len(audio) - 220.0) < 5.0

    # Running again gives the same manifest (the converted folder under root is skipped).
    before = (dest / "train.tsv").read_bytes()
    manifest_cli.main([str(root), "--dest", str(dest), "--ext", "flac,wav", "--split-name", "train", "--resample"])
    assert (dest / "train.tsv").read_bytes() == before


def test_resample_leaves_fitting_corpus_alone(audio_tree: Path, tmp_path: Path) -> None:
    dest = tmp_path / "m"
    manifest_cli.main([str(audio_tree), "--dest", str(dest), "--split-name", "x", "--resample"])
    assert read_tsv(dest / "x.tsv")[0] == str(audio_tree.resolve())
    assert not (dest / "resampled_16000hz").exists()


def test_empty_folder_and_missing_folder_are_clear_errors(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "readme.txt").write_text("no audio here\n")
    with pytest.raises(SystemExit) as raised:
        manifest_cli.main([str(empty), "--dest", str(tmp_path / "m")])
    assert "no audio files" in str(raised.value) and str(empty) in str(raised.value)

    with pytest.raises(SystemExit) as raised:
        manifest_cli.main([str(tmp_path / "does-not-exist"), "--dest", str(tmp_path / "m")])
    assert "not a folder" in str(raised.value)
    assert not (tmp_path / "m").exists()


def test_read_manifest_round_trip(audio_tree: Path) -> None:
    built = build_manifest(audio_tree)
    path = audio_tree.parent / "x.tsv"
    atomic_write_text(path, built.to_text())
    read_back = read_manifest(path)
    assert read_back.root == built.root
    assert [(e.relative_path, e.num_frames) for e in read_back.entries] == [
        (e.relative_path, e.num_frames) for e in built.entries
    ]


def test_manifest_of_the_shipped_corpus(tmp_path: Path) -> None:
    dest = tmp_path / "m"
    manifest_cli.main([str(TINY_CORPUS / "dev"), "--dest", str(dest), "--split-name", "valid"])
    root_line, entries = read_tsv(dest / "valid.tsv")
    assert root_line == str((TINY_CORPUS / "dev").resolve())
    flac_files = sorted(p.relative_to(TINY_CORPUS / "dev").as_posix() for p in (TINY_CORPUS / "dev").rglob("*.flac"))
    assert [rel for rel, _ in entries] == flac_files
    for rel, frames in entries:
        assert frames == soundfile.info(str(TINY_CORPUS / "dev" / rel)).frames


def truncate_to_half(path: Path) -> Path:
    """Cut a file to half its bytes: the header still promises every frame."""
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def test_truncated_flac_is_found_by_decoding_it(tmp_path: Path) -> None:
    """soundfile.info accepts a truncated FLAC (its header still holds the full frame
    count); the check decodes every file, names the truncated one, writes nothing and
    exits non-zero, with the same result over 1 or 3 worker processes."""
    root = tmp_path / "audio"
    for i in range(40):  # more files than one worker chunk, so the pool is used
        write_tone(root / f"spk{i % 3}" / f"utt{i:02d}.flac", 16000 + 37 * i)
    truncated = truncate_to_half(root / "spk1" / "utt07.flac")
    assert soundfile.info(str(truncated)).frames == 16000 + 37 * 7  # the header still says so

    dest = tmp_path / "m"
    for workers in ("1", "3"):
        with pytest.raises(SystemExit) as raised:
            manifest_cli.main([str(root), "--dest", str(dest), "--workers", workers, "--no-progress"])
        message = str(raised.value)
        assert message.startswith("knnvq-manifest: error: 1 of 40 audio files cannot be read")
        assert str(truncated) in message and "Nothing was written" in message
        assert not dest.exists()


def test_parallel_check_equals_serial_check(audio_tree: Path) -> None:
    paths = find_audio_files(audio_tree, "flac,wav") * 5
    serial = check_audio_files(paths, workers=1)
    parallel = check_audio_files(paths, workers=2)
    assert parallel == serial
    assert [c.num_frames for c in serial[:8]] == [soundfile.info(str(p)).frames for p in paths[:8]]


def test_workers_must_be_positive(audio_tree: Path, tmp_path: Path) -> None:
    with pytest.raises(SystemExit, match="--workers must be at least 1, got 0"):
        manifest_cli.main([str(audio_tree), "--dest", str(tmp_path / "m"), "--workers", "0"])
