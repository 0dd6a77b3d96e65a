"""Global KNN across workers: two real gloo processes against one process on the
concatenated batch.

The contract of ``KnnVertexLoss(global_=True)`` (see ``fairseq_knnvq/quantization/distributed.py``):
on worker r, with N_r valid rows of N in all,

- the value is the single-process loss of the concatenated batch;
- ``(N_r / N) * grad_r`` is the single-process gradient on worker r's rows, so that
  fairseq's averaging (all-reduce SUM of grad / world, then times world / sum of sample
  sizes, with sample_size_r = N_r as in wav2vec 2.0) applies exactly the
  single-process gradient to shared parameters.

The workers are started with ``torch.multiprocessing`` and talk through a gloo process
group on CPU; each saves its results, and the parent compares them with its own
single-process computation.
"""

import pytest
import torch
import torch.distributed as dist

from fairseq_knnvq.quantization import KnnVertexLoss, SmoothedVectorQuantizer, knn_vertex_loss
from fairseq_knnvq.quantization.rows import as_rows
from gloo_workers import run_gloo_workers

WORLD = 2
ENTRIES, GROUPS = 7, 2

# name -> (per-rank leading shapes, k, distance, masked, chunk_size)
SCENARIOS = {
    "ce_uneven": ([(37,), (20,)], 4, "ce", False, None),
    "l2_uneven": ([(37,), (20,)], 4, "l2", False, None),
    "ce_masked_chunked": ([(3, 10), (2, 10)], 5, "ce", True, 3),
    "l2_masked_chunked": ([(3, 10), (2, 10)], 5, "l2", True, 2),
    "fewer_rows_than_k": ([(3,), (2,)], 8, "ce", False, None),
    "one_rank_below_k": ([(30,), (2,)], 6, "l2", False, None),
    "one_rank_all_padding": ([(2, 6), (2, 6)], 3, "ce", "rank1_empty", None),
}


def scenario_inputs(name):
    """Per-rank float64 logits (and masks), the same in the parent and the workers."""
    shapes, _, _, masked, _ = SCENARIOS[name]
    gen = torch.Generator().manual_seed(sum(map(ord, name)))
    logits, masks = [], []
    for rank, lead in enumerate(shapes):
        logits.append(3.0 * torch.randn(*lead, GROUPS, ENTRIES, generator=gen, dtype=torch.float64))
        if masked == "rank1_empty":
            masks.append(torch.full(lead, rank == 0))
        elif masked:
            masks.append(torch.rand(*lead, generator=gen) > 0.3)
        else:
            masks.append(None)
    return logits, masks


def quantizer_inputs():
    gen = torch.Generator().manual_seed(5)
    xs = [torch.randn(b, 12, 16, generator=gen) for b in (3, 2)]
    masks = [torch.rand(b, 12, generator=gen) > 0.25 for b in (3, 2)]
    return xs, masks


def make_quantizer():
    torch.manual_seed(0)
    return SmoothedVectorQuantizer(
        16,
        ENTRIES,
        (2.0, 0.5, 0.999995),
        GROUPS,
        False,
        8,
        True,
        smoothing="softmax",
        regularizer="knn",
        knn_k=4,
        knn_global=True,
    ).double()


def fairseq_average(params, sample_size):
    """What fairseq does after backward: legacy_ddp all-reduces grad / world with a SUM,
    then Trainer.train_step multiplies by world / (sample sizes summed over workers)."""
    total = torch.tensor([float(sample_size)], dtype=torch.float64)
    dist.all_reduce(total)
    for p in params:
        if p.grad is None:  # legacy_ddp all-reduces zeros for unused parameters
            p.grad = torch.zeros_like(p)
        p.grad.div_(WORLD)
        dist.all_reduce(p.grad)
        p.grad.mul_(WORLD / total.item())


