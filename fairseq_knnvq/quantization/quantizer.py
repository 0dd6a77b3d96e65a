"""Quantizers: the KNN-regularised smoothed quantizer and the classic VQ-VAE baseline.

:class:`SmoothedVectorQuantizer` is a drop-in for fairseq's ``GumbelVectorQuantizer``:
same constructor arguments first, same parameter names (so state dicts load), same
forward keys. Per group g it computes logits ``l = W z + b``, a smoothed code-selection
vector ``p`` on the simplex (:mod:`.smoothing`) and the quantized vector ``q_g = p^T C_g``
as a matrix product (fairseq instead multiplies an N x G*M x d broadcast and sums it).
"""

from __future__ import annotations

import dataclasses
import itertools
from typing import Any, Dict, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

from .diversity import (
    entropy_perplexity,
    gumbel_softmax_and_mean_probs,
    masked_mean_probs,
    masked_prob_sums,
    perplexity_and_diversity,
    redraws_noise_on,
    tempered_softmax_and_mean_probs,
)
from .knn import KnnVertexLoss
from .metrics import CodeUsage, count_codes, tightness_sums, tightness_sums_of_logits
from .smoothing import (
    TemperatureSchedule,
    TemperatureSpec,
    check_smoothing,
    select_codes,
    smooth,
    smoothed_logits_of,
)
from .rows import at_least_float32, without_autocast
from .vertex_search import AUTO_CHUNK_ELEMENTS, check_chunk_size

REGULARIZERS = ("knn", "diversity", "none")
KNN_INPUTS = ("smoothed", "probs")


def _check_choice(name: str, value: str, choices: Sequence[str]) -> str:
    if value not in choices:
        raise ValueError(f"unknown {name} {value!r}; choose one of {', '.join(choices)}")
    return value


class StraightThroughCodewords(torch.autograd.Function):
    """``q_g = (onehot(index) - sg(soft) + soft) C_g`` per group without forming the
    straight-through selection: the forward value is the chosen codeword times the
    selection's value at ``index`` (``(1 - s) + s``, 1 up to rounding, exactly as the
    N x M form rounds it); the backward pass gives ``soft`` the gradient of the selection,
    ``grad_q C^T``, and the codebook ``sum_n w_n grad_q[n]`` over the rows that chose
    each entry. Saves ``index`` (N x G) and the weights, not an N x G x M tensor.

    ``soft`` ``(N, G, M)``, ``index`` ``(N, G)``, ``codebooks`` ``(G, M, d)``; returns
    ``(G, N, d)`` in the codebooks' dtype. The backward pass sums in at least float32
    (a half-precision codebook gets the float32 sum rounded once, as fairseq's
    float32 reductions give it) and returns the gradients in the inputs' dtypes.
    """

    @staticmethod
    def forward(ctx, soft: Tensor, index: Tensor, codebooks: Tensor) -> Tensor:
        s = soft.gather(-1, index.unsqueeze(-1)).squeeze(-1)  # (N, G)
        weight = ((1.0 - s) + s).to(codebooks.dtype).t()  # (G, N)
        gather_index = index.t().unsqueeze(-1).expand(-1, -1, codebooks.shape[-1])  # (G, N, d)
        chosen = codebooks.gather(1, gather_index)
        ctx.save_for_backward(index, weight, codebooks)
        ctx.soft_dtype = soft.dtype
        return chosen * weight.unsqueeze(-1)

    @staticmethod
    @once_differentiable
    @without_autocast()
    def backward(ctx, grad_q: Tensor):
        index, weight, codebooks = ctx.saved_tensors
        grad_soft = grad_codebooks = None
        grad_q = at_least_float32(grad_q)
        if ctx.needs_input_grad[0]:
            codebooks32 = codebooks.to(grad_q.dtype)
            grad_soft = torch.bmm(grad_q, codebooks32.transpose(1, 2)).transpose(0, 1).to(ctx.soft_dtype)
        if ctx.needs_input_grad[2]:
            gather_index = index.t().unsqueeze(-1).expand(-1, -1, codebooks.shape[-1])
            summed = grad_q.new_zeros(codebooks.shape).scatter_add_(
                1, gather_index, grad_q * weight.to(grad_q.dtype).unsqueeze(-1)
            )
            grad_codebooks = summed.to(codebooks.dtype)
        return grad_soft, None, grad_codebooks


