"""SmoothedVectorQuantizer: exact parity with fairseq's GumbelVectorQuantizer, smoothing
modes, the schedule, metrics and bad input; the VQ-VAE baseline."""

import pytest
import torch
import torch.nn.functional as F

from fairseq.modules import GumbelVectorQuantizer

from fairseq_knnvq.quantization import (
    CodeUsage,
    SmoothedVectorQuantizer,
    TemperatureSchedule,
    VQVAEQuantizer,
    codebook_stats,
    knn_vertex_loss,
    smooth,
)

TEMP = (2.0, 0.5, 0.999995)


def make_pair(depth=1, combine_groups=False, time_first=True, **ours):
    args = dict(
        dim=64,
        num_vars=16,
        temp=TEMP,
        groups=2,
        combine_groups=combine_groups,
        vq_dim=32,
        time_first=time_first,
        weight_proj_depth=depth,
        weight_proj_factor=2,
    )
    torch.manual_seed(11)
    ref = GumbelVectorQuantizer(**args)
    torch.manual_seed(11)
    mine = SmoothedVectorQuantizer(**args, **ours)
    return ref, mine


@pytest.mark.parametrize("depth", [1, 2])
@pytest.mark.parametrize("combine_groups", [False, True])
@pytest.mark.parametrize("training", [True, False])
def test_parity_with_fairseq_gumbel_quantizer(depth, combine_groups, training):
    ref, mine = make_pair(depth, combine_groups, smoothing="gumbel_hard", regularizer="diversity")
    assert list(ref.state_dict()) == list(mine.state_dict())
    for a, b in zip(ref.state_dict().values(), mine.state_dict().values()):
        assert torch.equal(a, b)  # same seed, same weights
    ref.train(training)
    mine.train(training)
    for num_updates in (0, 5000):
        ref.set_num_updates(num_updates)
        mine.set_num_updates(num_updates)
        x = torch.randn(3, 7, 64)
        torch.manual_seed(5)
        r = ref(x, produce_targets=True)
        torch.manual_seed(5)
        o = mine(x, produce_targets=True)
        torch.testing.assert_close(o["x"], r["x"], atol=1e-5, rtol=0)
        assert torch.equal(o["targets"], r["targets"])
        for key in ("code_perplexity", "prob_perplexity"):
            assert o[key].item() == pytest.approx(r[key].item(), rel=1e-6)
        assert o["temp"] == r["temp"] and o["num_vars"] == r["num_vars"]
        # the diversity loss is the one the stock model derives from prob_perplexity
        stock = (r["num_vars"] - r["prob_perplexity"]) / r["num_vars"]
        assert o["diversity_loss"].item() == pytest.approx(stock.item(), rel=1e-6)


def test_parity_gradients_and_time_last_layout():
    ref, mine = make_pair(time_first=False, smoothing="gumbel_hard", regularizer="diversity")
    x = torch.randn(2, 64, 9)
    torch.manual_seed(2)
    r = ref(x)
    torch.manual_seed(2)
    o = mine(x)
    assert o["x"].shape == r["x"].shape == (2, 32, 9)
    weights = torch.randn_like(r["x"])
    (r["x"] * weights).sum().add(r["prob_perplexity"]).backward()
    (o["x"] * weights).sum().add(o["prob_perplexity"]).backward()
    for (name, a), b in zip(ref.named_parameters(), mine.parameters()):
        torch.testing.assert_close(b.grad, a.grad, atol=1e-4, rtol=1e-4, msg=name)


def test_stock_state_dict_loads_strictly():
    ref, _ = make_pair()
    _, mine = make_pair(regularizer="knn")
    mine.load_state_dict(ref.state_dict(), strict=True)
    assert mine.codebook().shape == ref.codebook().shape
    assert torch.equal(mine.codebook(), ref.codebook())


