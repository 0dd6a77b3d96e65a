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

from dataclasses import dataclass
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

KNN_DISTANCES: Tuple[str, ...] = ("ce", "l2")

# Above this many selection scores (N * G * M), the neighbour search is chunked over
# vertices; 2**24 floats are 64 MiB.
AUTO_CHUNK_ELEMENTS = 1 << 24
# Blocks of log-only statistics (batch-mean probabilities, tightness): 2**22 values,
# 16 MiB in float32, small next to one N x M tensor at large codebooks.
STATISTICS_BLOCK_ELEMENTS = 1 << 22


def as_rows(logits: Tensor, mask: Optional[Tensor] = None) -> Tuple[Tensor, Optional[Tensor]]:
    """Views ``logits`` as rows ``(N, G, M)`` and flattens ``mask`` to ``(N,)``.

    One rule for groups, with or without a mask: a 2-D tensor is ``(N, M)`` (one group)
    and a tensor of three or more dimensions is ``(..., G, M)``, its last two dimensions
    being the groups and the entries. A mask covers exactly the leading (position)
    dimensions, ``logits.shape[:-2]`` (``logits.shape[:-1]`` for a 2-D tensor), so an
    all-True mask never changes a result. One group over ``(B, T)`` positions is
    ``(B, T, 1, M)``.
    """
    if not torch.is_tensor(logits):
        raise ValueError(f"logits must be a tensor, got {type(logits).__name__}")
    if not logits.is_floating_point():
        raise ValueError(f"logits must be floating point, got {logits.dtype}")
    if logits.dim() < 2:
        raise ValueError(
            f"logits must have shape (N, M) or (..., G, M), got {tuple(logits.shape)}"
        )
    rows = logits.unsqueeze(1) if logits.dim() == 2 else logits.reshape(-1, logits.shape[-2], logits.shape[-1])
    if mask is None:
        return rows, None

    if not torch.is_tensor(mask) or mask.dtype != torch.bool:
        raise ValueError("mask must be a boolean tensor, True where a position is valid")
    positions = tuple(logits.shape[:-1] if logits.dim() == 2 else logits.shape[:-2])
    if tuple(mask.shape) != positions:
        hint = ""
        if logits.dim() >= 3 and tuple(mask.shape) == tuple(logits.shape[:-1]):
            hint = (
                f"; logits of shape {tuple(logits.shape)} are read as (..., G, M) with "
                f"G={logits.shape[-2]} groups: for one group pass logits.unsqueeze(-2)"
            )
        raise ValueError(
            f"mask of shape {tuple(mask.shape)} does not match logits of shape "
            f"{tuple(logits.shape)}: it must have the shape of the position dimensions "
            f"{positions} (everything before the group and entry dimensions){hint}"
        )
    return rows, mask.reshape(-1).to(rows.device)


def at_least_float32(x: Tensor) -> Tensor:
    """fp16 / bf16 inputs are computed in float32; float64 stays float64."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def check_finite(logits: Tensor) -> None:
    # A NaN or infinity anywhere makes the sum non-finite, so one reduction settles the
    # common case; a non-finite sum may also be an overflow of finite values, and only
    # then is the element-wise test (a full boolean copy) run.
    with torch.no_grad():
        if bool(torch.isfinite(logits.sum())) or bool(torch.isfinite(logits).all()):
            return
    raise ValueError(
        "logits contain NaN or infinite values; check the learning rate, the "
        "temperature and fp16 overflow upstream of the quantizer"
    )


def check_knn_args(k: int, distance: str, chunk_size: Optional[int] = None) -> None:
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"knn k must be an integer >= 1, got {k!r}")
    if distance not in KNN_DISTANCES:
        raise ValueError(
            f"unknown knn distance {distance!r}; choose one of {', '.join(KNN_DISTANCES)}"
        )
    check_chunk_size(chunk_size)


def check_chunk_size(chunk_size: Optional[int], name: str = "chunk_size") -> None:
    """``chunk_size`` (vertices per chunk of the neighbour search) is None or >= 1."""
    if chunk_size is not None and (
        isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1
    ):
        raise ValueError(
            f"{name} must be an integer >= 1 (vertices per chunk of the neighbour search) "
            f"or None for automatic chunking, got {chunk_size!r}"
        )


def knn_rows(
    logits: Tensor,
    k: int,
    distance: str,
    mask: Optional[Tensor],
    check_inputs: bool,
    chunk_size: Optional[int] = None,
) -> Tuple[Tensor, Optional[Tensor]]:
    """The argument checks every KNN loss starts with; returns :func:`as_rows`."""
    check_knn_args(k, distance, chunk_size)
    rows, valid = as_rows(logits, mask)
    if check_inputs:
        check_finite(rows)
    return rows, valid


def valid_count(rows: Tensor, valid: Optional[Tensor]) -> Tensor:
    """Number of valid rows as a 0-d int64 tensor on the rows' device (no host sync)."""
    if valid is None:
        return torch.full((), rows.shape[0], dtype=torch.long, device=rows.device)
    return valid.sum()


