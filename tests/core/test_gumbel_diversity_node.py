"""The Gumbel smoothing and the diversity loss's batch mean in one autograd node
(``GumbelSoftmaxWithMeanProbs``): the unfused computation's values bit for bit, the
generator left as the unfused computation leaves it, the gradient to a tight tolerance
(also where ``p`` underflows), and one N x G x M tensor kept for the backward pass.

Tolerance: the node recovers ``softmax(l)`` from ``p`` (or ``s``) and the redrawn noise,
not from ``l``, so its gradient differs from autograd's by rounding. The tests allow
``|diff| <= 1e-5 |grad| + 2e-7 max|grad|`` (logits of scale 4) and ``|diff| <= 1e-6
max|grad|`` (scale 150, where most of ``p`` underflows); measured over 8-10 seeds the
differences stay below ``1e-9`` and ``1e-7`` of ``max|grad|``, and the node's gradient is
as far from a float64 reference as autograd's float32 gradient is.
"""

import pytest
import torch
import torch.nn.functional as F

from fairseq_knnvq.quantization import SmoothedVectorQuantizer
from fairseq_knnvq.quantization import quantizer as quantizer_module
from fairseq_knnvq.quantization.diversity import gumbel_softmax_and_mean_probs, keeps_probs, masked_mean_probs
from fairseq_knnvq.quantization.smoothing import sample_gumbel_like, smoothed_logits_of


def unfused(logits, tau, mask):
    """Today's computation in the quantizer: the mean first, then the noisy softmax."""
    mean = masked_mean_probs(logits, mask)
    smoothed = smoothed_logits_of(logits, "gumbel", tau)
    return F.softmax(smoothed, dim=-1), mean, smoothed


def run(fn, logits, tau, mask, upstream, upstream_mean, seed=5):
    """Values, gradient and the global generator's state after forward and after backward."""
    leaf = logits.clone().requires_grad_()
    torch.manual_seed(seed)
    probs, mean, smoothed = fn(leaf, tau, mask)
    after_forward = torch.get_rng_state()
    ((probs * upstream).sum() + (mean * upstream_mean).sum()).backward()
    return (probs.detach(), mean.detach(), smoothed.detach()), leaf.grad, after_forward, torch.get_rng_state()


def inputs(rows=300, groups=2, entries=37, scale=4.0, masked=True, seed=0):
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(rows, groups, entries, generator=gen) * scale
    mask = torch.rand(rows, generator=gen) > 0.3 if masked else None
    upstream = torch.randn(rows, groups, entries, generator=gen)
    upstream_mean = torch.randn(groups, entries, generator=gen)
    return logits, mask, upstream, upstream_mean


@pytest.mark.parametrize("tau", [2.0, 1.0, 0.5, 0.1])  # p kept (tau >= 1), s kept (tau < 1)
@pytest.mark.parametrize("masked", [False, True])
def test_node_equals_the_unfused_computation(tau, masked):
    logits, mask, upstream, upstream_mean = inputs(masked=masked)
    ref_values, ref_grad, ref_forward_rng, ref_rng = run(unfused, logits, tau, mask, upstream, upstream_mean)
    values, grad, forward_rng, rng = run(gumbel_softmax_and_mean_probs, logits, tau, mask, upstream, upstream_mean)
    for ours, ref in zip(values, ref_values):
        assert torch.equal(ours, ref)  # p, the mean and s: bit for bit
    assert torch.equal(forward_rng, ref_forward_rng)  # the same draws from the generator
    assert torch.equal(rng, ref_rng)  # the backward pass's redraw leaves it alone
    scale = float(ref_grad.abs().max())
    torch.testing.assert_close(grad, ref_grad, atol=2e-7 * scale, rtol=1e-5)


def test_the_redraw_uses_a_generator_of_its_own():
    """A draw between forward and backward (as the next layer's dropout would make) does
    not change the gradient, and the draws after it are those of the unfused path."""
    logits, mask, upstream, upstream_mean = inputs()
    results = []
    for fn in (unfused, gumbel_softmax_and_mean_probs):
        leaf = logits.clone().requires_grad_()
        torch.manual_seed(5)
        probs, mean, _ = fn(leaf, 0.7, mask)
        between = torch.rand(3)
        ((probs * upstream).sum() + (mean * upstream_mean).sum()).backward()
        results.append((leaf.grad, between, torch.rand(3)))
    (ref_grad, ref_between, ref_after), (grad, between, after) = results
    assert torch.equal(between, ref_between) and torch.equal(after, ref_after)
    torch.testing.assert_close(grad, ref_grad, atol=2e-7 * float(ref_grad.abs().max()), rtol=1e-5)


@pytest.mark.parametrize("tau", [1.0, 0.5])
def test_underflowing_probabilities_keep_the_gradient(tau):
    """Logits of scale 150: most of ``p`` underflows to 0 (``log p = -inf``), yet the
    gradient has no NaN and is as close to a float64 reference as autograd's."""
    logits, mask, upstream, upstream_mean = inputs(rows=200, entries=64, scale=150.0)
    ref_values, ref_grad, _, _ = run(unfused, logits, tau, mask, upstream, upstream_mean)
    _, grad, _, _ = run(gumbel_softmax_and_mean_probs, logits, tau, mask, upstream, upstream_mean)
    assert (ref_values[0] == 0).float().mean() > 0.3  # p underflowed
    assert keeps_probs(tau, torch.float32) == (tau >= 1)

    leaf = logits.double().requires_grad_()
    torch.manual_seed(5)
    noise = sample_gumbel_like(logits).double()
    weights = mask.double().view(-1, 1, 1)
    mean = (F.softmax(leaf, -1) * weights).sum(0) / weights.sum()
    ((F.softmax((leaf + noise) / tau, -1) * upstream).sum() + (mean * upstream_mean).sum()).backward()
    scale = float(leaf.grad.abs().max())
    assert torch.isfinite(grad).all()
    ours, autograd = (float((g.double() - leaf.grad).abs().max()) for g in (grad, ref_grad))
    assert ours <= 1.05 * autograd + 1e-7 * scale
    torch.testing.assert_close(grad, ref_grad, atol=1e-6 * scale, rtol=0)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("tau", [2.0, 0.5])
