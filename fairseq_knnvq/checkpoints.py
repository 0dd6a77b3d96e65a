"""Reading fairseq checkpoints of this plugin (or of stock wav2vec 2.0) outside training.

Every command that reads a checkpoint (``knnvq-report codes``, ``knnvq-infer``,
``knnvq-export-hf``, ``knnvq-eval-image``) goes through these steps:

1. :func:`register_plugins`: fairseq first, then this plugin's models, tasks and
   criterions (fairseq skips a user dir's auto-imports when the package was imported
   before it), which also allow-lists the two harmless classes fairseq checkpoints hold
   (``argparse.Namespace``, ``Dictionary``) for torch's weights-only loading
   (:mod:`fairseq_knnvq.checkpoint_safety`); a file holding anything else is refused
   with a message that names what it holds;
2. :func:`read_checkpoint`: the saved state (``cfg``, ``model`` weights, ``task_state``)
   by fairseq's own ``load_checkpoint_to_cpu``, which also upgrades old checkpoints;
3. :func:`load_model`: the model (eval mode) and task built by fairseq's
   ``load_model_ensemble_and_task`` from that state, which a caller may have changed
   (another data folder, say).

"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, Optional

import torch

from .checkpoint_safety import describe_load_error


class CheckpointError(Exception):
    """A checkpoint that cannot be used; the message names the file and what to do.
    ``detail`` is the underlying error (``"UnpicklingError: ..."``), empty if none."""

    def __init__(self, message: str, detail: str = "") -> None:
        super().__init__(message)
        self.detail = detail


def register_plugins() -> None:
    """Registers this plugin's fairseq parts (safe to call more than once)."""
    import fairseq  # noqa: F401  (before the plugin, so that it registers its parts)

    import fairseq_knnvq

    fairseq_knnvq.register_with_fairseq()


def read_checkpoint(path: Path) -> Dict[str, Any]:
    """The state of the checkpoint file ``path``: ``cfg`` (an OmegaConf config),
    ``model`` (the weights) and what else fairseq saved."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist (give the .pt file that fairseq-hydra-train wrote)")
    register_plugins()
    from fairseq import checkpoint_utils

    try:
        state = checkpoint_utils.load_checkpoint_to_cpu(str(path))
    except Exception as error:  # torch.load raises many types for a file that is no checkpoint
        detail = f"{type(error).__name__}: {error}"
        raise CheckpointError(describe_load_error(str(path), error), detail) from None
    if not isinstance(state, dict) or state.get("cfg") is None or "model" not in state:
        raise CheckpointError(
            f"{path} has no 'cfg' and 'model' entries: not a checkpoint written by fairseq's training"
        )
    return state


def load_model(path: Path, state: Optional[Dict[str, Any]] = None, device: Any = "cpu"):
    """``(model, cfg, task)``: the checkpoint's (first) model in eval mode on ``device``,
    its config and its task, built from ``state`` (default: :func:`read_checkpoint`)."""
    if state is None:
        state = read_checkpoint(path)
    from fairseq import checkpoint_utils

    try:
        models, cfg, task = checkpoint_utils.load_model_ensemble_and_task([str(path)], state=state)
    except Exception as error:
        detail = f"{type(error).__name__}: {error}"
        raise CheckpointError(f"the model in {path} could not be built: {detail}", detail) from error
    return models[0].to(device).eval(), cfg, task


def min_input_samples(model: torch.nn.Module) -> int:
    """The fewest audio samples that give one output frame: the receptive field of the
    model's convolutional feature extractor (400 samples, 25 ms, for wav2vec 2.0).
    A shorter clip has no frame (and crashes ``conv1d`` when alone)."""
    convs = [m for name, m in model.named_modules() if "feature_extractor" in name and isinstance(m, torch.nn.Conv1d)]
    length = 1
    for conv in reversed(convs):
        length = (length - 1) * conv.stride[0] + conv.kernel_size[0]
    return length
