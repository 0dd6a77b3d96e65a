"""wav2vec2_knnvq model and wav2vec_knnvq criterion: parity with stock fairseq wav2vec 2.0,
the KNN term, padding, worker-independent logging, and the shipped configs."""
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

import fairseq  # noqa: F401  (before the plugin, so that it registers its fairseq parts)
import fairseq_knnvq
from fairseq.criterions.wav2vec_criterion import Wav2vecCriterion
from fairseq.data.data_utils import compute_mask_indices
from fairseq.dataclass.utils import merge_with_parent
from fairseq.logging import metrics
from fairseq.models.wav2vec.wav2vec2 import Wav2Vec2Config, Wav2Vec2Model

from fairseq_knnvq.criterions.wav2vec_knnvq import (
    COUNT_KEY,
    Wav2vecKnnVqCriterion,
    Wav2VecKnnVqCriterionConfig,
)
from fairseq_knnvq.models.wav2vec2_knnvq import Wav2Vec2KnnVqConfig, Wav2Vec2KnnVqModel
from fairseq_knnvq.quantization import SmoothedVectorQuantizer, knn_vertex_loss
from fairseq_knnvq.quantization import distributed as knn_distributed
from fairseq_knnvq.quantization import regularizers as knn_regularizers
from references import brute_force_knn

fairseq_knnvq.register_with_fairseq()

REPO = Path(__file__).resolve().parent.parent
PRETRAINING_CONFIGS = REPO / "configs" / "pretraining"
RUN_CONFIGS = REPO / "configs" / "run_config"
STOCK_BASE_YAML = (
    Path(fairseq.__file__).parent / "examples" / "wav2vec" / "config" / "pretraining"
    / "wav2vec2_base_librispeech.yaml"
)

TINY = dict(
    conv_feature_layers="[(32, 10, 5)] + [(32, 3, 2)] * 4 + [(32, 2, 2)] + [(32, 2, 2)]",
    encoder_layers=2,
    encoder_embed_dim=32,
    encoder_ffn_embed_dim=64,
    encoder_attention_heads=2,
    conv_pos=16,
    conv_pos_groups=16,
    latent_vars=16,
    latent_groups=2,
    final_dim=16,
    quantize_targets=True,
    num_negatives=10,
)
STOCK_LOG_KEYS = ["prob_perplexity", "code_perplexity", "temp"]
SAMPLES = 8000  # 0.5 s: 24 frames


def stock_model(seed=0, **overrides):
    torch.manual_seed(seed)
    return Wav2Vec2Model(Wav2Vec2Config(**{**TINY, **overrides}))


def knnvq_model(seed=0, **overrides):
    torch.manual_seed(seed)
    return Wav2Vec2KnnVqModel(Wav2Vec2KnnVqConfig(**{**TINY, **overrides}))


def batch(model, batch_size=3, seed=0, padded_samples=0):
    """Audio, padding mask and fixed mask indices, all drawn from ``seed`` (fairseq main
    draws its masks from fresh OS entropy, so runs are compared on explicit masks)."""
    generator = torch.Generator().manual_seed(seed)
    source = torch.randn(batch_size, SAMPLES, generator=generator)
    padding_mask = None
    frames = int(model._get_feat_extract_output_lengths(torch.tensor(SAMPLES)))
    frame_padding = None
    if padded_samples:
        padding_mask = torch.zeros(batch_size, SAMPLES, dtype=torch.bool)
        padding_mask[-1, SAMPLES - padded_samples :] = True
        source[padding_mask] = 0
        lengths = model._get_feat_extract_output_lengths((~padding_mask).long().sum(-1))
        frame_padding = torch.arange(frames).unsqueeze(0) >= lengths.unsqueeze(1)
    # seed/epoch/indices: fairseq's own per-utterance seeding of its mask generator (without
    # them it uses fresh OS entropy, and each test run would draw other masks)
    mask_indices = torch.from_numpy(
        compute_mask_indices((batch_size, frames), frame_padding, 0.65, 5, min_masks=2, require_same_masks=True,
                             seed=seed, epoch=0, indices=torch.arange(batch_size))
    )
    return source, padding_mask, mask_indices


def sample_of(source, padding_mask, mask_indices):
    net_input = {"source": source, "mask_indices": mask_indices}
    if padding_mask is not None:
        net_input["padding_mask"] = padding_mask
    return {"id": torch.arange(source.shape[0]), "net_input": net_input}


def seeded(fn, seed=7):
    torch.manual_seed(seed)
    return fn()