def test_node_on_the_gpu_equals_the_unfused_computation(tau):
    """The same on CUDA: the redraw from the saved state of the CUDA generator."""
    logits, mask, upstream, upstream_mean = (t.cuda() for t in inputs())
    results = []
    for fn in (unfused, gumbel_softmax_and_mean_probs):
        leaf = logits.clone().requires_grad_()
        torch.manual_seed(5)
        probs, mean, smoothed = fn(leaf, tau, mask)
        after_forward = torch.cuda.get_rng_state()
        ((probs * upstream).sum() + (mean * upstream_mean).sum()).backward()
        results.append(((probs.detach(), mean.detach(), smoothed.detach()), leaf.grad, after_forward))
        results[-1] += (torch.cuda.get_rng_state(),)
    (ref_values, ref_grad, *ref_states), (values, grad, *states) = results
    for ours, ref in zip(values, ref_values):
        assert torch.equal(ours, ref)
    assert all(torch.equal(a, b) for a, b in zip(states, ref_states))
    torch.testing.assert_close(grad, ref_grad, atol=2e-7 * float(ref_grad.abs().max()), rtol=1e-5)


def test_empty_and_all_masked_batches():
    for rows, mask in ((0, None), (5, torch.zeros(5, dtype=torch.bool))):
        logits = torch.randn(rows, 2, 6, requires_grad=True)
        probs, mean, smoothed = gumbel_softmax_and_mean_probs(logits, 0.5, mask)
        assert probs.shape == smoothed.shape == logits.shape and torch.equal(mean, torch.zeros(2, 6))
        ((probs * 2).sum() + mean.sum()).backward()
        assert logits.grad.shape == logits.shape and torch.isfinite(logits.grad).all()


def test_bad_temperature():
    with pytest.raises(ValueError, match="temperature must be > 0"):
        gumbel_softmax_and_mean_probs(torch.randn(3, 4), 0.0)


# ------------------------------------------------------------------ in the quantizer


def quantizer(smoothing, updates=0, dim=64, entries=16):
    torch.manual_seed(11)
    q = SmoothedVectorQuantizer(dim, entries, (2.0, 0.5, 0.999995), 2, False, 32, True, smoothing=smoothing)
    q.regularizer = "diversity"
    q.track_knn_loss = False
    q.set_num_updates(updates)
    return q.train()


def quantizer_step(q, x, mask, upstream):
    torch.manual_seed(4)
    out = q(x, produce_targets=True, mask=mask)
    ((out["x"] * upstream).sum() + 3.0 * out["diversity_loss"]).backward()
    grads = [p.grad.clone() for p in q.parameters()]
    q.zero_grad()
    return out, grads, torch.get_rng_state()


@pytest.mark.parametrize("smoothing", ["gumbel", "gumbel_hard"])
@pytest.mark.parametrize("updates", [0, 300000])  # tau 2.0 and 0.5
@pytest.mark.parametrize("masked", [False, True])
def test_quantizer_step_equals_the_unfused_step(smoothing, updates, masked, monkeypatch):
    x = torch.randn(3, 9, 64)
    mask = torch.rand(3, 9) > 0.3 if masked else None
    upstream = torch.randn(3, 9, 32)
    fused = quantizer_step(quantizer(smoothing, updates), x, mask, upstream)
    monkeypatch.setattr(quantizer_module, "redraws_noise_on", lambda device: False)  # the unfused path
    ref = quantizer_step(quantizer(smoothing, updates), x, mask, upstream)
    for key in ("x", "targets", "diversity_loss", "prob_perplexity", "code_perplexity"):
        assert torch.equal(fused[0][key], ref[0][key]), key
    assert torch.equal(fused[2], ref[2])  # the generator after forward + backward
    for ours, theirs in zip(fused[1], ref[1]):
        torch.testing.assert_close(ours, theirs, atol=2e-7 * float(theirs.abs().max()), rtol=1e-5)


def saved_storages(q, x, at_least):
    """Distinct storages of at least ``at_least`` elements that autograd keeps for the
    backward pass of ``q(x)``."""
    found = {}

    def pack(tensor):
        if tensor.numel() >= at_least:
            found[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        out = q(x)
        loss = out["x"].sum() + out["diversity_loss"]
    del out, loss
    return len(found)


@pytest.mark.parametrize(
    "smoothing, updates, kept",
    [
        ("gumbel_hard", 0, 1),  # p (what the unfused path kept: p and softmax(l))
        ("gumbel_hard", 300000, 1),  # s
        ("gumbel", 0, 1),  # p, also the codebook product's
        ("gumbel", 300000, 2),  # the product's p and the node's s
    ],
)
def test_one_batch_sized_tensor_is_kept(smoothing, updates, kept):
    q = quantizer(smoothing, updates, dim=8, entries=64)  # the input is smaller than N x G x M
    x = torch.randn(2, 50, 8)
    assert saved_storages(q, x, at_least=100 * 2 * 64) == kept
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(quantizer_module, "redraws_noise_on", lambda device: False)
        assert saved_storages(q, x, at_least=100 * 2 * 64) == 2  # the unfused path
