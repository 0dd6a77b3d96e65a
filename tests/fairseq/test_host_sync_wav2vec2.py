"""A wav2vec 2.0 training step through the plugin reads no more values back to the host
than stock fairseq's, counted the same way for both (``tests/core/test_host_sync.py``'s
recorder: syncing operators and host copies).

Stock's own step reads some: ``padding_mask.any()`` and a row sum per utterance when
the batch has padding, ``neg_is_pos.any()`` in the negatives, boolean indexing by the
time mask; its criterion reads every logged value with ``.item()``. The plugin's model
adds none (the quantizers read nothing; the mask seeds take numpy indices; the padding
is learnt from stock's own check), and its criterion one device-to-host copy for all the
values it adds to the logs.
"""

import sys
from collections import Counter
from pathlib import Path

import pytest
import torch

from fairseq.criterions.wav2vec_criterion import Wav2vecCriterion
from fairseq.data.data_utils import compute_mask_indices

from fairseq_knnvq.criterions.wav2vec_knnvq import Wav2vecKnnVqCriterion
from tiny_wav2vec2 import STOCK_LOG_KEYS, batch, capture_quantizer_inputs, knnvq_model, sample_of, stock_model

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "core"))
from test_host_sync import HostCopyRecorder, SyncRecorder  # noqa: E402


def record(step):
    """(syncing operators, host copies) of ``step()``."""
    with HostCopyRecorder() as copies, SyncRecorder() as syncs:
        step()
    return syncs.found, copies.found


def model_step(model, net_input):
    def step():
        out = model(**net_input)
        extra = [loss for loss in model.get_extra_losses(out) if loss is not None]
        (out["x"].float().sum() + sum(loss.float().sum() for loss in extra)).backward()

    return step


OVERRIDES = {
    "default": {},
    "channel_masks": dict(mask_channel_prob=0.2, mask_channel_length=4),
    "quantize_input": dict(quantize_input=True),
    "negatives_from_everywhere": dict(negatives_from_everywhere=True),
}


@pytest.mark.parametrize("padded_samples", [0, 1600])
@pytest.mark.parametrize("regularizer", ["knn", "diversity"])
@pytest.mark.parametrize("name", list(OVERRIDES))
def test_model_step_makes_no_more_syncs_than_stock(name, regularizer, padded_samples):
    overrides = OVERRIDES[name]
    stock = stock_model(seed=0, **overrides).train()
    ours = knnvq_model(seed=0, regularizer=regularizer, **overrides).train()
    source, padding_mask, _ = batch(stock, padded_samples=padded_samples)
    net_input = {"source": source, "padding_mask": padding_mask}
    found = {}
    for label, model in (("stock", stock), ("plugin", ours)):
        torch.manual_seed(1)
        syncs, copies = record(model_step(model, net_input))
        found[label] = syncs + copies
    assert found["stock"]  # the count sees stock's own reads
    assert len(found["plugin"]) <= len(found["stock"]), (found["plugin"], found["stock"])
    assert not Counter(found["plugin"]) - Counter(found["stock"]), found


def test_criterion_step_adds_one_host_copy_for_all_its_values():
    """Criterion forward + backward: the operators stock's criterion and model sync on,
    plus one host copy for the plugin's logged values; its logging output then holds
    host values only (fairseq's trainer reads every meter after every step), also in the
    first step, whose KNN-rows check reads the host copy."""
    stock = stock_model(seed=0).train()
    ours = knnvq_model(seed=0, regularizer="knn").train()
    sample = sample_of(*batch(stock, padded_samples=1600))
    criteria = {
        "stock": Wav2vecCriterion(None, infonce=True, loss_weights=[0.1, 10], log_keys=STOCK_LOG_KEYS),
        "plugin": Wav2vecKnnVqCriterion(None, infonce=True, loss_weights=[0.1, 10], log_keys=STOCK_LOG_KEYS),
    }
    found, logs = {}, {}
    for label, model in (("stock", stock), ("plugin", ours)):

        def step():
            loss, _, logs[label] = criteria[label](model, sample)
            loss.backward()

        torch.manual_seed(1)
        found[label] = record(step)
    assert Counter(found["plugin"][0]) == Counter(found["stock"][0])
    assert found["stock"][1] == [] and found["plugin"][1] == ["Tensor.tolist"]
    assert criteria["plugin"].check_knn_rows.done
    added = logs["plugin"].keys() - logs["stock"].keys()
    assert {"knn_loss", "diversity_loss", "knn_rows", "knn_rows_per_vertex", "_code_usage_2x16"} <= added
    for key in added:
        value = logs["plugin"][key]
        assert not torch.is_tensor(value) or (key.startswith("_code_usage") and value.device.type == "cpu"), key


def test_seeded_masks_are_those_of_torch_indices():
    """The mask seeds take numpy indices: fairseq's compute_mask_indices then draws what
    it draws with ``indices=torch.arange(B)`` (the same Python ints in the seed hash)."""
    model = knnvq_model(seed=0, mask_channel_prob=0.3, mask_channel_length=3, mask_channel_before=False)
    x = torch.ones(4, 60, 32)
    padding = torch.arange(60).unsqueeze(0) >= torch.tensor([[60], [45], [60], [30]])
    torch.manual_seed(11)
    model._mask_calls = [None, 0]
    seed = model._mask_seed()
    torch.manual_seed(11)
    model._mask_calls = [None, 0]
    masked, time_mask = model.apply_mask(x.clone(), padding)
    expected = compute_mask_indices(
        (4, 60),
        padding,
        model.mask_prob,
        model.mask_length,
        model.mask_selection,
        model.mask_other,
        min_masks=2,
        no_overlap=model.no_mask_overlap,
        min_space=model.mask_min_space,
        require_same_masks=model.cfg.require_same_masks,
        mask_dropout=model.cfg.mask_dropout,
        seed=seed,
        epoch=0,
        indices=torch.arange(4),
    )
    channels = compute_mask_indices(
        (4, 32),
        None,
        model.mask_channel_prob,
        model.mask_channel_length,
        model.mask_channel_selection,
        model.mask_channel_other,
        no_overlap=model.no_mask_channel_overlap,
        min_space=model.mask_channel_min_space,
        seed=seed,
        epoch=1,
        indices=torch.arange(4),
    )
    assert torch.equal(time_mask, torch.from_numpy(expected))
    channel_mask = torch.from_numpy(channels).unsqueeze(1).expand(-1, 60, -1)
    assert channel_mask.any() and torch.equal(masked == 0, channel_mask)  # channel masks zero the features


@pytest.mark.parametrize("padded_samples", [None, 0, 1600])
def test_input_quantizer_sees_the_valid_frames_from_stocks_padding_check(padded_samples):
    """Without padding (no padding mask, or one that is all False) the input quantizer
    gets no mask; with padding, the frames within each utterance's length."""
    model = knnvq_model(seed=0, quantize_input=True, regularizer="knn").train()
    calls = capture_quantizer_inputs(model)
    source, padding_mask, _ = batch(model, padded_samples=padded_samples or 0)
    if padded_samples == 0:
        padding_mask = torch.zeros_like(source, dtype=torch.bool)
    torch.manual_seed(1)
    model(source=source, padding_mask=padding_mask)
    _, mask = calls[0]
    if not padded_samples:
        assert mask is None
    else:
        lengths = model._get_feat_extract_output_lengths((~padding_mask).long().sum(-1))
        assert torch.equal(mask, torch.arange(mask.shape[1]).unsqueeze(0) < lengths.unsqueeze(1))
        assert not mask.all()
    assert model._feature_lengths is None  # only within a forward call
