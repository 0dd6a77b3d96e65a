"""What a GPU run relies on, checked on the CPU: the top-k layouts give the values of
``torch.topk``; ``CodeUsage.all_reduce`` reduces on a device the backend takes.
(Its sums over two real gloo workers: tests/core/test_global_knn.py; under NCCL with
CPU sums: tests/e2e/test_cuda.py.)"""

import pytest
import torch

from fairseq_knnvq.quantization import knn_vertex_loss
from fairseq_knnvq.quantization import vertex_search
from fairseq_knnvq.quantization.metrics import collective_device


@pytest.mark.parametrize("shape", [(300, 2, 37), (50, 1, 9), (4000, 1, 600)])
@pytest.mark.parametrize("layout", vertex_search.TOPK_LAYOUTS)
def test_topk_layouts_give_the_values_of_torch_topk(layout, shape, monkeypatch):
    gen = torch.Generator().manual_seed(0)
    score = torch.randn(*shape, generator=gen)
    score[::7] = float("-inf")  # masked rows, as the search marks them
    # small blocks, so that the blocked layout loops over several of them
    monkeypatch.setattr(vertex_search, "TOPK_BLOCK_ELEMENTS", shape[0] * shape[1] * 5)
    values, indices = vertex_search.topk_along_rows(score, 6, layout=layout)
    expected = torch.topk(score, 6, dim=0, sorted=True)
    assert values.is_contiguous() and indices.is_contiguous()
    assert torch.equal(values, expected.values)
    assert torch.equal(indices, expected.indices)  # random scores: no ties among the kept


@pytest.mark.parametrize("distance", ["ce", "l2"])
@pytest.mark.parametrize("chunk_size", [None, 5])
def test_knn_loss_is_the_same_in_either_topk_layout(distance, chunk_size, monkeypatch):
    """The search with the GPU's layout (forced on the CPU) gives the loss and gradient of
    the CPU's, bit for bit."""
    gen = torch.Generator().manual_seed(1)
    logits = 3.0 * torch.randn(400, 2, 24, generator=gen)
    mask = torch.rand(400, generator=gen) > 0.2
    results = []
    for layout in vertex_search.TOPK_LAYOUTS:
        plain = vertex_search.topk_along_rows
        monkeypatch.setattr(vertex_search, "topk_along_rows", lambda s, k, layout=layout: plain(s, k, layout))
        x = logits.clone().requires_grad_()
        loss = knn_vertex_loss(x, k=4, distance=distance, mask=mask, chunk_size=chunk_size)
        results.append((loss, *torch.autograd.grad(loss, x)))
        monkeypatch.undo()
    assert torch.equal(results[0][0], results[1][0])
    assert torch.equal(results[0][1], results[1][1])


def test_unknown_topk_layout():
    with pytest.raises(ValueError, match="unknown top-k layout 'columns'; choose one of blocked, rows_last"):
        vertex_search.topk_along_rows(torch.zeros(3, 1, 2), 1, layout="columns")


@pytest.mark.parametrize(
    "backend, device, expected",
    [
        ("gloo", "cpu", "cpu"),
        ("gloo", "cuda:1", "cuda:1"),  # gloo reduces CUDA tensors too
        ("mpi", "cpu", "cpu"),
        ("nccl", "cuda:1", "cuda:1"),
        ("NCCL", "cuda:0", "cuda:0"),
        ("cpu:gloo,cuda:nccl", "cpu", "cpu"),
        ("cpu:gloo,cuda:nccl", "cuda:1", "cuda:1"),
        ("cuda:nccl", "cuda:0", "cuda:0"),
    ],
)
def test_collective_device_keeps_a_tensor_where_the_backend_reduces_it(backend, device, expected):
    """(Moving CPU sums to the current CUDA device under NCCL needs a GPU:
    tests/e2e/test_cuda.py runs that case.)"""
    assert collective_device(backend, torch.device(device)) == torch.device(expected)
