"""fairseq-knnvq: KNN-to-simplex-vertex regularised smoothed vector quantization.

This folder is a fairseq user dir: ``common.user_dir=$(python -m fairseq_knnvq)``.
fairseq imports it after importing itself and then auto-imports ``models/`` and
``tasks/``; criterions must be imported here. The core in ``quantization/`` never
imports fairseq, so the fairseq parts are registered only when fairseq is already
loaded (or when :func:`register_with_fairseq` is called).
"""
import os
import sys

__version__ = "0.2.0"

PLUGIN_DIR = os.path.dirname(os.path.abspath(__file__))


def register_with_fairseq() -> None:
    """Imports the models, tasks and criterions so that fairseq's registries know them.

    Safe to call more than once. Needed when this package was imported before fairseq
    in the same process: fairseq then skips the user dir's auto-imports."""
    from . import criterions, models, tasks  # noqa: F401
    from .quiet_logs import silence_harmless_warnings

    silence_harmless_warnings()
    allow_fairseq_checkpoint_classes()


def allow_fairseq_checkpoint_classes() -> None:
    """Lets torch >= 2.6's weights-only ``torch.load`` read fairseq checkpoints that hold
    a task state: fine-tuning checkpoints store the target ``Dictionary``, and without
    this fairseq cannot resume them (``UnpicklingError ... Dictionary``)."""
    import torch
    from fairseq.data.dictionary import Dictionary

    add_safe_globals = getattr(torch.serialization, "add_safe_globals", None)
    if add_safe_globals is not None:  # torch < 2.4 loads everything anyway
        add_safe_globals([Dictionary])


if "fairseq" in sys.modules:
    register_with_fairseq()
