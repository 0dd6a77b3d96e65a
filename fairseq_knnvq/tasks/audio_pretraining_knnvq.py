"""The ``audio_pretraining_knnvq`` task: fairseq's ``audio_pretraining`` (same options,
same data) whose data survive unreadable files (:mod:`.audio_data`), which stops a run
resumed at ``optimization.max_update`` before it trains (:mod:`.finished_run`), guards
its checkpoint folder (:mod:`.run_folder`: atomic checkpoint files, one run per folder,
a save on SIGTERM / SIGUSR1), logs the usage verdict after each validation
(:mod:`.usage_verdict`) and renames a 0.1.0 model config (:mod:`.renamed_fields`).
"""

from dataclasses import dataclass, field

from omegaconf import II

from fairseq.tasks import register_task
from fairseq.tasks.audio_pretraining import AudioPretrainingConfig, AudioPretrainingTask

from .audio_data import ResilientAudioDataMixin
from .finished_run import MAX_UPDATE_HELP, StopWhenFinishedMixin
from .renamed_fields import RenameOldModelFieldsMixin
from .run_folder import GuardedRunMixin
from .usage_verdict import LogUsageVerdictMixin


@dataclass
class AudioPretrainingKnnVqConfig(AudioPretrainingConfig):
    max_update: int = field(
        default=II("optimization.max_update"),
        metadata={"help": MAX_UPDATE_HELP},
    )


@register_task("audio_pretraining_knnvq", dataclass=AudioPretrainingKnnVqConfig)
class AudioPretrainingKnnVqTask(
    RenameOldModelFieldsMixin,
    LogUsageVerdictMixin,
    GuardedRunMixin,
    StopWhenFinishedMixin,
    ResilientAudioDataMixin,
    AudioPretrainingTask,
):
    """fairseq's ``audio_pretraining``; unreadable files are replaced, logged and counted,
    and a model config with the 0.1.0 field names is renamed before fairseq reads it
    (:mod:`fairseq_knnvq.tasks.renamed_fields`)."""