def test_knn_output_is_the_loss_of_the_smoothed_vectors():
    _, mine = make_pair(smoothing="gumbel", regularizer="knn", knn_k=4, knn_distance="l2")
    x = torch.randn(4, 10, 64)
    torch.manual_seed(3)
    out = mine(x)
    # rebuild the same Gumbel sample and compare
    logits = mine.weight_proj(x.reshape(-1, 64)).view(-1, 2, 16)
    torch.manual_seed(3)
    _, smoothed = smooth(logits, "gumbel", mine.curr_temp, training=True)
    expected = knn_vertex_loss(smoothed, k=4, distance="l2")
    assert out["knn_loss"].item() == pytest.approx(expected.item(), rel=1e-6)
    # tightness is that of the same smoothed vectors
    probs = F.softmax(smoothed, dim=-1).detach()
    torch.testing.assert_close(out["usage_sums"].max_prob_sums, probs.max(-1).values.sum(0).double())
    out["knn_loss"].backward()
    assert mine.weight_proj.weight.grad is not None and mine.weight_proj.weight.grad.abs().sum() > 0


def test_knn_input_probs_is_noise_free():
    _, mine = make_pair(smoothing="gumbel_hard", regularizer="knn", knn_input="probs")
    x = torch.randn(2, 8, 64)
    first, second = mine(x)["knn_loss"], mine(x)["knn_loss"]
    assert first.item() == pytest.approx(second.item(), rel=1e-6)
    logits = mine.weight_proj(x.reshape(-1, 64)).view(-1, 2, 16)
    assert first.item() == pytest.approx(knn_vertex_loss(logits / mine.curr_temp).item(), rel=1e-6)


def test_counts_mask_and_usage():
    _, mine = make_pair(regularizer="none")
    mine.eval()
    x = torch.randn(3, 5, 64)
    mask = torch.ones(3, 5, dtype=torch.bool)
    mask[2, 2:] = False
    out = mine(x, produce_targets=True, mask=mask)
    counts = out["usage_sums"].counts
    assert counts.shape == (2, 16) and counts.dtype == torch.long
    assert counts.sum(1).tolist() == [int(mask.sum())] * 2
    expected = torch.stack([torch.bincount(out["targets"][mask][:, g], minlength=16) for g in range(2)])
    assert torch.equal(counts, expected)
    stats = codebook_stats(out["usage_sums"])
    assert stats["code_usage"] == pytest.approx(float((counts > 0).float().mean()))


def test_smoothing_modes():
    torch.manual_seed(0)
    logits = torch.randn(6, 2, 5, requires_grad=True)
    tau = 0.7
    p, s = smooth(logits, "softmax", tau)
    torch.testing.assert_close(p, F.softmax(logits / tau, -1))
    torch.testing.assert_close(s, logits / tau)

    sel, s = smooth(logits, "ste", tau)
    assert torch.equal(sel.detach(), F.one_hot(logits.argmax(-1), 5).float())
    (g_ste,) = torch.autograd.grad((sel * torch.arange(5.0)).sum(), logits)
    (g_soft,) = torch.autograd.grad((F.softmax(logits / tau, -1) * torch.arange(5.0)).sum(), logits)
    torch.testing.assert_close(g_ste, g_soft)

    torch.manual_seed(1)
    sel, s = smooth(logits, "gumbel_hard", tau)
    torch.manual_seed(1)
    ref = F.gumbel_softmax(logits, tau=tau, hard=True)
    torch.testing.assert_close(sel, ref)
    assert torch.equal(sel.detach().argmax(-1), s.argmax(-1))

    sel, _ = smooth(logits, "gumbel", tau, training=False)
    assert torch.equal(sel, F.one_hot(logits.argmax(-1), 5).float())


def test_temperature_schedule_matches_fairseq():
    ref, mine = make_pair()
    for updates in (0, 1, 1000, 10**6):
        ref.set_num_updates(updates)
        mine.set_num_updates(updates)
        assert mine.curr_temp == ref.curr_temp
    assert TemperatureSchedule.parse("(2, 0.5, 0.999995)")(10**7) == 0.5


