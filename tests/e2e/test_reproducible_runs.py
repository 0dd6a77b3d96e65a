"""Same seed, same numbers: wav2vec 2.0 pretraining through stock ``fairseq-hydra-train``
draws its time masks from seeded generators (``model.seeded_masks``, on by default), so
two runs with one ``common.seed`` log identical validation records, another seed gives
other numbers, and a run resumed from a checkpoint trains and validates as if never
stopped."""

import pytest
import torch

import fairseq  # noqa: F401  (before the plugin, so that it registers its fairseq parts)
import fairseq_knnvq
from fairseq_run import CONFIG_DIR, parse_json_log, records_of, run_hydra_train

fairseq_knnvq.register_with_fairseq()

PRETRAINING = CONFIG_DIR / "pretraining"
# Keys that measure time, not the computation.
TIMING_KEYS = ("wps", "ups", "wall", "train_wall", "gb_free")


def _records(log, logger: str):
    """The records of one logger in a parsed log, without the keys that measure time."""
    return [{k: v for k, v in r.items() if not k.endswith(TIMING_KEYS)} for r in records_of(log, logger)]


def _run(manifests, run_dir, seed, max_update):
    """The parsed log of a tiny_knn_ce run validating (and saving) every 4 updates."""
    overrides = [
        f"task.data={manifests}",
        f"common.seed={seed}",
        f"optimization.max_update={max_update}",
        "common.log_interval=1",
        "dataset.validate_interval_updates=4",
        f"checkpoint.save_dir={run_dir / 'checkpoints'}",
        "checkpoint.save_interval_updates=4",
    ]
    return parse_json_log(run_hydra_train(PRETRAINING, "tiny_knn_ce", overrides, run_dir).stdout)


@pytest.mark.slow
def test_same_seed_gives_identical_validation_logs_and_another_seed_differs(tiny_manifests, tmp_path):
    first = _records(_run(tiny_manifests, tmp_path / "a", seed=3, max_update=8), "valid")
    second = _records(_run(tiny_manifests, tmp_path / "b", seed=3, max_update=8), "valid")
    other = _records(_run(tiny_manifests, tmp_path / "c", seed=4, max_update=8), "valid")

    assert [r["valid_num_updates"] for r in first] == [4.0, 8.0]
    assert first == second  # every logged value, to the digit fairseq prints
    # Another seed: other masks, negatives and noise, so the loss and accuracy differ.
    assert all(a["valid_loss"] != b["valid_loss"] for a, b in zip(first, other))
    assert any(a["valid_accuracy"] != b["valid_accuracy"] for a, b in zip(first, other))


@pytest.mark.slow
def test_resumed_run_trains_and_validates_what_the_uninterrupted_run_does(tiny_manifests, tmp_path):
    whole = _run(tiny_manifests, tmp_path / "whole", seed=5, max_update=8)
    # Stops at update 4 (a checkpoint is saved there), then the same command with a
    # larger max_update resumes from checkpoint_last.pt.
    resumed_dir = tmp_path / "resumed"
    part = _run(tiny_manifests, resumed_dir, seed=5, max_update=4)
    rest = _run(tiny_manifests, resumed_dir, seed=5, max_update=8)
    assert [r["num_updates"] for r in _records(whole, "train_inner")] == list(range(1, 9))
    assert [r["valid_num_updates"] for r in _records(whole, "valid")] == [4.0, 8.0]
    # Every logged value of every update (loss, its terms, usage, gradient norm, lr):
    # the same masks, crops, negatives, noise and data order after the resume.
    assert _records(part, "train_inner") + _records(rest, "train_inner") == _records(whole, "train_inner")
    # Every logged value of both validations. The one at update 8 is the uninterrupted
    # run's third pass (after fairseq's start-up dry run and update 4) and the resumed
    # process's second: equal only because every pass gets a fresh validation iterator
    # at epoch 1 (fairseq's cached one advances its epoch, which reorders the clips
    # longer than max_sample_size and moves their crops).
    assert _records(part, "valid") + _records(rest, "valid") == _records(whole, "valid")


def test_stock_masks_stay_available(tmp_path):
    """``seeded_masks=false`` is stock fairseq: masks from fresh OS entropy, so two calls
    under the same torch seed differ; with the default they are equal."""
    from fairseq_knnvq.models.wav2vec2_knnvq import Wav2Vec2KnnVqConfig, Wav2Vec2KnnVqModel

    def masks(seeded: bool):
        cfg = Wav2Vec2KnnVqConfig(
            conv_feature_layers="[(32, 10, 5)] + [(32, 3, 2)] * 2",
            encoder_layers=1,
            encoder_embed_dim=32,
            encoder_ffn_embed_dim=32,
            encoder_attention_heads=2,
            final_dim=16,
            latent_vars=8,
            conv_pos=4,
            conv_pos_groups=4,
            seeded_masks=seeded,
        )
        model = Wav2Vec2KnnVqModel(cfg)
        drawn = []
        for _ in range(2):
            torch.manual_seed(11)  # what fairseq's trainer does before each update
            model._mask_calls = [None, 0]
            _, mask = model.apply_mask(torch.zeros(4, 200, 32), None)
            drawn.append(mask)
        return drawn

    seeded_a, seeded_b = masks(True)
    assert torch.equal(seeded_a, seeded_b)
    assert 0.3 < seeded_a.float().mean() < 0.8  # fairseq's mask_prob 0.65, span 10, overlaps
    stock_a, stock_b = masks(False)
    assert not torch.equal(stock_a, stock_b)
