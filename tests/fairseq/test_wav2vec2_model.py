"""wav2vec2_knnvq: parity with stock fairseq wav2vec 2.0 (weights, outputs, losses,
gradients, padded batches), the KNN term of the masked frames, and padding kept out of
the regulariser and the statistics."""

import pytest
import torch

from fairseq.criterions.wav2vec_criterion import Wav2vecCriterion

from fairseq_knnvq.criterions.wav2vec_knnvq import (
    Wav2vecKnnVqCriterion,
    Wav2VecKnnVqCriterionConfig,
)
from fairseq_knnvq.quantization import SmoothedVectorQuantizer, knn_vertex_loss
from tiny_wav2vec2 import (
    STOCK_LOG_KEYS,
    batch,
    capture_quantizer_inputs,
    count_knn_searches,
    knn_of_call,
    knnvq_model,
    sample_of,
    seeded,
    stock_model,
)


# --- parity with stock wav2vec 2.0 -------------------------------------------------


def test_seeded_construction_gives_stock_weights_and_leaves_the_random_stream_alone():
    stock = stock_model(seed=3)
    after_stock = torch.rand(4)
    ours = knnvq_model(seed=3, regularizer="diversity")
    after_ours = torch.rand(4)
    assert torch.equal(after_stock, after_ours)
    stock_state, our_state = stock.state_dict(), ours.state_dict()
    assert stock_state.keys() == our_state.keys()
    for key in stock_state:
        assert torch.equal(stock_state[key], our_state[key]), key
    assert isinstance(ours.quantizer, SmoothedVectorQuantizer)


@pytest.mark.parametrize("num_updates", [0, 20000])
def test_stock_state_dict_gives_stock_outputs_losses_and_gradients(num_updates):
    """The parity test: a stock wav2vec2 state dict in wav2vec2_knnvq with
    regularizer=diversity, smoothing=gumbel_hard computes what stock wav2vec 2.0 does."""
    assert_stock_parity(dict(), num_updates=num_updates, padded_samples=0)


PLACEMENTS = {
    "targets": dict(),
    "input_and_targets": dict(quantize_input=True),
    "input_only": dict(quantize_input=True, quantize_targets=False),
    "negatives_from_everywhere": dict(negatives_from_everywhere=True),
}


@pytest.mark.parametrize("placement", sorted(PLACEMENTS))
def test_diversity_variant_is_stock_on_padded_batches_in_every_placement(placement):
    """With padding in the batch, also where a quantizer sees padded frames (the input
    quantizer; targets from every frame): stock's values, losses and gradients."""
    assert_stock_parity(PLACEMENTS[placement], num_updates=100, padded_samples=3000)


@pytest.mark.parametrize("placement", ["input_only", "negatives_from_everywhere"])
def test_diversity_counts_padding_false_excludes_padded_frames(placement):
    overrides = PLACEMENTS[placement]
    model = knnvq_model(regularizer="diversity", diversity_counts_padding=False, **overrides)
    stock = stock_model(**overrides)
    model.load_state_dict(stock.state_dict())
    model.eval()
    stock.eval()
    source, padding_mask, mask_indices = batch(model, padded_samples=3000)
    calls = capture_quantizer_inputs(model)
    with torch.no_grad():
        out = model(source=source, padding_mask=padding_mask, mask_indices=mask_indices)
        stock_out = stock(source=source, padding_mask=padding_mask, mask_indices=mask_indices)
        y, mask = calls[-1]
        quantizer = model.smoothed_quantizers()[0]
        logits = quantizer.weight_proj(y).view(-1, 2, 16)
        valid = logits[mask.reshape(-1)]
        avg = torch.softmax(valid.float(), -1).mean(0)
        expected = torch.exp(-(avg * torch.log(avg + 1e-7)).sum(-1)).sum()
    assert 0 < int(mask.sum()) < mask.numel()
    torch.testing.assert_close(out["prob_perplexity"], expected, rtol=1e-5, atol=0)
    # stock counts the padded frames: a different number
    assert abs(float(stock_out["prob_perplexity"]) - float(expected)) > 1e-2


