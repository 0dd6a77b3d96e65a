"""Mixed precision, checked on the CPU (bf16 autocast, bf16 and fp16 models).

- The KNN and diversity losses take half-precision logits, compute in float32 and return
  float32 values; the value is the float32 loss of the same (rounded) logits and the
  gradient comes back in the input's dtype.
- The quantizer under ``torch.autocast("cpu", torch.bfloat16)`` (its projection then runs
  in bf16) and as a bf16 / fp16 module, against the same module in float32: values and
  gradients within bf16's / fp16's precision.
- A tiny wav2vec 2.0 pretraining step (criterion forward + backward) with the whole model
  in bf16 / fp16, which is what fairseq's ``common.bf16`` / ``common.fp16`` run: the
  diversity variant equals stock fairseq in the same precision, and the KNN term equals
  the brute-force KNN loss of the rows the half-precision model fed its quantizer.
  (The whole model under autocast is not tested: stock fairseq's ``apply_mask`` writes
  the float32 mask embedding into the autocast bf16 features with ``index_put``, which
  raises "Index put requires the source and destination dtypes match", for stock
  ``wav2vec2`` as for this plugin.)
- ``fairseq-hydra-train`` with ``common.bf16=true`` on the CPU: 3 updates of the tiny
  pretraining, the KNN term in the logged loss with its weight.
"""

import math

import pytest
import torch

from fairseq_knnvq.criterions.wav2vec_knnvq import Wav2vecKnnVqCriterion
from fairseq_knnvq.quantization import KnnVertexLoss, SmoothedVectorQuantizer, diversity_loss, knn_vertex_loss
from fairseq_run import CONFIG_DIR, last_record, parse_json_log, records_of, run_hydra_train
from tiny_wav2vec2 import (
    STOCK_LOG_KEYS,
    batch,
    brute_force_knn,
    capture_quantizer_inputs,
    knnvq_model,
    sample_of,
    seeded,
    stock_model,
)

HALF = [torch.bfloat16, torch.float16]
TEMP = (2.0, 0.5, 0.999995)
# relative precision of one rounding
EPS = {torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}


def relative_l2(got, expected):
    got, expected = got.double(), expected.double()
    return float((got - expected).norm() / expected.norm())


# --- the losses ---------------------------------------------------------------------


@pytest.mark.parametrize("dtype", HALF, ids=str)
@pytest.mark.parametrize("loss_fn", ["knn_ce", "knn_l2", "fused_knn_ce", "diversity"])
def test_losses_of_half_precision_logits_are_the_float32_losses(dtype, loss_fn):
    gen = torch.Generator().manual_seed(0)
    logits = (3.0 * torch.randn(600, 2, 32, generator=gen)).to(dtype)
    mask = torch.rand(600, generator=gen) > 0.2

    def compute(x):
        if loss_fn == "diversity":
            return diversity_loss(x, mask=mask)
        if loss_fn == "fused_knn_ce":
            return KnnVertexLoss(4, "ce").with_softmax(x, mask=mask)[1]
        return knn_vertex_loss(x, k=4, distance=loss_fn[-2:], mask=mask)

    half = logits.clone().requires_grad_()
    full = logits.float().requires_grad_()
    loss, ref = compute(half), compute(full)
    assert loss.dtype == torch.float32
    assert float(loss) == pytest.approx(float(ref), rel=1e-6)
    if loss_fn != "diversity":
        assert float(loss) == pytest.approx(float(brute_force_knn(logits.double()[mask], 4, loss_fn[-2:])), rel=1e-5)
    (grad,) = torch.autograd.grad(loss, half)
    (ref_grad,) = torch.autograd.grad(ref, full)
    assert grad.dtype == dtype
    scale = float(ref_grad.abs().max())
    assert scale > 0
    # the float32 gradient, rounded once to the input's dtype
    # (fp16 also flushes gradients below its smallest subnormal, 2**-24, to zero)
    atol = 1e-3 * EPS[dtype] * scale + (2.0**-24 if dtype == torch.float16 else 0.0)
    torch.testing.assert_close(grad.float(), ref_grad, rtol=EPS[dtype], atol=atol)


