"""A lock file that keeps a second process out of a folder in use.

Two trainings started into one ``checkpoint.save_dir`` overwrite each other's
checkpoints, and a second ``knnvq-study`` into one ``--out`` deletes the first one's
running run. :class:`FolderLock` creates ``<folder>/<name>`` with ``O_CREAT | O_EXCL``
(atomic on local and NFS v3+ file systems) holding who took it: process id, host, the
process's start time, the SLURM job id and the command. It is removed when the process
exits normally (``atexit``, and multiprocessing's exit hook for a spawned worker), also
on ``sys.exit``.

A lock whose process is gone (killed with SIGKILL, a crashed node) is recognised as
stale and taken over, with a warning: on the same host when no process of that id runs
or when the id now belongs to a process that started later (ids are reused); on any
host when it was taken by the same SLURM job (a requeued job starts again, possibly on
another node). A lock from another host and another job cannot be checked from here:
the error names it and says to delete it if that process no longer runs.
"""

from __future__ import annotations

import atexit
import datetime
import json
import logging
import multiprocessing.util
import os
import socket
import sys
from pathlib import Path
from typing import Any, Dict, Optional

logger = logging.getLogger(__name__)


class FolderInUseError(Exception):
    """The folder is locked by a process that (as far as can be told) still runs; the
    message names it and the fix."""


def _process_start_ticks(pid: int) -> Optional[int]:
    """The start time of process ``pid`` in clock ticks since boot (Linux ``/proc``),
    ``None`` where that cannot be read."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat:
            fields = stat.read().rsplit(b")", 1)[1].split()
        return int(fields[19])  # field 22 of proc(5); the split starts at field 3
    except (OSError, IndexError, ValueError):
        return None


def _holder_is_running(holder: Dict[str, Any]) -> bool:
    """Whether the process that wrote ``holder`` may still run (True when unknown)."""
    job = os.environ.get("SLURM_JOB_ID")
    if job and holder.get("slurm_job_id") == job:
        return False  # this job was requeued: its earlier run has ended
    if holder.get("host") != socket.gethostname():
        return True
    pid = holder.get("pid")
    if not isinstance(pid, int):
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # runs, as another user
    started = holder.get("start_ticks")
    now_started = _process_start_ticks(pid)
    if started is not None and now_started is not None and now_started != started:
        return False  # the id was reused by a later process
    return True


class FolderLock:
    """``FolderLock(folder, "run.lock", "training into checkpoint.save_dir")``; call
    :meth:`acquire` (raises :class:`FolderInUseError`) and, optionally, :meth:`release`.
    ``what`` says what the folder is used for, in the messages."""

    def __init__(self, folder, name: str, what: str, fix: str) -> None:
        self.folder = Path(folder).absolute()  # hydra changes the working folder back at exit
        self.path = self.folder / name
        self.what = what
        self.fix = fix
        self.held = False

    def _record(self) -> Dict[str, Any]:
        return {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "start_ticks": _process_start_ticks(os.getpid()),
            "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
            "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
            "command": " ".join(sys.argv),
        }

    def holder(self) -> Optional[Dict[str, Any]]:
        """The record in the lock file; ``{}`` for one that cannot be parsed, ``None``
        when there is no lock file."""
        try:
            text = self.path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return None
        try:
            record = json.loads(text)
        except ValueError:
            return {}
        return record if isinstance(record, dict) else {}

    def acquire(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        for _ in range(3):
            try:
                descriptor = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
            except FileExistsError:
                holder = self.holder()
                if holder is None:
                    continue  # removed in between: try again
                if holder == {}:
                    # Being written this instant by another process, or left empty by a
                    # crash within that instant: look once more before judging.
                    import time

                    time.sleep(0.2)
                    holder = self.holder()
                    if holder is None:
                        continue
                if holder and _holder_is_running(holder):
                    raise FolderInUseError(self._in_use_message(holder))
                logger.warning(
                    f"{self.path}: stale lock of process {holder.get('pid', '?')} on "
                    f"{holder.get('host', '?')} (started {holder.get('started', '?')}), which no longer "
                    f"runs; taking it over"
                )
                self.path.unlink(missing_ok=True)
                continue
            with os.fdopen(descriptor, "w", encoding="utf-8") as lock_file:
                json.dump(self._record(), lock_file)
                lock_file.flush()
                os.fsync(lock_file.fileno())
            self.held = True
            atexit.register(self.release)
            # Processes of multiprocessing (fairseq's spawned workers) skip atexit.
            multiprocessing.util.Finalize(None, self.release, exitpriority=10)
            return
        raise FolderInUseError(f"{self.path} keeps changing: another process is taking it; {self.fix}")

    def _in_use_message(self, holder: Dict[str, Any]) -> str:
        return (
            f"{self.folder} is in use: process {holder.get('pid', '?')} on {holder.get('host', '?')} "
            f"(started {holder.get('started', '?')}: {holder.get('command', '?')}) is {self.what} there. "
            f"{self.fix}. If that process no longer runs, delete {self.path}"
        )

    def release(self) -> None:
        """Removes the lock file if this process holds it."""
        if not self.held:
            return
        holder = self.holder()
        if holder and holder.get("pid") == os.getpid() and holder.get("host") == socket.gethostname():
            self.path.unlink(missing_ok=True)
        self.held = False
