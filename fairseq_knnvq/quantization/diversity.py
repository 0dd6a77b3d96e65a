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
    probs = F.softmax(at_least_float32(rows), dim=-1)
    if valid is None:
        return probs.mean(dim=0) if rows.shape[0] else probs.sum(dim=0)
    weights = valid.to(probs.dtype)
    return (probs * weights.view(-1, 1, 1)).sum(0) / weights.sum().clamp_min(1.0)


@without_autocast()
def diversity_loss(logits: Tensor, mask: Optional[Tensor] = None, check_inputs: bool = True) -> Tensor:
    """``L_div`` of ``softmax(logits)`` over the valid rows (0 when there are none).

    Groups as :func:`~.rows.as_rows` reads them: ``(N, M)`` is one group, ``(..., G, M)``
    has G; an all-True mask gives the value without a mask. ``check_inputs``: raise
    ValueError on NaN / inf logits (a device sync; training loops pass False so that an
    fp16 overflow reaches the loss scaler).
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
