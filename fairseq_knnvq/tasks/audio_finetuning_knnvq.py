"""The ``audio_finetuning_knnvq`` task: fairseq's ``audio_finetuning`` (same options, same
data) whose data survive unreadable files (:mod:`.audio_data`), which checks
``model.w2v_path`` (:mod:`.pretrained_checkpoint`) and every split's labels against the
dictionary before fairseq uses them, stops a run resumed at ``optimization.max_update``
before it trains (:mod:`.finished_run`) and guards its checkpoint folder
(:mod:`.run_folder`).
"""

import os
from dataclasses import dataclass, field

from omegaconf import II

from fairseq.tasks import register_task
from fairseq.tasks.audio_finetuning import AudioFinetuningConfig, AudioFinetuningTask

from ..preflight import RunConfigError
from ..preparation.labels import describe_unknown_units, find_unknown_units
from .audio_data import ResilientAudioDataMixin
from .finished_run import MAX_UPDATE_HELP, StopWhenFinishedMixin
from .pretrained_checkpoint import check_pretrained_checkpoint
from .run_folder import GuardedRunMixin


@dataclass
class AudioFinetuningKnnVqConfig(AudioFinetuningConfig):
    max_update: int = field(
        default=II("optimization.max_update"),
        metadata={"help": MAX_UPDATE_HELP},
    )


class LabelError(RunConfigError):
    """Fine-tuning labels that the dictionary cannot express; the message says how to fix it."""


@register_task("audio_finetuning_knnvq", dataclass=AudioFinetuningKnnVqConfig)
class AudioFinetuningKnnVqTask(GuardedRunMixin, StopWhenFinishedMixin, ResilientAudioDataMixin, AudioFinetuningTask):
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
