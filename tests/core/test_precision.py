"""Half precision and autocast in the core, on the CPU (what a GPU run in fp16 / bf16 or
under ``common.amp`` would get wrong without them):

- the VQ-VAE's code search in fp16 and bf16 against the float64 argmin (with the
  ``||z||^2`` term in the input's dtype every distance rounded to the same value and
  every position picked code 0 at M = 16384);
- half-precision codebook gradients: the float32 sum rounded once, against the float64
  sum of the same half-precision values (a sum in fp16 rounds at every addition);
- the losses, tightness and usage sums, the quantizers' outputs and gradients under
  ``torch.autocast`` (CPU, bf16 and fp16) equal the values without autocast.

Every test also runs on a GPU (its ``cuda`` parameter, marked ``cuda``: skipped without
one, run by ``scripts/gpu_check.sh``), where fp16 sums and atomics make the difference.
"""

import pytest
import torch
import torch.nn as nn

from fairseq_knnvq.quantization import (
    CodeUsage,
    KnnVertexLoss,
    SmoothedVectorQuantizer,
    VQVAEQuantizer,
    diversity_loss,
)
from fairseq_knnvq.quantization.diversity import masked_prob_sums
from fairseq_knnvq.quantization.metrics import tightness_sums, tightness_sums_of_logits
from fairseq_knnvq.quantization.quantizer import StraightThroughCodewords, nearest_codes
from references import float64_argmin

HALF = [torch.float16, torch.bfloat16]
TEMP = (2.0, 0.5, 0.999995)
CUDA = pytest.param(
    "cuda", marks=[pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]
)
DEVICES = ["cpu", CUDA]


# --- the VQ-VAE code search ------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("entries", [1024, 16384])
@pytest.mark.parametrize("dtype", HALF + [torch.float32], ids=str)
def test_vqvae_code_search_in_every_dtype_is_the_float64_argmin(dtype, entries, device):
    """The issue's case: z ~ 0.35 N(0, 1) in 256 dimensions (||z||^2 ~ 31) against the
    initial codebook (entries ~ 1/M): 2 z.e ~ 1e-4 separates the codes. Before the fix,
    fp16 agreed with the float64 argmin on 10 % (M = 1024) and 0 % (M = 16384) of the
    rows, and float32 on 99.9 % and 99.4 %."""
    torch.manual_seed(0)
    vq = VQVAEQuantizer(256, entries).to(device, dtype)
    z = (0.35 * torch.randn(2048, 256, generator=torch.Generator().manual_seed(1))).to(device, dtype)
    with torch.no_grad():
        codes = vq(z)["targets"][:, 0].cpu()
    expected = float64_argmin(z, vq.codebooks[0].detach())
    agreement = float((codes == expected).double().mean())
    assert agreement >= 0.99, agreement
    assert codes.unique().numel() >= 0.99 * expected.unique().numel()


def test_nearest_codes_over_blocks_of_rows_equal_one_block():
    gen = torch.Generator().manual_seed(2)
    z, codebooks = torch.randn(3, 301, 5, generator=gen), torch.randn(3, 40, 5, generator=gen)
    whole = nearest_codes(z, codebooks, block_elements=10**9)
    assert torch.equal(nearest_codes(z, codebooks, block_elements=3 * 40 * 7), whole)  # 7 rows a block
    for g in range(3):
        assert torch.equal(whole[g], float64_argmin(z[g], codebooks[g]))


# --- codebook gradients in half precision ------------------------------------------------


