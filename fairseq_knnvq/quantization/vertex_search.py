"""The neighbour search of the KNN loss: the K rows nearest to every simplex vertex.

For rows ``p_n = softmax(l_n)`` of one group and the vertex ``e_m`` (onehot of entry m),
the K nearest rows are

    S_K(m) = top-K_n  c(e_m, p_n),    c_CE = log p_m,    c_L2 = 2 p_m - ||p||^2 = 1 - d_L2,

the closeness ``c`` being larger when ``p_n`` is nearer to ``e_m``. Both come from the
rows in O(N * M) through ``log p_m = l_m - log sum_j exp(l_j)``: no distance matrix
against an identity codebook is built. Invalid rows score -inf. For large M the search
runs over chunks of vertices, so the extra memory is O(N * chunk + K * M) rather than a
second N x M copy. The choice is a constant of the loss: it is made without gradient.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from .rows import at_least_float32, row_blocks, valid_count

KNN_DISTANCES: Tuple[str, ...] = ("ce", "l2")

# Above this many selection scores (N * G * M), the neighbour search is chunked over
# vertices; 2**24 floats are 64 MiB. Also the block budget of the backward passes.
AUTO_CHUNK_ELEMENTS = 1 << 24

# On CPU a top-k along the first axis of an (N, G, C) tensor reads it column by column,
# a stride of G*C values apart; copying a few columns at a time into a contiguous block
# first keeps those reads in cache. Measured on one core, K=8: 30 -> 13 ms at N=4096,
# M=1024 and 121 -> 42 ms at N=16384, M=1024. Blocks of 2**18 values are a little faster
# still on one core, but with several threads every block is a parallel region, and on a
# busy machine each region can wait for a descheduled thread: fewer, larger blocks.
TOPK_BLOCK_ELEMENTS = 1 << 20


def check_knn_args(k: int, distance: str, chunk_size: Optional[int] = None) -> None:
    """K is an integer >= 1, the distance one of :data:`KNN_DISTANCES`, and
    :func:`check_chunk_size`."""
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"knn k must be an integer >= 1, got {k!r}")
    if distance not in KNN_DISTANCES:
        raise ValueError(f"unknown knn distance {distance!r}; choose one of {', '.join(KNN_DISTANCES)}")
    check_chunk_size(chunk_size)


def check_chunk_size(chunk_size: Optional[int], name: str = "chunk_size") -> None:
    """``chunk_size`` (vertices per chunk of the neighbour search) is None or >= 1."""
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(
            f"{name} must be an integer >= 1 (vertices per chunk of the neighbour search) "
            f"or None for automatic chunking, got {chunk_size!r}"
        )


def vertex_closeness(rows: Tensor, lse: Tensor, sq_norm: Optional[Tensor], distance: str) -> Tensor:
    """The closeness ``c`` of rows ``(N, G, C)`` to a chunk of C vertices, from the rows'
    log-sum-exp ``lse`` (and ``||p||^2`` for L2), both ``(N, G)``."""
    log_p = rows - lse.unsqueeze(-1)
    if distance == "ce":
        return log_p
    return 2.0 * log_p.exp_() - sq_norm.unsqueeze(-1)


# How topk_along_rows reads the (N, G, C) scores: "blocked" copies a few columns at a
# time into a contiguous block and takes the top-k along its first axis (the CPU's
# default); "rows_last" copies the scores once into a (G, C, N) tensor and takes the
# top-k along its last, contiguous axis (the default on other devices, where a top-k
# along dim 0 reads every value of a (group, vertex) slice G*C values apart).
TOPK_LAYOUTS: Tuple[str, ...] = ("blocked", "rows_last")


def topk_along_rows(score: Tensor, k: int, layout: Optional[str] = None) -> Tuple[Tensor, Tensor]:
    """``torch.topk(score, k, dim=0, sorted=True)`` of ``(N, G, C)`` scores:
    ``(values, indices)``, each ``(k, G, C)`` and contiguous. ``layout``: one of
    :data:`TOPK_LAYOUTS` (default: ``blocked`` on the CPU, ``rows_last`` elsewhere);
    the values are the same in every layout (the indices too, up to the order among
    tied values, which ``torch.topk`` leaves open). ``rows_last`` makes one copy of
    the scores."""
    if layout is None:
        layout = "blocked" if score.device.type == "cpu" else "rows_last"
    if layout not in TOPK_LAYOUTS:
        raise ValueError(f"unknown top-k layout {layout!r}; choose one of {', '.join(TOPK_LAYOUTS)}")
    n, groups, entries = score.shape
    if layout == "rows_last":
        top = torch.topk(score.permute(1, 2, 0).contiguous(), k, dim=-1, sorted=True)
        return top.values.permute(2, 0, 1).contiguous(), top.indices.permute(2, 0, 1).contiguous()
    width = max(1, TOPK_BLOCK_ELEMENTS // max(1, n * groups))
    if width >= entries:
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


@torch.no_grad()
def row_statistics(rows: Tensor, with_sq_norm: bool) -> Tuple[Tensor, Optional[Tensor]]:
    """``log sum_m exp(l_m)`` and, if asked, ``||softmax(l)||^2``, both ``(N, G)``, computed
    over blocks of rows so that the temporaries stay O(block * G * M)."""
    dtype = at_least_float32(rows).dtype
    lse = torch.empty(rows.shape[:2], dtype=dtype, device=rows.device)
    sq_norm = torch.empty_like(lse) if with_sq_norm else None
    for start, stop in row_blocks(rows, AUTO_CHUNK_ELEMENTS):
        block = at_least_float32(rows[start:stop])
        # log_softmax is one fused kernel (several times faster than logsumexp); at a
        # row's largest logit it equals -log sum exp(l - max), so max(l) - max(log p) is
        # the log-sum-exp with one rounding.
        log_p = F.log_softmax(block, dim=-1)
        lse[start:stop] = block.amax(-1) - log_p.amax(-1)
        if sq_norm is not None:
            sq_norm[start:stop] = log_p.exp_().square_().sum(-1)
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
    """The ``k`` rows nearest to every (group, vertex) of rows ``(N, G, M)``; invalid
    rows (``valid`` False) are chosen only when fewer than ``k`` rows are valid.

    With ``chunk_size`` >= M (default: when N * G * M <= ``AUTO_CHUNK_ELEMENTS``) the
    scores are computed in one piece and kept for the backward pass (at most
    ``AUTO_CHUNK_ELEMENTS`` values). Otherwise the search runs over chunks of vertices
    and the extra memory is O(N * G * chunk + k * G * M).

    ``probs``: ``softmax(rows)`` when the caller has it already (the loss that also
    returns the softmax); the per-row statistics then come from it and the search always
    runs over chunks, keeping nothing of size N * G * M.
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


