"""knn_vertex_loss and diversity_loss against brute-force references written here."""

import subprocess
import sys

import pytest
import torch

from fairseq_knnvq.quantization import KnnVertexLoss, diversity_loss, knn_vertex_loss


def brute_force_knn(logits, k, distance, valid=None):
    """Explicit loops over groups and vertices; distances from an identity codebook."""
    rows = logits.reshape(-1, logits.shape[-2], logits.shape[-1])
    if valid is not None:
        rows = rows[valid.reshape(-1)]
    n, groups, entries = rows.shape
    k_eff = min(k, n)
    total = rows.new_zeros(())
    for g in range(groups):
        p = torch.softmax(rows[:, g], dim=-1)
        vertices = torch.eye(entries, dtype=rows.dtype)
        if distance == "l2":
            dist = torch.cdist(vertices, p) ** 2  # (M, N)
        else:
            dist = -torch.log_softmax(rows[:, g], dim=-1).t()
        for m in range(entries):
            order = sorted(range(n), key=lambda i: dist[m, i].detach().item())
            for i in order[:k_eff]:
                total = total + dist[m, i]
    return total / (groups * entries * k_eff)


@pytest.mark.parametrize("distance", ["ce", "l2"])
@pytest.mark.parametrize("k", [1, 4, 8])
@pytest.mark.parametrize("n", [3, 40])
def test_values_and_gradients_match_brute_force(distance, k, n):
    torch.manual_seed(1000 * k + n)
    logits = (2 * torch.randn(n, 2, 6, dtype=torch.float64)).requires_grad_()
    ours = knn_vertex_loss(logits, k=k, distance=distance)
    ref = brute_force_knn(logits, k, distance)
    assert ours.item() == pytest.approx(ref.item(), abs=1e-10)
    (g_ours,) = torch.autograd.grad(ours, logits)
    (g_ref,) = torch.autograd.grad(ref, logits)
    torch.testing.assert_close(g_ours, g_ref, atol=1e-10, rtol=1e-8)


@pytest.mark.parametrize("distance", ["ce", "l2"])
def test_float32_agrees_to_1e5(distance):
    torch.manual_seed(7)
    logits = torch.randn(200, 3, 17) * 3
    ours = knn_vertex_loss(logits, k=8, distance=distance)
    ref = brute_force_knn(logits.double(), 8, distance)
    assert ours.item() == pytest.approx(ref.item(), abs=1e-5)


@pytest.mark.parametrize("distance", ["ce", "l2"])
def test_gradcheck_float64(distance):
    torch.manual_seed(3)
    logits = torch.randn(12, 2, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: knn_vertex_loss(x, k=3, distance=distance), (logits,))


@pytest.mark.parametrize("distance", ["ce", "l2"])
def test_mask_excludes_positions(distance):
    torch.manual_seed(4)
    logits = torch.randn(3, 10, 2, 7, dtype=torch.float64)
    mask = torch.rand(3, 10) > 0.4
    # padded positions get logits that would win every vertex if they were counted
    logits[~mask] = 50.0 * torch.eye(7, dtype=torch.float64)[torch.randint(0, 7, (int((~mask).sum()),))].unsqueeze(1)
    logits.requires_grad_()
    ours = knn_vertex_loss(logits, k=4, distance=distance, mask=mask)
    ref = brute_force_knn(logits, 4, distance, valid=mask)
    assert ours.item() == pytest.approx(ref.item(), abs=1e-10)
    (grad,) = torch.autograd.grad(ours, logits)
    assert float(grad[~mask].abs().max()) == 0.0


def brute_force_diversity(rows):
    """wav2vec 2.0's prob-perplexity loss of rows (N, G, M), written out per group."""
    groups, entries = rows.shape[1], rows.shape[2]
    ppl = 0.0
    for g in range(groups):
        avg = torch.softmax(rows[:, g].double(), dim=-1).mean(0)
        ppl = ppl + torch.exp(-(avg * torch.log(avg + 1e-7)).sum())
    return (groups * entries - ppl) / (groups * entries)


@pytest.mark.parametrize("shape", [(12, 5), (12, 3, 5), (3, 4, 2, 5), (2, 3, 4, 3, 5)])
def test_one_group_rule_with_and_without_a_mask(shape):
    """The last two dimensions are (G, M) whether or not a mask is given (2-D: one
    group), the mask covers the rest, and an all-True mask changes nothing."""
    torch.manual_seed(len(shape))
    logits = (2 * torch.randn(*shape, dtype=torch.float64)).requires_grad_()
    positions = shape[:-1] if len(shape) == 2 else shape[:-2]
    groups = 1 if len(shape) == 2 else shape[-2]
    rows = logits.reshape(-1, groups, shape[-1])
    all_true = torch.ones(positions, dtype=torch.bool)
    for distance in ("ce", "l2"):
        ref = brute_force_knn(rows, 3, distance)
        plain = knn_vertex_loss(logits, k=3, distance=distance)
        masked = knn_vertex_loss(logits, k=3, distance=distance, mask=all_true)
        assert plain.item() == pytest.approx(ref.item(), abs=1e-12)
        assert masked.item() == pytest.approx(ref.item(), abs=1e-12)
        (g_ref,) = torch.autograd.grad(ref, logits)
        (g_masked,) = torch.autograd.grad(masked, logits)
        torch.testing.assert_close(g_masked, g_ref, atol=1e-12, rtol=1e-10)
    div_ref = brute_force_diversity(rows.detach())
    assert diversity_loss(logits).item() == pytest.approx(div_ref.item(), abs=1e-12)
    assert diversity_loss(logits, mask=all_true).item() == pytest.approx(div_ref.item(), abs=1e-12)


