"""The ``image_autoencoding`` task: discrete image autoencoding on an image folder.

Reads ``<data>/<split>/<class>/*.JPEG`` (ImageNet layout; fairseq's ``valid`` subset
also finds ImageNet's ``val`` folder) or a file list ``<data>/<split>.txt``; see
:mod:`fairseq_knnvq.data.image_folder`. Batches hold ``dataset.batch_size`` images.
"""

import logging
from dataclasses import dataclass, field
from typing import Optional

from omegaconf import II, MISSING

from fairseq.dataclass import FairseqDataclass
from fairseq.tasks import FairseqTask, register_task

from ..data.image_folder import ImageFolderDataset, find_split
from .finished_run import MAX_UPDATE_HELP, StopWhenFinishedMixin
from .renamed_fields import RenameOldModelFieldsMixin
from .run_folder import GuardedRunMixin
from .unreadable_files import CountUnreadableFilesMixin
from .usage_verdict import LogUsageVerdictMixin

logger = logging.getLogger(__name__)


@dataclass
class ImageAutoencodingConfig(FairseqDataclass):
    data: str = field(
        default=MISSING,
        metadata={
            "help": "folder with one sub-folder per split (<data>/train/<class>/*.JPEG, "
            "<data>/val/...) or file lists <data>/<split>.txt (one image path per line)"
        },
    )
    image_size: int = field(default=256, metadata={"help": "side of the square crop fed to the model"})
    resize_size: Optional[int] = field(
        default=None,
        metadata={
            "help": "the shorter image side is resized to this before cropping "
            "(default: image_size); larger values make the random training crop "
            "cover less of the image"
        },
    )
    augment_train: bool = field(
        default=True,
        metadata={"help": "random crop and horizontal flip for the training subset"},
    )
    train_subset: str = II("dataset.train_subset")
    max_update: int = field(default=II("optimization.max_update"), metadata={"help": MAX_UPDATE_HELP})
    seed: int = II("common.seed")
    # Read by FairseqTask.get_batch_iterator. Rebuilding the batches every epoch
    # reshuffles which images share a batch (not only the batch order), and a fresh
    # data loader per epoch hands the new epoch number to the worker processes, which
    # seeds the random crops.
    rebuild_batches: bool = field(default=True, metadata={"help": "reshuffle the images into new batches every epoch"})
    reuse_dataloader: bool = field(
        default=False,
        metadata={"help": "keep one data loader across epochs (then the workers keep the first epoch's crop seeds)"},
    )
    persistent_workers: bool = field(default=False, metadata={"help": "keep data-loader workers alive between epochs"})


@register_task("image_autoencoding", dataclass=ImageAutoencodingConfig)
class ImageAutoencodingTask(
    RenameOldModelFieldsMixin,
    LogUsageVerdictMixin,
    GuardedRunMixin,
    StopWhenFinishedMixin,
    CountUnreadableFilesMixin,
    FairseqTask,
):
    """Unreadable images are replaced by the next readable one, warned about once and
    counted (:mod:`fairseq_knnvq.tasks.unreadable_files`); a model config with the 0.1.0
    field names is renamed before fairseq reads it (:mod:`fairseq_knnvq.tasks.renamed_fields`)."""

    unreadable_kind = "image"

    cfg: ImageAutoencodingConfig

    @classmethod
    def setup_task(cls, cfg: ImageAutoencodingConfig, **kwargs):
        return cls(cfg)

    def load_dataset(self, split: str, epoch: int = 1, combine: bool = False, **kwargs):
        paths = find_split(self.cfg.data, split)
        is_train = split == self.cfg.train_subset
        self.datasets[split] = ImageFolderDataset(
            paths,
            image_size=self.cfg.image_size,
            resize_size=self.cfg.resize_size,
            augment=is_train and self.cfg.augment_train,
            shuffle=is_train,
            seed=self.cfg.seed,
            on_unreadable="replace",
        )
        logger.info(f"split {split}: {len(paths)} images from {self.cfg.data}")

    def get_batch_iterator(self, dataset, max_tokens=None, max_sentences=None, **kwargs):
        if max_tokens is None and max_sentences is None:
            raise ValueError(
                "image_autoencoding needs a batch size: set dataset.batch_size (images per batch and worker)"
            )
        return super().get_batch_iterator(dataset, max_tokens=max_tokens, max_sentences=max_sentences, **kwargs)

    def valid_step(self, sample, model, criterion):
        result = super().valid_step(sample, model, criterion)
        grids = getattr(criterion, "validation_grids", None)
        if grids is not None:  # the image criterion keeps, the task writes
            grids.write_pending()
        return result

    def max_positions(self):
        return None

    @property
    def source_dictionary(self):
        return None

    @property
    def target_dictionary(self):
        return None