def capture_quantizer_inputs(model):
    """Inputs (and masks) of every quantizer call, in call order."""
    calls = []

    def hook(module, args, kwargs):
        calls.append((args[0].detach(), kwargs.get("mask")))

    for quantizer in model.smoothed_quantizers():
        quantizer.register_forward_pre_hook(hook, with_kwargs=True)
    return calls


def knn_of_call(quantizer, call, k, distance="ce"):
    """The brute-force KNN loss of one quantizer call without Gumbel noise (softmax
    smoothing or eval): the rows are the valid frames' ``logits / temp``."""
    y, mask = call
    logits = quantizer.weight_proj(y).view(*y.shape[:2], quantizer.groups, quantizer.num_vars)
    rows = logits.reshape(-1, quantizer.groups, quantizer.num_vars)
    if mask is not None:
        rows = rows[mask.reshape(-1)]
    return brute_force_knn(rows / quantizer.curr_temp, k, distance)


def count_knn_searches(monkeypatch):
    """Counts the calls of the KNN neighbour search (local and global entry points)."""
    calls = [0]
    original = knn_regularizers.search_vertices

    def counting(*args, **kwargs):
        calls[0] += 1
        return original(*args, **kwargs)

    monkeypatch.setattr(knn_regularizers, "search_vertices", counting)
    monkeypatch.setattr(knn_distributed, "search_vertices", counting)
    return calls


# --- parity with stock wav2vec 2.0 -------------------------------------------------


def test_seeded_construction_gives_stock_weights_and_leaves_the_random_stream_alone():
    stock = stock_model(seed=3)
    after_stock = torch.rand(4)
    ours = knnvq_model(seed=3, quantizer_regularizer="diversity")
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
    model = knnvq_model(quantizer_regularizer="diversity", diversity_counts_padding=False, **overrides)
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
    ours = knnvq_model(seed=1, quantizer_regularizer="diversity", quantizer_smoothing="gumbel_hard", **overrides)
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
    ours = knnvq_model(seed=5, quantize_input=True, quantizer_regularizer="diversity")
    ours.load_state_dict(stock.state_dict(), strict=True)
    assert isinstance(ours.input_quantizer, SmoothedVectorQuantizer)
    assert isinstance(ours.quantizer, SmoothedVectorQuantizer) and ours.quantizer is not ours.input_quantizer


# --- the KNN term and the statistics --------------------------------------------------


@pytest.mark.parametrize("distance", ["ce", "l2"])
def test_knn_loss_is_the_loss_of_the_masked_frames_and_is_trained(distance):
    model = knnvq_model(quantizer_regularizer="knn", knn_distance=distance, knn_k=4)
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
    assert int(out["code_usage"].counts.sum()) == 2 * y.shape[0] * y.shape[1]

    # trained: the gradient of the term is that of the brute-force loss
    model = knnvq_model(quantizer_regularizer="knn", knn_distance=distance, knn_k=4, quantizer_smoothing="softmax")
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
    model = knnvq_model(quantizer_regularizer=regularizer, quantizer_smoothing="softmax", knn_k=4)
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
    model = knnvq_model(quantizer_regularizer=regularizer, quantizer_smoothing="softmax", knn_k=4)
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
    counts = out["code_usage"].counts
    assert counts.sum(-1).tolist() == [valid_frames] * counts.shape[0]


def test_same_quantizer_for_input_and_targets_stays_one_module():
    model = knnvq_model(quantize_input=True, same_quantizer=True, knn_k=4, quantizer_smoothing="softmax")
    assert model.input_quantizer is model.quantizer
    source, _, mask_indices = batch(model)
    calls = capture_quantizer_inputs(model)
    out = model(source=source, mask_indices=mask_indices)
    # both calls of the one module: the input frames, then the targets
    assert len(calls) == 2 and calls[0][0].shape[1] == mask_indices.shape[1]
    expected = sum(knn_of_call(model.quantizer, call, 4) for call in calls)
    torch.testing.assert_close(out["knn_loss"].double(), expected, rtol=1e-5, atol=0)


# --- the criterion ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "loss_weights, expected",
    [([0.1, 10], [0.1, 10.0, 0.3]), ([2.0], [2.0, 2.0, 0.3]), (None, [0.0, 0.0, 0.3])],
)
def test_loss_weights_keep_their_stock_meaning_and_knn_weight_is_added(loss_weights, expected):
    criterion = Wav2vecKnnVqCriterion(None, infonce=True, loss_weights=loss_weights, knn_weight=0.3)
    assert criterion.loss_weights == expected