def test_a_mask_over_the_group_dimension_is_refused_with_the_fix():
    """(B, T, M) is T groups of B rows; a (B, T) mask would silently change that."""
    torch.manual_seed(5)
    logits = torch.randn(4, 6, 9, dtype=torch.float64)
    mask = torch.ones(4, 6, dtype=torch.bool)
    mask[0, 3:] = False
    for loss in (knn_vertex_loss, diversity_loss):
        with pytest.raises(ValueError, match=r"G=6 groups: for one group pass logits.unsqueeze\(-2\)"):
            loss(logits, mask=mask)
    one_group = logits.unsqueeze(-2)  # (B, T, 1, M)
    ref = brute_force_knn(one_group, 2, "ce", valid=mask)
    assert knn_vertex_loss(one_group, k=2, mask=mask).item() == pytest.approx(ref.item(), abs=1e-12)
    div_ref = brute_force_diversity(one_group.reshape(-1, 1, 9)[mask.reshape(-1)])
    assert diversity_loss(one_group, mask=mask).item() == pytest.approx(div_ref.item(), abs=1e-12)


def test_fewer_valid_rows_than_k_uses_all_rows():
    logits = torch.randn(5, 4, dtype=torch.float64)
    full = knn_vertex_loss(logits, k=50)
    assert full.item() == pytest.approx(knn_vertex_loss(logits, k=5).item(), abs=1e-12)
    mask = torch.tensor([True, False, True, False, False])
    ref = brute_force_knn(logits[mask].unsqueeze(1), 2, "ce")
    assert knn_vertex_loss(logits, k=8, mask=mask).item() == pytest.approx(ref.item(), abs=1e-12)


def test_all_masked_gives_zero_with_a_graph():
    logits = torch.randn(2, 3, 1, 5, requires_grad=True)
    loss = knn_vertex_loss(logits, mask=torch.zeros(2, 3, dtype=torch.bool))
    loss.backward()
    assert loss.item() == 0.0 and float(logits.grad.abs().sum()) == 0.0
    assert diversity_loss(logits, mask=torch.zeros(2, 3, dtype=torch.bool)).item() == 0.0


@pytest.mark.parametrize("distance", ["ce", "l2"])
def test_gradient_flows_only_through_selected_rows(distance):
    """The rows with a gradient are exactly the brute-force neighbours, and the gradient
    is the brute force's (N = 100 >= 4 K M: the sparse backward pass)."""
    torch.manual_seed(6)
    logits = (2 * torch.randn(100, 1, 4, dtype=torch.float64)).requires_grad_()
    (grad,) = torch.autograd.grad(knn_vertex_loss(logits, k=2, distance=distance), logits)
    (ref,) = torch.autograd.grad(brute_force_knn(logits, 2, distance), logits)
    torch.testing.assert_close(grad, ref, atol=1e-12, rtol=1e-10)
    p = torch.softmax(logits.detach()[:, 0], -1)
    dist = -p.log() if distance == "ce" else 1 - 2 * p + (p * p).sum(-1, keepdim=True)
    selected = set(dist.topk(2, dim=0, largest=False).indices.flatten().tolist())
    touched = set((grad.abs().sum(dim=(1, 2)) > 0).nonzero().flatten().tolist())
    assert touched == selected and len(selected) >= 2


