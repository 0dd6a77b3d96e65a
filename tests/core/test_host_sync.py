"""A training step of the quantizers and of the KNN losses reads nothing back to the host.

On a GPU every ``.item()`` / ``int()`` / ``bool()`` of a tensor, ``nonzero()``, boolean
indexing or ``masked_select`` (their output size depends on the data), ``bincount`` and
``unique`` wait for the device and stall the pipeline once per step. fairseq's own
``GumbelVectorQuantizer`` makes none of them. The CPU tests record the ATen operators of
a forward + backward pass (a ``TorchDispatchMode`` sees the backward pass too) and the
calls that copy a tensor to the host (``.cpu()``, ``.tolist()``, ``.numpy()``: no
operator on a CPU tensor, so a ``TorchFunctionMode`` records them), and fail on any of
those; the detector is first shown to catch each kind. The ``cuda`` tests run the same
steps under ``torch.cuda.set_sync_debug_mode("error")``.

Not seen by the CPU detector: ``.to("cuda")`` / ``.to("cpu")`` (on a CPU-only machine the
direction of a copy is unknown), and a host copy inside a backward pass.
``tests/fairseq/test_host_sync_wav2vec2.py`` counts the same way for wav2vec 2.0's
training step, stock against the plugin.
"""

from __future__ import annotations

import contextlib
from typing import List

import pytest
import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

from fairseq.modules import GumbelVectorQuantizer

from fairseq_knnvq.quantization import KnnVertexLoss, SmoothedVectorQuantizer, VQVAEQuantizer, knn_vertex_loss
from fairseq_knnvq.quantization import distributed

# operators whose result (or output size) the host has to wait for
SYNCING = {
    "aten._local_scalar_dense",  # .item(), int(), float(), bool() of a tensor
    "aten.nonzero",
    "aten.masked_select",
    "aten.masked_scatter",
    "aten.bincount",  # reads max() back on CUDA to size its output
    "aten.unique_dim",
    "aten._unique",
    "aten._unique2",
    "aten.unique_consecutive",
    "aten.repeat_interleave",  # with tensor repeats, sized from their sum
    "aten.is_nonzero",
    "aten.equal",
    "aten.allclose",
}


def _has_bool_index(args) -> bool:
    indices = args[1] if len(args) > 1 else ()
    return any(torch.is_tensor(i) and i.dtype in (torch.bool, torch.uint8) for i in (indices or ()) if i is not None)


