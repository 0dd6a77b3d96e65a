"""Every console script checks that it can write its outputs before it starts its work,
and preparation never leaves manifests of an earlier run that overlap the new ones."""

import os
import tempfile

import numpy as np
import pytest
import soundfile

from fairseq_knnvq.cli import eval_image, infer_ctc, manifest, prepare_librispeech, report
from fairseq_knnvq.cli.outputs import output_file_problem, output_folder_problem
from fairseq_run import TINY_CORPUS


def sys_is_read_only() -> bool:
    try:
        with tempfile.TemporaryFile(dir="/sys"):
            return False
    except OSError:
        return os.path.isdir("/sys")


@pytest.fixture()
def blocker(tmp_path):
    """A plain file where an output folder would have to be."""
    path = tmp_path / "a_file"
    path.write_text("not a folder\n")
    return path


@pytest.fixture()
def audio(tmp_path):
    root = tmp_path / "audio"
    root.mkdir()
    for i in range(3):
        soundfile.write(str(root / f"u{i}.flac"), np.zeros(1600 + i), 16000)
    (root / "broken.flac").write_bytes(b"not audio")  # the output check comes first
    return root


def test_output_folder_problem(tmp_path, blocker):
    assert output_folder_problem(tmp_path / "new" / "deeper", "--dest") is None
    assert not (tmp_path / "new").exists()  # nothing is created by the check
    assert output_folder_problem(blocker / "out", "--dest") == (
        f"--dest {blocker / 'out'}: {blocker} is a file, not a folder; choose another --dest"
    )
    assert output_file_problem(tmp_path, "--output") == (
        f"--output {tmp_path} is a folder; give the file to write, e.g. {tmp_path / 'metrics.json'}"
    )
    assert sorted(os.listdir(tmp_path)) == ["a_file"]


@pytest.mark.skipif(not sys_is_read_only(), reason="needs a folder this user cannot write (/sys)")
def test_unwritable_folder_is_named_before_the_audio_is_read(audio):
    with pytest.raises(SystemExit) as raised:
        manifest.main([str(audio), "--dest", "/sys/knnvq_out", "--no-progress"])
    assert str(raised.value) == (
        "knnvq-manifest: error: cannot write to --dest /sys/knnvq_out (it would be created inside /sys): "
        "Permission denied; choose a folder you can write to, or fix its permissions"
    )


def test_manifest_and_preparation_check_dest_first(audio, blocker):
    with pytest.raises(SystemExit, match=f"knnvq-manifest: error: --dest {blocker}/m: {blocker} is a file"):
        manifest.main([str(audio), "--dest", str(blocker / "m"), "--no-progress"])
    with pytest.raises(SystemExit, match=f"knnvq-prepare-librispeech: error: --dest {blocker}/d: {blocker} is a file"):
        prepare_librispeech.main(
            [str(TINY_CORPUS), "--dest", str(blocker / "d"), "--split", "train=train", "--no-progress"]
        )


def test_infer_checks_its_output_folder_before_loading_the_model(tmp_path, blocker):
    checkpoint = tmp_path / "checkpoint_best.pt"
    checkpoint.write_bytes(b"not a checkpoint: loading it would fail")
    with pytest.raises(SystemExit) as raised:
        infer_ctc.main(
            [str(checkpoint), "--data", str(tmp_path), "--subset", "dev", "--output-dir", str(blocker / "out"), "--cpu"]
        )
    assert str(raised.value) == (
        f"knnvq-infer: error: --output-dir {blocker / 'out'}: {blocker} is a file, not a folder; "
        "choose another --output-dir"
    )


def test_eval_image_checks_its_output_before_loading_the_model(tmp_path, blocker, capsys):
    checkpoint = tmp_path / "checkpoint.pt"
    checkpoint.write_bytes(b"not a checkpoint")
    assert eval_image.main([str(checkpoint), str(tmp_path), "--output", str(tmp_path)]) == 2
    assert f"knnvq-eval-image: error: --output {tmp_path} is a folder" in capsys.readouterr().err
    assert eval_image.main([str(checkpoint), str(tmp_path), "--output", str(blocker / "m.json")]) == 2
    assert f"knnvq-eval-image: error: --output {blocker}: {blocker} is a file" in capsys.readouterr().err


def test_report_checks_its_output_folder_first(tmp_path, blocker, capsys):
    assert report.main(["curves", str(tmp_path / "no_run.log"), "--out", str(blocker / "r")]) == 2
    assert f"knnvq-report: error: --out {blocker / 'r'}: {blocker} is a file" in capsys.readouterr().err


def test_manifest_refuses_to_leave_an_overlapping_valid_split(audio, tmp_path):
    (audio / "broken.flac").unlink()
    dest = tmp_path / "m"
    manifest.main([str(audio), "--dest", str(dest), "--valid-percent", "0.5", "--seed", "3", "--no-progress"])
    before = {p.name: p.read_bytes() for p in dest.iterdir()}
    assert set(before) == {"train.tsv", "valid.tsv"} and len(before["valid.tsv"].splitlines()) > 1
    with pytest.raises(SystemExit) as raised:
        manifest.main([str(audio), "--dest", str(dest), "--valid-percent", "0", "--no-progress"])
    message = str(raised.value)
    valid_files = len(before["valid.tsv"].splitlines()) - 1
    assert f"{dest / 'valid.tsv'} lists {valid_files} audio files that the new train.tsv also lists" in message
    assert "Nothing was written" in message
    assert {p.name: p.read_bytes() for p in dest.iterdir()} == before


def test_preparation_refuses_to_leave_an_old_split_that_overlaps_a_new_one(tmp_path):
    dest = tmp_path / "d"
    prepare_librispeech.main(
        [str(TINY_CORPUS), "--dest", str(dest), "--split", "train=train", "--split", "valid=dev", "--no-progress"]
    )
    before = {p.name: p.read_bytes() for p in dest.iterdir()}
    # Again, with the whole corpus as the training split: the old valid.tsv (dev) overlaps.
    with pytest.raises(SystemExit) as raised:
        prepare_librispeech.main([str(TINY_CORPUS), "--dest", str(dest), "--split", "train=.", "--no-progress"])
    dev_files = len(before["valid.tsv"].splitlines()) - 1
    assert f"{dest / 'valid.tsv'} lists {dev_files} audio files that the new train.tsv also lists" in str(raised.value)
    assert {p.name: p.read_bytes() for p in dest.iterdir()} == before
    # Re-running the same preparation replaces the same set: allowed, identical output.
    prepare_librispeech.main(
        [str(TINY_CORPUS), "--dest", str(dest), "--split", "train=train", "--split", "valid=dev", "--no-progress"]
    )
    assert {p.name: p.read_bytes() for p in dest.iterdir()} == before


def test_named_manifests_may_overlap_unless_one_is_the_training_split(audio, tmp_path):
    (audio / "broken.flac").unlink()
    dest = tmp_path / "m"
    manifest.main([str(audio), "--dest", str(dest), "--split-name", "all", "--no-progress"])
    manifest.main(
        [str(audio), "--dest", str(dest), "--split-name", "valid", "--path-must-contain", "u1", "--no-progress"]
    )
    with pytest.raises(SystemExit, match=f"{dest / 'valid.tsv'} lists 1 audio files that the new train.tsv"):
        manifest.main([str(audio), "--dest", str(dest), "--split-name", "train", "--no-progress"])
    assert sorted(p.name for p in dest.iterdir()) == ["all.tsv", "valid.tsv"]
