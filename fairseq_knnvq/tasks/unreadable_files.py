"""Unreadable data files in a run: each warned about once, all counted in the logs.

The datasets of :mod:`fairseq_knnvq.data` replace a file that fails to load (truncated,
corrupt, deleted since the manifest or folder was read; for audio also NaN or inf
samples, or another length than the manifest says) by the next readable one of its
split, and put ``(path, reason)`` pairs under ``"unreadable"`` in the batch. Loading
may run in data-loader worker processes, so the task takes them out of the batch where
it arrives: :class:`CountUnreadableFilesMixin` warns once per file (``skipping
unreadable <kind> <path> (<reason>)``), logs ``unreadable_files`` (items replaced, summed
over workers, in the ``train_inner``, ``train`` and ``valid`` records where it happened)
and repeats the total so far at every epoch start. Speech and image tasks alike.
"""

from __future__ import annotations

import logging

from fairseq.logging import metrics

from ..data.unreadable import UnreadableFileLog

logger = logging.getLogger(__name__)

# The logged metric (fairseq prefixes it: train_unreadable_files, valid_unreadable_files).
UNREADABLE_METRIC = "unreadable_files"


class CountUnreadableFilesMixin:
    """Goes before the fairseq task in the bases. ``unreadable_kind`` names a file in the
    warnings ("audio file", "image"); ``unreadable_fix`` ends the epoch-start warning."""

    unreadable_kind = "file"
    unreadable_fix = ""

    def __init__(self, cfg, *args, **kwargs):
        super().__init__(cfg, *args, **kwargs)
        self.unreadable = UnreadableFileLog(
            self.unreadable_kind, replacement=": replaced by the next readable file of its split"
        )

    def _take_unreadable(self, sample, count: bool) -> int:
        """Removes the batch's ``unreadable`` entries and warns about new files; returns
        how many items were replaced (0 for fairseq's dummy batches: ``count`` False)."""
        if not sample or "unreadable" not in sample:
            return 0
        entries = sample.pop("unreadable")
        return self.unreadable.note(entries) if count else 0

    def train_step(self, sample, model, criterion, optimizer, update_num, ignore_grad=False):
        replaced = self._take_unreadable(sample, count=not ignore_grad)
        loss, sample_size, logging_output = super().train_step(
            sample, model, criterion, optimizer, update_num, ignore_grad
        )
        # Always present (0 too): fairseq sums logging outputs across workers by the
        # keys of the first one, with one all-reduce that needs the same keys everywhere.
        logging_output[UNREADABLE_METRIC] = replaced
        return loss, sample_size, logging_output

    def valid_step(self, sample, model, criterion):
        replaced = self._take_unreadable(sample, count=True)
        loss, sample_size, logging_output = super().valid_step(sample, model, criterion)
        logging_output[UNREADABLE_METRIC] = replaced
        return loss, sample_size, logging_output

    def reduce_metrics(self, logging_outputs, criterion):
        # Taken out before the criterion sees them: wav2vec's criterion logs the mean
        # of every key it does not know, which is not a count.
        replaced = float(sum(log.pop(UNREADABLE_METRIC, 0) for log in logging_outputs))
        super().reduce_metrics(logging_outputs, criterion)
        if replaced:
            metrics.log_scalar_sum(UNREADABLE_METRIC, replaced, round=0)

    def begin_epoch(self, epoch, model):
        super().begin_epoch(epoch, model)
        if len(self.unreadable):
            logger.warning(
                f"{len(self.unreadable)} unreadable {self.unreadable_kind}(s) skipped so far (replaced by "
                f"the next readable file of their split){self.unreadable_fix}"
            )