def test_usage_sums_equal_concatenated_batch():
    torch.manual_seed(12)
    a, b = torch.randn(40, 2, 9), torch.randn(25, 2, 9)
    pooled = CodeUsage.from_logits(a) + CodeUsage.from_logits(b)
    whole = CodeUsage.from_logits(torch.cat([a, b]))
    s_pooled, s_whole = codebook_stats(pooled), codebook_stats(whole)
    assert s_pooled.keys() == s_whole.keys()
    for key in s_whole:
        assert s_pooled[key] == pytest.approx(s_whole[key], rel=1e-6), key
    # round trip through the flat form used for all-reduce
    back = CodeUsage.from_flat(pooled.to_flat(), 2, 9)
    assert codebook_stats(back) == pytest.approx(s_pooled)


def test_codebook_stats_from_indices_and_counts():
    indices = torch.tensor([[0, 1], [0, 1], [2, 1], [0, 3]])  # (N, G)
    stats = codebook_stats(indices, num_vars=4)
    assert stats["used_codes"] == 4 and stats["code_usage"] == 0.5
    probs_g0 = torch.tensor([3, 0, 1, 0]) / 4
    probs_g1 = torch.tensor([0, 3, 0, 1]) / 4
    expected = sum(torch.exp(-(p * torch.log(p + 1e-7)).sum()) for p in (probs_g0, probs_g1))
    assert stats["code_perplexity"] == pytest.approx(float(expected), rel=1e-6)
    counts = torch.tensor([[3, 0, 1, 0], [0, 3, 0, 1]])
    assert codebook_stats(counts) == pytest.approx(stats)
    assert codebook_stats(torch.tensor([5, 0, 0]))["code_usage"] == pytest.approx(1 / 3)


def test_tightness_of_onehot_and_uniform():
    onehot = CodeUsage.from_logits(40.0 * torch.eye(4))
    uniform = CodeUsage.from_logits(torch.zeros(4, 4))
    assert codebook_stats(onehot)["tightness_max_prob"] == pytest.approx(1.0, abs=1e-6)
    assert codebook_stats(onehot)["tightness_vertex_l2"] == pytest.approx(0.0, abs=1e-6)
    assert codebook_stats(uniform)["tightness_max_prob"] == pytest.approx(0.25)
    assert codebook_stats(uniform)["tightness_vertex_l2"] == pytest.approx(0.75)


@pytest.mark.parametrize(
    "build, message",
    [
        (lambda: SmoothedVectorQuantizer(8, 4, smoothing="hardmax"), "unknown smoothing"),
        (lambda: SmoothedVectorQuantizer(8, 4, regularizer="entropy"), "unknown regularizer"),
        (lambda: SmoothedVectorQuantizer(8, 4, knn_k=0), "k must be"),
        (lambda: SmoothedVectorQuantizer(8, 4, knn_distance="cos"), "unknown knn distance"),
        (lambda: SmoothedVectorQuantizer(8, 4, knn_input="noise"), "unknown knn_input"),
        (lambda: SmoothedVectorQuantizer(8, 4, groups=3, vq_dim=8), "divisible"),
        (lambda: SmoothedVectorQuantizer(8, 4, temp=(2, 0.5)), "temperature"),
        (lambda: SmoothedVectorQuantizer(8, 4)(torch.randn(2, 3, 5)), "input channels"),
        (lambda: SmoothedVectorQuantizer(8, 4)(torch.randn(2, 8)), "expected input"),
        (lambda: SmoothedVectorQuantizer(8, 4)(torch.randn(2, 3, 8), mask=torch.ones(3, 2, dtype=torch.bool)), "mask"),
        (lambda: codebook_stats(torch.tensor([0, 5]), num_vars=4), r"\[0, 4\)"),
        (lambda: VQVAEQuantizer(8, 4)(torch.randn(3, 7)), "expected input"),
        (lambda: SmoothedVectorQuantizer(8, 4, knn_chunk_size=0), "knn_chunk_size must be an integer >= 1"),
        (lambda: SmoothedVectorQuantizer(8, 4, knn_chunk_size=-1), "knn_chunk_size must be an integer >= 1"),
    ],
)
def test_bad_arguments(build, message):
    with pytest.raises(ValueError, match=message):
        build()


