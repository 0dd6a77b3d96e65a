"""fairseq's audio tasks with datasets that survive unreadable files.

``audio_pretraining_knnvq`` and ``audio_finetuning_knnvq`` are fairseq's
``audio_pretraining`` and ``audio_finetuning`` (same options, same data), except that
an audio file that fails to load during the run (truncated, corrupt, deleted since the
manifest was written), holds NaN or inf samples, or has another frame count than its
manifest line says, is replaced by the next readable one of its split instead of
ending the run (see :mod:`fairseq_knnvq.data.audio`). Each such file is logged once
(``skipping unreadable audio file <path> (<reason>)``) and counted in fairseq's
logged metrics as ``unreadable_audio`` (items replaced, summed over workers, in the
``train_inner``, ``train`` and ``valid`` records where it happened).

``knnvq-manifest`` / ``knnvq-prepare-librispeech`` already refuse files that do not
decode; this covers what happens to the files after that check.

Also: ``audio_finetuning_knnvq`` checks every split's labels against the dictionary and
``model.w2v_path`` before fairseq uses them, and both tasks stop a run resumed at
``optimization.max_update`` before it trains (:mod:`fairseq_knnvq.tasks.finished_run`);
their checkpoint folders are guarded by :mod:`fairseq_knnvq.tasks.run_folder` (atomic
checkpoint files, one run per folder, a save on SIGTERM / SIGUSR1).
"""

import logging
import os
from dataclasses import dataclass, field

from omegaconf import II

from fairseq.tasks import register_task
from fairseq.tasks.audio_finetuning import AudioFinetuningConfig, AudioFinetuningTask
from fairseq.tasks.audio_pretraining import AudioPretrainingConfig, AudioPretrainingTask
from fairseq.logging import metrics

from ..checkpoint_safety import describe_load_error
from ..data.audio import ReplaceUnreadableDataset
from ..preparation.labels import describe_unknown_units, find_unknown_units
from ..data.unreadable import UnreadableFileLog
from ..preflight import RunConfigError, missing_manifest_split
from .finished_run import MAX_UPDATE_HELP, StopWhenFinishedMixin
from .renamed_fields import RenameOldModelFieldsMixin
from .run_folder import GuardedRunMixin
from .usage_verdict import LogUsageVerdictMixin

logger = logging.getLogger(__name__)

# The logged metric (fairseq prefixes it: train_unreadable_audio, valid_unreadable_audio).
UNREADABLE_METRIC = "unreadable_audio"


@dataclass
class AudioPretrainingKnnvqConfig(AudioPretrainingConfig):
    max_update: int = field(
        default=II("optimization.max_update"),
        metadata={"help": MAX_UPDATE_HELP},
    )


@dataclass
class AudioFinetuningKnnvqConfig(AudioFinetuningConfig):
    max_update: int = field(
        default=II("optimization.max_update"),
        metadata={"help": MAX_UPDATE_HELP},
    )


class ReplaceUnreadableAudioMixin:
    """Wraps every loaded split in :class:`ReplaceUnreadableDataset`, warns once per
    unreadable file and logs the count. Goes before a fairseq audio task in the bases."""

    def __init__(self, cfg):
        super().__init__(cfg)
        self.unreadable = UnreadableFileLog(
            "audio file", replacement=": replaced by the next readable file of its split"
        )

    def load_dataset(self, split: str, task_cfg=None, **kwargs):
        cfg = task_cfg or self.cfg
        if cfg.get("multi_corpus_keys", None) is None:
            # fairseq loads the training split with combine=True, validation splits without
            option = "dataset.train_subset" if kwargs.get("combine") else "dataset.valid_subset"
            missing = missing_manifest_split(cfg.data, split, option)
            if missing is not None:
                raise RunConfigError(missing)
        super().load_dataset(split, task_cfg, **kwargs)
        # fairseq's training subsets are named train* by convention (train, train_10h, ...)
        self.datasets[split] = ReplaceUnreadableDataset(
            self.datasets[split],
            training=split.startswith("train"),
            manifest=os.path.join((task_cfg or self.cfg).data, f"{split}.tsv"),
        )

    def can_reuse_epoch_itr(self, dataset) -> bool:
        # fairseq caches a split's EpochBatchIterator and advances its epoch at every
        # pass, although the trainer asks for epoch 1 "to keep validation data
        # consistent". The batches of epoch e are made under numpy_seed(seed + e), and
        # RawAudioDataset orders clips of equal cropped length (all those longer than
        # max_sample_size) by a permutation drawn there: the second validation pass of a
        # process would batch and crop them otherwise than the first, and a resumed run
        # (which starts again at epoch 1) otherwise than the uninterrupted run. A fresh
        # iterator at epoch 1 for every validation pass makes every pass the same.
        if isinstance(dataset, ReplaceUnreadableDataset) and not dataset.training:
            return False
        return super().can_reuse_epoch_itr(dataset)

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
                f"{len(self.unreadable)} unreadable audio file(s) skipped so far (replaced by "
                f"the next readable file of their split); fix or remove them and rewrite the "
                f"manifests with knnvq-manifest / knnvq-prepare-librispeech"
            )


