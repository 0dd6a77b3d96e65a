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
