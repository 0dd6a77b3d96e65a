"""The chunked neighbour search and the written-out backward pass of the KNN loss.

Large codebooks (16k-64k entries) go through a search over chunks of vertices that keeps
only per-row statistics; small ones through a search in one piece that keeps the
log-probabilities. Both, and both backward variants (rows that some vertex selected only,
or every row), must give the values and gradients of plain autograd.
"""

import pytest
import torch
import torch.nn.functional as F

from fairseq_knnvq.quantization import KnnVertexLoss, knn_vertex_loss
from fairseq_knnvq.quantization import vertex_search
from fairseq_knnvq.quantization.knn import SelectedVertexDistance
from fairseq_knnvq.quantization.rows import as_rows
from fairseq_knnvq.quantization.vertex_search import search_vertices


def autograd_selected_distance(rows, index, weight, distance):
    """sum w * d(e_m, softmax(rows[index])) by autograd through log_softmax."""
    log_p = F.log_softmax(rows, dim=-1)
    chosen = log_p.gather(0, index)
    if distance == "ce":
        dist = -chosen
    else:
        p = log_p.exp()
        sq = p.pow(2).sum(-1, keepdim=True).expand_as(p).gather(0, index)
        dist = 1.0 - 2.0 * chosen.exp() + sq
    return (weight * dist).sum()


def loss_and_grad(logits, **kwargs):
    logits = logits.detach().clone().requires_grad_()
    loss = knn_vertex_loss(logits, **kwargs)
    (grad,) = torch.autograd.grad(loss, logits)
    return loss.detach(), grad


@pytest.mark.parametrize("distance", ["ce", "l2"])
@pytest.mark.parametrize("masked", [False, True])
def test_chunked_equals_unchunked_values_and_gradients(distance, masked):
    torch.manual_seed(11)
    logits = 3.0 * torch.randn(4, 30, 2, 37, dtype=torch.float64)
    mask = torch.rand(4, 30) > 0.3 if masked else None
    whole, whole_grad = loss_and_grad(logits, k=5, distance=distance, mask=mask, chunk_size=37)
    for chunk in (1, 6, 36):
        loss, grad = loss_and_grad(logits, k=5, distance=distance, mask=mask, chunk_size=chunk)
        assert loss.item() == pytest.approx(whole.item(), abs=1e-12)
        torch.testing.assert_close(grad, whole_grad, atol=1e-12, rtol=1e-10)
    if masked:
        assert float(whole_grad[~mask].abs().max()) == 0.0


def test_search_in_one_piece_only_below_the_threshold(monkeypatch):
    rows = torch.randn(64, 2, 16)
    assert search_vertices(rows, 4, "ce").full is not None  # 2048 values: one piece
    monkeypatch.setattr(vertex_search, "AUTO_CHUNK_ELEMENTS", 64 * 2 * 4)
    search = search_vertices(rows, 4, "ce")
    assert search.full is None and search.lse is not None  # chunks of 4 vertices
    whole = search_vertices(rows, 4, "ce", chunk_size=16)
    torch.testing.assert_close(search.closeness, whole.closeness)
    assert torch.equal(search.index, whole.index)


@pytest.mark.parametrize("distance", ["ce", "l2"])
def test_automatic_chunking_gives_the_same_loss(distance, monkeypatch):
    torch.manual_seed(12)
    logits = 2.0 * torch.randn(50, 3, 20, dtype=torch.float64)
    ref, ref_grad = loss_and_grad(logits, k=4, distance=distance)
    # force chunks of 2 vertices and blocks of 2 rows in the backward pass
    monkeypatch.setattr(vertex_search, "AUTO_CHUNK_ELEMENTS", 50 * 3 * 2)
    loss, grad = loss_and_grad(logits, k=4, distance=distance)
    assert loss.item() == pytest.approx(ref.item(), abs=1e-12)
    torch.testing.assert_close(grad, ref_grad, atol=1e-12, rtol=1e-10)