@register_task("audio_pretraining_knnvq", dataclass=AudioPretrainingKnnvqConfig)
class AudioPretrainingKnnvqTask(
    RenameOldModelFieldsMixin,
    LogUsageVerdictMixin,
    GuardedRunMixin,
    StopWhenFinishedMixin,
    ReplaceUnreadableAudioMixin,
    AudioPretrainingTask,
):
    """fairseq's ``audio_pretraining``; unreadable files are replaced, logged and counted,
    and a model config with the 0.1.0 field names is renamed before fairseq reads it
    (:mod:`fairseq_knnvq.tasks.renamed_fields`)."""


class LabelError(RunConfigError):
    """Fine-tuning labels that the dictionary cannot express; the message says how to fix it."""


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


@register_task("audio_finetuning_knnvq", dataclass=AudioFinetuningKnnvqConfig)
class AudioFinetuningKnnvqTask(
    GuardedRunMixin, StopWhenFinishedMixin, ReplaceUnreadableAudioMixin, AudioFinetuningTask
):
    """fairseq's ``audio_finetuning``; unreadable files are replaced, logged and counted,
    and every split's labels are checked against the dictionary before it is loaded
    (fairseq would silently train units it lacks as ``<unk>``)."""

    def build_model(self, model_cfg, from_checkpoint=False):
        # Only when fairseq's Wav2VecEncoder will read w2v_path: not when the config
        # already holds the pretrained model's config (a fine-tuned checkpoint).
        w2v_path = model_cfg.get("w2v_path", None)
        if w2v_path and model_cfg.get("w2v_args", None) is None:
            check_pretrained_checkpoint(w2v_path)
        return super().build_model(model_cfg, from_checkpoint)

    def load_dataset(self, split: str, task_cfg=None, **kwargs):
        cfg = task_cfg or self.cfg
        if cfg.labels and cfg.get("multi_corpus_keys") is None:
            self.check_labels(os.path.join(self.cfg.data, f"{split}.{cfg.labels}"))
        super().load_dataset(split, task_cfg, **kwargs)

    def check_labels(self, label_path: str) -> None:
        """Raises :class:`LabelError` naming the lines and units of ``label_path`` that
        the target dictionary lacks (the same rule as ``knnvq-infer``)."""
        if not os.path.isfile(label_path):
            return  # fairseq's own error names the missing file
        dictionary_dir = self.cfg.target_dictionary or self.cfg.data
        dictionary_path = os.path.join(dictionary_dir, f"dict.{self.cfg.labels}.txt")
        try:
            with open(label_path, encoding="utf-8") as label_file:
                found = find_unknown_units(label_file, self.target_dictionary.indices)
        except UnicodeDecodeError as error:
            raise LabelError(
                f"{label_path} is not UTF-8 text ({error}); write it again with knnvq-prepare-librispeech"
            ) from None
        if found is not None:
            raise LabelError(
                describe_unknown_units(label_path, found, dictionary_path)
                + ". fairseq would train them as <unk>. Labels and dictionary must come from the "
                "same knnvq-prepare-librispeech run (its dictionary holds the units of the "
                "--dict-from split, 'train' by default, so every other split may only use those), "
                "and the transcripts should be normalised first (LibriSpeech style: upper case, "
                "digits spelled out, no accents); or add the units to the dictionary before "
                "fine-tuning starts."
            )