def assert_stock_parity(overrides, num_updates, padded_samples):
    stock = stock_model(seed=0, **overrides)
    ours = knnvq_model(seed=1, regularizer="diversity", smoothing="gumbel_hard", **overrides)
    ours.load_state_dict(stock.state_dict(), strict=True)
    for model in (stock, ours):
        model.train()
        model.set_num_updates(num_updates)
    source, padding_mask, mask_indices = batch(stock, padded_samples=padded_samples)
    if padded_samples:
        assert padding_mask.any()
    net_input = dict(source=source, padding_mask=padding_mask, mask_indices=mask_indices)

    stock_out = seeded(lambda: stock(**net_input))
    our_out = seeded(lambda: ours(**net_input))
    for key in ("x", "features_pen", "prob_perplexity", "code_perplexity"):
        assert torch.equal(stock_out[key], our_out[key]), key
    assert our_out["num_vars"] == stock_out["num_vars"] and our_out["temp"] == stock_out["temp"]
    stock_extra, our_extra = stock.get_extra_losses(stock_out), ours.get_extra_losses(our_out)
    assert torch.equal(stock_extra[0], our_extra[0]) and torch.equal(stock_extra[1], our_extra[1])
    assert our_extra[2] is None  # the KNN loss is only reported, not trained
    assert stock_extra[0] is not None

    sample = sample_of(source, padding_mask, mask_indices)
    stock_criterion = Wav2vecCriterion(None, infonce=True, loss_weights=[0.1, 10], log_keys=STOCK_LOG_KEYS)
    our_criterion = Wav2vecKnnVqCriterion(
        None, infonce=True, loss_weights=[0.1, 10], log_keys=STOCK_LOG_KEYS, knn_weight=0.5
    )
    stock_loss, stock_size, stock_log = seeded(lambda: stock_criterion(stock, sample))
    our_loss, our_size, our_log = seeded(lambda: our_criterion(ours, sample))
    assert torch.equal(stock_loss, our_loss) and stock_size == our_size
    for key, value in stock_log.items():
        assert our_log[key] == value, key
    stock_loss.backward()
    our_loss.backward()
    our_params = dict(ours.named_parameters())
    for name, param in stock.named_parameters():
        if param.grad is None:
            assert our_params[name].grad is None, name
        else:
            torch.testing.assert_close(
                our_params[name].grad, param.grad, rtol=1e-4, atol=1e-6, msg=lambda m: f"{name}: {m}"
            )


def test_stock_state_dict_with_quantized_input_loads_strictly():
    stock = stock_model(quantize_input=True)
    ours = knnvq_model(seed=5, quantize_input=True, regularizer="diversity")
    ours.load_state_dict(stock.state_dict(), strict=True)
    assert isinstance(ours.input_quantizer, SmoothedVectorQuantizer)
    assert isinstance(ours.quantizer, SmoothedVectorQuantizer) and ours.quantizer is not ours.input_quantizer


# --- the KNN term and the statistics --------------------------------------------------


@pytest.mark.parametrize("distance", ["ce", "l2"])
def test_knn_loss_is_the_loss_of_the_masked_frames_and_is_trained(distance):
    model = knnvq_model(regularizer="knn", knn_distance=distance, knn_k=4)
    source, _, mask_indices = batch(model)
    captured = {}
    model.quantizer.register_forward_hook(lambda module, args, output: captured.update(y=args[0]))

    model.eval()  # no Gumbel noise: the smoothed vectors are softmax(logits / temp)
    with torch.no_grad():
        out = model(source=source, mask_indices=mask_indices)
    y = captured["y"]
    assert y.shape[:2] == (source.shape[0], int(mask_indices[0].sum()))
    logits = model.quantizer.weight_proj(y).view(*y.shape[:2], 2, 16) / model.quantizer.curr_temp
    expected = knn_vertex_loss(logits.reshape(-1, 2, 16), k=4, distance=distance)
    torch.testing.assert_close(out["knn_loss"], expected)
    assert int(out["usage_sums"].counts.sum()) == 2 * y.shape[0] * y.shape[1]

    # trained: the gradient of the term is that of the brute-force loss
    model = knnvq_model(regularizer="knn", knn_distance=distance, knn_k=4, smoothing="softmax")
    model.train()
    calls = capture_quantizer_inputs(model)
    out = seeded(lambda: model(source=source, mask_indices=mask_indices))
    diversity, features_pen, knn = model.get_extra_losses(out)
    assert diversity is None and features_pen is not None
    weight = model.quantizer.weight_proj.weight
    (grad,) = torch.autograd.grad(knn, weight)
    expected_loss = knn_of_call(model.quantizer, calls[-1], 4, distance)
    (expected_grad,) = torch.autograd.grad(expected_loss, weight)
    torch.testing.assert_close(knn.double(), expected_loss, rtol=1e-5, atol=0)
    scale = expected_grad.abs().max()
    assert scale > 0
    torch.testing.assert_close(grad.double(), expected_grad.double(), rtol=0, atol=1e-4 * float(scale))