def worker_results(rank):
    out = {}
    for name, (_, k, distance, _, chunk) in SCENARIOS.items():
        logits, masks = scenario_inputs(name)
        mine = logits[rank].clone().requires_grad_()
        loss = KnnVertexLoss(k, distance, chunk, global_=True)(mine, mask=masks[rank])
        (grad,) = torch.autograd.grad(loss, mine)
        out[name] = {"loss": loss.item(), "grad": grad}
        # the same through the one-node softmax + KNN, under a gradient on the softmax
        upstream = torch.randn(mine.shape, generator=torch.Generator().manual_seed(rank), dtype=mine.dtype)
        probs, loss = KnnVertexLoss(k, distance, chunk, global_=True).with_softmax(mine, mask=masks[rank])
        (both,) = torch.autograd.grad((probs * upstream).sum() + loss, mine)
        (softmax_only,) = torch.autograd.grad((torch.softmax(mine, -1) * upstream).sum(), mine)
        out[name + "/fused"] = {"loss": loss.item(), "grad": both - softmax_only}

    # ties across workers: both workers hold the same rows
    logits, _ = scenario_inputs("ce_uneven")
    rows, _ = as_rows(logits[0])
    for k in (1, 4):
        sel = KnnVertexLoss(k, "ce", global_=True).select(rows)
        out[f"ties_k{k}"] = {"kept": sel.weight.sum(0)}
    same = logits[0].clone().requires_grad_()
    loss = KnnVertexLoss(4, "ce", global_=True)(same)
    out["ties_loss"] = {"loss": loss.item(), "grad": torch.autograd.grad(loss, same)[0]}

    # shared parameters through fairseq's gradient averaging, sample_size = N_r
    for distance in ("ce", "l2"):
        torch.manual_seed(1)
        proj = torch.nn.Linear(5, GROUPS * ENTRIES).double()
        gen = torch.Generator().manual_seed(2)
        features = [torch.randn(n, 5, generator=gen, dtype=torch.float64) for n in (23, 9)]
        loss = KnnVertexLoss(3, distance, global_=True)(proj(features[rank]).view(-1, GROUPS, ENTRIES))
        sample_size = features[rank].shape[0]
        (loss * sample_size).backward()
        fairseq_average(list(proj.parameters()), sample_size)
        out[f"fairseq_{distance}"] = {"loss": loss.item(), "grads": [p.grad.clone() for p in proj.parameters()]}

    # the quantizer with knn_global=True, and pooled usage metrics
    quantizer = make_quantizer()
    xs, masks = quantizer_inputs()
    result = quantizer(xs[rank].double(), mask=masks[rank])
    sample_size = int(masks[rank].sum())
    (result["knn_loss"] * sample_size).backward()
    fairseq_average(list(quantizer.parameters()), sample_size)
    out["quantizer"] = {
        "loss": result["knn_loss"].item(),
        "grads": [p.grad.clone() for p in quantizer.parameters()],
        "usage": result["usage_sums"].all_reduce().stats(),
    }
    return out


@pytest.fixture(scope="module")
def workers(tmp_path_factory):
    return run_gloo_workers(worker_results, WORLD, tmp_path_factory.mktemp("gloo"))


def single_process(logits, masks, k, distance, chunk):
    cat = torch.cat(logits).requires_grad_()
    mask = None if masks[0] is None else torch.cat(masks)
    loss = knn_vertex_loss(cat, k=k, distance=distance, mask=mask, chunk_size=chunk)
    (grad,) = torch.autograd.grad(loss, cat)
    counts = [as_rows(x)[0].shape[0] if m is None else int(m.sum()) for x, m in zip(logits, masks)]
    return loss.item(), grad.split([x.shape[0] for x in logits]), counts


def grad_or_zeros(p):
    return torch.zeros_like(p) if p.grad is None else p.grad


slow = pytest.mark.slow  # the fixture starts two worker processes (a few seconds)


@slow
@pytest.mark.parametrize("name", list(SCENARIOS))
@pytest.mark.parametrize("variant", ["", "/fused"])
def test_loss_and_gradients_equal_single_process_on_concatenated_batch(workers, name, variant):
    """``variant`` "/fused": ``KnnVertexLoss(global_=True).with_softmax``, the KNN part of its gradient."""
    _, k, distance, _, chunk = SCENARIOS[name]
    logits, masks = scenario_inputs(name)
    ref_loss, ref_grads, counts = single_process(logits, masks, k, distance, chunk)
    total = sum(counts)
    for rank in range(WORLD):
        got = workers[rank][name + variant]
        assert got["loss"] == pytest.approx(ref_loss, abs=1e-10), f"rank {rank}"
        if counts[rank] == 0:
            assert float(got["grad"].abs().max()) < 1e-15
        else:
            torch.testing.assert_close(got["grad"] * counts[rank] / total, ref_grads[rank], atol=1e-12, rtol=1e-9)
    if name == "one_rank_all_padding":
        assert ref_loss == pytest.approx(knn_vertex_loss(logits[0], k=k, mask=masks[0]).item(), abs=1e-12)