def test_knn_term_enters_the_loss_with_its_weight():
    model = knnvq_model(quantizer_regularizer="knn")
    source, padding_mask, mask_indices = batch(model)
    sample = sample_of(source, padding_mask, mask_indices)
    model.train()
    totals = {}
    for weight in (0.0, 2.0):
        criterion = Wav2vecKnnVqCriterion(None, infonce=True, loss_weights=[0.1, 10], knn_weight=weight)
        loss, sample_size, log = seeded(lambda: criterion(model, sample))
        totals[weight] = (float(loss), log)
    knn_loss = totals[2.0][1]["knn_loss"]
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
    model = knnvq_model(quantizer_regularizer="knn")
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
            usages.append(seeded(lambda: model(source=source, mask_indices=mask_indices), seed=seed)["code_usage"])

    gathered = _reduced(Wav2vecKnnVqCriterion.reduce_metrics, logs)
    summed = _reduced(Wav2vecKnnVqCriterion.reduce_metrics, _summed_like_fairseq(logs))
    stock = _reduced(Wav2vecCriterion.reduce_metrics, [
        {k: v for k, v in log.items() if k != COUNT_KEY and not k.startswith("_code_usage")} for log in logs
    ])
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
    model = knnvq_model(quantizer_regularizer="knn", latent_vars=64)
    model.eval()
    criterion = Wav2vecKnnVqCriterion(None, infonce=True, loss_weights=[0.1, 10])
    criterion.eval()
    per_batch, counts = [], []
    with metrics.aggregate(new_root=True) as aggregator:
        for seed in range(3):
            source, padding_mask, mask_indices = batch(model, seed=seed, batch_size=1)
            with torch.no_grad():
                _, _, log = criterion(model, sample_of(source, padding_mask, mask_indices))
                counts.append(model(source=source, mask_indices=mask_indices)["code_usage"].counts)
            Wav2vecKnnVqCriterion.reduce_metrics([log])
            per_batch.append(float((counts[-1] > 0).sum()))
        values = aggregator.get_smoothed_values()
    pooled_used = int((torch.stack(counts).sum(0) > 0).sum())
    assert values["used_codes"] == pooled_used
    assert pooled_used > max(per_batch)  # a per-batch mean would be smaller


# --- configs -------------------------------------------------------------------------

QUANTIZER_KEYS = {
    "common.user_dir", "criterion._name", "criterion.knn_weight", "model._name", "model.latent_groups",
    "model.quantizer_smoothing", "model.quantizer_regularizer", "model.knn_k", "model.knn_distance",
    "model.knn_input", "model.knn_global",
}


def _flat(cfg, prefix=""):
    out = {}
    for key, value in cfg.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(_flat(value, name + "."))
        else:
            out[name] = value
    return out


def _load(path):
    return _flat(OmegaConf.to_container(OmegaConf.load(path)))


BASE_CONFIGS = sorted(PRETRAINING_CONFIGS.glob("base_*.yaml"))
TINY_CONFIGS = sorted(PRETRAINING_CONFIGS.glob("tiny_*.yaml"))


def test_every_compared_variant_has_a_base_and_a_tiny_config():
    names = {p.stem[len("base_"):] for p in BASE_CONFIGS}
    assert {"knn_ce", "knn_l2", "diversity", "gumbel", "ste"} <= names
    assert any(_load(p)["model.latent_groups"] == 1 for p in BASE_CONFIGS)
    assert {p.stem[len("tiny_"):] for p in TINY_CONFIGS} == names


@pytest.mark.parametrize("path", BASE_CONFIGS, ids=lambda p: p.stem)
def test_base_configs_are_fairseqs_base_recipe_except_the_quantizer(path):
    """Apart from the quantizer, the only difference is the task: the plugin's
    ``audio_pretraining_knnvq``, fairseq's ``audio_pretraining`` with the same config."""
    from fairseq.tasks import TASK_REGISTRY
    from fairseq.tasks.audio_pretraining import AudioPretrainingTask

    stock, ours = _load(STOCK_BASE_YAML), _load(path)
    assert stock["task._name"] == "audio_pretraining" and ours["task._name"] == "audio_pretraining_knnvq"
    assert issubclass(TASK_REGISTRY[ours["task._name"]], AudioPretrainingTask)
    for key, value in stock.items():
        if key not in QUANTIZER_KEYS | {"task._name"}:
            assert ours.get(key) == value, key
    assert set(ours) - set(stock) <= QUANTIZER_KEYS


