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
    """Lets torch >= 2.6's weights-only ``torch.load`` read fairseq checkpoints: the
    ``argparse.Namespace`` of old checkpoints and the ``Dictionary`` of fine-tuning
    checkpoints, nothing else (see :mod:`fairseq_knnvq.checkpoint_safety`)."""
    from .checkpoint_safety import allow_fairseq_checkpoint_classes as allow

    allow()


if "fairseq" in sys.modules:
    register_with_fairseq()