# --- the quantizer ------------------------------------------------------------------

QUANTIZER_CASES = {
    "knn_ce": dict(regularizer="knn", knn_distance="ce"),
    "knn_l2": dict(regularizer="knn", knn_distance="l2"),
    "diversity": dict(regularizer="diversity"),
}


def quantizer_step(overrides, precision, smoothing="softmax"):
    """One training step of the quantizer: ``precision`` is float32, autocast (bf16
    autocast on the CPU), or a half dtype for the module and its input."""
    torch.manual_seed(0)
    quantizer = SmoothedVectorQuantizer(64, 32, TEMP, 2, False, 32, True, smoothing=smoothing, knn_k=4, **overrides)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(4, 100, 64, generator=gen)
    upstream = torch.randn(4, 100, 32, generator=gen)
    if isinstance(precision, torch.dtype):
        quantizer.to(precision)
        x = x.to(precision)
    x.requires_grad_()
    quantizer.train()
    torch.manual_seed(2)  # the Gumbel noise
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "autocast"):
        out = quantizer(x, produce_targets=True)
        reg = out.get("knn_loss") if overrides["regularizer"] == "knn" else out["diversity_loss"]
        loss = (out["x"].float() * upstream).sum() + 10.0 * reg
    loss.backward()
    grads = {"input": x.grad.float(), **{n: p.grad.float() for n, p in quantizer.named_parameters()}}
    return out, reg, grads