class SyncRecorder(TorchDispatchMode):
    """Records every operator of :data:`SYNCING` and boolean-mask indexing."""

    def __init__(self):
        super().__init__()
        self.found: List[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket._qualified_op_name.replace("::", ".")
        if name in SYNCING:
            self.found.append(str(func))
        elif name in ("aten.index", "aten.index_put", "aten.index_put_", "aten._index_put_impl_") and _has_bool_index(
            args
        ):
            self.found.append(f"{func} with a boolean mask")
        return func(*args, **(kwargs or {}))


# Tensor methods that copy a tensor's values to the host (a sync on a GPU)
HOST_COPIES = {"cpu", "tolist", "numpy"}


class HostCopyRecorder(TorchFunctionMode):
    """Records every call of :data:`HOST_COPIES` (the forward pass only)."""

    def __init__(self):
        super().__init__()
        self.found: List[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if getattr(func, "__name__", None) in HOST_COPIES:
            self.found.append(f"Tensor.{func.__name__}")
        return func(*args, **(kwargs or {}))


def record_syncs(step) -> List[str]:
    """The syncing operators (:class:`SyncRecorder`) and host copies
    (:class:`HostCopyRecorder`) of ``step()``, in that order."""
    with HostCopyRecorder() as copies, SyncRecorder() as recorder:
        step()
    return recorder.found + copies.found


# ---------------------------------------------------------------- the detector works


class SyncInBackward(torch.autograd.Function):
    """The pattern this file guards against: a ``nonzero()`` in a backward pass."""

    @staticmethod
    def forward(ctx, x):
        return x * 2

    @staticmethod
    def backward(ctx, grad):
        touched = (grad != 0).nonzero()
        return grad * 2 + touched.numel() * 0


@pytest.mark.parametrize(
    "step, expected",
    [
        (lambda x, m: int(x.sum()), "_local_scalar_dense"),
        (lambda x, m: x.sum().item(), "_local_scalar_dense"),
        (lambda x, m: bool((x > 0).any()), "_local_scalar_dense"),
        (lambda x, m: x[m], "boolean mask"),
        (lambda x, m: x.masked_fill(m, 0).nonzero(), "nonzero"),
        (lambda x, m: torch.masked_select(x, m), "masked_select"),
        (lambda x, m: torch.bincount(m.long()), "bincount"),
        (lambda x, m: torch.unique(m.long()), "unique"),
        (lambda x, m: SyncInBackward.apply(x).sum().backward(), "nonzero"),
        (lambda x, m: x.detach().tolist(), "Tensor.tolist"),
        (lambda x, m: x.detach().cpu(), "Tensor.cpu"),
        (lambda x, m: m.numpy(), "Tensor.numpy"),
    ],
)
def test_the_detector_catches_each_kind_of_sync(step, expected):
    x = torch.randn(6, requires_grad=True)
    m = torch.tensor([True, False, True, True, False, False])
    found = record_syncs(lambda: step(x, m))
    assert found and any(expected in f for f in found), found


def test_the_detector_ignores_sync_free_operators():
    x = torch.randn(6, 4, requires_grad=True)
    m = torch.tensor([True, False, True, True, False, False])
    index = torch.tensor([0, 2, 2])

    def step():
        y = torch.where(m.unsqueeze(1), x, 0.0).softmax(-1)[index]  # integer indexing
        (y.topk(2, dim=0).values.sum() + x.masked_fill(~m.unsqueeze(1), 0).sum()).backward()

    assert record_syncs(step) == []


# ----------------------------------------------------------------- the training steps


def quantizer_step(quantizer, x, mask):
    def step():
        out = quantizer(x, produce_targets=True, mask=mask)
        loss = (out["x"] * 1.5).sum()
        for key in ("knn_loss", "diversity_loss"):
            if key in out and out[key].requires_grad:
                loss = loss + out[key]
        loss.backward()

    return step


CASES = [
    # (smoothing, regularizer, knn_input, distance, knn_chunk_size, frames)
    ("gumbel_hard", "diversity", "smoothed", "ce", None, 40),  # stock wav2vec 2.0
    ("gumbel_hard", "knn", "smoothed", "ce", None, 40),  # fused softmax + KNN, dense backward
    ("gumbel_hard", "knn", "smoothed", "l2", 3, 300),  # chunked search, sparse backward
    ("softmax", "knn", "smoothed", "ce", 5, 300),
    ("ste", "knn", "probs", "ce", None, 40),  # a second autograd node for the KNN loss
    ("gumbel", "knn", "probs", "l2", 4, 300),  # ... with its sparse backward
    ("softmax", "none", "smoothed", "ce", None, 40),
]


def make_inputs(frames, dim=16, device="cpu"):
    gen = torch.Generator().manual_seed(frames)
    x = torch.randn(2, frames // 2, dim, generator=gen).to(device)
    mask = (torch.rand(2, frames // 2, generator=gen) > 0.3).to(device)
    return x, mask


def make_quantizer(smoothing, regularizer, knn_input, distance, chunk, device="cpu", **extra):
    torch.manual_seed(0)
    return (
        SmoothedVectorQuantizer(
            16,
            8,
            (2.0, 0.5, 0.999995),
            2,
            False,
            8,
            True,
            smoothing=smoothing,
            regularizer=regularizer,
            knn_input=knn_input,
            knn_k=4,
            knn_distance=distance,
            knn_chunk_size=chunk,
            **extra,
        )
        .to(device)
        .train()
    )


def test_stock_fairseq_quantizer_makes_no_sync():
    """The reference: fairseq's GumbelVectorQuantizer training step."""
    torch.manual_seed(0)
    stock = GumbelVectorQuantizer(16, 8, (2.0, 0.5, 0.999995), 2, False, 8, True).train()
    x, _ = make_inputs(40)

    def step():
        out = stock(x, produce_targets=True)
        (out["x"].sum() + out["prob_perplexity"]).backward()

    assert record_syncs(step) == []


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(map(str, c)))
@pytest.mark.parametrize("masked", [True, False])
def test_quantizer_training_step_makes_no_sync(case, masked):
    smoothing, regularizer, knn_input, distance, chunk, frames = case
    quantizer = make_quantizer(smoothing, regularizer, knn_input, distance, chunk)
    x, mask = make_inputs(frames)
    assert record_syncs(quantizer_step(quantizer, x, mask if masked else None)) == []
    # the evaluation forward (fairseq's validation) as well
    quantizer.eval()
    with torch.no_grad():
        assert record_syncs(lambda: quantizer(x, produce_targets=True, mask=mask if masked else None)) == []


@pytest.mark.parametrize("distance", ["ce", "l2"])
@pytest.mark.parametrize("rows", [12, 300])  # dense and sparse backward passes
@pytest.mark.parametrize("chunk", [None, 3])
def test_knn_losses_make_no_sync_with_check_inputs_off(distance, rows, chunk):
    gen = torch.Generator().manual_seed(rows)
    logits = torch.randn(rows, 2, 8, generator=gen).requires_grad_()
    mask = torch.rand(rows, generator=gen) > 0.5
    mask[:2] = False

    def step():
        loss = knn_vertex_loss(logits, k=4, distance=distance, mask=mask, chunk_size=chunk, check_inputs=False)
        probs, fused = KnnVertexLoss(4, distance, chunk, check_inputs=False).with_softmax(logits, mask)
        (loss + fused + probs[:, :, 0].sum()).backward()

    assert record_syncs(step) == []
    # with the check (the default for direct calls) the finiteness test reads back
    assert record_syncs(lambda: knn_vertex_loss(logits, k=4, distance=distance, mask=mask)) != []


@pytest.fixture
def two_fake_workers(monkeypatch):
    """The global KNN code path in one process: a second worker holding a copy of the
    batch (the all-gather duplicates this worker's tensors)."""
    monkeypatch.setattr(distributed, "world_size", lambda group=None: 2)
    monkeypatch.setattr(distributed, "_all_gather", lambda tensor, group: torch.stack([tensor, tensor]))
    monkeypatch.setattr(distributed.dist, "get_rank", lambda group=None: 0)


@pytest.mark.parametrize("distance", ["ce", "l2"])
def test_global_knn_training_step_makes_no_sync(two_fake_workers, distance):
    quantizer = make_quantizer("gumbel_hard", "knn", "smoothed", distance, None, knn_global=True)
    x, mask = make_inputs(40)
    assert record_syncs(quantizer_step(quantizer, x, mask)) == []
    separate = make_quantizer("gumbel_hard", "knn", "probs", distance, 3, knn_global=True)
    assert record_syncs(quantizer_step(separate, x, mask)) == []


def test_global_knn_fake_workers_equal_a_doubled_batch(two_fake_workers):
    """The fixture is a faithful second worker: the global loss over two copies equals
    the single-process loss of the batch concatenated with itself."""
    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(10, 2, 8, generator=gen, dtype=torch.float64)
    mask = torch.rand(10, generator=gen) > 0.3
    ours = KnnVertexLoss(4, "l2", global_=True)(logits, mask=mask)
    ref = knn_vertex_loss(torch.cat([logits, logits]), k=4, distance="l2", mask=torch.cat([mask, mask]))
    assert ours.item() == pytest.approx(ref.item(), abs=1e-12)


def test_vqvae_training_step_makes_no_sync():
    torch.manual_seed(0)
    vq = VQVAEQuantizer(dim=8, num_vars=16, groups=2, rotation_trick=True).train()
    z = torch.randn(5, 7, 8, requires_grad=True)

    def step():
        out = vq(z)
        (out["x"].sum() + out["vq_loss"]).backward()

    assert record_syncs(step) == []


# ----------------------------------------------------------------- on a GPU


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@contextlib.contextmanager
def sync_debug_error():
    torch.cuda.synchronize()
    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode(previous)


@pytest.mark.cuda
@cuda
def test_cuda_sync_debug_mode_catches_a_sync():
    x = torch.randn(8, device="cuda")
    with pytest.raises(RuntimeError):
        with sync_debug_error():
            int(x.sum())


@pytest.mark.cuda
@cuda
@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(map(str, c)))
def test_cuda_quantizer_training_step_makes_no_sync(case):
    smoothing, regularizer, knn_input, distance, chunk, frames = case
    quantizer = make_quantizer(smoothing, regularizer, knn_input, distance, chunk, device="cuda")
    x, mask = make_inputs(frames, device="cuda")
    step = quantizer_step(quantizer, x, mask)
    step()  # first call: lazy initialisation of kernels and workspaces
    with sync_debug_error():
        step()


@pytest.mark.cuda
@cuda
def test_cuda_vqvae_training_step_makes_no_sync():
    vq = VQVAEQuantizer(dim=8, num_vars=16, groups=2).cuda().train()
    z = torch.randn(5, 7, 8, device="cuda", requires_grad=True)
    for _ in range(2):
        with sync_debug_error() if _ else contextlib.nullcontext():
            out = vq(z)
            (out["x"].sum() + out["vq_loss"]).backward()
