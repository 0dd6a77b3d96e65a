"""Every validation pass of a process validates the same batches, cropped the same way.

fairseq caches a split's ``EpochBatchIterator`` and advances its epoch at every pass.
For audio that reorders the clips longer than ``max_sample_size`` (``RawAudioDataset``
breaks their size ties with a permutation seeded by ``seed + epoch``), so the second
pass batched and cropped them otherwise than the first; the audio tasks now give every
validation pass a fresh iterator at epoch 1. Checked in one process with fairseq's own
``Trainer`` and ``fairseq_cli.train.validate`` on the shipped tiny corpus (both checks
fail with the task's ``can_reuse_epoch_itr`` override removed), and that the image task,
whose validation split is neither shuffled nor augmented, makes the same batches in
every pass although its iterator is cached.
"""

import json
import logging

import numpy as np
import torch
from omegaconf import OmegaConf

import fairseq  # noqa: F401  (before the plugin, so that it registers its fairseq parts)
import fairseq_knnvq
from tiny_wav2vec2 import TINY

fairseq_knnvq.register_with_fairseq()

MAX_SAMPLE_SIZE = 16000  # 1 s (tiny_recipe.yaml: 2 s): 31 of the 40 dev clips are longer, and tie
TIMING_KEYS = ("wps", "ups", "wall", "train_wall", "gb_free")


def build_trainer(manifests):
    """fairseq's Trainer for the plugin's pretraining task on the tiny corpus, on the CPU."""
    from fairseq import tasks
    from fairseq.dataclass.configs import FairseqConfig
    from fairseq.trainer import Trainer

    from fairseq_knnvq.criterions.wav2vec_knnvq import Wav2VecKnnVqCriterionConfig
    from fairseq_knnvq.models.wav2vec2_knnvq import Wav2Vec2KnnVqConfig
    from fairseq_knnvq.tasks.audio_pretraining_knnvq import AudioPretrainingKnnVqConfig

    cfg = OmegaConf.structured(FairseqConfig)
    cfg.common.cpu = True
    cfg.common.seed = 1
    cfg.common.log_format = "json"
    cfg.dataset.max_tokens = 160000
    cfg.dataset.required_batch_size_multiple = 1
    cfg.dataset.skip_invalid_size_inputs_valid_test = True
    cfg.dataset.fixed_validation_seed = 7  # the same negatives in every pass
    cfg.distributed_training.ddp_backend = "legacy_ddp"
    cfg.task = OmegaConf.structured(
        AudioPretrainingKnnVqConfig(
            _name="audio_pretraining_knnvq",
            data=str(manifests),
            max_sample_size=MAX_SAMPLE_SIZE,
            min_sample_size=8000,
            normalize=False,
        )
    )
    cfg.model = OmegaConf.structured(
        Wav2Vec2KnnVqConfig(_name="wav2vec2_knnvq", **dict(TINY, regularizer="knn", smoothing="gumbel_hard", knn_k=4))
    )
    cfg.criterion = OmegaConf.structured(
        Wav2VecKnnVqCriterionConfig(
            _name="wav2vec_knnvq",
            infonce=True,
            loss_weights=[0.1, 10],
            knn_weight=0.1,
            log_keys=["prob_perplexity", "code_perplexity", "temp"],
        )
    )
    cfg.optimizer = OmegaConf.create({"_name": "adam"})
    cfg.lr_scheduler = OmegaConf.create({"_name": "fixed"})
    torch.manual_seed(cfg.common.seed)  # as fairseq does before it builds the task
    task = tasks.setup_task(cfg.task)
    task.load_dataset("valid")
    model = task.build_model(cfg.model)
    return cfg, task, model, Trainer(cfg, task, model, task.build_criterion(cfg.criterion))


def test_two_validation_passes_in_one_process_log_identical_records(tiny_manifests, caplog):
    from fairseq_cli.train import validate

    cfg, task, model, trainer = build_trainer(tiny_manifests)
    epoch_itr = trainer.get_train_iterator(epoch=1)  # loads the training split, as train.py does
    # Clips that tie at max_sample_size are what fairseq's epoch-seeded order moves.
    assert (np.asarray(task.dataset("valid").sizes) > MAX_SAMPLE_SIZE).sum() >= 10

    records, batch_ids = [], []
    caplog.set_level(logging.INFO)
    for _ in range(2):
        # What the training update between two validations of a run does: it sets another
        # torch seed, so the model counts its mask draws from 0 again.
        model._mask_calls = [None, 0]
        iterator = trainer.get_valid_iterator("valid")
        batch_ids.append(
            [batch["id"].tolist() for batch in iterator.next_epoch_itr(shuffle=False, set_dataset_epoch=False)]
        )
        assert iterator.epoch == 1
        caplog.clear()
        validate(cfg, trainer, task, epoch_itr, ["valid"])
        logged = [
            json.loads(r.getMessage()) for r in caplog.records if r.name == "valid" and r.getMessage().startswith("{")
        ]
        assert len(logged) == 1
        records.append({k: v for k, v in logged[0].items() if not k.endswith(TIMING_KEYS)})

    assert sorted(i for ids in batch_ids[0] for i in ids) == list(range(len(task.dataset("valid"))))
    assert batch_ids[0] == batch_ids[1]
    assert {"valid_loss", "valid_accuracy", "valid_knn_loss"} <= set(records[0])
    assert records[0] == records[1]  # every logged value, to the digit fairseq prints


def test_image_validation_batches_are_the_same_in_every_pass(tmp_path):
    """The image task keeps fairseq's cached iterator: its validation split is in file
    order and centre-cropped, so the advancing epoch changes nothing."""
    from fairseq_knnvq.preparation.synthetic_images import write_synthetic_image_folder
    from fairseq_knnvq.tasks.image_autoencoding import ImageAutoencodingConfig, ImageAutoencodingTask

    write_synthetic_image_folder(str(tmp_path), {"train": 4, "val": 7}, size=40, seed=3)
    task = ImageAutoencodingTask(
        ImageAutoencodingConfig(data=str(tmp_path), image_size=32, seed=1, train_subset="train", max_update=1)
    )
    task.load_dataset("valid")
    passes = []
    for epoch in (1, 2):
        # Trainer.get_valid_iterator's call; the second returns the cached iterator
        iterator = task.get_batch_iterator(task.dataset("valid"), max_sentences=3, seed=1, epoch=1)
        batches = list(iterator.next_epoch_itr(shuffle=False, set_dataset_epoch=False))
        assert iterator.epoch == epoch
        passes.append(batches)
    assert [b["id"].tolist() for b in passes[0]] == [[0, 1, 2], [3, 4, 5], [6]]
    assert [b["id"].tolist() for b in passes[1]] == [[0, 1, 2], [3, 4, 5], [6]]
    for first, second in zip(*passes):
        assert torch.equal(first["net_input"]["images"], second["net_input"]["images"])
