"""fairseq's dummy batches stay out of the global KNN.

At uneven epoch and validation ends fairseq's trainer gives a worker whose shard has run
out a "dummy" batch (a copy of the first batch), runs it through forward (and backward)
so that every collective still happens, and only zeroes its loss, sample size and logs.
Its rows must not compete for the K neighbours of each vertex.

Two real gloo processes: rank 0 holds a real batch, rank 1 a dummy. Checked against the
brute-force KNN loss of rank 0's real rows alone:

- model level (``mark_next_batch_dummy``): the KNN value on both ranks, and the gradient
  that fairseq's averaging applies to the shared quantizer weights; without the mark the
  value is measurably different (the test can fail);
- through fairseq's own ``Trainer.valid_step`` (rank 1 passes the empty sample fairseq's
  iterators yield, which ``Trainer._prepare_sample`` replaces by the dummy batch): the
  logged validation KNN loss;
- the image autoencoder (``vq_image_autoencoder`` with ``knn_global``): the KNN value on
  both ranks against the brute-force loss of rank 0's latent positions alone.
"""

import pytest
import torch
import torch.distributed as dist
from omegaconf import OmegaConf

import fairseq  # noqa: F401  (before the plugin, so that it registers its fairseq parts)
import fairseq_knnvq

from gloo_workers import run_gloo_workers
from tiny_wav2vec2 import TINY, batch, brute_force_knn, capture_quantizer_inputs, sample_of

fairseq_knnvq.register_with_fairseq()

WORLD = 2
K = 4
MODEL = dict(TINY, regularizer="knn", smoothing="softmax", knn_k=K, knn_global=True)


def build_model():
    from fairseq_knnvq.models.wav2vec2_knnvq import Wav2Vec2KnnVqConfig, Wav2Vec2KnnVqModel

    torch.manual_seed(0)
    return Wav2Vec2KnnVqModel(Wav2Vec2KnnVqConfig(**MODEL))


def fairseq_average(params, sample_size):
    """legacy_ddp's SUM all-reduce of grad / world, then Trainer.train_step's
    multiply_grads(world / summed sample sizes); a dummy batch's sample size is 0."""
    total = torch.tensor([float(sample_size)], dtype=torch.float64)
    dist.all_reduce(total)
    for p in params:
        p.grad.div_(WORLD)
        dist.all_reduce(p.grad)
        p.grad.mul_(WORLD / total.item())


def model_level(rank, mark_dummy):
    model = build_model()
    model.train()
    source, padding_mask, mask_indices = batch(model, seed=rank)
    calls = capture_quantizer_inputs(model)
    is_dummy = rank == 1
    if mark_dummy:
        model.mark_next_batch_dummy(is_dummy)
    out = model(source=source, padding_mask=padding_mask, mask_indices=mask_indices)
    sample_size = 0 if is_dummy else int(mask_indices.sum())
    loss = out["knn_loss"] * sample_size  # the trainer zeroes a dummy batch's loss
    params = list(model.quantizer.weight_proj.parameters())
    for p in params:
        p.grad = None
    loss.backward()
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    fairseq_average(params, sample_size)
    return {"knn": float(out["knn_loss"]), "grads": [p.grad.clone() for p in params], "y": calls[-1][0]}


