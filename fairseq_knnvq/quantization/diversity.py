"""The prob perplexity and wav2vec 2.0's diversity loss.

For rows ``p_n = softmax(l_n)`` with row weights ``w_n`` (1 valid, 0 not; see
:mod:`.rows`) the batch-mean probabilities of group g, their perplexity summed over the
groups, and the diversity loss are

    pbar_g      = sum_n w_n p_{n,g} / sum_n w_n
    perplexity  = sum_g exp(H(pbar_g)),      H(q) = -sum_m q_m log(q_m + 1e-7)
    L_div       = (G*M - perplexity) / (G*M)

(fairseq's ``+1e-7`` inside the log). ``L_div`` is 0 when every entry is used equally
and approaches ``(M - 1) / M`` when every row picks the same entry; it is 0 by
definition when no row is valid. :func:`perplexity_and_diversity` is the only place
the loss is computed: ``diversity_loss``, the quantizer and (through the quantizer's
output) the fairseq model and criterion read it from there.
"""

from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

from .rows import (
    STATISTICS_BLOCK_ELEMENTS,
    as_rows,
    at_least_float32,
    check_finite,
    row_blocks,
    row_weights,
    valid_count,
    without_autocast,
)
from .smoothing import default_generator, gumbel_noise_


def entropy_perplexity(mean_probs: Tensor) -> Tensor:
    """``sum_g exp(H(mean_probs_g))`` with fairseq's ``+1e-7`` inside the log."""
    return torch.exp(-torch.sum(mean_probs * torch.log(mean_probs + 1e-7), dim=-1)).sum()