def selection_weight(search_index: Tensor, valid: Optional[Tensor], dtype: torch.dtype) -> Tensor:
    """1 for every selected row that is valid, else 0, ``(k, G, M)``.

    The search always takes ``min(k, N)`` rows per vertex, a size known without looking
    at the mask (no host sync); invalid rows score -inf and are taken only when fewer
    than ``k`` rows are valid. Their weight 0 leaves them out of value and gradient.
    """
    if valid is None:
        return torch.ones(search_index.shape, dtype=dtype, device=search_index.device)
    return valid.to(dtype)[search_index]


def vertex_closeness(rows: Tensor, lse: Tensor, sq_norm: Optional[Tensor], distance: str) -> Tensor:
    """A score that is larger when ``p_n`` is closer to vertex m, for rows ``(N, G, C)``
    of a chunk of C vertices. CE: ``log p_m``; L2: ``2 p_m - ||p||^2`` (= 1 - d_L2)."""
    log_p = rows - lse.unsqueeze(-1)
    if distance == "ce":
        return log_p
    return 2.0 * log_p.exp_() - sq_norm.unsqueeze(-1)


# On CPU a top-k along the first axis of an (N, G, C) tensor reads it column by column,
# a stride of G*C values apart; copying a few columns at a time into a contiguous block
# first keeps those reads in cache. Measured on one core, K=8: 30 -> 13 ms at N=4096,
# M=1024 and 121 -> 42 ms at N=16384, M=1024. Blocks of 2**18 values are a little faster
# still on one core, but with several threads every block is a parallel region, and on a
# busy machine each region can wait for a descheduled thread: fewer, larger blocks.
TOPK_BLOCK_ELEMENTS = 1 << 20