@pytest.mark.parametrize("precision", ["autocast", torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("case", sorted(QUANTIZER_CASES))
def test_quantizer_in_half_precision_against_float32(case, precision):
    overrides = QUANTIZER_CASES[case]
    ref_out, ref_reg, ref_grads = quantizer_step(overrides, torch.float32)
    out, reg, grads = quantizer_step(overrides, precision)
    eps = EPS[torch.bfloat16 if precision == "autocast" else precision]
    # logits of magnitude ~10 rounded to the dtype: a few eps of relative error
    assert reg.dtype == torch.float32
    assert float(reg) == pytest.approx(float(ref_reg), rel=8 * eps)
    torch.testing.assert_close(out["prob_perplexity"].float(), ref_out["prob_perplexity"], rtol=8 * eps, atol=0)
    assert relative_l2(out["x"], ref_out["x"]) < 8 * eps
    for name, ref in ref_grads.items():
        assert relative_l2(grads[name], ref) < 16 * eps, name


@pytest.mark.parametrize("precision", ["autocast", torch.bfloat16], ids=str)
def test_gumbel_hard_codes_in_half_precision_are_the_float32_codes(precision):
    """Same Gumbel noise: the hard codes agree except where the two best entries are
    closer than the rounding."""
    ref_out, _, _ = quantizer_step(QUANTIZER_CASES["knn_ce"], torch.float32, smoothing="gumbel_hard")
    out, _, _ = quantizer_step(QUANTIZER_CASES["knn_ce"], precision, smoothing="gumbel_hard")
    agreement = float((out["targets"] == ref_out["targets"]).float().mean())
    assert agreement > 0.97  # chance agreement would be 1/32


# --- a tiny pretraining step with a half-precision model ----------------------------


def _half_model_step(model, dtype, inputs, log_keys=None, knn_weight=0.5, stock=False):
    """Criterion forward + backward of ``model`` in ``dtype`` on ``inputs`` (from
    ``batch``: made once per test, since fairseq draws each call's masks afresh)."""
    source, padding_mask, mask_indices = inputs
    model.to(dtype).train()
    sample = sample_of(source.to(dtype), padding_mask, mask_indices)
    if stock:
        from fairseq.criterions.wav2vec_criterion import Wav2vecCriterion

        criterion = Wav2vecCriterion(None, infonce=True, loss_weights=[0.1, 10], log_keys=log_keys)
    else:
        criterion = Wav2vecKnnVqCriterion(
            None, infonce=True, loss_weights=[0.1, 10], log_keys=log_keys, knn_weight=knn_weight
        )
    loss, sample_size, log = seeded(lambda: criterion(model, sample))
    loss.backward()
    return loss, log


@pytest.mark.parametrize("dtype", HALF, ids=str)
def test_half_precision_diversity_variant_equals_stock_in_the_same_precision(dtype):
    stock = stock_model(seed=0)
    ours = knnvq_model(seed=1, regularizer="diversity", smoothing="gumbel_hard")
    ours.load_state_dict(stock.state_dict())
    inputs = batch(stock, padded_samples=2000)
    stock_loss, stock_log = _half_model_step(stock, dtype, inputs, STOCK_LOG_KEYS, stock=True)
    our_loss, our_log = _half_model_step(ours, dtype, inputs, STOCK_LOG_KEYS)
    assert torch.equal(our_loss, stock_loss)
    for key, value in stock_log.items():
        assert our_log[key] == value, key
    # Gradients: the rounding of the two quantizers' backward passes differs (the same
    # sums in another order), by about one rounding of the dtype at the projection,
    # carried back through the network.
    our_params = dict(ours.named_parameters())
    for name, param in stock.named_parameters():
        if param.grad is not None:
            assert relative_l2(our_params[name].grad, param.grad) < 4 * EPS[dtype], name


@pytest.mark.parametrize("dtype", HALF, ids=str)
def test_half_precision_model_trains_the_brute_force_knn_loss(dtype):
    model = knnvq_model(regularizer="knn", smoothing="softmax", knn_k=4)
    calls = capture_quantizer_inputs(model)
    inputs = batch(model, padded_samples=2000)
    loss, log = _half_model_step(model, dtype, inputs)
    y, _ = calls[-1]
    quantizer = model.quantizer
    weight = quantizer.weight_proj.weight
    logits = quantizer.weight_proj(y).view(-1, quantizer.groups, quantizer.num_vars).double() / quantizer.curr_temp
    expected = brute_force_knn(logits, 4)
    assert log["knn_loss"] == pytest.approx(float(expected), rel=1e-5)
    # the KNN term's gradient on the projection (the model's total gradient minus the
    # one without the term) against the brute-force one
    with_knn = weight.grad.double().clone()
    model.zero_grad()
    _half_model_step(model, dtype, inputs, knn_weight=0.0)
    knn_grad = (with_knn - weight.grad.double()) / (0.5 * int(log["sample_size"]))
    (expected_grad,) = torch.autograd.grad(expected, weight)
    assert relative_l2(knn_grad, expected_grad) < 0.1


@pytest.mark.slow
def test_fairseq_hydra_train_with_bf16_on_the_cpu(tiny_manifests, tmp_path):
    result = run_hydra_train(
        CONFIG_DIR / "pretraining",
        "tiny_knn_ce",
        [f"task.data={tiny_manifests}", "common.bf16=true", "optimization.max_update=3", "common.log_interval=1"],
        run_dir=tmp_path / "run",
    )
    records = parse_json_log(result.stdout)
    updates = records_of(records, "train_inner")
    assert [r["num_updates"] for r in updates] == [1, 2, 3]
    for record in updates:
        assert record["loss_2"] == pytest.approx(0.1 * record["knn_loss"] / math.log(2), abs=2e-3)
    valid = last_record(records, "valid")
    assert valid["valid_num_updates"] == 3 and "valid_knn_loss" in valid
    # fairseq trained the model itself in bf16 (fp32 master weights in the optimizer)
    from fairseq import checkpoint_utils

    state = checkpoint_utils.load_checkpoint_to_cpu(str(tmp_path / "run" / "checkpoints" / "checkpoint_last.pt"))
    # (fairseq saves half-precision weights as float32; a bf16 model's are bf16 values)
    weight = state["model"]["quantizer.weight_proj.weight"]
    assert torch.equal(weight, weight.bfloat16().float())
    assert state["cfg"]["common"]["bf16"] is True