@pytest.mark.parametrize("path", BASE_CONFIGS + TINY_CONFIGS, ids=lambda p: p.stem)
def test_configs_name_valid_fields(path):
    cfg = OmegaConf.load(path)
    model = merge_with_parent(Wav2Vec2KnnVqConfig(), cfg.model)
    criterion = merge_with_parent(Wav2VecKnnVqCriterionConfig(), cfg.criterion)
    assert model._name == "wav2vec2_knnvq" and criterion._name == "wav2vec_knnvq"
    if path.stem.startswith("tiny_"):
        base = OmegaConf.load(PRETRAINING_CONFIGS / path.name.replace("tiny_", "base_"))
        for key in ("quantizer_smoothing", "quantizer_regularizer", "knn_k", "knn_distance", "knn_input", "knn_global", "latent_groups"):
            assert cfg.model[key] == base.model[key], key
        assert cfg.criterion == base.criterion
        assert cfg.common.cpu is True and cfg.model.encoder_layers == 2


def test_base_model_has_the_size_of_wav2vec2_base():
    cfg = OmegaConf.load(PRETRAINING_CONFIGS / "base_knn_ce.yaml").model
    model = Wav2Vec2KnnVqModel.build_model(merge_with_parent(Wav2Vec2KnnVqConfig(), cfg))
    assert sum(p.numel() for p in model.parameters()) == 95_044_608


@pytest.mark.parametrize("name", ["local", "slurm_1", "slurm_2", "slurm_4", "slurm_8"])
def test_run_configs_keep_the_effective_batch_of_64_gpus(name):
    cfg = OmegaConf.load(RUN_CONFIGS / f"{name}.yaml")
    world_size = cfg.distributed_training.distributed_world_size
    assert world_size * cfg.optimization.update_freq[0] == 64
    if name.startswith("slurm"):
        launcher = cfg.hydra.launcher
        assert launcher.nodes * launcher.gpus_per_node == world_size
        assert launcher.tasks_per_node == launcher.gpus_per_node  # one process per GPU
        assert cfg.distributed_training.distributed_port > 0  # fairseq's SLURM init needs it


def _compose(config_name, overrides, cfg_part="job"):
    """The config fairseq-hydra-train would run (``--cfg``), resolved, as a dict."""
    import subprocess
    import sys

    import yaml

    from fairseq_run import console_script

    result = subprocess.run(
        [console_script("fairseq-hydra-train"), "--config-dir", str(PRETRAINING_CONFIGS),
         "--config-name", config_name, *overrides, "--cfg", cfg_part, "--resolve"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, timeout=120, cwd=str(REPO),
    )
    assert result.returncode == 0, result.stderr[-4000:]
    return yaml.safe_load(result.stdout)


@pytest.mark.slow
def test_run_config_composes_onto_a_base_config_and_user_dir_defaults_to_the_plugin():
    cfg = _compose("base_knn_ce", ["hydra.searchpath=[file://configs]", "+run_config=local", "task.data=/data"])
    assert cfg["distributed_training"]["distributed_world_size"] == 8
    assert cfg["optimization"]["update_freq"] == [8]
    assert cfg["model"]["_name"] == "wav2vec2_knnvq" and cfg["criterion"]["knn_weight"] == 0.1
    assert Path(cfg["common"]["user_dir"]).resolve() == Path(fairseq_knnvq.PLUGIN_DIR).resolve()


@pytest.mark.slow
@pytest.mark.parametrize("nodes", [1, 2, 4, 8])
def test_slurm_run_configs_select_the_submitit_launcher(nodes):
    try:
        import hydra_plugins.hydra_submitit_launcher  # noqa: F401
    except ImportError:
        pytest.skip("hydra-submitit-launcher is not installed (pip install 'fairseq-knnvq[slurm]')")
    cfg = _compose("base_knn_ce", ["hydra.searchpath=[file://configs]", f"+run_config=slurm_{nodes}", "task.data=/data"], "hydra")
    launcher = cfg["hydra"]["launcher"]
    assert launcher["_target_"].endswith("SlurmLauncher")
    assert launcher["nodes"] == nodes and launcher["tasks_per_node"] == 8


def test_both_regularisers_are_logged_by_name_for_every_variant():
    for regularizer in ("knn", "diversity", "none"):
        model = knnvq_model(quantizer_regularizer=regularizer)
        source, padding_mask, mask_indices = batch(model)
        model.train()
        criterion = Wav2vecKnnVqCriterion(None, infonce=True, loss_weights=[0.1, 10])
        _, _, log = seeded(lambda: criterion(model, sample_of(source, padding_mask, mask_indices)))
        net = seeded(lambda: model(source=source, padding_mask=padding_mask, mask_indices=mask_indices))
        expected = (net["num_vars"] - net["prob_perplexity"]) / net["num_vars"]
        assert log["diversity_loss"] == pytest.approx(float(expected), rel=1e-5), regularizer
        assert log["knn_loss"] == pytest.approx(float(net["knn_loss"]), rel=1e-5), regularizer