def build_trainer(world_size=1, rank=0):
    """fairseq's own Trainer for the tiny model of these tests, on the CPU."""
    from fairseq import tasks
    from fairseq.dataclass.configs import FairseqConfig
    from fairseq.tasks.audio_pretraining import AudioPretrainingConfig
    from fairseq.trainer import Trainer

    from fairseq_knnvq.criterions.wav2vec_knnvq import Wav2VecKnnVqCriterionConfig
    from fairseq_knnvq.models.wav2vec2_knnvq import Wav2Vec2KnnVqConfig

    cfg = OmegaConf.structured(FairseqConfig)
    cfg.common.cpu = True
    cfg.distributed_training.distributed_world_size = world_size
    cfg.distributed_training.distributed_rank = rank
    cfg.distributed_training.distributed_backend = "gloo"
    cfg.distributed_training.ddp_backend = "legacy_ddp"
    cfg.task = OmegaConf.structured(AudioPretrainingConfig(_name="audio_pretraining", data="unused"))
    cfg.model = OmegaConf.structured(Wav2Vec2KnnVqConfig(_name="wav2vec2_knnvq", **MODEL))
    cfg.criterion = OmegaConf.structured(
        Wav2VecKnnVqCriterionConfig(_name="wav2vec_knnvq", infonce=True, loss_weights=[0.1, 10])
    )
    cfg.optimizer = OmegaConf.create({"_name": "adam"})
    cfg.lr_scheduler = OmegaConf.create({"_name": "fixed"})
    task = tasks.setup_task(cfg.task)
    torch.manual_seed(0)
    model = task.build_model(cfg.model)
    return Trainer(cfg, task, model, task.build_criterion(cfg.criterion)), model


def trainer_level(rank):
    trainer, model = build_trainer(WORLD, rank)
    samples = [sample_of(*batch(model, seed=seed)) for seed in range(WORLD)]
    # fairseq's dummy batch is the epoch's first batch; give rank 1 a different one
    # from rank 0's real batch, so that its rows would matter
    trainer.reset_dummy_batch(samples[1])
    calls = capture_quantizer_inputs(model)
    # fairseq's sharded iterators yield [] on the worker whose shard has run out
    logged = trainer.valid_step(samples[0] if rank == 0 else [])
    return {"knn": logged["knn_loss"], "y": calls[-1][0] if calls else None}


IMAGE_MODEL = dict(
    channels=8,
    max_channels=16,
    num_res_blocks=1,
    code_dim=8,
    latent_vars=16,
    downsample_factor=4,
    smoothing="softmax",
    regularizer="knn",
    knn_k=K,
    knn_global=True,
)


def build_image_model():
    from fairseq_knnvq.models.vq_image_autoencoder import VQImageAutoencoder, VQImageAutoencoderConfig

    torch.manual_seed(0)
    return VQImageAutoencoder(VQImageAutoencoderConfig(**IMAGE_MODEL))


def image_batch(seed):
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(3, 3, 16, 16, generator=generator) * 2 - 1


def image_level(rank, mark_dummy):
    """The image model on rank 0's real batch and rank 1's dummy (another batch, as
    fairseq's dummy is the epoch's first)."""
    model = build_image_model()
    model.train()
    inputs = []
    model.quantizer.register_forward_pre_hook(lambda module, args: inputs.append(args[0].detach()))
    if mark_dummy:
        model.mark_next_batch_dummy(rank == 1)
    out = model(image_batch(seed=rank))
    return {"knn": float(out["knn_loss"]), "used": int(out["usage_sums"].counts.sum()), "z": inputs[-1]}


def image_reference(z):
    """Brute-force KNN loss of latent positions ``z`` (B, h*w, C) in the workers' model."""
    quantizer = build_image_model().quantizer
    logits = quantizer.weight_proj(z).view(-1, quantizer.groups, quantizer.num_vars) / quantizer.curr_temp
    return float(brute_force_knn(logits, K))


def worker_results(rank):
    return {
        "marked": model_level(rank, mark_dummy=True),
        "unmarked": model_level(rank, mark_dummy=False),
        "trainer": trainer_level(rank),
        "image_marked": image_level(rank, mark_dummy=True),
        "image_unmarked": image_level(rank, mark_dummy=False),
    }


@pytest.fixture(scope="module")
def workers(tmp_path_factory):
    return run_gloo_workers(worker_results, WORLD, tmp_path_factory.mktemp("dummy_gloo"))


def reference(y, train):
    """Brute-force KNN loss of rows ``y`` (rank 0's real rows) and its gradient on the
    quantizer's projection, in the model of the workers."""
    model = build_model()
    model.train(train)
    quantizer = model.quantizer
    logits = quantizer.weight_proj(y).view(-1, quantizer.groups, quantizer.num_vars) / quantizer.curr_temp
    loss = brute_force_knn(logits, K)
    grads = torch.autograd.grad(loss, list(quantizer.weight_proj.parameters()))
    return float(loss), grads