@dataclasses.dataclass
class SmoothedChoice:
    """What the smoothing chose for one batch (:meth:`SmoothedVectorQuantizer._choose`).

    ``selection`` is the (N, G, M) vector that multiplies the codebook; on the
    straight-through path (``gumbel_hard``, ``ste`` in training) it stays None and
    ``hard_index`` (N, G) with ``soft`` (the softmax of the smoothed logits) make the
    codeword. ``soft`` is also set where a node already holds that softmax, for the
    tightness statistics. ``avg_probs`` is the batch-mean ``softmax(l)`` (G, M) and
    ``prob_sums`` its sum over the valid rows; ``knn_loss`` is set when the KNN loss was
    fused with the softmax."""

    selection: Optional[Tensor] = None
    hard_index: Optional[Tensor] = None
    soft: Optional[Tensor] = None
    smoothed_logits: Optional[Tensor] = None
    avg_probs: Optional[Tensor] = None
    prob_sums: Optional[Tensor] = None
    knn_loss: Optional[Tensor] = None

    def codes(self) -> Tensor:
        """The hard code of every row and group, (N, G)."""
        return self.hard_index if self.hard_index is not None else self.selection.argmax(-1)


class CodebookIndexing:
    """fairseq's helpers over the V**G combined codewords (used for codebook negatives)."""

    vars: Tensor
    groups: int
    num_vars: int
    combine_groups: bool

    def get_codebook_indices(self) -> Tensor:
        if getattr(self, "codebook_indices", None) is None:
            combos = torch.tensor(
                list(itertools.product(range(self.num_vars), repeat=self.groups)),
                dtype=torch.long,
                device=self.vars.device,
            )
            if not self.combine_groups:
                combos = combos + torch.arange(self.groups, device=combos.device) * self.num_vars
            self.codebook_indices = combos.flatten()
        return self.codebook_indices

    def codebook(self) -> Tensor:
        indices = self.get_codebook_indices()
        return self.vars.squeeze(0).index_select(0, indices).view(self.num_vars**self.groups, -1)

    def sample_from_codebook(self, b: int, n: int) -> Tensor:
        indices = self.get_codebook_indices().view(-1, self.groups)
        if n >= indices.size(0):
            raise ValueError(f"sample size {n} is not smaller than the codebook ({indices.size(0)})")
        chosen = indices[torch.randint(low=0, high=indices.size(0), size=(b * n,))]
        return self.vars.squeeze(0).index_select(0, chosen.flatten()).view(b, n, -1)

    def to_codebook_index(self, indices: Tensor) -> Tensor:
        result = indices.new_zeros(indices.shape[:-1])
        for i in range(self.groups):
            result += indices[..., i] * (self.num_vars ** (self.groups - i - 1))
        return result