@pytest.mark.parametrize("regularizer", ["diversity", "none"])
def test_other_regularizers_report_but_do_not_train_the_knn_loss(regularizer):
    model = knnvq_model(regularizer=regularizer, smoothing="softmax", knn_k=4)
    model.train()
    source, _, mask_indices = batch(model)
    calls = capture_quantizer_inputs(model)
    out = model(source=source, mask_indices=mask_indices)
    expected = knn_of_call(model.quantizer, calls[-1], 4)
    torch.testing.assert_close(out["knn_loss"].double(), expected, rtol=1e-5, atol=0)
    assert not out["knn_loss"].requires_grad
    diversity, _, knn = model.get_extra_losses(out)
    assert knn is None
    assert (diversity is None) == (regularizer == "none")


@pytest.mark.parametrize("regularizer", ["diversity", "none"])
def test_baselines_compute_the_knn_loss_only_in_logged_updates(regularizer, monkeypatch):
    """Training: a KNN search only in the updates whose logs fairseq writes (update u is
    logged when u % log_interval == 0; the model sees u - 1); validation: always. The
    logged value is the KNN loss of that forward call."""
    searches = count_knn_searches(monkeypatch)
    model = knnvq_model(regularizer=regularizer, smoothing="softmax", knn_k=4)
    criterion = Wav2vecKnnVqCriterion(None, infonce=True, loss_weights=[0.1, 10], knn_log_interval=4)
    source, padding_mask, mask_indices = batch(model)
    sample = sample_of(source, padding_mask, mask_indices)
    calls = capture_quantizer_inputs(model)
    model.train()
    logged_updates = []
    for update in range(8):
        model.set_num_updates(update)  # as fairseq's task.train_step does before the step
        before = searches[0]
        loss, _, log = seeded(lambda: criterion(model, sample))
        loss.backward()
        assert searches[0] - before == ("knn_loss" in log), update
        if "knn_loss" in log:
            logged_updates.append(update + 1)
            expected = knn_of_call(model.quantizer, calls[-1], 4)
            assert log["knn_loss"] == pytest.approx(float(expected), rel=1e-5)
    assert logged_updates == [4, 8]
    assert all(q.track_knn_loss for q in model.smoothed_quantizers())  # restored after each call

    model.eval()
    before = searches[0]
    with torch.no_grad():
        _, _, log = criterion(model, sample)
    assert searches[0] - before == 1
    expected = knn_of_call(model.quantizer, calls[-1], 4)
    assert log["knn_loss"] == pytest.approx(float(expected), rel=1e-5)


def test_knn_log_interval_is_fairseqs_log_interval_and_must_be_positive():
    from omegaconf import OmegaConf as OC

    cfg = OC.merge(
        OC.create({"common": {"log_interval": 25}}),
        OC.create({"criterion": OC.structured(Wav2VecKnnVqCriterionConfig)}),
    )
    assert cfg.criterion.knn_log_interval == 25
    with pytest.raises(ValueError, match="knn_log_interval"):
        Wav2vecKnnVqCriterion(None, infonce=True, loss_weights=[0.1, 10], knn_log_interval=0)


@pytest.mark.parametrize(
    "overrides",
    [
        dict(quantize_targets=True, negatives_from_everywhere=True),  # targets from every frame
        dict(quantize_targets=False, quantize_input=True),  # input quantizer sees every frame
    ],
)
def test_padded_frames_never_reach_the_statistics(overrides):
    model = knnvq_model(**overrides)
    source, padding_mask, mask_indices = batch(model, padded_samples=3000)
    valid_frames = int(model._get_feat_extract_output_lengths((~padding_mask).long().sum(-1)).sum())
    assert valid_frames < source.shape[0] * mask_indices.shape[1]
    out = model(source=source, padding_mask=padding_mask, mask_indices=mask_indices)
    counts = out["usage_sums"].counts
    assert counts.sum(-1).tolist() == [valid_frames] * counts.shape[0]


def test_same_quantizer_for_input_and_targets_stays_one_module():
    model = knnvq_model(quantize_input=True, same_quantizer=True, knn_k=4, smoothing="softmax")
    assert model.input_quantizer is model.quantizer
    source, _, mask_indices = batch(model)
    calls = capture_quantizer_inputs(model)
    out = model(source=source, mask_indices=mask_indices)
    # both calls of the one module: the input frames, then the targets
    assert len(calls) == 2 and calls[0][0].shape[1] == mask_indices.shape[1]
    expected = sum(knn_of_call(model.quantizer, call, 4) for call in calls)
    torch.testing.assert_close(out["knn_loss"].double(), expected, rtol=1e-5, atol=0)


# --- the criterion ----------------------------------------------------------------------
