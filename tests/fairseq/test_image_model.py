"""vq_image_autoencoder and image_vq_reconstruction in-process: shapes, losses, pooled
metrics against brute force, summability across workers, the PNG grid."""

import math
import os

import numpy as np
import pytest
import torch
from PIL import Image

import fairseq  # noqa: F401
import fairseq_knnvq  # noqa: F401
from fairseq.logging import metrics

from fairseq_knnvq.criterions.image_vq_reconstruction import (
    ImageVQReconstructionConfig,
    ImageVQReconstructionCriterion,
    psnr_from_mse,
)
from fairseq_knnvq.models.vq_image_autoencoder import VQImageAutoencoder, VQImageAutoencoderConfig

SMALL = dict(channels=8, max_channels=16, num_res_blocks=1, code_dim=8, latent_vars=16)


def make_model(**kw):
    torch.manual_seed(0)
    return VQImageAutoencoder(VQImageAutoencoderConfig(**{**SMALL, "downsample_factor": 4, **kw}))


def make_criterion(grid_dir=None, **kw):
    cfg = ImageVQReconstructionConfig(grid_dir=grid_dir, **kw)
    return ImageVQReconstructionCriterion(cfg, task=None)


def images(n=4, size=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, size, size, generator=g) * 2 - 1


@pytest.mark.parametrize("f", [4, 8, 16])
@pytest.mark.parametrize("quantizer", ["vqvae", "smoothed"])
def test_shapes_for_every_downsampling_factor(f, quantizer):
    model = make_model(downsample_factor=f, quantizer=quantizer, latent_groups=2)
    x = images(2, 32)
    out = model(x)
    assert out["x"].shape == x.shape
    assert out["codes"].shape == (2, 32 // f, 32 // f, 2)
    assert out["usage_sums"].counts.sum() == 2 * 2 * (32 // f) ** 2
    loss = out["x"].pow(2).mean() + sum(out[k] for k in out["training_losses"])
    loss.backward()
    assert all(p.grad is not None for p in model.encoder.parameters())


def test_bad_configuration_and_inputs():
    with pytest.raises(ValueError, match="downsample_factor must be one of"):
        make_model(downsample_factor=2)
    with pytest.raises(ValueError, match="divisible by model.latent_groups"):
        make_model(code_dim=9, latent_groups=2)
    model = make_model()
    with pytest.raises(ValueError, match="multiples of model.downsample_factor=4"):
        model(images(1, 18))
    with pytest.raises(ValueError, match=r"expected images \(B, 3, H, W\)"):
        model(torch.zeros(1, 1, 16, 16))


def test_every_method_trains_the_right_losses():
    assert make_model(quantizer="vqvae").training_losses() == ("vq_loss",)
    assert make_model(regularizer="knn").training_losses() == ("knn_loss",)
    assert make_model(regularizer="diversity").training_losses() == ("diversity_loss",)
    assert make_model(regularizer="none").training_losses() == ()
    rot = make_model(quantizer="vqvae", rotation_trick=True)
    out = rot(images())
    out["x"].mean().backward()
    assert rot.encoder.layers[0].weight.grad.abs().sum() > 0


def test_temperature_follows_updates():
    model = make_model(smoothing="gumbel", latent_temp=(2.0, 0.5, 0.9))
    model.set_num_updates(0)
    assert model.quantizer.curr_temp == pytest.approx(2.0)
    model.set_num_updates(5)
    assert model.quantizer.curr_temp == pytest.approx(2.0 * 0.9**5)
    assert model.num_updates == 5
    model.set_num_updates(1000)
    assert model.quantizer.curr_temp == pytest.approx(0.5)


def test_vqvae_usage_is_hard():
    out = make_model(quantizer="vqvae")(images())
    stats = out["usage_sums"].stats()
    assert stats["prob_perplexity"] == pytest.approx(stats["code_perplexity"])
    assert stats["tightness_max_prob"] == pytest.approx(1.0)
    assert stats["tightness_vertex_l2"] == pytest.approx(0.0)


def test_loss_is_reconstruction_plus_weighted_training_losses():
    x = images()
    sample = {"net_input": {"images": x}}
    for kw, key, name in [
        (dict(regularizer="knn"), "knn_loss", "knn_weight"),
        (dict(regularizer="diversity"), "diversity_loss", "diversity_weight"),
        (dict(quantizer="vqvae"), "vq_loss", "vq_weight"),
        (dict(regularizer="none"), None, None),
    ]:
        model = make_model(**kw).eval()
        crit = make_criterion(knn_weight=0.3, diversity_weight=0.2, vq_weight=0.7)
        loss, sample_size, log = crit(model, sample)
        out = model(x)
        recon = (out["x"] - x).pow(2).flatten(1).mean(1).sum()
        weights = {"knn_weight": 0.3, "diversity_weight": 0.2, "vq_weight": 0.7}
        extra = 0.0 if key is None else weights[name] * 4 * out[key]
        assert sample_size == 4
        assert float(loss.detach()) == pytest.approx(float(recon.detach() + extra), rel=1e-5)
        if key is None:
            # The KNN loss is still reported for comparison, but not trained.
            assert "knn_loss" in log and float(loss.detach()) == pytest.approx(float(recon.detach()), rel=1e-6)


def reduce(logging_outputs):
    with metrics.aggregate(new_root=True) as agg:
        ImageVQReconstructionCriterion.reduce_metrics(logging_outputs)
        return agg.get_smoothed_values()


def test_pooled_metrics_match_brute_force_and_survive_worker_summation():
    model = make_model(regularizer="knn").eval()
    crit = make_criterion()
    batches = [images(3, seed=1), images(5, seed=2)]
    logs, recons, codes = [], [], []
    for x in batches:
        _, _, log = crit(model, {"net_input": {"images": x}})
        logs.append(log)
        with torch.no_grad():
            out = model(x)
        recons.append(out["x"].clamp(-1, 1))
        codes.append(out["codes"].flatten())
    err = torch.cat([(r - x).pow(2).flatten() for r, x in zip(recons, batches)])
    mse = float(err.mean())
    all_codes = torch.cat(codes)
    hist = torch.bincount(all_codes, minlength=16).double()
    p = hist / hist.sum()
    perplexity = math.exp(-(p[p > 0] * p[p > 0].log()).sum().item())

    per_batch = reduce(logs)
    # fairseq's all-reduce sync sums every key of the workers' logging outputs.
    summed = {k: sum(log[k] for log in logs) for k in logs[0]}
    across_workers = reduce([summed])
    for values in (per_batch, across_workers):
        assert values["mse"] == pytest.approx(mse, rel=1e-4)
        assert values["psnr"] == pytest.approx(10 * math.log10(4 / mse), abs=2e-3)
        assert values["used_codes"] == len(set(all_codes.tolist()))
        assert values["pooled_code_perplexity"] == pytest.approx(perplexity, abs=1e-3)
    assert per_batch["loss"] == pytest.approx(across_workers["loss"])
    assert psnr_from_mse(1.0) == pytest.approx(10 * math.log10(4))


def test_validation_grid_is_written_once_per_update(tmp_path):
    """The criterion keeps the images, the task writes them after each validation step
    (as ImageAutoencodingTask.valid_step does)."""
    model = make_model().eval()
    crit = make_criterion(grid_dir=str(tmp_path), grid_images=3)
    grids = crit.validation_grids

    def validate(batch):
        crit(model, {"net_input": {"images": batch}})
        return grids.write_pending()

    x = images(4, 16)
    model.set_num_updates(7)
    assert validate(x) == str(tmp_path / "reconstructions_update0000007.png")
    assert validate(images(4, 16, seed=9)) is None  # same validation
    files = sorted(os.listdir(tmp_path))
    assert files == ["reconstructions_update0000007.png"]
    grid = np.asarray(Image.open(tmp_path / files[0]))
    assert grid.shape == (2 * 16 + 3 * 2, 3 * (16 + 2) + 2, 3)
    expected = ((x[0].clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()
    assert np.array_equal(grid[2:18, 2:18], expected)  # first original, top left

    # After a training step at update 7 (8 completed), the next grid is named 8.
    model.train()
    crit(model, {"net_input": {"images": x}})
    model.eval()
    validate(x)
    assert "reconstructions_update0000008.png" in os.listdir(tmp_path)
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".")]

    no_grid = make_criterion(grid_dir=None)
    no_grid(model, {"net_input": {"images": x}})
    assert no_grid.validation_grids.write_pending() is None


def test_l1_reconstruction_loss():
    model = make_model(regularizer="none").eval()
    x = images()
    loss, _, log = make_criterion(reconstruction_loss="l1")(model, {"net_input": {"images": x}})
    with torch.no_grad():
        expected = (model(x)["x"] - x).abs().flatten(1).mean(1).sum()
    assert float(loss) == pytest.approx(float(expected), rel=1e-6)
    assert log["reconstruction_loss"] == pytest.approx(float(expected), rel=1e-6)