def perplexity_and_diversity(mean_probs: Tensor, num_valid: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
    """``(perplexity, L_div)`` of the batch-mean probabilities ``(G, M)``, with the float
    operations of stock fairseq (``(num_vars - prob_perplexity) / num_vars``).
    ``num_valid`` (0-d tensor): the loss is 0 where it is 0, chosen on the device (no
    host sync); leave it out when the batch has valid rows by construction."""
    perplexity = entropy_perplexity(mean_probs)
    total_entries = mean_probs.shape[0] * mean_probs.shape[1]  # fairseq's num_vars, G*M
    loss = (total_entries - perplexity) / total_entries
    if num_valid is not None:
        loss = torch.where(num_valid > 0, loss, loss * 0.0)
    return perplexity, loss


@without_autocast()
def masked_prob_sums(logits: Tensor, mask: Optional[Tensor] = None) -> Tensor:
    """``sum_n w_n p_n``, ``(G, M)``, in at least float32.

    Under ``torch.no_grad()`` (statistics for logs) the softmax runs over blocks of rows,
    so no N x G x M tensor is made; with gradient it is the one tensor the softmax's
    backward pass needs.
    """
    rows, valid = as_rows(logits, mask)
    n, groups, entries = rows.shape
    weights = row_weights(rows, valid)
    if torch.is_grad_enabled() and rows.requires_grad:
        probs = F.softmax(at_least_float32(rows), dim=-1)
        if weights is None:
            return probs.sum(0)
        return (weights @ probs.view(n, groups * entries)).view(groups, entries)
    total = torch.zeros(groups * entries, dtype=at_least_float32(rows).dtype, device=rows.device)
    for start, stop in row_blocks(rows, STATISTICS_BLOCK_ELEMENTS):
        block = F.softmax(at_least_float32(rows[start:stop]), dim=-1).view(-1, groups * entries)
        if weights is None:
            total += block.sum(0)
        else:
            total.addmv_(block.t(), weights[start:stop])
    return total.view(groups, entries)


@without_autocast()
def masked_mean_probs(logits: Tensor, mask: Optional[Tensor] = None) -> Tensor:
    """``pbar``, ``(G, M)`` (zeros without a valid row).

    With gradient, the operations of fairseq's ``softmax(...).mean(0)`` (the same
    rounding as stock wav2vec 2.0); without, :func:`masked_prob_sums` over blocks."""
    rows, valid = as_rows(logits, mask)
    if not (torch.is_grad_enabled() and rows.requires_grad):
        return masked_prob_sums(rows, valid) / valid_count(rows, valid).clamp_min(1)
    return _mean_of_probs(F.softmax(at_least_float32(rows), dim=-1), row_weights(rows, valid))


def _mean_of_probs(probs: Tensor, weights: Optional[Tensor], in_place: bool = False) -> Tensor:
    """``pbar`` of the whole ``(N, G, M)`` probabilities with fairseq's operations
    (``.mean(0)``; with weights their weighted sum over their sum), so that every caller
    rounds as stock wav2vec 2.0 does. ``in_place``: the weighting overwrites ``probs``
    (the same values without a second N x G x M tensor)."""
    if weights is None:
        return probs.mean(dim=0) if probs.shape[0] else probs.sum(dim=0)
    weighted = probs.mul_(weights.view(-1, 1, 1)) if in_place else probs * weights.view(-1, 1, 1)
    return weighted.sum(0) / weights.sum().clamp_min(1.0)


@without_autocast()
def diversity_loss(logits: Tensor, mask: Optional[Tensor] = None, check_inputs: bool = True) -> Tensor:
    """``L_div`` of ``softmax(logits)`` over the valid rows (0 when there are none).

    Groups as :func:`~.rows.as_rows` reads them: ``(N, M)`` is one group, ``(..., G, M)``
    has G; an all-True mask gives the value without a mask. ``check_inputs``: raise
    ValueError on NaN / inf logits (training loops pass False; why:
    :class:`~.knn.KnnVertexLoss`).
    """
    rows, valid = as_rows(logits, mask)
    if check_inputs:
        check_finite(rows)
    num_valid = None if valid is None and rows.shape[0] else valid_count(rows, valid)
    return perplexity_and_diversity(masked_mean_probs(rows, valid), num_valid)[1]


class TemperedSoftmaxWithMeanProbs(torch.autograd.Function):
    """``p = softmax(rows / tau)`` (the smoothing) and ``pbar`` (the diversity loss's
    input) as one autograd node that saves only ``p``.

    The backward pass recomputes ``softmax(rows)`` from ``p``: both are normalised
    exponentials of the same logits, so ``softmax(l) = p**tau / sum_m p_m**tau``. The
    diversity loss then adds no N x G x M tensor to what the smoothing keeps. With
    ``c = sum_n w_n`` and ``g`` the gradient of the mean, the gradient is the
    smoothing's plus

        dL/dl_n += (w_n / c) * q_n * (g - <q_n, g>),   q_n = softmax(l_n),

    computed over blocks of rows into the same buffer. Entries where ``p`` underflows to
    0 while ``softmax(l)`` does not (``tau < 1`` and logits ~50 below the row's largest)
    get a zero diversity gradient, where autograd's would be below 1e-21.
    """

    @staticmethod
    def forward(ctx, rows: Tensor, tau: float, weights: Optional[Tensor], count: Tensor):
        rows32 = at_least_float32(rows)
        probs = F.softmax(rows32 / tau, dim=-1)
        with torch.no_grad():
            valid = None if weights is None else weights > 0
            mean = masked_prob_sums(rows32, valid) / count.clamp_min(1).to(probs.dtype)
        ctx.save_for_backward(probs, weights, count)
        ctx.tau, ctx.input_dtype = tau, rows.dtype
        return probs, mean

    @staticmethod
    @once_differentiable
    @without_autocast()
    def backward(ctx, grad_probs: Optional[Tensor], grad_mean: Optional[Tensor]):
        probs, weights, count = ctx.saved_tensors
        if grad_probs is None:
            grad = torch.zeros_like(probs)
        else:
            grad = torch._softmax_backward_data(grad_probs, probs, -1, probs.dtype).div_(ctx.tau)
        if grad_mean is not None and probs.shape[0]:
            scale = 1.0 / count.clamp_min(1).to(probs.dtype)
            for start, stop in row_blocks(probs, STATISTICS_BLOCK_ELEMENTS):
                q = probs[start:stop].pow(ctx.tau)
                q.div_(q.sum(-1, keepdim=True))
                inner = grad_mean - torch.linalg.vecdot(q, grad_mean).unsqueeze(-1)
                row_scale = scale if weights is None else (weights[start:stop] * scale).view(-1, 1, 1)
                grad[start:stop].addcmul_(q.mul_(row_scale), inner)
                del q, inner
        return grad.to(ctx.input_dtype), None, None, None


@without_autocast()
def tempered_softmax_and_mean_probs(logits: Tensor, tau: float, mask: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
    """``(softmax(logits / tau), masked_mean_probs(logits, mask))`` in one autograd node
    (:class:`TemperedSoftmaxWithMeanProbs`): the values and gradients of computing the
    two apart, keeping one N x G x M tensor instead of two. Shapes as
    :func:`~.rows.as_rows`; the probabilities have the shape of ``logits`` (at least
    float32), the mean is ``(G, M)``."""
    if tau <= 0:
        raise ValueError(f"temperature must be > 0, got {tau}")
    rows, valid = as_rows(logits, mask)
    probs, mean = TemperedSoftmaxWithMeanProbs.apply(
        rows, float(tau), row_weights(rows, valid), valid_count(rows, valid)
    )
    return probs.view(logits.shape), mean


class GumbelSoftmaxWithMeanProbs(torch.autograd.Function):
    """The Gumbel smoothing ``s = (l + g) / tau``, ``p = softmax(s)`` (``g`` Gumbel(0, 1)
    noise) and ``pbar``, the batch mean of ``q = softmax(l)``, as one autograd node that
    keeps one N x G x M tensor and the generator state ``g`` was drawn from.

    The noise is drawn from the default generator of the logits' device, as
    :func:`~.smoothing.sample_gumbel_like` draws it (so ``p``, ``s`` and the generator
    afterwards are those of the unfused computation, bit for bit), and ``pbar`` is
    computed with :func:`masked_mean_probs`'s operations. The backward pass redraws the
    same ``g`` from the saved state with a generator of its own (the caller's is not
    touched), recovers ``q`` over blocks of rows from ``l = tau * s - g`` up to a per-row
    constant,

        q = softmax(tau * log p - g)    (or softmax(tau * s - g), see below),

    and returns

        dL/dl_n = (1/tau) p_n * (G_n - <p_n, G_n>) + (w_n / c) q_n * (gbar - <q_n, gbar>)

    (``G``, ``gbar``: the gradients of ``p`` and of ``pbar``; ``w_n``, ``c``: the row
    weights and their sum) written into the redrawn noise's buffer.

    Underflow: where ``p`` underflows to 0 (or to a subnormal), ``log p`` no longer
    gives ``l`` (``log p = -inf`` gives ``q = 0`` there). Such entries have ``s_m - s_top
    < log(tiny)``, so ``q_m / q_top < exp(tau * log(tiny) + g_top - g_m)``. The node keeps
    ``p`` only while ``tau * -log(tiny) >= -log(tiny of float32)`` (:func:`keeps_probs`:
    tau >= 1 in float32), where that bound is below ``exp(-87.3 + 41) = 8e-21`` (the noise
    of a float32 draw lies within [-4, 37]): zero to any tolerance on the gradient. Below,
    it keeps ``s`` instead, from which ``p = softmax(s)`` and ``q = softmax(tau * s - g)``
    follow at any temperature. Either is one N x G x M tensor; ``p`` is the one the
    ``gumbel`` smoothing's codebook product keeps anyway.
    """

    @staticmethod
    def forward(ctx, rows: Tensor, tau: float, weights: Optional[Tensor]):
        rows32 = at_least_float32(rows)
        mean = _mean_of_probs(F.softmax(rows32, dim=-1), weights, in_place=True)  # freed before the noise
        generator = default_generator(rows32.device)
        ctx.generator_state = generator.get_state()
        noise = gumbel_noise_(torch.empty_like(rows32, memory_format=torch.legacy_contiguous_format))
        smoothed = noise.add_(rows32).div_(tau)  # (l + g) / tau, rounded as the unfused form
        probs = F.softmax(smoothed, dim=-1)
        ctx.keeps_probs = keeps_probs(tau, probs.dtype)
        ctx.save_for_backward(probs if ctx.keeps_probs else smoothed, weights)
        ctx.tau, ctx.input_dtype = tau, rows.dtype
        ctx.mark_non_differentiable(smoothed)
        ctx.set_materialize_grads(False)  # no N x G x M of zeros for s (or an unused p)
        return probs, mean, smoothed

    @staticmethod
    @once_differentiable
    @without_autocast()
    def backward(ctx, grad_probs: Optional[Tensor], grad_mean: Optional[Tensor], _grad_smoothed: Optional[Tensor]):
        kept, weights = ctx.saved_tensors
        tau = ctx.tau
        generator = torch.Generator(device=kept.device)
        generator.set_state(ctx.generator_state)
        grad = gumbel_noise_(torch.empty_like(kept, memory_format=torch.legacy_contiguous_format), generator)
        count = kept.shape[0] if weights is None else weights.sum().clamp_min(1.0)
        for start, stop in row_blocks(kept, STATISTICS_BLOCK_ELEMENTS):
            out = grad[start:stop]  # these rows' g, then their gradient
            if ctx.keeps_probs:
                probs = kept[start:stop]
                r = probs.log().mul_(tau)  # -inf where p is 0: q = 0 there
            else:
                probs = F.softmax(kept[start:stop], dim=-1)
                r = kept[start:stop].mul(tau)
            q = F.softmax(r.sub_(out), dim=-1)  # softmax(l) of these rows
            del r
            if grad_probs is None:
                out.zero_()
            else:
                out.copy_(torch._softmax_backward_data(grad_probs[start:stop], probs, -1, probs.dtype)).div_(tau)
            if grad_mean is not None:
                inner = grad_mean - torch.linalg.vecdot(q, grad_mean).unsqueeze(-1)
                row_scale = 1.0 / count if weights is None else (weights[start:stop] / count).view(-1, 1, 1)
                out.addcmul_(q.mul_(row_scale), inner)
            del probs, q
        return grad.to(ctx.input_dtype), None, None


def keeps_probs(tau: float, dtype: torch.dtype) -> bool:
    """Whether :class:`GumbelSoftmaxWithMeanProbs` keeps ``p`` (else ``s``) at ``tau``:
    ``tau * -log(tiny) >= -log(tiny of float32)`` (tau >= 1 in float32, >= 0.123 in
    float64)."""
    return tau * -math.log(torch.finfo(dtype).tiny) >= -math.log(torch.finfo(torch.float32).tiny)


def redraws_noise_on(device: torch.device) -> bool:
    """Whether :func:`gumbel_softmax_and_mean_probs` runs on ``device`` (it redraws the
    noise from a generator state: CPU and CUDA)."""
    return default_generator(device) is not None


@without_autocast()
def gumbel_softmax_and_mean_probs(
    logits: Tensor, tau: float, mask: Optional[Tensor] = None
) -> Tuple[Tensor, Tensor, Tensor]:
    """``(p, masked_mean_probs(logits, mask), s)`` with ``s = (logits + g) / tau`` and
    ``p = softmax(s)`` for Gumbel noise ``g`` drawn from the default generator, in one
    autograd node (:class:`GumbelSoftmaxWithMeanProbs`): the values of
    ``smoothed_logits_of(logits, "gumbel", tau)``, its softmax and
    :func:`masked_mean_probs` computed apart (bit for bit, the generator included) and
    their gradients, keeping one N x G x M tensor instead of two. ``s`` has no gradient.
    Shapes as :func:`~.rows.as_rows`; ``p`` and ``s`` have the shape of ``logits`` (at
    least float32), the mean is ``(G, M)``. CPU and CUDA (:func:`redraws_noise_on`)."""
    if tau <= 0:
        raise ValueError(f"temperature must be > 0, got {tau}")
    if not redraws_noise_on(logits.device):
        raise ValueError(f"gumbel_softmax_and_mean_probs runs on CPU and CUDA, not {logits.device.type}")
    rows, valid = as_rows(logits, mask)
    probs, mean, smoothed = GumbelSoftmaxWithMeanProbs.apply(rows, float(tau), row_weights(rows, valid))
    return probs.view(logits.shape), mean, smoothed.view(logits.shape)
