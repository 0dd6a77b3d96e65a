"""The wav2vec_knnvq criterion: the stock meaning of loss_weights plus knn_weight, both
regularisers logged by name, and logged metrics that do not depend on how workers are
synced (pooled usage over workers and over the whole validation subset)."""

import pytest
import torch

from fairseq.criterions.wav2vec_criterion import Wav2vecCriterion
from fairseq.logging import metrics

from fairseq_knnvq.criterions.wav2vec_knnvq import (
    COUNT_KEY,
    Wav2vecKnnVqCriterion,
)
from tiny_wav2vec2 import (
    STOCK_LOG_KEYS,
    batch,
    knnvq_model,
    sample_of,
    seeded,
    stock_model,
)


@pytest.mark.parametrize(
    "loss_weights, expected",
    [([0.1, 10], [0.1, 10.0, 0.3]), ([2.0], [2.0, 2.0, 0.3]), (None, [0.0, 0.0, 0.3])],
)
def test_loss_weights_keep_their_stock_meaning_and_knn_weight_is_added(loss_weights, expected):
    criterion = Wav2vecKnnVqCriterion(None, infonce=True, loss_weights=loss_weights, knn_weight=0.3)
    assert criterion.loss_weights == expected


def test_knn_term_enters_the_loss_with_its_weight():
    model = knnvq_model(regularizer="knn")
    source, padding_mask, mask_indices = batch(model)
    sample = sample_of(source, padding_mask, mask_indices)
    model.train()
    totals = {}
    for weight in (0.0, 2.0):
        criterion = Wav2vecKnnVqCriterion(None, infonce=True, loss_weights=[0.1, 10], knn_weight=weight)
        loss, sample_size, log = seeded(lambda: criterion(model, sample))
        totals[weight] = (float(loss), log)
    knn_loss = float(totals[2.0][1]["knn_loss"])  # read back with the other logged values, in one .tolist()
    assert totals[0.0][1]["knn_loss"] == knn_loss
    assert totals[2.0][0] - totals[0.0][0] == pytest.approx(2.0 * knn_loss * int(sample_size), rel=1e-4)


def test_bad_criterion_settings_are_refused_with_the_fix():
    with pytest.raises(ValueError, match="knn_weight"):
        Wav2vecKnnVqCriterion(None, loss_weights=[0.1, 10, 1.0])
    with pytest.raises(ValueError, match="log_keys"):
        Wav2vecKnnVqCriterion(None, loss_weights=[0.1, 10], log_keys=["logits"])
    stock = stock_model()
    source, padding_mask, mask_indices = batch(stock)
    criterion = Wav2vecKnnVqCriterion(None, infonce=True, loss_weights=[0.1, 10])
    with pytest.raises(ValueError, match="wav2vec2_knnvq"):
        criterion(stock, sample_of(source, padding_mask, mask_indices))


def _reduced(reduce, logging_outputs):
    with metrics.aggregate(new_root=True) as aggregator:
        reduce(logging_outputs)
    return aggregator.get_smoothed_values()


def _summed_like_fairseq(logging_outputs):
    """What fairseq's trainer hands reduce_metrics when outputs can be summed
    (Trainer._fast_stat_sync_sum): one dict of double tensors."""
    keys = logging_outputs[0].keys()
    return [{key: torch.as_tensor(sum(log[key] for log in logging_outputs), dtype=torch.double) for key in keys}]


def test_logged_metrics_do_not_depend_on_how_workers_are_synced():
    """Four logging outputs (e.g. 2 workers x 2 micro-batches): summed (fast path, any
    world size) and gathered give the same metrics, equal to fairseq's own criterion on
    the gathered outputs; code usage is pooled from the summed histograms."""
    model = knnvq_model(regularizer="knn")
    model.train()
    criterion = Wav2vecKnnVqCriterion(None, infonce=True, loss_weights=[0.1, 10], log_keys=STOCK_LOG_KEYS)
    logs, usages = [], []
    for seed in range(4):
        model.set_num_updates(1000 * seed)  # different temperatures, so averaging shows
        source, padding_mask, mask_indices = batch(model, seed=seed)
        sample = sample_of(source, padding_mask, mask_indices)
        _, _, log = seeded(lambda: criterion(model, sample), seed=seed)
        logs.append(log)
        with torch.no_grad():
            usages.append(seeded(lambda: model(source=source, mask_indices=mask_indices), seed=seed)["usage_sums"])

    gathered = _reduced(Wav2vecKnnVqCriterion.reduce_metrics, logs)
    summed = _reduced(Wav2vecKnnVqCriterion.reduce_metrics, _summed_like_fairseq(logs))
    stock = _reduced(
        Wav2vecCriterion.reduce_metrics,
        [{k: v for k, v in log.items() if k != COUNT_KEY and not k.startswith("_code_usage")} for log in logs],
    )
    assert gathered.keys() == summed.keys()
    for key in gathered:
        assert summed[key] == pytest.approx(gathered[key], rel=1e-6, abs=1e-9), key
    for key in stock:
        assert gathered[key] == pytest.approx(stock[key], rel=1e-6, abs=1e-9), key
    temps = [log["temp"] for log in logs]
    assert summed["temp"] == pytest.approx(sum(temps) / 4, abs=1e-3)

    union = torch.stack([u.counts for u in usages]).sum(0)
    assert summed["used_codes"] == int((union > 0).sum())
    assert summed["code_usage"] == pytest.approx(int((union > 0).sum()) / union.numel(), abs=1e-4)


def test_validation_usage_is_pooled_over_the_whole_subset():
    """Validation calls reduce_metrics once per batch inside one aggregation: the usage is
    that of all batches together, not the mean of per-batch usages."""
    model = knnvq_model(regularizer="knn", latent_vars=64)
    model.eval()
    criterion = Wav2vecKnnVqCriterion(None, infonce=True, loss_weights=[0.1, 10])
    criterion.eval()
    per_batch, counts = [], []
    with metrics.aggregate(new_root=True) as aggregator:
        for seed in range(3):
            source, padding_mask, mask_indices = batch(model, seed=seed, batch_size=1)
            with torch.no_grad():
                _, _, log = criterion(model, sample_of(source, padding_mask, mask_indices))
                counts.append(model(source=source, mask_indices=mask_indices)["usage_sums"].counts)
            Wav2vecKnnVqCriterion.reduce_metrics([log])
            per_batch.append(float((counts[-1] > 0).sum()))
        values = aggregator.get_smoothed_values()
    pooled_used = int((torch.stack(counts).sum(0) > 0).sum())
    assert values["used_codes"] == pooled_used
    assert pooled_used > max(per_batch)  # a per-batch mean would be smaller


# --- configs -------------------------------------------------------------------------


def test_both_regularisers_are_logged_by_name_for_every_variant():
    for regularizer in ("knn", "diversity", "none"):
        model = knnvq_model(regularizer=regularizer)
        source, padding_mask, mask_indices = batch(model)
        model.train()
        criterion = Wav2vecKnnVqCriterion(None, infonce=True, loss_weights=[0.1, 10])
        _, _, log = seeded(lambda: criterion(model, sample_of(source, padding_mask, mask_indices)))
        net = seeded(lambda: model(source=source, padding_mask=padding_mask, mask_indices=mask_indices))
        expected = (net["num_vars"] - net["prob_perplexity"]) / net["num_vars"]
        assert log["diversity_loss"] == pytest.approx(float(expected), rel=1e-5), regularizer
        assert log["knn_loss"] == pytest.approx(float(net["knn_loss"]), rel=1e-5), regularizer