def test_vqvae_nearest_codeword_and_straight_through():
    torch.manual_seed(13)
    vq = VQVAEQuantizer(dim=6, num_vars=10, groups=2)
    z = torch.randn(4, 5, 6, requires_grad=True)
    out = vq(z)
    codebooks = vq.codebooks.detach()
    for g in range(2):
        zg = z.detach().reshape(-1, 2, 3)[:, g]
        brute = torch.cdist(zg, codebooks[g]).argmin(-1)
        assert torch.equal(out["targets"].reshape(-1, 2)[:, g], brute)
        torch.testing.assert_close(out["x"].detach().reshape(-1, 2, 3)[:, g], codebooks[g][brute])
    out["x"].sum().backward()
    torch.testing.assert_close(z.grad, torch.ones_like(z))  # straight-through: identity
    chosen = out["x"].detach().reshape(-1, 2, 3)
    expected = F.mse_loss(chosen, z.detach().reshape(-1, 2, 3))
    assert out["codebook_loss"].item() == pytest.approx(expected.item(), rel=1e-5)
    assert out["vq_loss"].item() == pytest.approx(1.25 * expected.item(), rel=1e-5)


def test_vqvae_rotation_trick_keeps_value_changes_gradient():
    torch.manual_seed(14)
    plain = VQVAEQuantizer(dim=4, num_vars=8)
    rotated = VQVAEQuantizer(dim=4, num_vars=8, rotation_trick=True)
    rotated.load_state_dict(plain.state_dict())
    z = torch.randn(20, 4, requires_grad=True)
    a, b = plain(z)["x"], rotated(z)["x"]
    torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-5)
    (g,) = torch.autograd.grad(b.sum(), z)
    assert not torch.allclose(g, torch.ones_like(g))
    # the map is lambda * R with R orthogonal: it scales a vector's norm by ||e|| / ||z||
    v = torch.randn(4)
    zi, ei = z[0].detach(), b[0].detach()
    (jac,) = torch.autograd.grad(rotated.rotate_to(z[:1], b[:1].detach()), z, v.unsqueeze(0), retain_graph=False)
    expected_norm = v.norm() * ei.norm() / zi.norm()
    assert jac[0].norm().item() == pytest.approx(expected_norm.item(), rel=1e-4)


def test_vqvae_usage_is_complete_and_poolable():
    vq = VQVAEQuantizer(dim=4, num_vars=8, groups=2)
    usage = vq(torch.randn(30, 4))["usage_sums"]
    stats = codebook_stats(usage + usage)
    assert stats["tightness_max_prob"] == pytest.approx(1.0)
    assert stats["tightness_vertex_l2"] == 0.0
    assert stats["prob_perplexity"] == pytest.approx(stats["code_perplexity"], rel=1e-6)


def test_quantizer_lets_an_overflow_through_in_training():
    """fp16 overflow must reach fairseq's loss scaler (which skips the step): no error,
    a non-finite loss, and the other rows quantized as without the bad row."""
    _, mine = make_pair(smoothing="softmax", regularizer="knn")
    x = torch.randn(2, 5, 64)
    bad = x.clone()
    bad[0, 0, 0] = float("inf")
    out = mine(bad)
    ref = mine(x)
    assert not torch.isfinite(out["knn_loss"])
    assert torch.isfinite(ref["knn_loss"])
    torch.testing.assert_close(out["x"][1], ref["x"][1], atol=1e-6, rtol=0)
    torch.testing.assert_close(out["x"][0, 1:], ref["x"][0, 1:], atol=1e-6, rtol=0)