def assert_correctly_rounded(got, exact):
    """``got`` (half precision) is ``exact`` (float64) rounded once to its dtype: equal
    but for values within float32 rounding of a half-way point (a handful), which
    differ by one unit in the last place; relative L2 error below 1e-5 once the final
    rounding is taken out. A sum in fp16 misses it by 1e-4 to 1e-3."""
    got, rounded = got.cpu(), exact.cpu().to(got.dtype)
    differ = got != rounded
    assert float(differ.double().mean()) <= 2e-3
    ulp = (rounded.double().abs() * torch.finfo(got.dtype).eps).clamp_min(torch.finfo(got.dtype).tiny)
    assert bool(((got.double() - rounded.double()).abs() <= ulp)[differ].all())
    rel = float((got.double() - rounded.double()).norm() / rounded.double().norm())
    assert rel < 1e-5, rel


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", HALF, ids=str)
def test_straight_through_codebook_gradient_sums_in_float32(dtype, device):
    """4096 rows into 32 entries (about 128 additions per value). (On the CPU,
    ``scatter_add_`` into fp16 gave the correctly rounded sum here already; on a GPU
    its atomics round at every addition.)"""
    gen = torch.Generator().manual_seed(3)
    n, groups, entries, dim = 4096, 2, 32, 16
    soft = torch.softmax(torch.randn(n, groups, entries, generator=gen), -1)
    index = torch.randint(0, entries, (n, groups), generator=gen)
    codebooks = torch.randn(groups, entries, dim, generator=gen).to(dtype).requires_grad_()
    grad_q = torch.randn(groups, n, dim, generator=gen).to(dtype)
    leaf = codebooks.detach().to(device).requires_grad_()
    out = StraightThroughCodewords.apply(soft.to(device), index.to(device), leaf)
    (grad,) = torch.autograd.grad(out, leaf, grad_q.to(device))
    assert grad.dtype == dtype
    exact = torch.zeros(groups, entries, dim, dtype=torch.float64)
    for g in range(groups):
        exact[g].index_add_(0, index[:, g], grad_q[g].double())
    assert_correctly_rounded(grad, exact)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", HALF, ids=str)
@pytest.mark.parametrize("smoothing", ["ste", "softmax"])
def test_half_quantizer_codebook_gradient_is_the_float32_one_rounded(dtype, smoothing, device):
    """The quantizer as a half-precision module (fairseq's ``common.fp16`` /
    ``common.bf16``), its projection the identity so that the logits are the same
    numbers in both precisions: the codebook gradient is the float32 module's, rounded
    once; the quantized vectors are the float32 module's, rounded once."""
    groups, entries = 2, 32
    gen = torch.Generator().manual_seed(4)
    x = (2.0 * torch.randn(8, 512, groups * entries, generator=gen)).to(dtype)
    upstream = torch.randn(8, 512, 32, generator=gen).to(dtype)
    results = {}
    for precision in (dtype, torch.float64):
        torch.manual_seed(0)
        q = SmoothedVectorQuantizer(
            groups * entries, entries, TEMP, groups, False, 32, True, smoothing=smoothing, regularizer="none"
        )
        q.weight_proj = nn.Identity()
        with torch.no_grad():
            q.vars.copy_(q.vars.to(dtype))  # the same values in both precisions
        q.to(device, precision).train()
        out = q(x.to(device, precision))
        (grad,) = torch.autograd.grad(out["x"], q.vars, upstream.to(device, precision))
        results[precision] = out["x"].detach(), grad
    (x_half, grad_half), (x_ref, grad_ref) = results[dtype], results[torch.float64]
    assert grad_half.dtype == dtype and x_half.dtype == dtype
    assert_correctly_rounded(grad_half, grad_ref)
    assert_correctly_rounded(x_half, x_ref)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", HALF, ids=str)
def test_half_vqvae_codebook_gradient_is_the_float32_one_rounded(dtype, device):
    gen = torch.Generator().manual_seed(5)
    z = torch.randn(4096, 16, generator=gen).to(dtype)
    codebooks = torch.randn(2, 32, 8, generator=gen).to(dtype)  # the same values in both precisions
    grads = {}
    for precision in (dtype, torch.float64):
        vq = VQVAEQuantizer(16, 32, groups=2).to(device, precision)
        with torch.no_grad():
            vq.codebooks.copy_(codebooks)
        out = vq(z.to(device, precision))
        (grads[precision],) = torch.autograd.grad(out["codebook_loss"], vq.codebooks)
        assert out["x"].dtype == precision
    assert grads[dtype].dtype == dtype
    assert_correctly_rounded(grads[dtype], grads[torch.float64])