@pytest.mark.parametrize("distance", ["ce", "l2"])
@pytest.mark.parametrize("rows_n", [12, 400])  # 400 rows: only a few are selected
@pytest.mark.parametrize("chunked", [False, True])
def test_selected_distance_matches_autograd_for_any_weights(distance, rows_n, chunked):
    """Both backward variants (selected rows only, every row), weights of any sign,
    zeros included, and a scaled incoming gradient."""
    torch.manual_seed(13)
    rows = (2.0 * torch.randn(rows_n, 2, 9, dtype=torch.float64)).requires_grad_()
    search = search_vertices(rows.detach(), 3, distance, chunk_size=4 if chunked else None)
    weight = torch.randn(search.index.shape, dtype=torch.float64)
    weight[0, 0, :4] = 0.0
    ours = 2.5 * SelectedVertexDistance.apply(rows, search.index, weight, distance, search)
    ref = 2.5 * autograd_selected_distance(rows, search.index, weight, distance)
    assert ours.item() == pytest.approx(ref.item(), abs=1e-10)
    (g_ours,) = torch.autograd.grad(ours, rows)
    (g_ref,) = torch.autograd.grad(ref, rows)
    torch.testing.assert_close(g_ours, g_ref, atol=1e-10, rtol=1e-8)
    # without the search it computes its own row statistics
    alone = SelectedVertexDistance.apply(rows, search.index, weight, distance)
    assert 2.5 * alone.item() == pytest.approx(ref.item(), abs=1e-10)


@pytest.mark.parametrize("distance", ["ce", "l2"])
def test_half_precision_is_computed_in_float32(distance):
    torch.manual_seed(14)
    logits = 3.0 * torch.randn(300, 2, 40)
    half = logits.half().requires_grad_()
    loss = knn_vertex_loss(half, k=4, distance=distance, chunk_size=7)
    assert loss.dtype == torch.float32
    loss.backward()
    assert half.grad.dtype == torch.float16
    # the same computation on the float32 copy: the half gradient is its rounding
    same, same_grad = loss_and_grad(half.detach().float(), k=4, distance=distance, chunk_size=7)
    assert loss.item() == same.item()
    assert torch.equal(half.grad, same_grad.half())
    # against the search in one piece: within float16 rounding of gradients up to ~2e-3
    ref, ref_grad = loss_and_grad(half.detach().float(), k=4, distance=distance)
    assert float(ref_grad.abs().max()) > 1e-3
    assert loss.item() == pytest.approx(ref.item(), rel=1e-6)
    torch.testing.assert_close(half.grad.float(), ref_grad, atol=2e-6, rtol=1e-3)


def test_search_vertices_keeps_its_contract():
    torch.manual_seed(15)
    logits = torch.randn(40, 2, 6, dtype=torch.float64)
    valid = torch.rand(40) > 0.5
    rows, _ = as_rows(logits)
    for chunk in (None, 2):
        search = search_vertices(rows, 3, "l2", valid, chunk)
        index, closeness = search.index, search.closeness
        assert index.shape == closeness.shape == (3, 2, 6)
        assert bool(valid[index].all())
        p = torch.softmax(rows, -1)
        expected = 2 * p.gather(0, index) - p.pow(2).sum(-1, keepdim=True).expand_as(p).gather(0, index)
        torch.testing.assert_close(closeness, expected)
        assert bool((closeness[:-1] >= closeness[1:]).all())  # descending


def test_top_k_over_column_blocks_equals_one_top_k(monkeypatch):
    torch.manual_seed(16)
    score = torch.randn(300, 2, 50, dtype=torch.float64)
    whole = torch.topk(score, 6, dim=0)
    monkeypatch.setattr(vertex_search, "TOPK_BLOCK_ELEMENTS", 300 * 2 * 7)  # blocks of 7 columns
    values, indices = vertex_search.topk_along_rows(score, 6)
    assert torch.equal(values, whole.values) and torch.equal(indices, whole.indices)
    logits = 3.0 * torch.randn(300, 2, 50, dtype=torch.float64)
    ref, ref_grad = loss_and_grad(logits, k=6)
    monkeypatch.setattr(vertex_search, "TOPK_BLOCK_ELEMENTS", 1 << 18)
    loss, grad = loss_and_grad(logits, k=6)
    assert loss.item() == pytest.approx(ref.item(), abs=1e-12)
    torch.testing.assert_close(grad, ref_grad)


# ------------------------------------------------- softmax and KNN in one autograd node