@slow
def test_ties_across_workers_keep_exactly_k_per_vertex_lower_rank_first(workers):
    for k in (1, 4):
        kept = [workers[r][f"ties_k{k}"]["kept"] for r in range(WORLD)]
        assert torch.equal(kept[0] + kept[1], torch.full((GROUPS, ENTRIES), float(k), dtype=torch.float64))
        # every candidate ties with its copy on the other worker; rank 0 wins the ties
        assert torch.equal(kept[0], torch.full((GROUPS, ENTRIES), float((k + 1) // 2), dtype=torch.float64))
    logits, _ = scenario_inputs("ce_uneven")
    ref = knn_vertex_loss(torch.cat([logits[0], logits[0]]), k=4).item()
    for r in range(WORLD):
        assert workers[r]["ties_loss"]["loss"] == pytest.approx(ref, abs=1e-10)
    # the two copies of a row together get the single-process gradient of both copies
    cat = torch.cat([logits[0], logits[0]]).requires_grad_()
    (g,) = torch.autograd.grad(knn_vertex_loss(cat, k=4), cat)
    n = logits[0].shape[0]
    summed = (workers[0]["ties_loss"]["grad"] + workers[1]["ties_loss"]["grad"]) / 2
    torch.testing.assert_close(summed, g[:n] + g[n:], atol=1e-12, rtol=1e-9)


@slow
@pytest.mark.parametrize("distance", ["ce", "l2"])
def test_fairseq_gradient_averaging_gives_single_process_gradient(workers, distance):
    torch.manual_seed(1)
    proj = torch.nn.Linear(5, GROUPS * ENTRIES).double()
    gen = torch.Generator().manual_seed(2)
    features = torch.cat([torch.randn(n, 5, generator=gen, dtype=torch.float64) for n in (23, 9)])
    loss = knn_vertex_loss(proj(features).view(-1, GROUPS, ENTRIES), k=3, distance=distance)
    loss.backward()
    for rank in range(WORLD):
        got = workers[rank][f"fairseq_{distance}"]
        assert got["loss"] == pytest.approx(loss.item(), abs=1e-10)
        for g, p in zip(got["grads"], proj.parameters()):
            torch.testing.assert_close(g, p.grad, atol=1e-12, rtol=1e-9)


@slow
def test_quantizer_with_knn_global_and_pooled_usage(workers):
    quantizer = make_quantizer()  # same seed, same weights as the workers'
    xs, masks = quantizer_inputs()
    result = quantizer(torch.cat(xs).double(), mask=torch.cat(masks))
    result["knn_loss"].backward()
    expected_usage = result["usage_sums"].stats()
    for rank in range(WORLD):
        got = workers[rank]["quantizer"]
        assert got["loss"] == pytest.approx(result["knn_loss"].item(), rel=1e-6)
        for g, p in zip(got["grads"], quantizer.parameters()):
            # the quantizer computes its logits in float32
            torch.testing.assert_close(g, grad_or_zeros(p), atol=1e-8, rtol=1e-4)
        assert got["usage"].keys() == expected_usage.keys()
        for key, value in expected_usage.items():
            if key in ("code_usage", "used_codes", "num_codes", "code_perplexity"):  # from integer counts
                assert got["usage"][key] == pytest.approx(value, rel=1e-12), key
            else:  # sums of float32 probabilities
                assert got["usage"][key] == pytest.approx(value, rel=1e-6), key


def test_without_a_process_group_it_is_the_local_loss():
    assert not dist.is_initialized()
    torch.manual_seed(3)
    logits = torch.randn(20, 2, 6, dtype=torch.float64, requires_grad=True)
    mask = torch.rand(20) > 0.2
    ours = KnnVertexLoss(3, "l2", global_=True)(logits, mask=mask)
    ref = knn_vertex_loss(logits, k=3, distance="l2", mask=mask)
    assert ours.item() == ref.item()
    torch.testing.assert_close(torch.autograd.grad(ours, logits)[0], torch.autograd.grad(ref, logits)[0])
