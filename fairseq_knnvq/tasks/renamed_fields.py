"""The model config fields renamed in 0.2.0, and the rename that loads a checkpoint saved
before it as the same variant.

0.1.0 -> 0.2.0 (one vocabulary across speech and images):

- ``wav2vec2_knnvq``: ``quantizer_smoothing`` -> ``smoothing``, ``quantizer_regularizer``
  -> ``regularizer`` (the names of ``vq_image_autoencoder``);
- ``vq_image_autoencoder``: ``codebook_size`` -> ``latent_vars``, ``codebook_groups`` ->
  ``latent_groups``, ``temperature`` -> ``latent_temp`` (the names of wav2vec 2.0);
- criterion ``image_vq_reconstruction``: ``knn_loss_weight`` -> ``knn_weight`` (the name of
  ``wav2vec_knnvq``), ``diversity_loss_weight`` -> ``diversity_weight``,
  ``vq_loss_weight`` -> ``vq_weight``. fairseq never rebuilds a criterion from a
  checkpoint's config, and a YAML with an old name fails loudly at composition, so these
  need no rename here.

fairseq builds a checkpoint's model with ``merge_with_parent(dc(), cfg,
remove_missing=True)`` (``fairseq.models.build_model``, called by the task's
``build_model`` with ``from_checkpoint=True``), which silently drops keys the dataclass
lacks: an old ``quantizer_regularizer: diversity`` would load as the default variant
(knn). The plugin's tasks therefore rename the old keys of the model config first
(:class:`RenameOldModelFieldsMixin`); fine-tuning builds the pretrained model through the
pretraining checkpoint's own task, so this covers it too.
"""

import contextlib
from typing import Any, Dict

from omegaconf import DictConfig, open_dict

RENAMED_MODEL_FIELDS: Dict[str, Dict[str, str]] = {
    "wav2vec2_knnvq": {"quantizer_smoothing": "smoothing", "quantizer_regularizer": "regularizer"},
    "vq_image_autoencoder": {
        "codebook_size": "latent_vars",
        "codebook_groups": "latent_groups",
        "temperature": "latent_temp",
    },
}


def rename_old_model_fields(model_cfg: Any) -> None:
    """Renames, in place, the 0.1.0 fields of a model config (a ``DictConfig`` or dict;
    a dataclass instance has only the new names). Raises ``ValueError`` when an old and
    a new name both hold values that differ."""
    if not isinstance(model_cfg, (DictConfig, dict)):
        return
    renames = RENAMED_MODEL_FIELDS.get(model_cfg.get("_name"), {})
    with open_dict(model_cfg) if isinstance(model_cfg, DictConfig) else contextlib.nullcontext():
        for old, new in renames.items():
            if old not in model_cfg:
                continue
            value = model_cfg.pop(old)
            if new in model_cfg and model_cfg[new] != value:
                raise ValueError(
                    f"model.{old} (renamed model.{new} in 0.2.0) is {value!r} but model.{new} "
                    f"is {model_cfg[new]!r}; keep only model.{new}"
                )
            model_cfg[new] = value


class RenameOldModelFieldsMixin:
    """Renames the 0.1.0 fields of the model config before fairseq merges it with the
    model's dataclass. Goes before the fairseq task class in the bases."""

    def build_model(self, cfg, from_checkpoint=False):
        rename_old_model_fields(cfg)
        return super().build_model(cfg, from_checkpoint)