def selection_weight(search_index: Tensor, valid: Optional[Tensor], dtype: torch.dtype) -> Tensor:
    """1 for every selected row that is valid, else 0, ``(k, G, M)``.

    The search always takes ``min(k, N)`` rows per vertex, a size known without looking
    at the mask (no host sync); invalid rows score -inf and are taken only when fewer
    than ``k`` rows are valid. Their weight 0 leaves them out of value and gradient.
    """
    if valid is None:
        return torch.ones(search_index.shape, dtype=dtype, device=search_index.device)
    return valid.to(dtype)[search_index]


@dataclass
class VertexSelection:
    """The neighbour choice of one batch on one process.

    ``search``: the :class:`VertexSearch` (None when the batch has no row), ``weight``
    ``(k, G, M)``: 1 where a selected row counts, else 0. :meth:`loss` turns the weighted
    sum of the selected distances into L_KNN.
    """

    search: Optional[VertexSearch]
    weight: Optional[Tensor]
    # G * M * K_eff, K_eff = min(k, valid rows) (at least 1); a tensor when it depends
    # on the mask
    normaliser: Union[int, Tensor]

    @classmethod
    @torch.no_grad()
    def local(cls, rows: Tensor, k: int, valid: Optional[Tensor], search: Optional[VertexSearch]) -> "VertexSelection":
        """The choice of ``search`` (the ``min(k, N)`` nearest rows of every vertex among
        rows ``(N, G, M)``, None when N = 0) on this process alone."""
        groups_entries = rows.shape[1] * rows.shape[2]
        if valid is None:
            normaliser = groups_entries * max(1, min(k, rows.shape[0]))
        else:
            count = valid_count(rows, valid).clamp(1, k)
            normaliser = count.to(at_least_float32(rows).dtype) * groups_entries
        weight = None if search is None else selection_weight(search.index, valid, search.closeness.dtype)
        return cls(search, weight, normaliser)

    def loss(self, total: Tensor) -> Tensor:
        """L_KNN from ``total``, the weighted sum of the selected distances (a zero that
        keeps the graph when nothing is selected)."""
        return total / self.normaliser
