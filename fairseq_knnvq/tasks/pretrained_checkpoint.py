"""The check of ``model.w2v_path`` before fine-tuning reads it."""

import os

from ..checkpoint_safety import describe_load_error
from ..preflight import RunConfigError


class PretrainedCheckpointError(RunConfigError):
    """``model.w2v_path`` is not a wav2vec 2.0 pretraining checkpoint; the message says why."""


_PRETRAINING_FIX = (
    "give model.w2v_path the checkpoint_last.pt or checkpoint_best.pt of a pretraining run (configs/pretraining)"
)


def check_pretrained_checkpoint(w2v_path: str) -> None:
    """Raises :class:`PretrainedCheckpointError` unless ``w2v_path`` is a checkpoint of a
    registered model that fine-tuning can start from (one with
    ``remove_pretraining_modules``: wav2vec 2.0, this plugin's wav2vec2_knnvq).

    Without this, fairseq's ``Wav2VecEncoder`` fails with ``KeyError: 544502645`` (a
    text file), an ``AttributeError`` about ``remove_pretraining_modules`` (a fine-tuned
    or image checkpoint) or torch's advice to load with ``weights_only=False`` (for a file
    that holds a class other than those of :mod:`fairseq_knnvq.checkpoint_safety`).
    """
    import torch
    from fairseq.models import MODEL_REGISTRY

    if not os.path.isfile(w2v_path):
        raise PretrainedCheckpointError(f"model.w2v_path {w2v_path} does not exist; {_PRETRAINING_FIX}")
    try:
        with open(w2v_path, "rb") as checkpoint_file:
            state = torch.load(checkpoint_file, map_location="cpu")  # as fairseq loads it
    except Exception as error:  # refused by weights-only loading, a text file, a truncated download
        raise PretrainedCheckpointError(
            f"{describe_load_error(w2v_path, error, 'model.w2v_path ')}; {_PRETRAINING_FIX}"
        ) from None
    if not isinstance(state, dict) or "model" not in state or ("cfg" not in state and "args" not in state):
        raise PretrainedCheckpointError(
            f"model.w2v_path {w2v_path} is a PyTorch file but not a fairseq checkpoint (no 'model' and "
            f"'cfg' entries); {_PRETRAINING_FIX}"
        )
    if state.get("cfg") is not None:
        model_name = state["cfg"]["model"]["_name"]
    else:
        model_name = getattr(state["args"], "arch", None)
    model_class = MODEL_REGISTRY.get(model_name)
    if model_class is None:
        raise PretrainedCheckpointError(
            f"model.w2v_path {w2v_path} holds a '{model_name}' model, which no imported plugin registers; "
            f"pass common.user_dir of the plugin that trained it, or {_PRETRAINING_FIX}"
        )
    if not hasattr(model_class, "remove_pretraining_modules"):
        raise PretrainedCheckpointError(
            f"model.w2v_path {w2v_path} holds a '{model_name}' model (e.g. an already fine-tuned or an "
            f"image model), not a wav2vec 2.0 pretraining checkpoint; {_PRETRAINING_FIX}"
        )