# --- autocast ------------------------------------------------------------------------------

AUTOCAST = [torch.bfloat16, torch.float16]


def under_autocast(fn, dtype, device="cpu"):
    """``fn()`` under autocast on ``device``. The tests run their forward pass in ``fn`` and the
    backward pass outside it, as PyTorch's autocast guide asks (on the CPU a backward
    pass inside the region would run autograd's own matrix products in ``dtype``)."""
    with torch.autocast(torch.device(device).type, dtype=dtype):
        return fn()


def assert_same(got, expected, rel=1e-6):
    """Equal within ``rel`` of each value (exact for integers); entries much smaller
    than the tensor's largest within ``rel`` of that (a GPU's float atomics add in
    another order from run to run)."""
    if isinstance(expected, (tuple, list)):
        assert len(got) == len(expected)
        for a, b in zip(got, expected):
            assert_same(a, b, rel)
        return
    assert got.dtype == expected.dtype and got.device == expected.device
    got, expected = got.detach().cpu(), expected.detach().cpu()
    if not expected.is_floating_point():
        assert torch.equal(got, expected)
        return
    scale = float(expected.abs().max()) if expected.numel() else 0.0
    assert scale > 0
    torch.testing.assert_close(got, expected, rtol=rel, atol=rel * scale)


def logits_and_mask(device, seed=7, n=900, groups=2, entries=48):
    gen = torch.Generator().manual_seed(seed)
    logits = 3.0 * torch.randn(n, groups, entries, generator=gen)
    return logits.to(device), (torch.rand(n, generator=gen) > 0.25).to(device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("autocast_dtype", AUTOCAST, ids=str)
@pytest.mark.parametrize("distance", ["ce", "l2"])
@pytest.mark.parametrize("chunk_size", [None, 7])
@pytest.mark.parametrize("fused", [False, True])
def test_knn_loss_and_gradient_under_autocast_equal_float32(autocast_dtype, distance, chunk_size, fused, device):
    logits, mask = logits_and_mask(device)
    upstream = torch.randn(logits.shape, generator=torch.Generator().manual_seed(8)).to(device)
    loss_fn = KnnVertexLoss(4, distance, chunk_size)

    def forward():
        x = logits.clone().requires_grad_()
        if fused:
            probs, loss = loss_fn.with_softmax(x, mask)
            return x, loss, probs, (probs * upstream).sum() + loss
        return x, loss_fn(x, mask), None, None

    def step(autocast):
        x, loss, probs, total = under_autocast(forward, autocast, device) if autocast else forward()
        (grad,) = torch.autograd.grad(loss if total is None else total, x)
        return [t for t in (loss, grad, probs) if t is not None]

    assert_same(step(autocast_dtype), step(None))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("autocast_dtype", AUTOCAST, ids=str)
def test_diversity_loss_and_statistics_under_autocast_equal_float32(autocast_dtype, device):
    logits, mask = logits_and_mask(device)

    def forward():
        x = logits.clone().requires_grad_()
        loss = diversity_loss(x, mask)
        with torch.no_grad():
            usage = CodeUsage.from_logits(logits, logits / 0.5, mask)
            stats = [
                masked_prob_sums(logits, mask),
                *tightness_sums(torch.softmax(logits, -1), mask),
                *tightness_sums_of_logits(logits, mask),
                usage.counts,
                usage.prob_sums,
                usage.max_prob_sums,
                usage.vertex_l2_sums,
            ]
        return x, loss, stats

    def step(autocast):
        x, loss, stats = under_autocast(forward, autocast, device) if autocast else forward()
        return [loss, *torch.autograd.grad(loss, x), *stats]

    assert_same(step(autocast_dtype), step(None))


@pytest.mark.parametrize("device", DEVICES)
def test_masked_tightness_sums_beyond_fp16_range_under_fp16_autocast(device):
    """70,000 valid rows: a sum in fp16 stalls at 2**15 and overflows at 65,504."""
    gen = torch.Generator().manual_seed(9)
    probs = torch.softmax(torch.randn(80000, 1, 2, generator=gen), -1)
    valid = torch.arange(80000) < 70000
    got = under_autocast(lambda: tightness_sums(probs.to(device), valid.to(device)), torch.float16, device)
    got = [t.cpu() for t in got]
    max_p = probs.double().amax(-1)[valid]
    sq = probs.double().pow(2).sum(-1)[valid]
    torch.testing.assert_close(got[0], max_p.sum(0), rtol=1e-6, atol=0)
    torch.testing.assert_close(got[1], (1 - 2 * max_p + sq).sum(0), rtol=1e-6, atol=0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("autocast_dtype", AUTOCAST, ids=str)
@pytest.mark.parametrize(
    "case",
    [
        dict(smoothing="softmax", regularizer="knn", knn_distance="ce"),
        dict(smoothing="gumbel_hard", regularizer="knn", knn_distance="l2"),
        dict(smoothing="ste", regularizer="diversity"),
        dict(smoothing="gumbel", regularizer="knn", knn_distance="ce", knn_input="probs"),
    ],
)
def test_quantizer_after_its_projection_ignores_autocast(autocast_dtype, case, device):
    """The quantizer with an identity projection (the logits are the input), masked:
    every output and gradient under autocast equals the float32 one."""
    groups, entries = 2, 32
    gen = torch.Generator().manual_seed(10)
    x = (2.0 * torch.randn(4, 120, groups * entries, generator=gen)).to(device)
    mask = (torch.rand(4, 120, generator=gen) > 0.3).to(device)
    upstream = torch.randn(4, 120, 32, generator=gen).to(device)
    torch.manual_seed(0)
    q = SmoothedVectorQuantizer(groups * entries, entries, TEMP, groups, False, 32, True, knn_k=4, **case)
    q.weight_proj = nn.Identity()
    q.to(device).train()

    def forward():
        torch.manual_seed(1)  # the Gumbel noise (CPU and CUDA streams)
        inp = x.clone().requires_grad_()
        return inp, q(inp, mask=mask, produce_targets=True)

    def step(autocast):
        inp, out = under_autocast(forward, autocast, device) if autocast else forward()
        reg = out["knn_loss"] if case["regularizer"] == "knn" else out["diversity_loss"]
        grads = torch.autograd.grad((out["x"] * upstream).sum() + 10.0 * reg, [inp, q.vars])
        usage = out["usage_sums"]
        return [
            out["x"],
            reg,
            out["prob_perplexity"],
            out["code_perplexity"],
            out["targets"],
            *grads,
            usage.counts,
            usage.prob_sums,
            usage.max_prob_sums,
            usage.vertex_l2_sums,
        ]

    assert_same(step(autocast_dtype), step(None))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("autocast_dtype", AUTOCAST, ids=str)
@pytest.mark.parametrize("rotation_trick", [False, True])
def test_vqvae_under_autocast_equals_float32(autocast_dtype, rotation_trick, device):
    torch.manual_seed(0)
    vq = VQVAEQuantizer(16, 64, groups=2, rotation_trick=rotation_trick).to(device).train()
    z = (0.3 * torch.randn(6, 50, 16, generator=torch.Generator().manual_seed(11))).to(device)

    def forward():
        inp = z.clone().requires_grad_()
        return inp, vq(inp)

    def step(autocast):
        inp, out = under_autocast(forward, autocast, device) if autocast else forward()
        grads = torch.autograd.grad(out["x"].sum() + out["vq_loss"], [inp, vq.codebooks])
        return [out["x"], out["targets"], out["vq_loss"], *grads]

    assert_same(step(autocast_dtype), step(None))
