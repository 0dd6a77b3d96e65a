"""Warn once per unreadable data file and count them, in the process that trains.

Datasets that replace an unreadable file by the next readable one (images:
:mod:`fairseq_knnvq.data.image_folder`, audio: :mod:`fairseq_knnvq.data.audio`) put
``(path, reason)`` pairs into each item and batch under ``"unreadable"``. Loading may
run in data-loader worker processes, so the warning and the count happen where the
batch arrives, in the task's ``train_step`` / ``valid_step``.
"""

from __future__ import annotations

import logging
from typing import Sequence, Set

logger = logging.getLogger(__name__)

# How many following files (images, audio) to try before giving up on a run of unreadable ones.
MAX_REPLACEMENT_TRIES = 32


class UnreadableFileLog:
    """Warns once per unreadable file (``kind`` names what it is: "image", "audio file")."""

    def __init__(self, kind: str, replacement: str = ""):
        self.kind = kind
        self.replacement = replacement
        self.seen: Set[str] = set()

    def note(self, unreadable: Sequence[Sequence[str]]) -> int:
        """Logs the files not seen before; returns how many entries the batch had."""
        for path, reason in unreadable:
            if path not in self.seen:
                self.seen.add(path)
                logger.warning(
                    f"skipping unreadable {self.kind} {path} ({reason}){self.replacement}; this is "
                    f"reported once per file ({len(self.seen)} so far)"
                )
        return len(unreadable)

    def __len__(self) -> int:
        return len(self.seen)
