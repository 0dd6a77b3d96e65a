"""What the plugin's audio tasks add to fairseq's around the data.

An audio file that fails to load during the run (truncated, corrupt, deleted since the
manifest was written), holds NaN or inf samples, or has another frame count than its
manifest line says, is replaced by the next readable one of its split instead of ending
the run (:mod:`fairseq_knnvq.data.audio`), and warned about and counted
(:mod:`fairseq_knnvq.tasks.unreadable_files`). ``knnvq-manifest`` /
``knnvq-prepare-librispeech`` already refuse files that do not decode; this covers what
happens to the files after that check. A split that ``task.data`` lacks stops the run
before the model is built, naming the splits there and the override to use.
"""

import os

from ..data.audio import ReplaceUnreadableDataset
from ..preflight import RunConfigError, missing_manifest_split
from .unreadable_files import CountUnreadableFilesMixin


class ResilientAudioDataMixin(CountUnreadableFilesMixin):
    """Checks that ``task.data`` holds each split before fairseq reads it, wraps every
    loaded split in :class:`ReplaceUnreadableDataset`, and validates every pass on the
    same batches. Goes before a fairseq audio task in the bases."""

    unreadable_kind = "audio file"
    unreadable_fix = "; fix or remove them and rewrite the manifests with knnvq-manifest / knnvq-prepare-librispeech"

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
