"""The atomic writer (fairseq_knnvq.files): a failed write leaves the old file and no
temporary file; written files and folders get the mode that open() and mkdir give
under the process's umask (the references: os.stat of files made those ways)."""

import os
import stat
from pathlib import Path

import pytest

from fairseq_knnvq.files import atomic_folder, atomic_path, atomic_write_bytes, atomic_write_text


@pytest.fixture(params=[0o022, 0o077, 0o002])
def umask(request):
    old = os.umask(request.param)
    yield request.param
    os.umask(old)


def mode(path: Path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_files_get_the_mode_open_gives(tmp_path: Path, umask: int) -> None:
    reference = tmp_path / "reference.txt"
    with open(reference, "w") as f:
        f.write("x")
    text, data = tmp_path / "sub" / "a.txt", tmp_path / "b.bin"
    atomic_write_text(text, "one\ntwo\n")
    atomic_write_bytes(data, b"\x00\x01")
    assert text.read_bytes() == b"one\ntwo\n" and data.read_bytes() == b"\x00\x01"
    assert mode(text) == mode(data) == mode(reference) == 0o666 & ~umask


def test_folders_get_the_mode_mkdir_gives(tmp_path: Path, umask: int) -> None:
    reference = tmp_path / "reference"
    reference.mkdir()
    with atomic_folder(tmp_path / "out") as staged:
        (staged / "f.txt").write_text("new")
    assert mode(tmp_path / "out") == mode(reference) == 0o777 & ~umask


def test_a_failed_write_leaves_the_old_file_and_no_temporary_file(tmp_path: Path) -> None:
    path = tmp_path / "result.json"
    atomic_write_text(path, '{"old": 1}\n')
    before = os.stat(path)
    with pytest.raises(RuntimeError, match="interrupted"):
        with atomic_path(path) as partial:
            partial.write_bytes(b'{"new": 2')  # half written
            raise RuntimeError("interrupted")
    assert path.read_bytes() == b'{"old": 1}\n'
    assert os.stat(path).st_ino == before.st_ino
    assert sorted(p.name for p in tmp_path.iterdir()) == ["result.json"]
    with pytest.raises(TypeError):
        atomic_write_text(path, None)  # the write itself fails
    assert path.read_bytes() == b'{"old": 1}\n'
    assert sorted(p.name for p in tmp_path.iterdir()) == ["result.json"]


def test_a_successful_write_replaces_the_file(tmp_path: Path) -> None:
    path = tmp_path / "table.md"
    atomic_write_text(path, "old\n")
    with atomic_path(path) as partial:
        assert partial.parent == tmp_path and partial.name.startswith(".table.md.")
        assert path.read_text() == "old\n"  # the target is untouched while the block runs
        partial.write_text("new\n")
    assert path.read_text() == "new\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["table.md"]


def test_a_failed_folder_leaves_the_old_folder(tmp_path: Path) -> None:
    out = tmp_path / "export"
    with atomic_folder(out) as staged:
        (staged / "old.txt").write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_folder(out) as staged:
            (staged / "new.txt").write_text("new")
            raise RuntimeError("verification failed")
    assert sorted(p.name for p in out.iterdir()) == ["old.txt"]
    with atomic_folder(out) as staged:
        (staged / "new.txt").write_text("new")
    assert sorted(p.name for p in out.iterdir()) == ["new.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]
