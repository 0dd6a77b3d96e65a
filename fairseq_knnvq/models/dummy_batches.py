"""Tells the model when fairseq's trainer runs a dummy batch.

At uneven epoch and validation ends, a worker whose shard has run out gets an empty
sample; ``Trainer._prepare_sample`` replaces it with a "dummy" batch (a copy of the
epoch's first batch) and returns ``(sample, is_dummy=True)``, so that the worker still
runs forward and backward and takes part in every collective. fairseq then zeroes the
batch's loss (``ignore_grad``) and its logging outputs, but never tells the model. A
model whose forward pass mixes rows across workers (the global KNN of
``knn_global=true``) must know: otherwise the dummy rows compete with the real rows of
the other workers for each vertex's K neighbours.

:func:`install` wraps ``Trainer._prepare_sample``: after fairseq has prepared a sample,
the trainer's (unwrapped) model is told whether it is a dummy, through the model's
``mark_next_batch_dummy(is_dummy)`` if it has one. The call happens for every prepared
sample, so the flag is current for the forward call that follows (training and
validation alike); models without the method are not touched.
"""

from __future__ import annotations

import functools
import logging

logger = logging.getLogger(__name__)

_MARK = "mark_next_batch_dummy"
_INSTALLED = "_fairseq_knnvq_reports_dummy_batches"


def install() -> None:
    """Wraps fairseq's ``Trainer._prepare_sample`` (once; later calls do nothing)."""
    from fairseq.trainer import Trainer

    original = getattr(Trainer, "_prepare_sample", None)
    if original is None:
        logger.warning(
            "fairseq's Trainer has no _prepare_sample: fairseq_knnvq cannot tell dummy "
            "batches from real ones, and with knn_global=true their rows take part in the "
            "global KNN at uneven epoch and validation ends"
        )
        return
    if getattr(original, _INSTALLED, False):
        return

    @functools.wraps(original)
    def _prepare_sample(self, *args, **kwargs):
        prepared = original(self, *args, **kwargs)
        _, is_dummy = prepared
        mark = getattr(self.get_model(), _MARK, None)
        if mark is not None:
            mark(bool(is_dummy))
        return prepared

    setattr(_prepare_sample, _INSTALLED, True)
    Trainer._prepare_sample = _prepare_sample


class MarksDummyBatches:
    """The model side of the hook: ``mark_next_batch_dummy`` keeps the flag for the next
    forward call, which takes it with :meth:`take_dummy_mark` (so it lasts one call).

    On a dummy batch a model gives its smoothed quantizer an all-False mask: the rows
    enter no regulariser and no statistic (fairseq discards the batch's loss and logs
    anyway), and with ``knn_global`` the worker still takes part in the candidate
    exchange, but with no candidates, so the K neighbours of every vertex come from
    real batches."""

    _next_batch_is_dummy: bool = False

    def mark_next_batch_dummy(self, is_dummy: bool) -> None:
        """Whether the next forward call is on one of fairseq's dummy batches (called by
        the trainer hook of :func:`install`)."""
        self._next_batch_is_dummy = bool(is_dummy)

    def take_dummy_mark(self) -> bool:
        """The mark for this forward call; the next call is a real batch unless marked."""
        is_dummy, self._next_batch_is_dummy = self._next_batch_is_dummy, False
        return is_dummy
