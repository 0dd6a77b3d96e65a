"""Audio datasets that survive unreadable files.

fairseq's ``FileAudioDataset`` raises ``Exception("Failed to load ...")`` for a file
that does not decode (truncated, corrupt, deleted or moved since the manifest was
written), and that exception ends the whole training run. A LibriSpeech 960 h run
reads 281k files for days, so :class:`ReplaceUnreadableDataset` wraps the task's
dataset and replaces such an item by the next readable one of the split, as the image
dataset does (batches keep their size, which the KNN loss depends on). Each item and
batch carries ``unreadable``: the ``(path, reason)`` pairs it skipped, so that the
process that trains warns once per file and counts them, also when loading runs in
data-loader worker processes (see :class:`fairseq_knnvq.data.unreadable.UnreadableFileLog`).

For fine-tuning the wrapper goes around fairseq's ``AddTargetDataset``, so a replaced
item brings its own transcript: audio and labels never get out of step.

The wrapper also seeds the random crops of fairseq's collater (clips longer than
``max_sample_size``) from the run's seed, the batch's items and, for training splits,
the epoch, so that a resumed run crops what the uninterrupted run cropped. Validation
crops do not depend on the epoch, and the audio tasks give every validation pass a
fresh iterator at epoch 1 (:mod:`fairseq_knnvq.tasks.audio_data`), so every pass
makes the same batches and crops them the same way.
"""

from __future__ import annotations

import os
from typing import Any, Dict, List, Optional, Tuple

import torch
from fairseq.data import BaseWrapperDataset, FairseqDataset, data_utils

from .unreadable import MAX_REPLACEMENT_TRIES

# Why an item whose audio decodes to NaN or inf samples is skipped like an unreadable one.
NON_FINITE_REASON = "non-finite samples (NaN or inf)"


def audio_path(dataset: FairseqDataset, index: int) -> str:
    """The file behind item ``index`` of a (possibly wrapped) ``FileAudioDataset``;
    ``"item <index>"`` when the dataset keeps no file names."""
    inner = _inner_audio_dataset(dataset)
    names = getattr(inner, "fnames", None)
    if names is None or not hasattr(inner, "text_compressor"):
        return f"item {index}"
    name = names[index]
    name = name if isinstance(names, list) else name.as_py()  # a pyarrow array when pyarrow is installed
    return os.path.join(getattr(inner, "root_dir", ""), inner.text_compressor.decompress(name))


def _inner_audio_dataset(dataset: FairseqDataset) -> FairseqDataset:
    inner = dataset
    while not hasattr(inner, "fnames") and isinstance(getattr(inner, "dataset", None), FairseqDataset):
        inner = inner.dataset
    return inner


def manifest_line(dataset: FairseqDataset, index: int) -> Optional[int]:
    """The manifest line (1-based; line 1 is the root folder) of item ``index`` of a
    (possibly wrapped) ``FileAudioDataset``, which leaves out the lines below
    ``min_sample_size``; ``None`` when the dataset keeps no such record."""
    skipped = getattr(_inner_audio_dataset(dataset), "skipped_indices", None)
    if skipped is None:
        return None
    entry = index
    for position in sorted(skipped):
        if position <= entry:
            entry += 1
    return entry + 2


def is_load_error(error: BaseException) -> bool:
    """Whether ``error`` says that a file could not be loaded: fairseq's bare
    ``Exception("Failed to load ...")`` (or its sample-rate ``Exception``), an
    ``OSError`` or soundfile's ``LibsndfileError`` (a ``RuntimeError``). Anything else
    (``TypeError``, ``KeyError``, ...) is a bug and must not be hidden."""
    return type(error) is Exception or isinstance(error, (OSError, RuntimeError))