class SmoothedVectorQuantizer(CodebookIndexing, nn.Module):
    """Smoothed vector quantizer with a choice of smoothing and regulariser.

    Args (fairseq's ``GumbelVectorQuantizer`` first):
        dim: input channels.
        num_vars: entries per group (M).
        temp: ``(start, end, decay)`` temperature schedule per update.
        groups: G; the output concatenates one codeword per group.
        combine_groups: share one codebook between the groups.
        vq_dim: output dimension (divisible by ``groups``); default ``dim``.
        time_first: input ``(B, T, C)`` if True, else ``(B, C, T)``.
        activation, weight_proj_depth, weight_proj_factor: the logit projection.
        hard: fairseq's flag; only used when ``smoothing`` is None
            (True -> ``gumbel_hard``, False -> ``gumbel``).
        std: codebook init, ``uniform_`` if 0 else ``normal_(0, std)``.
        smoothing: ``softmax``, ``gumbel``, ``gumbel_hard`` or ``ste``.
        regularizer: ``knn``, ``diversity`` (wav2vec 2.0) or ``none``.
        knn_k, knn_distance: K and ``ce`` / ``l2`` of the KNN loss.
        knn_input: ``smoothed`` (the vector used in the forward pass, e.g. the Gumbel
            sample) or ``probs`` (the noise-free ``softmax(l / tau)``).
        knn_global: pick each vertex's neighbours from the batch of all workers.
        knn_chunk_size: vertices per chunk of the neighbour search, an integer >= 1
            (default automatic).
        track_knn_loss: also report a detached KNN loss when the regulariser is not KNN,
            so criteria can be compared on it.

    ``forward(x, produce_targets=False, mask=None)`` (``mask``: ``(B, T)`` bool, True
    where valid) returns fairseq's keys ``x``, ``num_vars``, ``code_perplexity``,
    ``prob_perplexity``, ``temp`` (and ``targets``), plus ``diversity_loss`` (with
    gradient only when it is the regulariser in training), ``knn_loss`` (when the
    regulariser is KNN or ``track_knn_loss``, with ``knn_rows`` and
    ``knn_rows_per_vertex``: the rows its neighbour search chose from, and those over
    ``K * M``) and ``usage_sums`` (:class:`CodeUsage`, the summable statistics of the
    batch; ``usage_sums.counts`` is the (G, M) histogram of the hard codes).
    An empty batch (B or T = 0) or one without a valid position gives correctly shaped
    empty outputs and zero losses.

    A training step reads nothing back to the host (no ``.item()``, ``nonzero()``,
    boolean indexing or ``bincount``; ``tests/core/test_host_sync.py``), and keeps no
    N x G x M tensor beyond those its gradient needs: statistics for the logs are taken
    without gradient over blocks of rows or from a softmax the step holds anyway.
    """

    def __init__(
        self,
        dim: int,
        num_vars: int,
        temp: TemperatureSpec = (2.0, 0.5, 0.999995),
        groups: int = 2,
        combine_groups: bool = False,
        vq_dim: Optional[int] = None,
        time_first: bool = True,
        activation: nn.Module = nn.GELU(),
        weight_proj_depth: int = 1,
        weight_proj_factor: int = 1,
        hard: bool = True,
        std: float = 0,
        *,
        smoothing: Optional[str] = None,
        regularizer: str = "knn",
        knn_k: int = 8,
        knn_distance: str = "ce",
        knn_input: str = "smoothed",
        knn_global: bool = False,
        knn_chunk_size: Optional[int] = None,
        track_knn_loss: bool = True,
    ):
        super().__init__()
        vq_dim = dim if vq_dim is None else vq_dim
        for name, value in (("dim", dim), ("num_vars", num_vars), ("groups", groups), ("vq_dim", vq_dim)):
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        if vq_dim % groups:
            raise ValueError(f"vq_dim {vq_dim} must be divisible by groups {groups}")
        self.smoothing = check_smoothing(smoothing if smoothing is not None else ("gumbel_hard" if hard else "gumbel"))
        self.regularizer = _check_choice("regularizer", regularizer, REGULARIZERS)
        self.knn_input = _check_choice("knn_input", knn_input, KNN_INPUTS)
        check_chunk_size(knn_chunk_size, "knn_chunk_size")
        # No finiteness check in the loss (why: KnnVertexLoss's check_inputs).
        self.knn = KnnVertexLoss(knn_k, knn_distance, knn_chunk_size, global_=knn_global, check_inputs=False)
        self.track_knn_loss = track_knn_loss

        self.groups = groups
        self.combine_groups = combine_groups
        self.input_dim = dim
        self.num_vars = num_vars
        self.time_first = time_first

        # Parameter names, shapes and initialisation order follow fairseq, so a seeded
        # construction gives the same weights and stock state dicts load.
        num_codebooks = 1 if combine_groups else groups
        self.vars = nn.Parameter(torch.empty(1, num_codebooks * num_vars, vq_dim // groups))
        if std == 0:
            nn.init.uniform_(self.vars)
        else:
            nn.init.normal_(self.vars, mean=0, std=std)
        if weight_proj_depth > 1:
            inner_dim = dim * weight_proj_factor
            self.weight_proj = nn.Sequential(
                *[
                    nn.Sequential(nn.Linear(dim if i == 0 else inner_dim, inner_dim), activation)
                    for i in range(weight_proj_depth - 1)
                ],
                nn.Linear(inner_dim, groups * num_vars),
            )
        else:
            self.weight_proj = nn.Linear(dim, groups * num_vars)
            nn.init.normal_(self.weight_proj.weight, mean=0, std=1)
            nn.init.zeros_(self.weight_proj.bias)

        self.tau_schedule = TemperatureSchedule.parse(temp)
        self.curr_temp = self.tau_schedule.start  # fairseq's name for the current tau
        self.codebook_indices = None

    def set_num_updates(self, num_updates: int) -> None:
        """Called by fairseq's trainer through ``BaseFairseqModel.set_num_updates``."""
        self.curr_temp = self.tau_schedule(num_updates)

    def extra_repr(self) -> str:
        return (
            f"groups={self.groups}, num_vars={self.num_vars}, smoothing={self.smoothing}, "
            f"regularizer={self.regularizer}, knn_k={self.knn.k}, "
            f"knn_distance={self.knn.distance}, knn_input={self.knn_input}"
        )

    def _codebooks(self) -> Tensor:
        """``(G, M, d)``: one codebook per group."""
        vars = self.vars.view(-1, self.num_vars, self.vars.shape[-1])
        return vars.expand(self.groups, -1, -1) if self.combine_groups else vars

    def forward(self, x: Tensor, produce_targets: bool = False, mask: Optional[Tensor] = None) -> Dict[str, Any]:
        if x.dim() != 3:
            raise ValueError(f"expected input (B, T, C) when time_first else (B, C, T), got {tuple(x.shape)}")
        if not self.time_first:
            x = x.transpose(1, 2)
        bsz, tsz, fsz = x.shape
        if fsz != self.input_dim:
            raise ValueError(f"expected {self.input_dim} input channels, got {fsz}")
        if mask is not None and tuple(mask.shape) != (bsz, tsz):
            raise ValueError(f"mask must have shape {(bsz, tsz)}, got {tuple(mask.shape)}")
        # the projection runs in the caller's precision (autocast included); everything
        # after it in at least float32 with autocast off (_quantize_logits)
        logits = self.weight_proj(x.reshape(-1, fsz)).view(bsz * tsz, self.groups, self.num_vars)
        return self._quantize_logits(logits, bsz, tsz, mask, produce_targets)

    @without_autocast()
    def _quantize_logits(
        self, logits: Tensor, bsz: int, tsz: int, mask: Optional[Tensor], produce_targets: bool
    ) -> Dict[str, Any]:
        """:meth:`forward` from the logits ``(B*T, G, M)`` on, in named steps: the hard
        codes' counts, the smoothing's choice (:meth:`_choose`), the losses, the statistics
        for the logs and the quantized vectors. The same values with and without an
        enclosing ``torch.autocast``. Nothing here reads a value back to the host (no
        .item(), nonzero() or boolean indexing): the mask enters as weights and every size
        comes from the shapes."""
        flat_mask = None if mask is None else mask.reshape(-1)
        logits32 = logits.float()
        with torch.no_grad():
            counts = count_codes(logits.argmax(-1), self.num_vars, mask=flat_mask, check=False)
        num_counted = counts[0].sum()  # valid rows, a 0-d tensor
        choice = self._choose(logits32, flat_mask, num_counted)
        result: Dict[str, Any] = {
            "num_vars": self.num_vars * self.groups,
            "code_perplexity": entropy_perplexity(counts.float() / num_counted.clamp_min(1)),
            "temp": self.curr_temp,
            **self._losses(choice, logits32, flat_mask, num_counted),
        }
        result["usage_sums"] = self._usage_sums(choice, counts, logits32, flat_mask)
        if produce_targets:
            result["targets"] = choice.codes().view(bsz, tsz, self.groups).detach()
        result["x"] = self._quantized(choice, bsz, tsz)
        return result

    def _choose(self, logits32: Tensor, flat_mask: Optional[Tensor], num_counted: Tensor) -> "SmoothedChoice":
        """The smoothing's choice for every row and group, and the batch-mean ``softmax(l)``.

        Fused autograd nodes keep the step from holding N x G x M tensors of its own: the
        KNN loss on the smoothing's own soft vectors computes softmax and loss in one node
        (``SoftmaxWithSelectedDistance``; ``knn_loss`` is then set here); the diversity
        loss with a noise-free smoothing computes ``softmax(l / tau)`` and the batch mean
        in one node (``TemperedSoftmaxWithMeanProbs``), with a Gumbel smoothing the noisy
        softmax and the batch mean (``GumbelSoftmaxWithMeanProbs``, which redraws the
        noise in its backward pass; CPU and CUDA); ``gumbel_hard`` and ``ste`` in
        training keep the hard index and the soft vector (``StraightThroughCodewords``
        makes the codeword), not the straight-through selection."""
        tau = self.curr_temp
        train_diversity = self.regularizer == "diversity" and torch.is_grad_enabled()
        fused_diversity = self.training and train_diversity and self.smoothing in ("softmax", "ste")
        noisy_diversity = (
            self.training
            and train_diversity
            and self.smoothing in ("gumbel", "gumbel_hard")
            and redraws_noise_on(logits32.device)
        )
        straight = self.training and self.smoothing in ("gumbel_hard", "ste")
        choice = SmoothedChoice()
        # The batch-mean probabilities, before the smoothing's tensors exist: with gradient
        # for the diversity loss (unless its fused node computes them), else a log-only
        # statistic summed over blocks of rows without gradient.
        if not train_diversity:
            with torch.no_grad():
                choice.prob_sums = masked_prob_sums(logits32.detach(), flat_mask)
            choice.avg_probs = choice.prob_sums / num_counted.clamp_min(1)
        elif not (fused_diversity or noisy_diversity):
            choice.avg_probs = masked_mean_probs(logits32, flat_mask)

        if self.training and self.regularizer == "knn" and self.knn_input == "smoothed":
            choice.smoothed_logits = smoothed_logits_of(logits32, self.smoothing, tau)
            choice.soft, choice.knn_loss = self.knn.with_softmax(choice.smoothed_logits, flat_mask)
        elif fused_diversity:
            choice.soft, choice.avg_probs = tempered_softmax_and_mean_probs(logits32, tau, flat_mask)
        elif noisy_diversity:
            choice.soft, choice.avg_probs, choice.smoothed_logits = gumbel_softmax_and_mean_probs(
                logits32, tau, flat_mask
            )
        elif straight:
            choice.smoothed_logits = smoothed_logits_of(logits32, self.smoothing, tau)
            choice.soft = F.softmax(choice.smoothed_logits, dim=-1)
        else:
            choice.selection, choice.smoothed_logits = smooth(logits32, self.smoothing, tau, self.training)
            if self.training and self.smoothing in ("softmax", "gumbel"):
                choice.soft = choice.selection  # the soft vector itself multiplies the codebook
        if straight:
            choice.hard_index = (choice.smoothed_logits if self.smoothing == "gumbel_hard" else logits32).argmax(-1)
        elif choice.selection is None:
            choice.selection = select_codes(choice.soft, choice.smoothed_logits, logits32, self.smoothing)
        if train_diversity:
            choice.prob_sums = choice.avg_probs.detach() * num_counted
        return choice

    def _knn_input(self, choice: "SmoothedChoice", logits32: Tensor) -> Tensor:
        """The logits whose softmax the KNN loss (and the tightness) measures."""
        if self.knn_input == "smoothed" and choice.smoothed_logits is not None:
            return choice.smoothed_logits
        return logits32 / self.curr_temp  # also the smoothed logits of softmax and ste

    def _losses(
        self, choice: "SmoothedChoice", logits32: Tensor, flat_mask: Optional[Tensor], num_counted: Tensor
    ) -> Dict[str, Any]:
        """``prob_perplexity`` and ``diversity_loss`` (with gradient only when it trains:
        ``avg_probs`` is detached otherwise; 0 without a valid row, like the KNN loss, with
        no sync on the mask), and ``knn_loss`` with ``knn_rows``, the rows its neighbour
        search chose from (every worker's with ``knn_global``), and ``knn_rows_per_vertex``,
        rows / (K * M), below 1 when K * M exceeds them."""
        losses: Dict[str, Any] = {}
        losses["prob_perplexity"], losses["diversity_loss"] = perplexity_and_diversity(
            choice.avg_probs, num_counted if flat_mask is not None or logits32.shape[0] == 0 else None
        )
        knn_loss = choice.knn_loss
        if self.regularizer == "knn" and knn_loss is None:
            knn_loss = self.knn(self._knn_input(choice, logits32), flat_mask)
        elif self.regularizer != "knn" and self.track_knn_loss:
            with torch.no_grad():
                knn_loss = self.knn(self._knn_input(choice, logits32), flat_mask)
        if knn_loss is not None:
            losses["knn_loss"] = knn_loss
            losses["knn_rows"] = self.knn.searched_rows
            losses["knn_rows_per_vertex"] = self.knn.searched_rows / float(self.knn.k * self.num_vars)
        return losses

    @torch.no_grad()
    def _usage_sums(
        self, choice: "SmoothedChoice", counts: Tensor, logits32: Tensor, flat_mask: Optional[Tensor]
    ) -> CodeUsage:
        """The batch's summable statistics for the logs. The tightness of the KNN input
        comes from a softmax some node already holds when it is that input, else over
        blocks of rows (no N x G x M copy)."""
        if choice.soft is not None and (self.knn_input == "smoothed" or self.smoothing in ("softmax", "ste")):
            max_prob_sums, vertex_l2_sums = tightness_sums(choice.soft.detach(), flat_mask)
        else:
            max_prob_sums, vertex_l2_sums = tightness_sums_of_logits(
                self._knn_input(choice, logits32).detach(), flat_mask
            )
        return CodeUsage(
            counts=counts,
            prob_sums=choice.prob_sums.detach().double(),
            max_prob_sums=max_prob_sums,
            vertex_l2_sums=vertex_l2_sums,
        )

    def _quantized(self, choice: "SmoothedChoice", bsz: int, tsz: int) -> Tensor:
        """The output: per group the codeword of the hard choice with the soft vector's
        gradient (straight-through), else ``p^T C``."""
        codebooks = self._codebooks()
        if choice.hard_index is not None:
            quantized = StraightThroughCodewords.apply(choice.soft, choice.hard_index, codebooks)
        else:
            # (G, BT, M) @ (G, M, d) -> (G, BT, d), summed in the selection's dtype (at
            # least float32) for every codebook dtype
            selection = choice.selection
            quantized = torch.bmm(selection.transpose(0, 1), codebooks.to(selection.dtype)).to(codebooks.dtype)
        quantized = quantized.transpose(0, 1).reshape(bsz, tsz, self.groups * codebooks.shape[-1])
        return quantized if self.time_first else quantized.transpose(1, 2)

    def forward_idx(self, x: Tensor):
        res = self.forward(x, produce_targets=True)
        return res["x"], res["targets"]


class VQVAEQuantizer(nn.Module):
    """Classic VQ-VAE quantizer (van den Oord et al. 2017), the straight-through baseline.

    Each of G groups of the input picks its nearest codeword ``e = argmin ||z - e_m||``;
    the output is ``z + sg(e - z)`` (straight-through), or with ``rotation_trick`` the
    rotated and rescaled ``z`` of Fifty et al. (2024), which equals ``e`` in the forward
    pass and carries the angle between z and e into the gradient. Losses:
    ``codebook_loss = ||sg(z) - e||^2``, ``commitment_loss = ||z - sg(e)||^2`` and
    ``vq_loss = codebook_loss + beta * commitment_loss``.

    ``forward(z)`` takes ``(..., dim)`` and returns ``x`` (same shape and dtype),
    ``targets`` ``(..., G)``, the losses, ``num_vars``, ``code_perplexity`` and
    ``usage_sums`` (:class:`CodeUsage`).

    Precision: the code search, the losses and the codebook's gradient are computed in
    at least float32 whatever the dtype of ``z`` and of the codebook, with autocast off
    (:func:`nearest_codes`); only ``x`` is returned in ``z``'s dtype.
    """

    def __init__(
        self,
        dim: int,
        num_vars: int,
        groups: int = 1,
        beta: float = 0.25,
        rotation_trick: bool = False,
    ):
        super().__init__()
        if dim < 1 or num_vars < 1 or groups < 1:
            raise ValueError("dim, num_vars and groups must be >= 1")
        if dim % groups:
            raise ValueError(f"dim {dim} must be divisible by groups {groups}")
        self.dim, self.num_vars, self.groups = dim, num_vars, groups
        self.beta, self.rotation_trick = beta, rotation_trick
        self.codebooks = nn.Parameter(torch.empty(groups, num_vars, dim // groups))
        nn.init.uniform_(self.codebooks, -1.0 / num_vars, 1.0 / num_vars)

    def extra_repr(self) -> str:
        return (
            f"dim={self.dim}, num_vars={self.num_vars}, groups={self.groups}, "
            f"beta={self.beta}, rotation_trick={self.rotation_trick}"
        )

    @staticmethod
    def rotate_to(z: Tensor, e: Tensor, eps: float = 1e-8) -> Tensor:
        """``lambda * R z`` with R the rotation taking z's direction onto e's and
        ``lambda = ||e|| / ||z||``, both treated as constants: equals e in value."""
        z_norm = z.norm(dim=-1, keepdim=True).clamp_min(eps)
        e_norm = e.norm(dim=-1, keepdim=True).clamp_min(eps)
        z_hat, e_hat = (z / z_norm).detach(), (e / e_norm).detach()
        r = z_hat + e_hat
        r = r / r.norm(dim=-1, keepdim=True).clamp_min(eps)
        # R = I - 2 r r^T + 2 e_hat z_hat^T, applied without forming the matrix.
        rotated = z - 2.0 * r * (r * z).sum(-1, keepdim=True) + 2.0 * e_hat * (z_hat * z).sum(-1, keepdim=True)
        return rotated * (e_norm / z_norm).detach()

    @without_autocast()
    def forward(self, z: Tensor) -> Dict[str, Any]:
        if z.dim() < 2 or z.shape[-1] != self.dim:
            raise ValueError(f"expected input (..., {self.dim}), got {tuple(z.shape)}")
        # No finiteness check (why: KnnVertexLoss's check_inputs).
        lead, input_dtype = z.shape[:-1], z.dtype
        z = at_least_float32(z)
        zg = z.reshape(-1, self.groups, self.dim // self.groups).transpose(0, 1)  # (G, N, d)
        # a half-precision codebook is read in float32: its gradient (the gather's
        # scatter-add over the rows) is summed in float32 and rounded once
        codebooks = self.codebooks.to(z.dtype)
        codes = nearest_codes(zg.detach(), codebooks.detach())  # (G, N)
        chosen = torch.gather(codebooks, 1, codes.unsqueeze(-1).expand(-1, -1, codebooks.shape[-1]))  # (G, N, d)
        if zg.numel():
            codebook_loss = F.mse_loss(chosen, zg.detach())
            commitment_loss = F.mse_loss(zg, chosen.detach())
        else:  # an empty batch: zero losses (a mean over nothing would be NaN)
            codebook_loss = commitment_loss = (chosen.sum() + zg.sum()) * 0.0
        if self.rotation_trick:
            out = self.rotate_to(zg, chosen.detach())
        else:
            out = zg + (chosen - zg).detach()
        counts = count_codes(codes.t(), self.num_vars, check=False)
        code_perplexity = entropy_perplexity(counts.float() / max(1, codes.shape[1]))
        return {
            "x": out.transpose(0, 1).reshape(*lead, self.dim).to(input_dtype),
            "targets": codes.t().reshape(*lead, self.groups),
            "num_vars": self.num_vars * self.groups,
            "codebook_loss": codebook_loss,
            "commitment_loss": commitment_loss,
            "vq_loss": codebook_loss + self.beta * commitment_loss,
            "code_perplexity": code_perplexity,
            # a hard choice is its own smoothed vector: onehot, max p = 1, on a vertex
            "usage_sums": CodeUsage(
                counts=counts,
                prob_sums=counts.double(),
                max_prob_sums=counts.sum(-1).double(),
                vertex_l2_sums=torch.zeros(self.groups, dtype=torch.float64, device=counts.device),
            ),
        }


@torch.no_grad()
def nearest_codes(z: Tensor, codebooks: Tensor, block_elements: int = AUTO_CHUNK_ELEMENTS) -> Tensor:
    """``argmin_m ||z_n - e_m||^2`` per group, ``(G, N)``, for ``z`` ``(G, N, d)`` and
    ``codebooks`` ``(G, M, d)``.

    Computed as ``argmin_m (||e_m||^2 - 2 z_n . e_m)`` in at least float32 (the
    ``||z_n||^2`` term is the same for every m): with it, and in fp16, ``||z||^2 ~ 30``
    rounds away differences of ``2 z.e ~ 1e-4`` between codes and every row picks the
    first code. Over blocks of rows, so that the distances take at most
    ``block_elements`` values at a time.
    """
    dtype = at_least_float32(z).dtype
    z, codebooks = z.to(dtype), codebooks.to(dtype)
    groups, n, _ = z.shape
    entries = codebooks.shape[1]
    sq_norms = codebooks.pow(2).sum(-1).unsqueeze(1)  # (G, 1, M)
    codes = torch.empty((groups, n), dtype=torch.long, device=z.device)
    block = max(1, block_elements // max(1, groups * entries))
    for start in range(0, n, block):
        stop = min(n, start + block)
        dist = torch.baddbmm(sq_norms, z[:, start:stop], codebooks.transpose(1, 2), alpha=-2.0)
        codes[:, start:stop] = dist.argmin(-1)
    return codes