def test_vqvae_lets_an_fp16_overflow_reach_the_loss_scaler():
    """An inf from an fp16 encoder: no ValueError in forward, a non-finite vq_loss (the
    scaler's signal), and the codes of the finite rows are the brute-force nearest."""
    torch.manual_seed(16)
    vq = VQVAEQuantizer(dim=6, num_vars=10, groups=2).train()
    z = torch.randn(8, 6)
    z[3, 1] = float("inf")
    out = vq(z.requires_grad_())
    assert not torch.isfinite(out["vq_loss"])
    finite = torch.tensor([i != 3 for i in range(8)])
    for g in range(2):
        zg = z.detach().reshape(-1, 2, 3)[:, g][finite]
        brute = torch.cdist(zg, vq.codebooks.detach()[g]).argmin(-1)
        assert torch.equal(out["targets"][finite][:, g], brute)
    out["vq_loss"].backward()  # the backward pass runs; the scaler then skips the step


@pytest.mark.parametrize("regularizer", ["knn", "diversity", "none"])
@pytest.mark.parametrize("smoothing", ["softmax", "gumbel_hard", "ste"])
@pytest.mark.parametrize("shape", [(0, 7), (3, 0)])
def test_empty_batch_gives_empty_outputs_and_zero_losses(regularizer, smoothing, shape):
    bsz, tsz = shape
    for time_first in (True, False):
        _, mine = make_pair(time_first=time_first, smoothing=smoothing, regularizer=regularizer)
        for mask in (None, torch.zeros(bsz, tsz, dtype=torch.bool)):
            x = torch.randn(bsz, tsz, 64) if time_first else torch.randn(bsz, 64, tsz)
            out = mine(x, produce_targets=True, mask=mask)
            assert out["x"].shape == ((bsz, tsz, 32) if time_first else (bsz, 32, tsz))
            assert out["targets"].shape == (bsz, tsz, 2)
            assert torch.equal(out["usage_sums"].counts, torch.zeros(2, 16, dtype=torch.long))
            assert out["code_perplexity"].item() == 2.0  # exp(H(0)) per group, as fairseq's +1e-7 gives
            assert regularizer == "none" or f"{regularizer}_loss" in out
            losses = [out[key] for key in ("knn_loss", "diversity_loss") if key in out]
            for loss in losses:
                assert loss.item() == 0.0
            total = out["x"].sum() + sum(loss for loss in losses if loss.requires_grad)
            total.backward()
            assert all(p.grad is None or float(p.grad.abs().sum()) == 0.0 for p in mine.parameters())
            mine.zero_grad()


def test_all_masked_batch_gives_zero_losses_with_rows_present():
    for regularizer in ("knn", "diversity"):
        _, mine = make_pair(smoothing="softmax", regularizer=regularizer)
        out = mine(torch.randn(2, 5, 64), mask=torch.zeros(2, 5, dtype=torch.bool))
        assert out[f"{regularizer}_loss"].item() == 0.0
        assert int(out["usage_sums"].counts.sum()) == 0


def test_vqvae_empty_batch():
    vq = VQVAEQuantizer(dim=6, num_vars=10, groups=2)
    out = vq(torch.randn(0, 6, requires_grad=True))
    assert out["x"].shape == (0, 6) and out["targets"].shape == (0, 2)
    assert out["vq_loss"].item() == 0.0 and int(out["usage_sums"].counts.sum()) == 0


