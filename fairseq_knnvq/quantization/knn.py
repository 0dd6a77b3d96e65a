"""The KNN-to-simplex-vertex loss.

``P`` holds one group's smoothed vectors ``p_n = softmax(l_n)`` as rows (N x M). With the
vertices ``e_m`` (onehot of entry m) of the simplex and two distances

    d_L2(e_m, p) = ||e_m - p||^2 = 1 - 2 p_m + ||p||^2
    d_CE(e_m, p) = -log p_m

the KNN-to-simplex-vertex loss is

    L_KNN = 1 / (G * M * K) * sum_g sum_m sum_{n in S_K(m)} d(e_m, p_n)

where ``S_K(m)`` are the K rows nearest to vertex m (:mod:`.vertex_search`, chosen
without gradient; over all workers with :mod:`.distributed`). It is smallest when every
vertex has K smoothed vectors sitting on it: onehot-like vectors and every entry used.

The selected distances and their gradient are written out (:class:`SelectedVertexDistance`)
so that the backward pass allocates only the gradient itself:

    CE:  dL/dl_n = sum_sel w * (p_n - e_m)
    L2:  dL/dl_n = 2 p_n * (c_n * (p_n - ||p_n||^2) + a_n - B_n)

with, per row n, ``c_n = sum_sel w``, ``a_n = sum_sel w * p_{n,m}`` and
``B_n = sum_sel w * e_m`` (the sums over the selections of row n, ``w`` their weights).
When the smoothing's soft vectors are the KNN input, :class:`SoftmaxWithSelectedDistance`
computes the softmax and the loss in one autograd node and adds these terms into the
softmax's gradient, so the loss keeps no N x G x M tensor of its own.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

from . import distributed
from .rows import as_rows, at_least_float32, check_finite, row_blocks, valid_count, without_autocast
from .vertex_search import (
    AUTO_CHUNK_ELEMENTS,
    VertexSearch,
    VertexSelection,
    check_knn_args,
    row_statistics,
    search_vertices,
)


@dataclass
class RowProbabilities:
    """``p = softmax(l)`` of rows ``(N, G, M)`` in the form a pass holds it: the
    probabilities ``probs``, the log-probabilities ``log_probs``, or the ``logits`` with
    their log-sum-exp ``lse`` ``(N, G)`` (then recomputed where needed). Every value read
    is at least float32."""

    probs: Optional[Tensor] = None
    log_probs: Optional[Tensor] = None
    logits: Optional[Tensor] = None
    lse: Optional[Tensor] = None

    def log_at(self, index: Tensor) -> Tensor:
        """``log p[index[k, g, m], g, m]``, ``(k, G, M)``."""
        if self.log_probs is not None:
            return self.log_probs.gather(0, index)
        return at_least_float32(self.logits.gather(0, index)) - _per_selection(self.lse, index)

    def at(self, index: Tensor) -> Tensor:
        """``p[index[k, g, m], g, m]``, ``(k, G, M)``."""
        if self.probs is not None:
            return self.probs.gather(0, index)
        return self.log_at(index).exp_()

    def of_pairs(self, pairs: Tensor) -> Tensor:
        """A new ``(len(pairs), M)`` tensor of the rows ``row * G + g`` in ``pairs``."""

        def flat(t: Tensor) -> Tensor:
            return t.reshape(-1, t.shape[-1]).index_select(0, pairs)

        if self.probs is not None:
            return flat(self.probs)
        if self.log_probs is not None:
            return flat(self.log_probs).exp_()
        lse = self.lse.view(-1).index_select(0, pairs).unsqueeze(-1)
        return at_least_float32(flat(self.logits)).sub_(lse).exp_()

    def block(self, start: int, stop: int, out: Optional[Tensor] = None) -> Tensor:
        """Rows ``start:stop``, written into ``out`` when given; without ``out`` a view
        where the probabilities are held (not to be changed in place)."""
        if self.probs is not None:
            rows = self.probs[start:stop]
            return rows if out is None else out.copy_(rows)
        if self.log_probs is not None:
            return torch.exp(self.log_probs[start:stop], out=out)
        return torch.sub(self.logits[start:stop], self.lse[start:stop].unsqueeze(-1), out=out).exp_()


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
    a mask that is True at the first selection of each pair.

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


def selected_distance_sum(
    source: RowProbabilities, index: Tensor, weight: Tensor, sq_norm: Optional[Tensor], distance: str
) -> Tensor:
    """``sum_{k,g,m} weight * d(e_m, p[index[k,g,m], g])``; ``sq_norm`` ``(N, G)`` is
    ``||p||^2`` (L2 only)."""
    if distance == "ce":
        dist = -source.log_at(index)
    else:
        dist = 1.0 - 2.0 * source.at(index) + _per_selection(sq_norm, index)
    # a selected padding row (fewer valid rows than k) weighs 0; its CE score in a
    # search's log-probabilities is -inf, so 0 * inf must not turn the sum into NaN
    return torch.where(weight != 0, weight * dist, torch.zeros_like(dist)).sum()


def _row_gradient(
    p: Tensor, c: Tensor, a: Optional[Tensor], sq: Optional[Tensor], distance: str, add_to: Optional[Tensor] = None
) -> Tensor:
    """The dense part of the gradient for rows of probabilities ``p`` ``(R, M)`` with
    their ``c_n``, ``a_n`` and ``||p_n||^2`` ``(R,)``: ``c p`` (CE) or
    ``2 p ((p - ||p||^2) c + a)`` (L2), in place in ``p``, or added to ``add_to``
    (``p`` then unchanged)."""
    if distance == "ce":
        factor, scale = c.unsqueeze(-1), 1.0
    else:
        factor, scale = (p - sq.unsqueeze(-1)).mul_(c.unsqueeze(-1)).add_(a.unsqueeze(-1)), 2.0
    if add_to is not None:
        return add_to.addcmul_(p, factor, value=scale)
    p.mul_(factor)
    return p.mul_(scale) if scale != 1.0 else p


def selected_distance_gradient(
    source: RowProbabilities,
    shape: torch.Size,
    index: Tensor,
    weight: Tensor,
    sq_norm: Optional[Tensor],
    distance: str,
    grad: Optional[Tensor] = None,
) -> Tensor:
    """The gradient of :func:`selected_distance_sum` with respect to the logits (the
    module docstring's equations), for rows of ``shape`` ``(N, G, M)``; ``weight``
    already scaled by the incoming gradient. Added into ``grad`` when given (the
    softmax's own gradient), else a new tensor.

    Only rows that some vertex selected have a gradient. When they are few (N much
    larger than K * M) only those rows are computed; otherwise every row, over blocks.
    """
    n, groups, entries = shape
    row_weight = _sum_per_row(weight, index, n)  # c_n, (N, G)
    chosen_p = None if distance == "ce" else source.at(index)
    sel_p = None if chosen_p is None else _sum_per_row(weight * chosen_p, index, n)  # a_n

    if _sparse_backward(n, index):
        if grad is None:
            grad = torch.zeros(shape, dtype=weight.dtype, device=weight.device)
        pairs, first = _selected_pairs(index, n)
        keep = first.to(weight.dtype)  # a pair's later selections add zero
        c = row_weight.view(-1).index_select(0, pairs) * keep
        a = None if sel_p is None else sel_p.view(-1).index_select(0, pairs) * keep
        sq = None if sq_norm is None else sq_norm.view(-1).index_select(0, pairs)
        extra = _row_gradient(source.of_pairs(pairs), c, a, sq, distance)
        grad.view(n * groups, entries).index_add_(0, pairs, extra)
    else:
        add = grad is not None
        if not add:
            grad = torch.empty(shape, dtype=weight.dtype, device=weight.device)
        for start, stop in row_blocks(grad, AUTO_CHUNK_ELEMENTS):
            a = None if sel_p is None else sel_p[start:stop]
            sq = None if sq_norm is None else sq_norm[start:stop]
            if add:
                _row_gradient(source.block(start, stop), row_weight[start:stop], a, sq, distance, grad[start:stop])
            else:
                _row_gradient(source.block(start, stop, grad[start:stop]), row_weight[start:stop], a, sq, distance)
    # the onehot term: - sum_sel w * e_m (CE), - sum_sel 2 w p_m e_m (L2)
    return grad.scatter_add_(0, index, -weight if chosen_p is None else -2.0 * weight * chosen_p)


class SelectedVertexDistance(torch.autograd.Function):
    """``sum_{k,g,m} weight[k,g,m] * d(e_m, softmax(rows[index[k,g,m], g]))``.

    The neighbour choice ``index`` is a constant. ``search`` (optional) is the
    :class:`~.vertex_search.VertexSearch` that produced ``index``; its per-row
    statistics are reused instead of computed again. The backward pass
    (:func:`selected_distance_gradient`) allocates one N x G x M tensor, the gradient,
    plus temporaries over blocks of rows.
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
        ctx.save_for_backward(rows, index, weight, full, lse, sq_norm)
        ctx.distance = distance
        return selected_distance_sum(_held(rows, full, lse, distance), index, weight, sq_norm, distance)

    @staticmethod
    @once_differentiable
    @without_autocast()
    def backward(ctx, grad_output: Tensor):
        rows, index, weight, full, lse, sq_norm = ctx.saved_tensors
        # The loss is linear in the weights, so the incoming scalar scales them (K*G*M
        # values) rather than the N x G x M gradient.
        source = _held(rows, full, lse, ctx.distance)
        grad = selected_distance_gradient(source, rows.shape, index, weight * grad_output, sq_norm, ctx.distance)
        return grad.to(rows.dtype), None, None, None, None


def _held(rows: Tensor, full: Optional[Tensor], lse: Optional[Tensor], distance: str) -> RowProbabilities:
    """The probabilities of a search: its ``full`` log-probabilities (CE) or
    probabilities (L2) when kept, else the logits with their log-sum-exp."""
    if full is None:
        return RowProbabilities(logits=rows, lse=lse)
    return RowProbabilities(log_probs=full) if distance == "ce" else RowProbabilities(probs=full)


class SoftmaxWithSelectedDistance(torch.autograd.Function):
    """``softmax(rows)`` and ``sum_{k,g,m} w * d(e_m, softmax(rows)[index[k,g,m], g])``
    as one autograd node, for a smoothing whose soft vectors are also the KNN input.

    ``probs`` is ``softmax(rows)`` computed without gradient (it is returned as the
    node's first output), ``search`` and ``weight`` the neighbour choice made from it
    (None when no row is selected). The backward pass adds the KNN terms into the
    softmax gradient in place, so the loss keeps no N x G x M tensor of its own, in
    either pass, beyond the O(N * chunk) of the search: no saved input, no separate
    gradient to accumulate. Probabilities and gradients are at least float32.
    """

    @staticmethod
    def forward(
        ctx, rows: Tensor, probs: Tensor, distance: str, search: Optional[VertexSearch], weight: Optional[Tensor]
    ):
        if search is None:
            total = probs.new_zeros(())
            ctx.save_for_backward(probs, None, None, None)
        else:
            source = RowProbabilities(probs=probs, logits=rows, lse=search.lse)
            total = selected_distance_sum(source, search.index, weight, search.sq_norm, distance)
            ctx.save_for_backward(probs, search.index, weight, search.sq_norm)
        ctx.distance, ctx.input_dtype = distance, rows.dtype
        return probs, total

    @staticmethod
    @once_differentiable
    @without_autocast()
    def backward(ctx, grad_probs: Tensor, grad_total: Tensor):
        probs, index, weight, sq_norm = ctx.saved_tensors
        grad = torch._softmax_backward_data(grad_probs, probs, -1, probs.dtype)
        if index is not None:
            source = RowProbabilities(probs=probs)
            selected_distance_gradient(source, probs.shape, index, weight * grad_total, sq_norm, ctx.distance, grad)
        return grad.to(ctx.input_dtype), None, None, None, None


class KnnVertexLoss:
    """L_KNN with a fixed K, distance and chunking, built once and called every step.

    Args:
        k: neighbours per vertex; with fewer valid rows than ``k``, all valid rows count.
        distance: ``"ce"`` (cross-entropy to the onehot) or ``"l2"`` (squared Euclidean).
        chunk_size: vertices per chunk of the neighbour search, an integer >= 1
            (default: automatic).
        global_: pick each vertex's neighbours from the batch of all workers of
            ``group`` (:mod:`.distributed`); with no process group, or a world of one,
            the local loss.
        group: the process group (default: the whole world).
        check_inputs: raise ValueError on NaN / inf logits. Quantizers inside a training
            loop pass False: with fp16 an overflow must reach fairseq's loss scaler (which
            skips the step), not stop the run, and the check costs a device sync.

    ``loss(logits, mask)`` returns the loss; :meth:`with_softmax` also the softmax, from
    one autograd node. Logits and mask as :func:`knn_vertex_loss`.
    """

    def __init__(
        self,
        k: int = 8,
        distance: str = "ce",
        chunk_size: Optional[int] = None,
        global_: bool = False,
        group=None,
        check_inputs: bool = True,
    ):
        check_knn_args(k, distance, chunk_size)
        self.k, self.distance, self.chunk_size = k, distance, chunk_size
        self.global_, self.group, self.check_inputs = global_, group, check_inputs
        # rows the last neighbour search chose from, a 0-d tensor (no host sync): this
        # process's valid rows, or every worker's when the choice is global
        self.searched_rows: Optional[Tensor] = None

    def __repr__(self) -> str:
        return (
            f"KnnVertexLoss(k={self.k}, distance={self.distance!r}, "
            f"chunk_size={self.chunk_size}, global_={self.global_})"
        )

    def rows(self, logits: Tensor, mask: Optional[Tensor] = None) -> Tuple[Tensor, Optional[Tensor]]:
        """:func:`~.rows.as_rows`, with the finiteness check when ``check_inputs``."""
        rows, valid = as_rows(logits, mask)
        if self.check_inputs:
            check_finite(rows)
        return rows, valid

    def select(self, rows: Tensor, valid: Optional[Tensor] = None, probs: Optional[Tensor] = None) -> VertexSelection:
        """The neighbour choice for rows ``(N, G, M)`` (``probs``: their softmax, when
        held): this process's ``min(k, N)`` nearest rows per vertex, a size from the
        shapes alone, then the choice over all workers when global."""
        k_search = min(self.k, rows.shape[0])
        search = None
        if k_search > 0:
            search = search_vertices(rows, k_search, self.distance, valid, self.chunk_size, probs=probs)
        if self.global_ and distributed.world_size(self.group) > 1:
            selection = distributed.global_vertex_selection(rows, self.k, self.distance, valid, search, self.group)
            self.searched_rows = selection.num_total
            return selection
        self.searched_rows = valid_count(rows, valid)
        return VertexSelection.local(rows, self.k, valid, search)

    @without_autocast()
    def __call__(self, logits: Tensor, mask: Optional[Tensor] = None) -> Tensor:
        rows, valid = self.rows(logits, mask)
        selection = self.select(rows, valid)
        if selection.search is None:
            return selection.loss(at_least_float32(rows).sum() * 0.0)  # keeps a graph
        search = selection.search
        return selection.loss(SelectedVertexDistance.apply(rows, search.index, selection.weight, self.distance, search))

    @without_autocast()
    def with_softmax(self, logits: Tensor, mask: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
        """``(softmax(logits), self(logits, mask))`` in one autograd node
        (:class:`SoftmaxWithSelectedDistance`): the same values and gradients as the
        two apart, with less memory and time. The probabilities have the shape of
        ``logits`` (at least float32)."""
        rows, valid = self.rows(logits, mask)
        rows32 = at_least_float32(rows)
        with torch.no_grad():
            probs = F.softmax(rows32, dim=-1)
        selection = self.select(rows32, valid, probs)
        probs, total = SoftmaxWithSelectedDistance.apply(rows, probs, self.distance, selection.search, selection.weight)
        return probs.view(logits.shape), selection.loss(total)


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
        k, distance, chunk_size, check_inputs: as :class:`KnnVertexLoss`.
        mask: boolean of the position dimensions' shape (``logits.shape[:-2]``, or
            ``logits.shape[:-1]`` for 2-D logits), True where valid. An all-True mask
            gives the value without a mask.

    Returns a scalar (at least float32) whose gradient flows through the selected
    distances only. With fewer valid rows than K, all valid rows count; with none the
    loss is 0.
    """
    return KnnVertexLoss(k, distance, chunk_size, check_inputs=check_inputs)(logits, mask)