class ReplaceUnreadableDataset(BaseWrapperDataset):
    """Replaces an item whose loading fails, or whose audio holds a NaN or inf sample,
    by the next item that loads.

    An item that failed once is remembered (per process), so fairseq's three read
    attempts (with 0 + 1 + 2 s of sleep) are spent once per file, not once per epoch;
    it is still reported in every batch that asked for it, so the counts per epoch are
    complete. After ``MAX_REPLACEMENT_TRIES`` consecutive failures the data is taken to
    be broken (a missing folder, a wrong ``task.data``) and the error is raised.
    """

    def __init__(
        self, dataset: FairseqDataset, seed: Optional[int] = None, training: bool = True, manifest: Optional[str] = None
    ):
        super().__init__(dataset)
        # The manifest the items come from, named when a file disagrees with its line.
        self.manifest = manifest
        self.failed: Dict[int, Tuple[str, str]] = {}
        # fairseq seeds torch with common.seed before it builds the task and its data.
        self.seed = torch.initial_seed() % 2**31 if seed is None else seed
        # A training split's crops change from epoch to epoch. A validation split's do
        # not: fairseq counts an "epoch" for every validation pass made by the process,
        # a count that starts again after a resume.
        self.training = training
        self.epoch = 1

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        super().set_epoch(epoch)

    def __getitem__(self, index: int) -> Dict[str, Any]:
        unreadable: List[Tuple[str, str]] = []
        tries = min(MAX_REPLACEMENT_TRIES, len(self.dataset))
        first_error = None
        for step in range(tries):
            current = (index + step) % len(self.dataset)
            if current in self.failed:
                unreadable.append(self.failed[current])
                continue
            try:
                item = self.dataset[current]
            except Exception as error:
                if not is_load_error(error):
                    raise  # a bug or a configuration error, not a bad file
                reason = f"{type(error).__name__}: {error}"
                first_error = first_error or error
                self.failed[current] = (audio_path(self.dataset, current), reason)
                unreadable.append(self.failed[current])
                continue
            source = item.get("source")
            if isinstance(source, torch.Tensor) and not bool(torch.isfinite(source).all()):
                # A NaN or inf sample makes every loss of the batch NaN (fairseq then
                # stops with "gradients are Nan/Inf", naming a layer, not the file).
                self.failed[current] = (audio_path(self.dataset, current), NON_FINITE_REASON)
                unreadable.append(self.failed[current])
                continue
            mismatch = self._frame_count_mismatch(current, source)
            if mismatch:
                self.failed[current] = (audio_path(self.dataset, current), mismatch)
                unreadable.append(self.failed[current])
                continue
            item["id"] = index  # ids stay unique within a batch
            item["unreadable"] = unreadable
            return item
        raise RuntimeError(
            f"could not load any of {tries} consecutive audio files starting at "
            f"{audio_path(self.dataset, index)} (first error: {first_error or unreadable[0][1]}); check that "
            f"task.data points at the right manifests and that the audio is where their first "
            f"line says"
        ) from first_error

    def _frame_count_mismatch(self, index: int, source: Any) -> str:
        """Why the decoded ``source`` of item ``index`` disagrees with the frame count of
        its manifest line (a stale manifest, a file replaced since), or ``""``. fairseq
        batches by the manifest's counts, and a shorter file ends the run with
        "Kernel size can't be greater than actual input size" or "entire sequence is
        masked", naming neither the file nor the line."""
        sizes = getattr(self.dataset, "sizes", None)
        if not isinstance(source, torch.Tensor) or sizes is None or index >= len(sizes):
            return ""
        expected, found = int(sizes[index]), int(source.shape[-1])
        if expected == found:
            return ""
        line = manifest_line(self.dataset, index)
        where = f"{self.manifest or 'the manifest'}" + (f" line {line}" if line is not None else "")
        return (
            f"{where} says {expected} frames, the file has {found}: rewrite the manifest with "
            f"knnvq-manifest / knnvq-prepare-librispeech"
        )

    def collater(self, samples: List[Dict[str, Any]]) -> Dict[str, Any]:
        unreadable = [entry for sample in samples for entry in sample.pop("unreadable", ())]
        # fairseq crops clips longer than max_sample_size at an offset drawn from numpy's
        # global generator, whose state after a resume is not what it was at that point of
        # the uninterrupted run. Seeded by (run seed, epoch, the batch's items), the crops
        # are the same in both, so a resumed run continues with the same numbers.
        epoch = self.epoch if self.training else 0
        with data_utils.numpy_seed(self.seed, epoch, *(sample["id"] for sample in samples)):
            batch = self.dataset.collater(samples)
        if unreadable and len(batch) > 0:
            batch["unreadable"] = unreadable
        return batch
