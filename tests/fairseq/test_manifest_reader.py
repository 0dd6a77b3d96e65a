"""The one reader of fairseq's audio manifests (fairseq_knnvq.preparation.manifest.read_manifest):
what Manifest.to_text writes reads back, lines are split as fairseq's FileAudioDataset
splits them, and a file that is no manifest is refused with the line that is wrong."""

from pathlib import Path

import pytest

from fairseq_knnvq.preparation.manifest import AudioEntry, Manifest, ManifestError, read_manifest


def test_round_trip_and_blank_lines(tmp_path: Path) -> None:
    root = tmp_path / "audio"
    manifest = Manifest(
        root, (AudioEntry("a/1.flac", 16000, root / "a/1.flac"), AudioEntry("b 2.wav", 400, root / "b 2.wav"))
    )
    path = tmp_path / "train.tsv"
    path.write_text(manifest.to_text() + "\n\n", encoding="utf-8")
    assert read_manifest(path) == manifest
    # fairseq's reader: line 1 the root, then "path<TAB>frames" (line.strip().split("\t"))
    lines = path.read_text().splitlines()
    assert Path(lines[0]) == manifest.root
    assert [tuple(line.split("\t")) for line in lines[1:] if line] == [("a/1.flac", "16000"), ("b 2.wav", "400")]
    assert read_manifest(path).total_frames == 16400


def test_an_empty_manifest_lists_no_files(tmp_path: Path) -> None:
    path = tmp_path / "valid.tsv"
    path.write_text(f"{tmp_path}\n")
    assert read_manifest(path) == Manifest(tmp_path, ())


@pytest.mark.parametrize(
    "text, reason",
    [
        ("", "the file is empty"),
        ("/root\na.flac\n", "line 2 is 'a.flac'"),
        ("/root\na.flac\t12\nb.flac\tx\n", "line 3 is 'b.flac\\tx'"),
    ],
)
def test_what_is_no_manifest_is_named(tmp_path: Path, text: str, reason: str) -> None:
    path = tmp_path / "m.tsv"
    path.write_text(text)
    with pytest.raises(ManifestError) as raised:
        read_manifest(path)
    assert str(raised.value) == (
        f"manifest {path} is not a fairseq manifest (line 1 the audio root, then "
        f"'relative/path<TAB>num_frames' lines): {reason}"
    )
    with pytest.raises(ManifestError, match="does not exist: write one with knnvq-manifest"):
        read_manifest(tmp_path / "missing.tsv")
