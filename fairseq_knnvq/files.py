"""Files and folders that appear complete or not at all.

Everything this package writes outside a training run (manifests, labels, resampled
audio, reports, plots, metrics, exported models) is first written under a temporary
name ``.<name>.<random>.partial`` in the target's own folder and then renamed over the
target with ``os.replace``, which is atomic within one file system. A write that fails
or is interrupted leaves the old target as it was and removes its temporary file.

The temporary file (or folder) is created as ``open()`` (or ``mkdir``) creates one:
mode ``0o666`` (``0o777``) less the process's umask, so the result has the usual
permissions, not the private ``0o600`` of ``tempfile.mkstemp``.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
from pathlib import Path
from typing import Callable, Iterator, Mapping, Union

PathLike = Union[str, "os.PathLike[str]"]


def _create_file(path: Path) -> None:
    os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))


def _create_folder(path: Path) -> None:
    os.mkdir(path, 0o777)


def _new_sibling(target: Path, create: Callable[[Path], None]) -> Path:
    """A new temporary file or folder (``create``) next to ``target``, hidden, with an
    unused random name."""
    while True:
        candidate = target.with_name(f".{target.name}.{secrets.token_hex(4)}.partial")
        try:
            create(candidate)
        except FileExistsError:
            continue
        return candidate


@contextlib.contextmanager
def atomic_path(path: PathLike) -> Iterator[Path]:
    """Yields a temporary file next to ``path`` (created empty, missing parent folders
    too) for the block to write, by name: ``savefig``, ``soundfile.write`` and the like
    open it themselves. When the block ends normally the file replaces ``path``;
    otherwise it is removed and ``path`` is left as it was."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = _new_sibling(target, _create_file)
    try:
        yield partial
        os.replace(partial, target)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: PathLike, data: bytes) -> None:
    """Writes ``data`` to ``path`` through :func:`atomic_path`."""
    with atomic_path(path) as partial:
        partial.write_bytes(data)


def atomic_write_text(path: PathLike, text: str) -> None:
    """Writes ``text`` to ``path`` as UTF-8 with ``\\n`` line ends through :func:`atomic_path`."""
    with atomic_path(path) as partial, open(partial, "w", encoding="utf-8", newline="\n") as file:
        file.write(text)


def write_files_atomically(files: Mapping[Path, Union[str, bytes]]) -> None:
    """Writes several files (text as UTF-8 with ``\\n`` line ends, or bytes) as a set:
    each is written in full to its temporary file first, and only then are they all
    renamed over their targets. An interruption while writing (a kill, a full disk)
    leaves every target as it was; only the renames themselves, microseconds apart,
    could be cut in between. The caller computes all of them first."""
    staged = []
    try:
        for path, data in files.items():
            target = Path(path)
            target.parent.mkdir(parents=True, exist_ok=True)
            partial = _new_sibling(target, _create_file)
            staged.append((partial, target))
            if isinstance(data, bytes):
                partial.write_bytes(data)
            else:
                with open(partial, "w", encoding="utf-8", newline="\n") as file:
                    file.write(data)
        while staged:
            partial, target = staged[0]
            os.replace(partial, target)
            staged.pop(0)
    except BaseException:
        for partial, _ in staged:
            partial.unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def atomic_folder(path: PathLike) -> Iterator[Path]:
    """Yields a new empty folder next to ``path`` for the block to fill. When the block
    ends normally the folder replaces ``path`` (an existing ``path`` is moved aside
    first and deleted after); otherwise it is deleted and ``path`` is left as it was."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    staged = _new_sibling(target, _create_folder)
    try:
        yield staged
        if target.exists():
            trash = _new_sibling(target, _create_folder)
            os.replace(target, trash / target.name)
            os.replace(staged, target)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.replace(staged, target)
    except BaseException:
        shutil.rmtree(staged, ignore_errors=True)
        raise
