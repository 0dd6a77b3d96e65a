"""Regularisers on smoothed code-selection vectors.

``P`` holds one group's smoothed vectors ``p_n = softmax(l_n)`` as rows (N x M). With the
vertices ``e_m`` (onehot of entry m) of the simplex and two distances

    d_L2(e_m, p) = ||e_m - p||^2 = 1 - 2 p_m + ||p||^2
    d_CE(e_m, p) = -log p_m

the KNN-to-simplex-vertex loss is

    L_KNN = 1 / (G * M * K) * sum_g sum_m sum_{n in S_K(m)} d(e_m, p_n)

where ``S_K(m)`` are the K rows nearest to vertex m (chosen without gradient). It is
smallest when every vertex has K smoothed vectors sitting on it: onehot-like vectors and
every entry used. The wav2vec 2.0 diversity loss is ``(G*M - sum_g exp(H(mean_n p_n))) /
(G*M)``.

The distances come from ``P`` in O(N*M): no distance matrix against an identity codebook
is ever built. For large M the neighbour search runs over chunks of vertices, so the
extra memory is O(N * chunk + K * M) rather than a second N x M copy, and the backward
pass is written out (:class:`SelectedVertexDistance`) so that it allocates only the
gradient itself.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

KNN_DISTANCES: Tuple[str, ...] = ("ce", "l2")

# Above this many selection scores (N * G * M), the neighbour search is chunked over
# vertices; 2**24 floats are 64 MiB.
AUTO_CHUNK_ELEMENTS = 1 << 24


def as_rows(logits: Tensor, mask: Optional[Tensor] = None) -> Tuple[Tensor, Optional[Tensor]]:
    """Views ``logits`` as rows ``(N, G, M)`` and flattens ``mask`` to ``(N,)``.

    Without a mask a 2-D tensor is ``(N, M)`` (one group) and a tensor of three or more
    dimensions is ``(..., G, M)``. With a mask, the mask's shape names the leading
    (position) dimensions and at most one group dimension may follow before M.
    """
    if not torch.is_tensor(logits):
        raise ValueError(f"logits must be a tensor, got {type(logits).__name__}")
    if not logits.is_floating_point():
        raise ValueError(f"logits must be floating point, got {logits.dtype}")
    if mask is None:
        if logits.dim() < 2:
            raise ValueError(
                f"logits must have shape (N, M) or (..., G, M), got {tuple(logits.shape)}"
            )
        if logits.dim() == 2:
            return logits.unsqueeze(1), None
        return logits.reshape(-1, logits.shape[-2], logits.shape[-1]), None

    if not torch.is_tensor(mask) or mask.dtype != torch.bool:
        raise ValueError("mask must be a boolean tensor, True where a position is valid")
    extra = logits.dim() - mask.dim()
    if extra not in (1, 2) or tuple(logits.shape[: mask.dim()]) != tuple(mask.shape):
        raise ValueError(
            f"mask of shape {tuple(mask.shape)} does not match logits of shape "
            f"{tuple(logits.shape)}: it must cover the leading position dimensions, "
            "followed by an optional group dimension and the entries"
        )
    groups = logits.shape[-2] if extra == 2 else 1
    rows = logits.reshape(-1, groups, logits.shape[-1])
    return rows, mask.reshape(-1).to(rows.device)


def at_least_float32(x: Tensor) -> Tensor:
    """fp16 / bf16 inputs are computed in float32; float64 stays float64."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def check_finite(logits: Tensor) -> None:
    if not bool(torch.isfinite(logits).all()):
        raise ValueError(
            "logits contain NaN or infinite values; check the learning rate, the "
            "temperature and fp16 overflow upstream of the quantizer"
        )


def check_knn_args(k: int, distance: str) -> None:
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"knn k must be an integer >= 1, got {k!r}")
    if distance not in KNN_DISTANCES:
        raise ValueError(
            f"unknown knn distance {distance!r}; choose one of {', '.join(KNN_DISTANCES)}"
        )