@pytest.mark.slow
def test_dummy_rows_take_no_part_in_the_global_knn(workers):
    real = workers[0]["marked"]
    value, grads = reference(real["y"], train=True)
    for rank in range(WORLD):
        got = workers[rank]["marked"]
        assert got["knn"] == pytest.approx(value, rel=1e-5), rank
        for grad, expected in zip(got["grads"], grads):
            scale = float(expected.abs().max())
            assert scale > 0
            torch.testing.assert_close(grad.double(), expected.double(), rtol=0, atol=1e-4 * scale)
    # without the mark, the dummy rows compete for the K slots: another value
    assert abs(workers[0]["unmarked"]["knn"] - value) > 100 * 1e-5 * value


@pytest.mark.slow
def test_fairseq_trainer_tells_the_model_about_its_dummy_batch(workers):
    value, _ = reference(workers[0]["trainer"]["y"], train=False)
    assert workers[1]["trainer"]["y"] is not None  # the dummy batch did run through forward
    for rank in range(WORLD):
        # fairseq rounds logged values to 3 decimals
        assert workers[rank]["trainer"]["knn"] == pytest.approx(value, abs=1e-3), rank
    unmarked_effect = abs(workers[0]["unmarked"]["knn"] - workers[0]["marked"]["knn"])
    assert unmarked_effect > 20 * 1e-3


@pytest.mark.slow
def test_image_dummy_positions_take_no_part_in_the_global_knn(workers):
    real = workers[0]["image_marked"]
    value = image_reference(real["z"])
    assert real["used"] == real["z"].shape[0] * real["z"].shape[1]  # every real position counted
    assert workers[1]["image_marked"]["used"] == 0  # the dummy's positions enter no statistic
    for rank in range(WORLD):
        assert workers[rank]["image_marked"]["knn"] == pytest.approx(value, rel=1e-5), rank
    # without the mark, the dummy positions compete for the K slots: another value
    assert abs(workers[0]["image_unmarked"]["knn"] - value) > 100 * 1e-5 * value


def test_image_mark_lasts_one_forward_call():
    """One process: a marked call gives the smoothed quantizer an all-False mask (no KNN
    loss, no counted code); the next call is a real batch again, equal to an unmarked one."""
    model = build_image_model()
    model.train()
    images = image_batch(seed=0)
    first = model(images)
    model.mark_next_batch_dummy(True)
    dummy = model(images)
    again = model(images)
    assert float(dummy["knn_loss"]) == 0.0 and int(dummy["usage_sums"].counts.sum()) == 0
    assert float(again["knn_loss"]) == float(first["knn_loss"]) > 0.1
    assert torch.equal(again["usage_sums"].counts, first["usage_sums"].counts)


def test_trainer_hook_is_installed_once():
    from fairseq.trainer import Trainer

    from fairseq_knnvq.models import dummy_batches

    hooked = Trainer._prepare_sample
    assert getattr(hooked, dummy_batches._INSTALLED, False)
    dummy_batches.install()
    assert Trainer._prepare_sample is hooked


def test_one_process_trainer_marks_its_dummy_batch():
    """fairseq's Trainer, one process: the empty sample becomes the dummy batch, whose
    frames enter no statistic and no KNN loss, while a real batch's KNN loss is the
    brute-force one; the mark lasts for one forward call only."""
    trainer, model = build_trainer()
    real = sample_of(*batch(model, seed=0))
    trainer.reset_dummy_batch(sample_of(*batch(model, seed=1)))
    calls = capture_quantizer_inputs(model)
    logged = trainer.valid_step(real)
    value, _ = reference(calls[-1][0], train=False)
    assert logged["knn_loss"] == pytest.approx(value, abs=1e-3) and value > 0.1
    dummy = trainer.valid_step([])
    assert dummy["knn_loss"] == 0 and dummy["used_codes"] == 0
    assert not calls[-1][1].any()  # the quantizer got an all-False mask
    again = trainer.valid_step(real)
    assert again["knn_loss"] == logged["knn_loss"]