@pytest.mark.parametrize("smoothing", ["softmax", "ste", "gumbel", "gumbel_hard"])
@pytest.mark.parametrize("masked", [False, True])
def test_diversity_training_step_equals_autograd_reference(smoothing, masked):
    """The smoothing and the batch-mean softmax in one node: softmax / ste keep only
    softmax(l / tau) (TemperedSoftmaxWithMeanProbs), gumbel / gumbel_hard only the noisy
    softmax and redraw the noise in the backward pass (GumbelSoftmaxWithMeanProbs;
    ``tests/core/test_gumbel_diversity_node.py``). Against the formulas written out with
    autograd, in float64."""
    _, mine = make_pair(smoothing=smoothing, regularizer="diversity", track_knn_loss=False)
    mine = mine.double()
    mine.set_num_updates(50000)  # tau = 2 * 0.999995**50000 = 1.56
    x = torch.randn(3, 9, 64, dtype=torch.float64)
    mask = torch.rand(3, 9) > 0.3 if masked else None
    upstream = torch.randn(3, 9, 32, dtype=torch.float64)
    torch.manual_seed(4)
    out = mine(x, mask=mask)
    ((out["x"] * upstream).sum() + 3.0 * out["diversity_loss"]).backward()
    got = [p.grad.clone() for p in mine.parameters()]
    mine.zero_grad()

    tau = mine.curr_temp
    logits = mine.weight_proj(x.reshape(-1, 64)).view(-1, 2, 16).float()  # as fairseq's
    torch.manual_seed(4)
    selection, _ = smooth(logits, smoothing, tau)
    selection = selection.double()
    quantized = torch.einsum("ngm,gmd->ngd", selection, mine.vars.view(2, 16, 16)).reshape(3, 9, 32)
    valid = torch.ones(27, dtype=torch.bool) if mask is None else mask.reshape(-1)
    avg = F.softmax(logits[valid], dim=-1).mean(0)
    ppl = torch.exp(-(avg * torch.log(avg + 1e-7)).sum(-1)).sum()
    diversity = (32 - ppl) / 32
    ((quantized * upstream).sum() + 3.0 * diversity).backward()
    # the quantizer computes in float32 (as fairseq's does): float32 rounding
    torch.testing.assert_close(out["x"], quantized, atol=1e-6, rtol=1e-6)
    assert out["diversity_loss"].item() == pytest.approx(diversity.item(), abs=1e-7)
    assert out["prob_perplexity"].item() == pytest.approx(ppl.item(), rel=1e-6)
    for g, p in zip(got, mine.parameters()):
        scale = float(p.grad.abs().max())
        assert scale > 1e-2
        torch.testing.assert_close(g, p.grad, atol=1e-5 * scale, rtol=1e-5)


@pytest.mark.parametrize("combine_groups", [False, True])
def test_straight_through_codewords_equal_the_selection_matrix_product(combine_groups):
    """gumbel_hard / ste training forms q from the hard index without the N x G x M
    straight-through selection; values and gradients are those of the matrix product."""
    from fairseq_knnvq.quantization.quantizer import StraightThroughCodewords

    torch.manual_seed(17)
    logits = torch.randn(300, 2, 16, dtype=torch.float64, requires_grad=True)
    codebook = torch.randn(1 if combine_groups else 2, 16, 8, dtype=torch.float64, requires_grad=True)
    codebooks = codebook.expand(2, -1, -1)
    soft = F.softmax(logits / 0.7, dim=-1)
    index = soft.detach().argmax(-1)
    hard = torch.zeros_like(soft).scatter_(-1, index.unsqueeze(-1), 1.0)
    ref = torch.bmm((hard - soft.detach() + soft).transpose(0, 1), codebooks)
    ours = StraightThroughCodewords.apply(soft, index, codebooks)
    assert torch.equal(ours, ref)
    upstream = torch.randn(ref.shape, dtype=torch.float64)
    g_ref = torch.autograd.grad((ref * upstream).sum(), (logits, codebook), retain_graph=True)
    g_ours = torch.autograd.grad((ours * upstream).sum(), (logits, codebook))
    for a, b in zip(g_ours, g_ref):
        assert float(b.abs().max()) > 0.1
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-10)