def topk_along_rows(score: Tensor, k: int) -> Tuple[Tensor, Tensor]:
    """``torch.topk(score, k, dim=0)`` of ``(N, G, C)`` scores: ``(values, indices)``."""
    n, groups, entries = score.shape
    width = max(1, TOPK_BLOCK_ELEMENTS // max(1, n * groups))
    if score.device.type != "cpu" or width >= entries:
        top = torch.topk(score, k, dim=0, sorted=True)
        return top.values, top.indices
    values = score.new_empty((k, groups, entries))
    indices = torch.empty((k, groups, entries), dtype=torch.long, device=score.device)
    for start in range(0, entries, width):
        stop = min(entries, start + width)
        top = torch.topk(score[:, :, start:stop].contiguous(), k, dim=0, sorted=True)
        values[:, :, start:stop] = top.values
        indices[:, :, start:stop] = top.indices
    return values, indices


def rows_per_block(rows: Tensor, budget: int = AUTO_CHUNK_ELEMENTS) -> int:
    """Rows per block so that a block of ``(rows, G, M)`` temporaries stays within budget."""
    return max(1, budget // max(1, rows.shape[1] * rows.shape[2]))


@torch.no_grad()
def row_statistics(rows: Tensor, with_sq_norm: bool, block_rows: Optional[int] = None) -> Tuple[Tensor, Optional[Tensor]]:
    """``log sum_m exp(l_m)`` and, if asked, ``||softmax(l)||^2``, both ``(N, G)``, computed
    over blocks of rows so that the temporaries stay O(block * G * M)."""
    n = rows.shape[0]
    block_rows = rows_per_block(rows) if block_rows is None else block_rows
    dtype = at_least_float32(rows).dtype
    lse = torch.empty(rows.shape[:2], dtype=dtype, device=rows.device)
    sq_norm = torch.empty_like(lse) if with_sq_norm else None
    for start in range(0, n, block_rows):
        block = at_least_float32(rows[start : start + block_rows])
        # log_softmax is one fused kernel (several times faster than logsumexp); at a
        # row's largest logit it equals -log sum exp(l - max), so max(l) - max(log p) is
        # the log-sum-exp with one rounding.
        log_p = F.log_softmax(block, dim=-1)
        lse[start : start + block_rows] = block.amax(-1) - log_p.amax(-1)
        if sq_norm is not None:
            sq_norm[start : start + block_rows] = log_p.exp_().square_().sum(-1)
    return lse, sq_norm


@dataclass
class VertexSearch:
    """The neighbour search of one batch, everything the loss needs afterwards.

    ``index`` / ``closeness`` ``(k, G, M)``: the rows nearest to each vertex and their
    :func:`vertex_closeness` (descending). For a search in one piece ``full`` keeps the
    whole ``(N, G, M)`` log-probabilities (CE) or probabilities (L2) for the backward
    pass (CE: -inf on rows that ``valid`` excludes); a chunked search keeps only the
    per-row ``lse`` (and ``sq_norm`` for L2).
    """

    index: Tensor
    closeness: Tensor
    lse: Optional[Tensor] = None
    sq_norm: Optional[Tensor] = None
    full: Optional[Tensor] = None


@torch.no_grad()
def search_vertices(
    rows: Tensor,
    k: int,
    distance: str,
    valid: Optional[Tensor] = None,
    chunk_size: Optional[int] = None,
    probs: Optional[Tensor] = None,
) -> VertexSearch:
    """The ``k`` rows nearest to every (group, vertex) of rows ``(N, G, M)``.

    With ``chunk_size`` >= M (default: when N * G * M <= ``AUTO_CHUNK_ELEMENTS``) the
    scores are computed in one piece and kept for the backward pass (at most
    ``AUTO_CHUNK_ELEMENTS`` values). Otherwise the search runs over chunks of vertices
    and the extra memory is O(N * G * chunk + k * G * M).

    ``probs``: ``softmax(rows)`` when the caller has it already (see
    :class:`SoftmaxWithSelectedDistance`); the per-row statistics then come from it and
    the search always runs over chunks, keeping nothing of size N * G * M.
    """
    n, groups, entries = rows.shape
    if k > n:
        raise ValueError(f"cannot pick {k} nearest rows out of {n}")
    invalid = None if valid is None else ~valid.view(-1, 1, 1)
    rows32 = at_least_float32(rows)
    if chunk_size is None:
        chunk_size = max(1, min(entries, AUTO_CHUNK_ELEMENTS // max(1, n * groups)))
        if probs is not None and rows.device.type == "cpu":
            chunk_size = min(chunk_size, max(1, TOPK_BLOCK_ELEMENTS // max(1, n * groups)))

    if probs is None and chunk_size >= entries:
        if distance == "ce":
            # the scores are the log-probabilities themselves; masking them in place
            # leaves -inf on invalid rows, whose gradient is zero either way.
            full = score = F.log_softmax(rows32, dim=-1)
            sq_norm = None
        else:
            full = F.softmax(rows32, dim=-1)
            sq_norm = torch.linalg.vecdot(full, full)
            score = (2.0 * full).sub_(sq_norm.unsqueeze(-1))
        if invalid is not None:
            score.masked_fill_(invalid, float("-inf"))
        values, index = topk_along_rows(score, k)
        return VertexSearch(index, values, sq_norm=sq_norm, full=full)

    if probs is None:
        lse, sq_norm = row_statistics(rows, distance == "l2")
    elif distance == "ce":
        # at a row's largest entry p = 1 / sum exp(l - max), which never underflows
        lse, sq_norm = rows32.amax(-1) - probs.amax(-1).log(), None
    else:
        lse, sq_norm = None, torch.linalg.vecdot(probs, probs)
    index = torch.empty((k, groups, entries), dtype=torch.long, device=rows.device)
    closeness = torch.empty((k, groups, entries), dtype=rows32.dtype, device=rows.device)
    for start in range(0, entries, chunk_size):
        stop = min(entries, start + chunk_size)
        if probs is not None and distance == "l2":
            score = (2.0 * probs[:, :, start:stop]).sub_(sq_norm.unsqueeze(-1))
        else:
            score = vertex_closeness(rows32[:, :, start:stop], lse, sq_norm, distance)
        if invalid is not None:
            score.masked_fill_(invalid, float("-inf"))
        closeness[:, :, start:stop], index[:, :, start:stop] = topk_along_rows(score, k)
        del score
    return VertexSearch(index, closeness, lse=lse, sq_norm=sq_norm)


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
    search = search_vertices(rows, k, distance, valid, chunk_size)
    return search.index, search.closeness


def _sum_per_row(values: Tensor, index: Tensor, num_rows: int) -> Tensor:
    """Adds ``values[k, g, m]`` into row ``index[k, g, m]`` of group g: ``(num_rows, G)``."""
    groups = index.shape[1]
    flat_index = index.transpose(1, 2).reshape(-1, groups)
    flat_values = values.transpose(1, 2).reshape(-1, groups)
    return values.new_zeros((num_rows, groups)).scatter_add_(0, flat_index, flat_values)


def _per_selection(per_row: Tensor, index: Tensor) -> Tensor:
    """``per_row[index[k, g, m], g]`` for a ``(N, G)`` tensor: ``(k, G, M)``."""
    n, groups = per_row.shape
    return per_row.unsqueeze(-1).expand(n, groups, index.shape[2]).gather(0, index)


def _selected_pairs(index: Tensor, num_rows: int) -> Tuple[Tensor, Tensor]:
    """The (row, group) pair of every selection, flat ``row * G + g`` ``(k*G*M,)``, and
    a float mask that is 1 at the first selection of each pair, else 0.

    Its size is known from the shapes alone, so the sparse backward below needs no
    ``nonzero()`` (a host sync on GPUs); a pair that several vertices selected is
    computed once per selection and added once, through the mask.
    """
    groups = index.shape[1]
    group_ids = torch.arange(groups, device=index.device).view(1, groups, 1)
    pairs = (index * groups + group_ids).reshape(-1)
    order = torch.arange(pairs.numel(), device=index.device)
    first = torch.full((num_rows * groups,), pairs.numel(), dtype=torch.long, device=index.device)
    first.scatter_reduce_(0, pairs, order, reduce="amin")
    return pairs, first.gather(0, pairs) == order


def _sparse_backward(num_rows: int, index: Tensor) -> bool:
    """Whether a backward pass computes the selected rows only: when the selections
    (at most ``k * M`` rows per group) are at most a quarter of the N rows. Decided
    from the shapes, never from the data (no host sync)."""
    k, _, entries = index.shape
    return 4 * k * entries <= num_rows


class SelectedVertexDistance(torch.autograd.Function):
    """``sum_{k,g,m} weight[k,g,m] * d(e_m, softmax(rows[index[k,g,m], g]))``.

    The neighbour choice ``index`` is a constant. ``search`` (optional) is the
    :class:`VertexSearch` that produced ``index``; its per-row statistics are reused
    instead of computed again. The backward pass is written out so that it allocates
    one N x G x M tensor, the gradient, plus temporaries over blocks of rows:

        CE:  dL/dl_n = sum_sel w * (softmax(l_n) - e_m)
        L2:  dL/dl_n = 2 p_n * (c_n * (p_n - ||p_n||^2) + a_n - B_n)

    with, per row n, ``c_n = sum_sel w``, ``a_n = sum_sel w * p_{n,m}`` and
    ``B_n = sum_sel w * e_m``.
    """

    @staticmethod
    def forward(
        ctx,
        rows: Tensor,
        index: Tensor,
        weight: Tensor,
        distance: str,
        search: Optional[VertexSearch] = None,
    ) -> Tensor:
        full = lse = sq_norm = None
        if search is not None:
            full, lse, sq_norm = search.full, search.lse, search.sq_norm
        if full is None and (lse is None or (distance == "l2" and sq_norm is None)):
            lse, sq_norm = row_statistics(rows, distance == "l2")
        if full is not None:
            chosen = full.gather(0, index)  # log p_m (CE) or p_m (L2)
        else:
            chosen = at_least_float32(rows).gather(0, index) - _per_selection(lse, index)
            if distance == "l2":
                chosen = chosen.exp_()
        if distance == "ce":
            dist = -chosen
        else:
            dist = 1.0 - 2.0 * chosen + _per_selection(sq_norm, index)
        ctx.save_for_backward(rows, index, weight, full, lse, sq_norm)
        ctx.distance = distance
        # a selected padding row (fewer valid rows than k) weighs 0; its CE score in
        # ``full`` is -inf, so 0 * inf must not turn the sum into NaN
        return torch.where(weight != 0, weight * dist, torch.zeros_like(dist)).sum()

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output: Tensor):
        rows, index, weight, full, lse, sq_norm = ctx.saved_tensors
        n, groups, entries = rows.shape
        # The loss is linear in the weights, so the incoming scalar scales them (K*G*M
        # values) rather than the N x G x M gradient.
        weight = weight * grad_output
        row_weight = _sum_per_row(weight, index, n)  # c_n, (N, G)
        if ctx.distance == "ce":
            chosen_p = None
        elif full is not None:
            chosen_p = full.gather(0, index)
        else:
            chosen_p = (at_least_float32(rows).gather(0, index) - _per_selection(lse, index)).exp_()
        sel_p = None if chosen_p is None else _sum_per_row(weight * chosen_p, index, n)  # a_n

        def row_gradient(p: Tensor, c: Tensor, a: Optional[Tensor], sq: Optional[Tensor]) -> Tensor:
            """The dense part of the gradient for rows of probabilities ``p`` (in place)."""
            if ctx.distance == "ce":
                return p.mul_(c.unsqueeze(-1))
            inner = (p - sq.unsqueeze(-1)).mul_(c.unsqueeze(-1)).add_(a.unsqueeze(-1))
            return p.mul_(inner).mul_(2.0)

        # Only rows that some vertex selected have a gradient. When they are few (N much
        # larger than K * M) the others are left at zero instead of computed.
        if _sparse_backward(n, index):
            pairs, first = _selected_pairs(index, n)
            grad = torch.zeros(rows.shape, dtype=weight.dtype, device=rows.device)
            if full is not None:
                p = full.view(n * groups, entries).index_select(0, pairs)
                p = p.exp_() if ctx.distance == "ce" else p
            else:
                p = at_least_float32(rows.reshape(n * groups, entries).index_select(0, pairs))
                p = p.sub_(lse.view(-1).index_select(0, pairs).unsqueeze(-1)).exp_()
            keep = first.to(weight.dtype)  # a pair's later selections add zero
            sq = None if sq_norm is None else sq_norm.view(-1).index_select(0, pairs)
            a = None if sel_p is None else sel_p.view(-1).index_select(0, pairs) * keep
            grad.view(n * groups, entries).index_add_(
                0, pairs, row_gradient(p, row_weight.view(-1).index_select(0, pairs) * keep, a, sq)
            )
        elif full is not None and ctx.distance == "ce":
            grad = row_gradient(full.exp(), row_weight, None, None)
        elif full is not None:
            grad = row_gradient(full.clone(), row_weight, sel_p, sq_norm)
        else:
            grad = torch.empty(rows.shape, dtype=weight.dtype, device=rows.device)
            block_rows = rows_per_block(rows)
            for start in range(0, n, block_rows):
                stop = start + block_rows
                p = grad[start:stop]
                torch.sub(rows[start:stop], lse[start:stop].unsqueeze(-1), out=p).exp_()
                row_gradient(
                    p,
                    row_weight[start:stop],
                    None if sel_p is None else sel_p[start:stop],
                    None if sq_norm is None else sq_norm[start:stop],
                )
        # the onehot term: - sum_sel w * e_m (CE), - sum_sel 2 w p_m e_m (L2)
        grad.scatter_add_(0, index, -weight if chosen_p is None else -2.0 * weight * chosen_p)
        return grad.to(rows.dtype), None, None, None, None


def knn_vertex_loss(
    logits: Tensor,
    k: int = 8,
    distance: str = "ce",
    mask: Optional[Tensor] = None,
    chunk_size: Optional[int] = None,
    check_inputs: bool = True,
) -> Tensor:
    """L_KNN of ``softmax(logits)`` along the last axis (see the module docstring).

    Args:
        logits: ``(N, M)`` (one group) or ``(..., G, M)`` (the last two dimensions are
            always groups and entries, with or without a mask; one group over ``(B, T)``
            positions is ``(B, T, 1, M)``); pass ``(l + g) / tau`` for a Gumbel sample.
        k: neighbours per vertex; with fewer valid rows than ``k``, all valid rows count.
        distance: ``"ce"`` (cross-entropy to the onehot) or ``"l2"`` (squared Euclidean).
        mask: boolean of the position dimensions' shape (``logits.shape[:-2]``, or
            ``logits.shape[:-1]`` for 2-D logits), True where valid. An all-True mask
            gives the value without a mask.
        chunk_size: vertices per chunk of the neighbour search, an integer >= 1
            (default: automatic).
        check_inputs: raise ValueError on NaN / inf logits. Quantizers inside a training
            loop pass False: with fp16 an overflow must reach fairseq's loss scaler (which
            skips the step), not stop the run, and the check costs a device sync.

    Returns a scalar (at least float32) whose gradient flows through the selected distances only.
    """
    rows, valid = knn_rows(logits, k, distance, mask, check_inputs, chunk_size)
    k_search = min(k, rows.shape[0])  # from the shapes: no host sync on the mask
    if k_search == 0:
        return at_least_float32(rows).sum() * 0.0
    search = search_vertices(rows, k_search, distance, valid, chunk_size)
    weight = selection_weight(search.index, valid, search.closeness.dtype)
    total = SelectedVertexDistance.apply(rows, search.index, weight, distance, search)
    return total / _normaliser(rows, valid, k)


def _normaliser(rows: Tensor, valid: Optional[Tensor], k: int):
    """``G * M * K_eff`` with ``K_eff = min(k, valid rows)`` (at least 1), a tensor when
    it depends on the mask."""
    groups_entries = rows.shape[1] * rows.shape[2]
    if valid is None:
        return groups_entries * max(1, min(k, rows.shape[0]))
    return valid_count(rows, valid).clamp(1, k).to(at_least_float32(rows).dtype) * groups_entries


class SoftmaxWithSelectedDistance(torch.autograd.Function):
    """``softmax(rows)`` and ``sum_{k,g,m} w * d(e_m, softmax(rows)[index[k,g,m], g])``
    as one autograd node, for a smoothing whose soft vectors are also the KNN input.

    ``select(rows, probs)`` makes the (constant) neighbour choice once the probabilities
    exist and returns ``(search, weight)`` (:class:`VertexSearch` and weights of the shape
    of ``search.index``), or None when no row is selected. The backward pass adds the
    KNN terms of :class:`SelectedVertexDistance` into the softmax gradient in place, so
    the regulariser keeps no N x G x M tensor of its own, in either pass, beyond the
    O(N * chunk) of the search: no saved input, no separate gradient to accumulate.
    Probabilities and gradients are computed in at least float32.
    """

    @staticmethod
    def forward(ctx, rows: Tensor, distance: str, select):
        rows32 = at_least_float32(rows)
        probs = F.softmax(rows32, dim=-1)
        chosen = select(rows32, probs)
        if chosen is None:
            total = probs.new_zeros(())
            ctx.save_for_backward(probs, None, None, None)
        else:
            search, weight = chosen
            index = search.index
            if distance == "ce":
                sq_norm = None
                dist = _per_selection(search.lse, index) - rows32.gather(0, index)
            else:
                sq_norm = search.sq_norm
                dist = 1.0 - 2.0 * probs.gather(0, index) + _per_selection(sq_norm, index)
            total = (weight * dist).sum()
            ctx.save_for_backward(probs, index, weight, sq_norm)
        ctx.distance, ctx.input_dtype = distance, rows.dtype
        return probs, total

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_probs: Tensor, grad_total: Tensor):
        probs, index, weight, sq_norm = ctx.saved_tensors
        grad = torch._softmax_backward_data(grad_probs, probs, -1, probs.dtype)
        if index is None:
            return grad.to(ctx.input_dtype), None, None
        n, groups, entries = probs.shape
        weight = weight * grad_total
        row_weight = _sum_per_row(weight, index, n)  # c_n
        chosen_p = None if ctx.distance == "ce" else probs.gather(0, index)
        sel_p = None if chosen_p is None else _sum_per_row(weight * chosen_p, index, n)  # a_n

        if _sparse_backward(n, index):  # few rows selected: add to those only
            pairs, first = _selected_pairs(index, n)
            keep = first.to(probs.dtype).unsqueeze(-1)  # a pair's later selections add zero
            p = probs.view(n * groups, entries).index_select(0, pairs)
            c = row_weight.view(-1).index_select(0, pairs).unsqueeze(-1).mul_(keep)
            if ctx.distance == "ce":
                extra = p.mul_(c)
            else:
                sq = sq_norm.view(-1).index_select(0, pairs).unsqueeze(-1)
                a = sel_p.view(-1).index_select(0, pairs).unsqueeze(-1).mul_(keep)
                extra = p.mul_((p - sq).mul_(c).add_(a)).mul_(2.0)
            grad.view(n * groups, entries).index_add_(0, pairs, extra)
        elif ctx.distance == "ce":
            grad.addcmul_(probs, row_weight.unsqueeze(-1))
        else:
            block_rows = rows_per_block(probs)
            for start in range(0, n, block_rows):
                stop = start + block_rows
                p = probs[start:stop]
                inner = (p - sq_norm[start:stop].unsqueeze(-1)).mul_(row_weight[start:stop].unsqueeze(-1))
                inner.add_(sel_p[start:stop].unsqueeze(-1))
                grad[start:stop].addcmul_(p, inner, value=2.0)
                del inner
        grad.scatter_add_(0, index, -weight if chosen_p is None else -2.0 * weight * chosen_p)
        return grad.to(ctx.input_dtype), None, None


def softmax_and_knn_loss(
    logits: Tensor,
    k: int = 8,
    distance: str = "ce",
    mask: Optional[Tensor] = None,
    chunk_size: Optional[int] = None,
    check_inputs: bool = True,
) -> Tuple[Tensor, Tensor]:
    """``(softmax(logits), knn_vertex_loss(logits, k, distance, mask, chunk_size))`` in
    one autograd node (:class:`SoftmaxWithSelectedDistance`): the same values and
    gradients as computing the two apart, with less memory and time. The probabilities
    have the shape of ``logits`` (at least float32)."""
    rows, valid = knn_rows(logits, k, distance, mask, check_inputs, chunk_size)
    k_search = min(k, rows.shape[0])  # from the shapes: no host sync on the mask

    def select(rows32: Tensor, probs: Tensor):
        if k_search == 0:
            return None
        search = search_vertices(rows32, k_search, distance, valid, chunk_size, probs=probs)
        return search, selection_weight(search.index, valid, probs.dtype)

    probs, total = SoftmaxWithSelectedDistance.apply(rows, distance, select)
    return probs.view(logits.shape), total / _normaliser(rows, valid, k)


class TemperedSoftmaxWithMeanProbs(torch.autograd.Function):
    """``p = softmax(rows / tau)`` (the smoothing) and ``mean_n softmax(rows_n)`` over the
    valid rows (the diversity loss's input) as one autograd node that saves only ``p``.

    The backward pass recomputes ``softmax(rows)`` from ``p``: both are normalised
    exponentials of the same logits, so ``softmax(l) = p**tau / sum_m p_m**tau``. The
    diversity loss then adds no N x G x M tensor to what the smoothing keeps. With
    ``w_n`` the row weights (1 valid, 0 not), ``c = sum_n w_n`` and ``g`` the gradient of
    the mean, the gradient is the smoothing's plus

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
    def backward(ctx, grad_probs: Optional[Tensor], grad_mean: Optional[Tensor]):
        probs, weights, count = ctx.saved_tensors
        n, groups, entries = probs.shape
        if grad_probs is None:
            grad = torch.zeros_like(probs)
        else:
            grad = torch._softmax_backward_data(grad_probs, probs, -1, probs.dtype).div_(ctx.tau)
        if grad_mean is not None and n:
            scale = 1.0 / count.clamp_min(1).to(probs.dtype)
            block_rows = rows_per_block(probs, STATISTICS_BLOCK_ELEMENTS)
            for start in range(0, n, block_rows):
                stop = start + block_rows
                q = probs[start:stop].pow(ctx.tau)
                q.div_(q.sum(-1, keepdim=True))
                inner = grad_mean - torch.linalg.vecdot(q, grad_mean).unsqueeze(-1)
                row_scale = scale if weights is None else (weights[start:stop] * scale).view(-1, 1, 1)
                grad[start:stop].addcmul_(q.mul_(row_scale), inner)
                del q, inner
        return grad.to(ctx.input_dtype), None, None, None


def tempered_softmax_and_mean_probs(
    logits: Tensor, tau: float, mask: Optional[Tensor] = None
) -> Tuple[Tensor, Tensor]:
    """``(softmax(logits / tau), masked_mean_probs(logits, mask))`` in one autograd node
    (:class:`TemperedSoftmaxWithMeanProbs`): the values and gradients of computing the
    two apart, keeping one N x G x M tensor instead of two. Shapes as :func:`as_rows`;
    the probabilities have the shape of ``logits`` (at least float32), the mean is
    ``(G, M)``."""
    if tau <= 0:
        raise ValueError(f"temperature must be > 0, got {tau}")
    rows, valid = as_rows(logits, mask)
    weights = None if valid is None else valid.to(at_least_float32(rows).dtype)
    probs, mean = TemperedSoftmaxWithMeanProbs.apply(rows, float(tau), weights, valid_count(rows, valid))
    return probs.view(logits.shape), mean


def entropy_perplexity(avg_probs: Tensor) -> Tensor:
    """``sum_g exp(H(avg_probs_g))`` with fairseq's ``+1e-7`` inside the log."""
    return torch.exp(-torch.sum(avg_probs * torch.log(avg_probs + 1e-7), dim=-1)).sum()


def masked_prob_sums(logits: Tensor, mask: Optional[Tensor] = None) -> Tensor:
    """Sum of ``softmax(logits)`` over valid rows, ``(G, M)``, in at least float32.

    Under ``torch.no_grad()`` (statistics for logs) the softmax runs over blocks of rows,
    so no N x G x M tensor is made; with gradient it is the one tensor the softmax's
    backward pass needs. The mask enters as a weighted sum, not by indexing (no host
    sync).
    """
    rows, valid = as_rows(logits, mask)
    n, groups, entries = rows.shape
    dtype = at_least_float32(rows).dtype
    weights = None if valid is None else valid.to(dtype)
    if torch.is_grad_enabled() and rows.requires_grad:
        probs = F.softmax(at_least_float32(rows), dim=-1)
        if weights is None:
            return probs.sum(0)
        return (weights @ probs.view(n, groups * entries)).view(groups, entries)
    total = torch.zeros(groups * entries, dtype=dtype, device=rows.device)
    block_rows = rows_per_block(rows, STATISTICS_BLOCK_ELEMENTS)
    for start in range(0, n, block_rows):
        block = F.softmax(at_least_float32(rows[start : start + block_rows]), dim=-1).view(-1, groups * entries)
        if weights is None:
            total += block.sum(0)
        else:
            total.addmv_(block.t(), weights[start : start + block_rows])
    return total.view(groups, entries)


def masked_mean_probs(logits: Tensor, mask: Optional[Tensor] = None) -> Tensor:
    """Mean of ``softmax(logits)`` over valid rows, ``(G, M)`` (zeros without any).

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


def diversity_loss(logits: Tensor, mask: Optional[Tensor] = None, check_inputs: bool = True) -> Tensor:
    """wav2vec 2.0's diversity loss ``(G*M - sum_g exp(H(mean_n softmax(l_n)))) / (G*M)``
    over the valid rows (0 when there are none).

    Groups as :func:`as_rows` reads them: ``(N, M)`` is one group, ``(..., G, M)`` has G;
    an all-True mask gives the value without a mask. ``check_inputs``: raise
    ValueError on NaN / inf logits (a device sync; training loops pass False so that an
    fp16 overflow reaches the loss scaler).
    """
    rows, valid = as_rows(logits, mask)
    if check_inputs:
        check_finite(rows)
    num_valid = None if valid is None and rows.shape[0] else valid_count(rows, valid)
    return perplexity_and_diversity(masked_mean_probs(rows, valid), num_valid)[1]


def perplexity_and_diversity(mean_probs: Tensor, num_valid: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
    """``(sum_g exp(H(mean_probs_g)), (G*M - that) / (G*M))`` for the batch-mean
    probabilities ``(G, M)``: fairseq's prob perplexity and wav2vec 2.0's diversity loss,
    with the float operations of stock fairseq. ``num_valid`` (0-d tensor): the loss is 0
    where it is 0 (no valid row), chosen on the device (no host sync)."""
    perplexity = entropy_perplexity(mean_probs)
    num_vars = mean_probs.shape[0] * mean_probs.shape[1]
    loss = (num_vars - perplexity) / num_vars
    if num_valid is not None:
        loss = torch.where(num_valid > 0, loss, loss * 0.0)
    return perplexity, loss
