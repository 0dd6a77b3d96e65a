"""Global KNN across data-parallel workers: each vertex's K nearest smoothed vectors are
picked from the batch of all workers, without gathering that batch.

The exchange. Every worker takes its local top-K candidates per (group, vertex) with
:func:`~.vertex_search.search_vertices` (K * G * M closeness values and their row
indices), all-gathers the closeness values (``world * K * G * M`` floats, plus one count
of valid rows per worker), sorts them per vertex in descending order with a stable sort
(candidates laid out rank-major, so among equal values the lower rank wins), and keeps
the local candidates among the first ``K_eff = min(K, total valid rows)``. Exactly
``K_eff`` rows are kept per vertex over all workers, and they are those that
single-process KNN would pick on the concatenated batch (up to the order among tied
values, which ``torch.topk`` leaves open as well). Communication is
``O(world * K * G * M)`` per step, independent of the number of rows; nothing is
gathered with a gradient, because the selection is a constant of the loss.

Normalisation. Let ``N_r`` be worker r's valid rows, ``N = sum_r N_r``, and
``partial_r = 1 / (G * M * K_eff) * sum`` of the distances of the rows that worker r
kept, so that ``sum_r partial_r`` is the single-process loss ``L`` of the concatenated
batch. Worker r returns

    value:    L                          (the same number on every worker)
    gradient: (N / N_r) * grad partial_r

i.e. ``sum_r (N_r / N) * grad_r = grad L``: the row-weighted mean of the per-worker
gradients is the single-process gradient. This is what fairseq's data-parallel training
computes. In ``Wav2vecCriterion`` (and criteria built on it) worker r's loss is
``loss_r = contrastive_r + lambda * knn_r * s_r`` with ``s_r`` its ``sample_size``;
``legacy_ddp`` all-reduces ``grad / world`` with a SUM, and ``Trainer.train_step`` then
multiplies by ``world / S`` with ``S = sum_r s_r`` (``multiply_grads(numer / sample_size)``
after ``_aggregate_logging_outputs`` summed the sample sizes). The KNN part of the
applied gradient is therefore

    lambda / S * sum_r s_r * grad knn_r = lambda * sum_r (s_r / S) * (N / N_r) * grad partial_r,

which is ``lambda * grad L`` exactly when ``s_r / S = N_r / N``, i.e. when every
worker's sample size is proportional, with one common factor, to the number of rows
it feeds the quantizer. wav2vec 2.0 quantizes exactly the masked frames
(``unmasked_features[mask_indices]``) and its ``sample_size`` is the number of masked
frames, so ``s_r = N_r``. (With ``negatives_from_everywhere`` every frame is quantized
while ``sample_size`` stays the masked count; the ratio then varies slightly between
workers and the gradient is exact only up to it.) The logged value is exact either way:
fairseq logs ``sum_r lambda * knn_r * s_r / S = lambda * L``.

:class:`~.knn.KnnVertexLoss` built with ``global_=True`` makes this selection (both
with and without the softmax in the same autograd node); with no initialised process
group, or a world of one, it makes the local one and is the single-process loss.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist
from torch import Tensor

from .rows import at_least_float32, valid_count
from .vertex_search import VertexSearch, VertexSelection, selection_weight


def world_size(group=None) -> int:
    """Workers in ``group``; 1 when torch.distributed is not initialised."""
    if not (dist.is_available() and dist.is_initialized()):
        return 1
    return dist.get_world_size(group)


def _all_gather(tensor: Tensor, group) -> Tensor:
    """``(world, *tensor.shape)``; no gradient flows through it."""
    parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, tensor.contiguous(), group=group)
    return torch.stack(parts)


@dataclass
class GlobalSelection(VertexSelection):
    """This worker's share of the global neighbour choice.

    ``search`` holds the local candidates (``min(k, N_r)`` per vertex, padding rows
    included) and ``weight`` (same shape as ``search.index``) is 1 where a valid
    candidate made the global cut, else 0. ``normaliser`` is ``G * M * K_eff`` with
    ``K_eff = min(k, N)``; ``value`` is the global loss L, from the closeness of the
    kept rows of every worker. The counts are 0-d tensors on the rows' device, so that
    nothing waits for the device: ``num_local`` / ``num_total`` are this worker's / all
    workers' valid rows.
    """

    value: Tensor
    num_local: Tensor
    num_total: Tensor

    def loss(self, total: Tensor) -> Tensor:
        """The value L with the gradient of ``(N / N_r) * partial_r``, from this worker's
        ``total`` of selected distances (a zero that keeps the graph when it has no
        rows); 0 when no worker has a valid row."""
        if self.search is None:
            return total + self.value
        num_local = self.num_local.to(total.dtype).clamp_min(1)  # no valid row: total is 0
        scaled = total * (self.num_total.to(total.dtype) / (num_local * self.normaliser))
        # the forward value is the global loss, the gradient that of the scaled local part
        return scaled + (self.value - scaled.detach())


@torch.no_grad()
def global_vertex_selection(
    rows: Tensor, k: int, distance: str, valid: Optional[Tensor], search: Optional[VertexSearch], group=None
) -> GlobalSelection:
    """The top-K candidate exchange (see the module docstring) for rows ``(N, G, M)``,
    from this worker's ``search`` of its ``min(k, N)`` nearest rows per vertex (None
    when N = 0).

    Every worker of ``group`` must call it, with the same G, M, k and distance. Every
    size here comes from the shapes (K candidates per vertex from each worker, -inf
    where a worker has fewer valid rows), never from the mask's contents: no host sync.
    """
    _, groups, entries = rows.shape
    dtype = at_least_float32(rows).dtype
    num_local = valid_count(rows, valid)
    num_total = _all_gather(num_local.view(1), group).sum()

    # Local candidates, padded to k with -inf. Padding and invalid rows (-inf closeness)
    # are never kept where real candidates remain, and weigh 0 where they are kept
    # because fewer than k rows are valid over all workers.
    candidates = torch.full((k, groups, entries), float("-inf"), dtype=dtype, device=rows.device)
    if search is not None:
        candidates[: search.index.shape[0]] = search.closeness
    gathered = _all_gather(candidates, group)  # (world, k, G, M)
    world = gathered.shape[0]
    ordered = torch.sort(gathered.view(world * k, groups, entries), dim=0, descending=True, stable=True)
    kept = torch.zeros(world * k, groups, entries, dtype=torch.bool, device=rows.device)
    kept.scatter_(0, ordered.indices[:k], True)
    top = ordered.values[:k]
    # closeness is finite for every valid row of finite logits, -inf for the others;
    # it is log p_m (CE) or 1 - d_L2 (L2)
    closeness_sum = torch.where(top > float("-inf"), top, torch.zeros_like(top)).sum()

    weight = None
    if search is not None:
        rank = dist.get_rank(group)
        mine = kept.view(world, k, groups, entries)[rank, : search.index.shape[0]].to(dtype)
        weight = mine * selection_weight(search.index, valid, dtype)
    k_eff = num_total.clamp(max=k).to(dtype)
    normaliser = groups * entries * k_eff.clamp_min(1)
    if distance == "ce":
        kept_distances = -closeness_sum
    else:
        kept_distances = groups * entries * k_eff - closeness_sum
    return GlobalSelection(search, weight, normaliser, kept_distances / normaliser, num_local, num_total)