def vertex_closeness(rows: Tensor, lse: Tensor, sq_norm: Optional[Tensor], distance: str) -> Tensor:
    """A score that is larger when ``p_n`` is closer to vertex m, for rows ``(N, G, C)``
    of a chunk of C vertices. CE: ``log p_m``; L2: ``2 p_m - ||p||^2`` (= 1 - d_L2)."""
    log_p = rows - lse.unsqueeze(-1)
    if distance == "ce":
        return log_p
    return 2.0 * log_p.exp_() - sq_norm.unsqueeze(-1)


@torch.no_grad()
def nearest_rows(
    rows: Tensor,
    k: int,
    distance: str,
    valid: Optional[Tensor] = None,
    chunk_size: Optional[int] = None,
) -> Tuple[Tensor, Tensor]:
    """For every (group, vertex), the ``k`` rows nearest to it.

    Returns ``(index, closeness)``, both ``(k, G, M)``, where ``index`` points into the
    N rows and ``closeness`` is :func:`vertex_closeness` of those rows (descending).
    Invalid rows (``valid`` False) are never chosen when ``k`` <= number of valid rows.
    """
    n, groups, entries = rows.shape
    rows = at_least_float32(rows)
    lse = torch.logsumexp(rows, dim=-1)  # (N, G)
    sq_norm = None
    if distance == "l2":
        sq_norm = F.softmax(rows, dim=-1).pow_(2).sum(-1)
    if chunk_size is None:
        chunk_size = max(1, min(entries, AUTO_CHUNK_ELEMENTS // max(1, n * groups)))
    index = rows.new_empty((k, groups, entries), dtype=torch.long)
    closeness = rows.new_empty((k, groups, entries))
    for start in range(0, entries, chunk_size):
        stop = min(entries, start + chunk_size)
        score = vertex_closeness(rows[:, :, start:stop], lse, sq_norm, distance)
        if valid is not None:
            score.masked_fill_(~valid.view(-1, 1, 1), float("-inf"))
        # top-k along N; transposing first keeps the reduction on a contiguous axis.
        top = torch.topk(score.permute(1, 2, 0), k, dim=-1, sorted=True)
        closeness[:, :, start:stop] = top.values.permute(2, 0, 1)
        index[:, :, start:stop] = top.indices.permute(2, 0, 1)
    return index, closeness


def _sum_per_row(values: Tensor, index: Tensor, num_rows: int) -> Tensor:
    """Adds ``values[k, g, m]`` into row ``index[k, g, m]`` of group g: ``(num_rows, G)``."""
    groups = index.shape[1]
    flat_index = index.transpose(1, 2).reshape(-1, groups)
    flat_values = values.transpose(1, 2).reshape(-1, groups)
    return values.new_zeros((num_rows, groups)).scatter_add_(0, flat_index, flat_values)


class SelectedVertexDistance(torch.autograd.Function):
    """``sum_{k,g,m} weight[k,g,m] * d(e_m, softmax(rows[index[k,g,m], g]))``.

    The neighbour choice ``index`` is a constant. The backward pass is written out so
    that it allocates one N x G x M tensor, the gradient, and nothing else:

        CE:  dL/dl_n = sum_sel w * (softmax(l_n) - e_m)
        L2:  dL/dl_n = 2 p_n * (c_n * (p_n - ||p_n||^2) + a_n - B_n)

    with, per row n, ``c_n = sum_sel w``, ``a_n = sum_sel w * p_{n,m}`` and
    ``B_n = sum_sel w * e_m``.
    """

    @staticmethod
    def forward(ctx, rows: Tensor, index: Tensor, weight: Tensor, distance: str) -> Tensor:
        rows32 = at_least_float32(rows)
        lse = torch.logsumexp(rows32, dim=-1)  # (N, G)
        n, groups, entries = rows.shape
        chosen_logit = rows32.gather(0, index)
        chosen_lse = lse.unsqueeze(-1).expand(n, groups, entries).gather(0, index)
        log_p = chosen_logit - chosen_lse
        if distance == "ce":
            dist = -log_p
        else:
            sq_norm = F.softmax(rows32, dim=-1).pow_(2).sum(-1)
            chosen_sq = sq_norm.unsqueeze(-1).expand(n, groups, entries).gather(0, index)
            dist = 1.0 - 2.0 * log_p.exp() + chosen_sq
        ctx.save_for_backward(rows, index, weight)
        ctx.distance = distance
        return (weight * dist).sum()

    @staticmethod
    def backward(ctx, grad_output: Tensor):
        rows, index, weight = ctx.saved_tensors
        n, groups, entries = rows.shape
        probs = F.softmax(at_least_float32(rows), dim=-1)
        row_weight = _sum_per_row(weight, index, n)
        if ctx.distance == "ce":
            grad = probs.mul_(row_weight.unsqueeze(-1))
            grad.scatter_add_(0, index, -weight)
        else:
            chosen_p = probs.gather(0, index)
            sel_p = _sum_per_row(weight * chosen_p, index, n)
            sq_norm = probs.pow(2).sum(-1, keepdim=True)
            inner = (probs - sq_norm).mul_(row_weight.unsqueeze(-1)).add_(sel_p.unsqueeze(-1))
            inner.scatter_add_(0, index, -weight)
            grad = inner.mul_(probs).mul_(2.0)
        grad.mul_(grad_output)
        return grad.to(rows.dtype), None, None, None


def knn_vertex_loss(
    logits: Tensor,
    k: int = 8,
    distance: str = "ce",
    mask: Optional[Tensor] = None,
    chunk_size: Optional[int] = None,
) -> Tensor:
    """L_KNN of ``softmax(logits)`` along the last axis (see the module docstring).

    Args:
        logits: ``(N, M)`` or ``(..., G, M)``; pass ``(l + g) / tau`` for a Gumbel sample.
        k: neighbours per vertex; with fewer valid rows than ``k``, all valid rows count.
        distance: ``"ce"`` (cross-entropy to the onehot) or ``"l2"`` (squared Euclidean).
        mask: boolean over the leading position dimensions, True where valid.
        chunk_size: vertices per chunk of the neighbour search (default: automatic).

    Returns a scalar (at least float32) whose gradient flows through the selected distances only.
    """
    check_knn_args(k, distance)
    rows, valid = as_rows(logits, mask)
    check_finite(rows)
    num_valid = rows.shape[0] if valid is None else int(valid.sum())
    if num_valid == 0:
        return at_least_float32(rows).sum() * 0.0
    k_eff = min(k, num_valid)
    index, _ = nearest_rows(rows, k_eff, distance, valid, chunk_size)
    weight = torch.ones(index.shape, dtype=at_least_float32(rows).dtype, device=rows.device)
    total = SelectedVertexDistance.apply(rows, index, weight, distance)
    return total / (rows.shape[1] * rows.shape[2] * k_eff)


def entropy_perplexity(avg_probs: Tensor) -> Tensor:
    """``sum_g exp(H(avg_probs_g))`` with fairseq's ``+1e-7`` inside the log."""
    return torch.exp(-torch.sum(avg_probs * torch.log(avg_probs + 1e-7), dim=-1)).sum()


def masked_mean_probs(logits: Tensor, mask: Optional[Tensor] = None) -> Tensor:
    """Mean of ``softmax(logits)`` over valid rows, ``(G, M)``."""
    rows, valid = as_rows(logits, mask)
    probs = F.softmax(at_least_float32(rows), dim=-1)
    if valid is None:
        return probs.mean(dim=0)
    weights = valid.to(probs.dtype)
    return (probs * weights.view(-1, 1, 1)).sum(0) / weights.sum().clamp_min(1.0)


def diversity_loss(logits: Tensor, mask: Optional[Tensor] = None) -> Tensor:
    """wav2vec 2.0's diversity loss ``(G*M - sum_g exp(H(mean_n softmax(l_n)))) / (G*M)``."""
    rows, _ = as_rows(logits, mask)
    check_finite(rows)
    num_vars = rows.shape[1] * rows.shape[2]
    return (num_vars - entropy_perplexity(masked_mean_probs(logits, mask))) / num_vars