@pytest.mark.parametrize("distance", ["ce", "l2"])
@pytest.mark.parametrize("rows_n, chunk", [(12, None), (400, None), (400, 3), (50, 2)])
@pytest.mark.parametrize("masked", [False, True])
def test_softmax_and_knn_loss_equals_the_two_apart(distance, rows_n, chunk, masked):
    torch.manual_seed(17)
    logits = (3.0 * torch.randn(rows_n, 2, 9, dtype=torch.float64)).requires_grad_()
    mask = torch.rand(rows_n) > 0.3 if masked else None
    upstream = torch.randn(rows_n, 2, 9, dtype=torch.float64)
    probs, loss = KnnVertexLoss(4, distance, chunk).with_softmax(logits, mask)
    ref_probs = torch.softmax(logits, dim=-1)
    ref_loss = knn_vertex_loss(logits, k=4, distance=distance, mask=mask)
    assert torch.equal(probs, ref_probs)
    assert loss.item() == pytest.approx(ref_loss.item(), abs=1e-12)
    total, ref_total = (probs * upstream).sum() + 1.7 * loss, (ref_probs * upstream).sum() + 1.7 * ref_loss
    (grad,) = torch.autograd.grad(total, logits)
    (ref_grad,) = torch.autograd.grad(ref_total, logits)
    torch.testing.assert_close(grad, ref_grad, atol=1e-12, rtol=1e-10)


def test_softmax_and_knn_loss_with_every_row_masked():
    logits = torch.randn(3, 4, 2, 5, requires_grad=True)
    probs, loss = KnnVertexLoss(3).with_softmax(logits, mask=torch.zeros(3, 4, dtype=torch.bool))
    assert loss.item() == 0.0 and probs.shape == logits.shape
    (grad,) = torch.autograd.grad(probs[..., 0].sum() + loss, logits)
    (ref,) = torch.autograd.grad(torch.softmax(logits, -1)[..., 0].sum(), logits)
    torch.testing.assert_close(grad, ref)


@pytest.mark.parametrize("smoothing", ["softmax", "gumbel", "gumbel_hard", "ste"])
@pytest.mark.parametrize("distance", ["ce", "l2"])
def test_quantizer_training_step_equals_smoothing_plus_separate_knn_loss(smoothing, distance):
    """In training with the KNN loss on the smoothed vectors the quantizer takes the
    one-node path; outputs and parameter gradients equal smooth() + knn_vertex_loss()."""
    from fairseq_knnvq.quantization import SmoothedVectorQuantizer, smooth

    torch.manual_seed(18)
    quantizer = SmoothedVectorQuantizer(
        16,
        12,
        (2.0, 0.5, 0.999995),
        2,
        False,
        8,
        True,
        smoothing=smoothing,
        regularizer="knn",
        knn_k=3,
        knn_distance=distance,
    )
    x = torch.randn(3, 20, 16)
    mask = torch.rand(3, 20) > 0.2
    upstream = torch.randn(3, 20, 8)

    torch.manual_seed(19)
    out = quantizer(x, mask=mask)
    ((out["x"] * upstream).sum() + 0.5 * out["knn_loss"]).backward()
    got = [p.grad.clone() for p in quantizer.parameters()]
    quantizer.zero_grad()

    torch.manual_seed(19)
    logits = quantizer.weight_proj(x.reshape(-1, 16)).view(60, 2, 12)
    selection, smoothed_logits = smooth(logits, smoothing, quantizer.curr_temp, True)
    knn = knn_vertex_loss(smoothed_logits, k=3, distance=distance, mask=mask.reshape(-1))
    quantized = torch.bmm(selection.transpose(0, 1), quantizer.vars.view(2, 12, 4)).transpose(0, 1).reshape(3, 20, 8)
    torch.testing.assert_close(out["x"], quantized, atol=1e-6, rtol=1e-6)
    assert out["knn_loss"].item() == pytest.approx(knn.item(), rel=1e-6)
    ((quantized * upstream).sum() + 0.5 * knn).backward()
    for g, p in zip(got, quantizer.parameters()):
        torch.testing.assert_close(g, p.grad, atol=1e-5, rtol=1e-4)