@pytest.mark.parametrize("distance", ["ce", "l2"])
@pytest.mark.parametrize("n", [9, 40, 200])
def test_rows_picked_by_several_vertices_get_one_gradient(distance, n):
    """Collapsed rows are the neighbours of many vertices; dense (n=9) and sparse
    (n >= 4 K M) backward passes both equal the brute force, masked and not."""
    torch.manual_seed(n)
    logits = torch.randn(n, 2, 3, dtype=torch.float64)
    logits[: n // 3, :, 0] += 6.0  # a third of the rows sit near vertex 0
    logits.requires_grad_()
    mask = torch.rand(n) > 0.2
    few = torch.zeros(n, dtype=torch.bool)
    few[[0, n // 2, n - 1]] = True  # 3 valid rows, each picked by all 3 vertices
    upstream = torch.randn(logits.shape, dtype=torch.float64)
    for m in (None, mask, few):
        (ref,) = torch.autograd.grad(brute_force_knn(logits, 3, distance, valid=m), logits)
        (grad,) = torch.autograd.grad(knn_vertex_loss(logits, k=3, distance=distance, mask=m), logits)
        torch.testing.assert_close(grad, ref, atol=1e-12, rtol=1e-10)
        # the fused softmax + KNN node: its KNN part of the gradient
        probs, loss = KnnVertexLoss(3, distance).with_softmax(logits, mask=m)
        (both,) = torch.autograd.grad((probs * upstream).sum() + loss, logits)
        (softmax_only,) = torch.autograd.grad((torch.softmax(logits, -1) * upstream).sum(), logits)
        torch.testing.assert_close(both - softmax_only, ref, atol=1e-12, rtol=1e-10)


def test_ce_is_finite_for_confident_logits():
    logits = torch.zeros(20, 8)
    logits[:, 0] = 1e4  # softmax underflows to exactly 0 for entries 1..7
    loss = knn_vertex_loss(logits, k=4, distance="ce")
    assert torch.isfinite(loss) and loss.item() > 1e3


def test_chunked_search_equals_unchunked():
    torch.manual_seed(8)
    logits = torch.randn(64, 2, 33, dtype=torch.float64)
    for distance in ("ce", "l2"):
        whole = knn_vertex_loss(logits, k=5, distance=distance, chunk_size=33)
        for chunk in (1, 4, 10):
            assert knn_vertex_loss(logits, k=5, distance=distance, chunk_size=chunk).item() == pytest.approx(
                whole.item(), abs=1e-12
            )


def test_minimised_by_k_rows_on_each_vertex():
    """The loss is ~0 exactly when every vertex has K near-onehot vectors on it."""
    entries, k = 5, 3
    on_vertices = 30.0 * torch.eye(entries).repeat_interleave(k, dim=0)
    assert knn_vertex_loss(on_vertices, k=k, distance="ce").item() < 1e-6
    collapsed = 30.0 * torch.eye(entries)[torch.zeros(entries * k, dtype=torch.long)]
    assert knn_vertex_loss(collapsed, k=k, distance="ce").item() > 5.0
    uniform = torch.zeros(entries * k, entries)
    assert knn_vertex_loss(uniform, k=k, distance="l2").item() == pytest.approx(1 - 1 / entries, abs=1e-6)


def fairseq_prob_perplexity_loss(logits):
    avg = torch.softmax(logits.float(), dim=-1).mean(dim=0)
    ppl = torch.exp(-torch.sum(avg * torch.log(avg + 1e-7), dim=-1)).sum()
    num_vars = logits.shape[1] * logits.shape[2]
    return (num_vars - ppl) / num_vars


def test_diversity_loss_is_the_wav2vec2_formula():
    torch.manual_seed(9)
    logits = torch.randn(50, 2, 11)
    assert diversity_loss(logits).item() == pytest.approx(fairseq_prob_perplexity_loss(logits).item(), abs=1e-6)
    mask = torch.rand(50) > 0.5
    assert diversity_loss(logits, mask=mask).item() == pytest.approx(
        fairseq_prob_perplexity_loss(logits[mask]).item(), abs=1e-6
    )
    # uniform vectors satisfy it perfectly while the hard codes collapse: the mismatch
    assert diversity_loss(torch.zeros(50, 2, 11)).item() == pytest.approx(0.0, abs=1e-5)


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: knn_vertex_loss(torch.randn(5)), "shape"),
        (lambda: knn_vertex_loss(torch.randn(5, 3), k=0), "k must be"),
        (lambda: knn_vertex_loss(torch.randn(5, 3), k=2.5), "k must be"),
        (lambda: knn_vertex_loss(torch.randn(5, 3), distance="cosine"), "unknown knn distance"),
        (lambda: knn_vertex_loss(torch.randn(4, 5, 3), mask=torch.ones(5, dtype=torch.bool)), "mask of shape"),
        (lambda: knn_vertex_loss(torch.randn(4, 5, 3), chunk_size=0), "chunk_size must be an integer >= 1"),
        (lambda: knn_vertex_loss(torch.randn(4, 5, 3), chunk_size=-3), "chunk_size must be an integer >= 1"),
        (lambda: knn_vertex_loss(torch.randn(4, 5, 3), mask=torch.ones(4, 5, dtype=torch.bool)), "unsqueeze"),
        (lambda: knn_vertex_loss(torch.randn(4, 5, 3), mask=torch.ones(4, 5)), "boolean"),
        (lambda: knn_vertex_loss(torch.tensor([[0.0, float("nan")]])), "NaN"),
        (lambda: knn_vertex_loss(torch.ones(3, 4, dtype=torch.long)), "floating point"),
        (lambda: diversity_loss(torch.tensor([[float("inf"), 0.0]])), "NaN"),
    ],
)
def test_bad_input_is_a_clear_value_error(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def test_core_does_not_import_fairseq():
    code = (
        "import sys, fairseq_knnvq.quantization as q; q.knn_vertex_loss; "
        "bad = [m for m in sys.modules if m == 'fairseq' or m.startswith('fairseq.')]; "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
