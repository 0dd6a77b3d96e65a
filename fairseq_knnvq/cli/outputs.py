"""Checks that a command can write its outputs, made before it starts its work.

Every console script calls :func:`output_folder_problem` on its output folder first, so
that a folder it cannot write ends the command at once with a message naming the
folder, not with a raw ``PermissionError`` after a decode or an evaluation of hours.
"""

from __future__ import annotations

import errno
import tempfile
from pathlib import Path
from typing import Optional


def output_folder_problem(folder: Path, option: str) -> Optional[str]:
    """Why files cannot be written into ``folder`` (created if missing), or ``None``.

    Nothing is left behind: a missing folder is not created here; a temporary file is
    created and removed in the nearest folder that exists.
    """
    folder = Path(folder).absolute()
    existing = folder
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        return f"{option} {folder}: {existing} is a file, not a folder; choose another {option}"
    try:
        with tempfile.TemporaryFile(dir=existing, prefix=".knnvq-write-check-"):
            pass
    except OSError as error:
        reason = error.strerror or errno.errorcode.get(error.errno or 0, type(error).__name__)
        made = "" if existing == folder else f" (it would be created inside {existing})"
        return (
            f"cannot write to {option} {folder}{made}: {reason}; choose a folder you can write "
            f"to, or fix its permissions"
        )
    return None


def output_file_problem(path: Path, option: str) -> Optional[str]:
    """:func:`output_folder_problem` for the folder of the file ``path``, and ``path``
    must not be a folder."""
    path = Path(path).absolute()
    if path.is_dir():
        return f"{option} {path} is a folder; give the file to write, e.g. {path / 'metrics.json'}"
    return output_folder_problem(path.parent, option)
