"""Known-harmless warnings of the libraries under a run, silenced, so that a run's console
shows fairseq's progress, the plugin's metrics and the warnings a user has to act on.

Each entry of :data:`HARMLESS_WARNINGS` is one exact message (a regular expression
matched at its start) of one library, with the reason it needs no action; nothing is
silenced by category alone, so a new warning of the same library still shows.
:func:`silence_harmless_warnings` installs them; the plugin calls it when fairseq
registers it (before the model is built), ``knnvq-train`` before it imports fairseq (so
hydra's warnings go too; stock ``fairseq-hydra-train`` prints hydra's before it imports
the plugin). ``tests/e2e/test_quiet_logs.py`` checks a tiny run's console.
"""

from __future__ import annotations

import logging
import os
import warnings
from typing import Tuple

# (category, message regex, why no action is needed)
HARMLESS_WARNINGS: Tuple[Tuple[type, str, str], ...] = (
    (
        Warning,
        r"\s*The version_base parameter is not specified",
        "fairseq's @hydra.main has no version_base; hydra keeps the 1.1 behaviour fairseq needs",
    ),
    (
        UserWarning,
        r"\s*'[^']*' is validated against ConfigStore schema with the same name",
        "fairseq (and knnvq-train) validate the primary config against FairseqConfig this way; hydra 1.3 supports it",
    ),
    (
        UserWarning,
        r"In '[^']*': Usage of deprecated keyword in package header '# @package _group_'",
        "fairseq's own configs (and configs/finetuning) start with this header; hydra 1.3 still reads it",
    ),
    (
        UserWarning,
        r"Future Hydra versions will no longer change working directory",
        "fairseq writes into hydra.run.dir by changing into it, as hydra 1.3 still does",
    ),
    (
        FutureWarning,
        r"`torch\.nn\.utils\.weight_norm` is deprecated",
        "fairseq's positional convolution uses the old weight_norm; it still works, and checkpoints keep its names",
    ),
    (
        FutureWarning,
        r"`torch\.cuda\.amp\.autocast\(args\.\.\.\)` is deprecated",
        "fairseq's train_step enters torch.cuda.amp.autocast (disabled unless --amp); same behaviour",
    ),
    (
        UserWarning,
        r"Using a non-tuple sequence for multidimensional indexing is deprecated",
        "fairseq's RawAudioDataset.crop_to_max_size indexes with a list of slices; the installed torch still "
        "reads it as a tuple (tests/e2e/test_quiet_logs.py checks that it crops the same)",
    ),
    (
        UserWarning,
        r"'pin_memory' argument is set as true but no accelerator is found",
        "fairseq always asks for pinned memory; on a machine without a GPU there is nothing to pin",
    ),
)

# Loggers of fairseq modules that log a notice at import, which matters only for a task
# this plugin does not run (text to speech: "Please install tensorboardX").
QUIET_IMPORT_LOGGERS = ("fairseq.tasks.text_to_speech", "fairseq.tasks.frm_text_to_speech")


def silence_harmless_warnings() -> None:
    """Installs an ``ignore`` filter for each of :data:`HARMLESS_WARNINGS` (idempotent:
    ``warnings.filterwarnings`` does not add a filter twice)."""
    for category, message, _why in HARMLESS_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category)


def quiet_fairseq_import() -> None:
    """Before ``import fairseq``: the notices its text-to-speech tasks log at import."""
    for name in QUIET_IMPORT_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)


def restore_root_log_level() -> None:
    """After ``import fairseq``: its ``wav2vec2_classification`` module sets the root
    logger to DEBUG at import (``logging.basicConfig(level=logging.DEBUG)``), so hydra's
    own DEBUG lines are printed before it configures logging. Back to fairseq's level:
    ``$LOGLEVEL``, INFO by default, as ``fairseq_cli/train.py`` means it to be."""
    logging.getLogger().setLevel(os.environ.get("LOGLEVEL", "INFO").upper())
