"""Codebook metrics from sums that add up across batches and workers.

Averaging per-batch or per-worker perplexities is wrong (perplexity is not linear), so
everything here is kept as sums, :class:`CodeUsage`, that can be added together or
all-reduced, and the metrics are derived once at the end:

- code usage: share of the G*M entries chosen (hard argmax) at least once
- code perplexity: ``sum_g exp(H(counts_g / N))`` of the hard choices
- prob perplexity: ``sum_g exp(H(mean_n p_n))`` of the soft probabilities
- tightness: mean ``max_m p_{n,m}`` and mean ``d_L2`` to the nearest vertex,
  ``1 - 2 max_m p_{n,m} + ||p_n||^2``, of the smoothed vectors
- the usage ceiling: the number of distinct entries that *uniform* use would show for
  the n vectors actually counted, ``sum_g M * (1 - (1 - 1/M)^n)`` (the expected number
  of distinct values among n uniform draws from M), and the share of it reached. With
  n not much larger than M even a perfect codebook cannot show all M entries: 1,000
  uniform draws from 320 entries show about 306.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Dict, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from .diversity import entropy_perplexity, masked_prob_sums
from .rows import STATISTICS_BLOCK_ELEMENTS, as_rows, at_least_float32, row_blocks, without_autocast


@dataclass
class CodeUsage:
    """Summable statistics of one codebook with G groups of M entries.

    ``counts`` (G, M) int64: hard choices per entry. The other fields are optional sums
    over the N vectors: ``prob_sums`` (G, M) of ``softmax(logits)``, ``max_prob_sums``
    (G,) of ``max_m p`` and ``vertex_l2_sums`` (G,) of the distance to the nearest vertex
    for the smoothed vectors ``p``.
    """

    counts: Tensor
    prob_sums: Optional[Tensor] = None
    max_prob_sums: Optional[Tensor] = None
    vertex_l2_sums: Optional[Tensor] = None

    @property
    def groups(self) -> int:
        return self.counts.shape[0]

    @property
    def num_vars(self) -> int:
        """M, entries per group (fairseq's ``num_vars``)."""
        return self.counts.shape[1]

    @classmethod
    @torch.no_grad()
    @without_autocast()
    def from_logits(
        cls,
        logits: Tensor,
        smoothed_logits: Optional[Tensor] = None,
        mask: Optional[Tensor] = None,
    ) -> "CodeUsage":
        """Statistics of one batch: hard codes ``argmax logits``, soft probabilities
        ``softmax(logits)``, tightness of ``softmax(smoothed_logits)`` (default: logits).
        Shapes as for :func:`~fairseq_knnvq.quantization.knn_vertex_loss`."""
        rows, valid = as_rows(logits.detach(), mask)
        counts = count_codes(rows.argmax(-1), rows.shape[2], mask=valid, check=False)
        prob_sums = masked_prob_sums(rows, valid).double()
        smoothed = rows if smoothed_logits is None else as_rows(smoothed_logits.detach(), mask)[0]
        max_prob_sums, vertex_l2_sums = tightness_sums(F.softmax(at_least_float32(smoothed), dim=-1), valid)
        return cls(
            counts=counts,
            prob_sums=prob_sums,
            max_prob_sums=max_prob_sums,
            vertex_l2_sums=vertex_l2_sums,
        )

    def __add__(self, other: "CodeUsage") -> "CodeUsage":
        if self.counts.shape != other.counts.shape:
            raise ValueError(
                f"cannot add usage of codebooks {tuple(self.counts.shape)} and {tuple(other.counts.shape)}"
            )
        summed = {}
        for f in fields(self):
            a, b = getattr(self, f.name), getattr(other, f.name)
            summed[f.name] = None if a is None or b is None else a + b.to(a.device)
        return CodeUsage(**summed)

    def to_flat(self) -> Tensor:
        """All fields in one float64 vector (for a single all-reduce)."""
        parts = [self.counts.double().flatten()]
        for name in ("prob_sums", "max_prob_sums", "vertex_l2_sums"):
            value = getattr(self, name)
            if value is None:
                raise ValueError(f"to_flat needs every field; {name} is missing")
            parts.append(value.double().flatten())
        return torch.cat(parts)

    @classmethod
    def from_flat(cls, flat: Tensor, groups: int, num_vars: int) -> "CodeUsage":
        gm = groups * num_vars
        expected = 2 * gm + 2 * groups
        if flat.numel() != expected:
            raise ValueError(f"expected {expected} values for a {groups}x{num_vars} codebook")
        return cls(
            counts=flat[:gm].round().long().view(groups, num_vars),
            prob_sums=flat[gm : 2 * gm].view(groups, num_vars),
            max_prob_sums=flat[2 * gm : 2 * gm + groups],
            vertex_l2_sums=flat[2 * gm + groups :],
        )

    def all_reduce(self, group=None) -> "CodeUsage":
        """Sums over the workers of ``torch.distributed`` (a no-op in one process).

        Under any backend: the sums travel on the device the group's backend reduces
        on (:func:`collective_device`; NCCL takes CUDA tensors only, while
        ``code_histograms.quantizer_usage`` returns CPU sums) and come back on the device
        of ``counts``."""
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            return self
        flat = self.to_flat()
        home = flat.device
        flat = flat.to(collective_device(dist.get_backend(group), home))
        dist.all_reduce(flat, group=group)
        return CodeUsage.from_flat(flat.to(home), self.groups, self.num_vars)

    def stats(self) -> Dict[str, float]:
        return codebook_stats(self)


# Backends that reduce tensors of one device type only, and that type.
SINGLE_DEVICE_BACKENDS: Dict[str, str] = {"nccl": "cuda", "xccl": "xpu", "hccl": "hpu"}


def collective_device(backend: str, device: torch.device) -> torch.device:
    """The device on which a collective of ``backend`` (the name ``dist.get_backend()``
    gives) takes a tensor that lives on ``device``: ``device`` itself where the backend
    reduces on it (gloo and mpi: CPU and CUDA), else the backend's own device (NCCL:
    the current CUDA device; a per-device backend such as ``cpu:gloo,cuda:nccl``: the
    first device type it names)."""
    backend = str(backend).lower()
    if ":" in backend:
        device_types = [part.split(":", 1)[0].strip() for part in backend.split(",")]
    elif backend in SINGLE_DEVICE_BACKENDS:
        device_types = [SINGLE_DEVICE_BACKENDS[backend]]
    else:
        return device
    if device.type in device_types:
        return device
    device_type = device_types[0]
    if device_type == "cpu":
        return torch.device("cpu")
    return torch.device(device_type, getattr(torch, device_type).current_device())


@torch.no_grad()
@without_autocast()
def tightness_sums(probs: Tensor, valid: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
    """Per-group sums over the valid rows of ``(N, G, M)`` probabilities of ``max_m p``
    and of the squared distance to the nearest vertex, ``1 - 2 max_m p + ||p||^2``.

    ``valid`` ``(N,)`` bool weighs rows instead of indexing them (no host sync); the
    squared norms run over blocks of rows, so no N x G x M temporary is made. Sums in
    at least float32 (half-precision probabilities are read in float32).
    """
    max_p = at_least_float32(probs.amax(-1))  # (N, G)
    sq_norm = torch.empty_like(max_p)
    for start, stop in row_blocks(probs, STATISTICS_BLOCK_ELEMENTS):
        block = at_least_float32(probs[start:stop])
        sq_norm[start:stop] = torch.linalg.vecdot(block, block)
    vertex_l2 = (1.0 - 2.0 * max_p).add_(sq_norm)
    # the sums over the rows in float64, as they are returned: (N, G) values only
    max_p, vertex_l2 = max_p.double(), vertex_l2.double()
    if valid is None:
        return max_p.sum(0), vertex_l2.sum(0)
    weights = valid.to(max_p.dtype)
    return weights @ max_p, weights @ vertex_l2


@torch.no_grad()
@without_autocast()
def tightness_sums_of_logits(rows: Tensor, valid: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
    """:func:`tightness_sums` of ``softmax(rows)`` for logits ``(N, G, M)``, computed over
    blocks of rows so that no N x G x M probability tensor is made."""
    max_sums = torch.zeros(rows.shape[1], dtype=torch.float64, device=rows.device)
    l2_sums = torch.zeros_like(max_sums)
    for start, stop in row_blocks(rows, STATISTICS_BLOCK_ELEMENTS):
        probs = F.softmax(at_least_float32(rows[start:stop]), dim=-1)
        a, b = tightness_sums(probs, None if valid is None else valid[start:stop])
        max_sums += a
        l2_sums += b
    return max_sums, l2_sums


def count_codes(indices: Tensor, num_vars: int, mask: Optional[Tensor] = None, check: bool = True) -> Tensor:
    """Histogram ``(G, M)`` int64 of integer codes ``(N, G)`` (or ``(N,)`` for one group).

    ``mask`` ``(N,)`` bool, True where valid: count only those rows. ``check``: raise ValueError for
    codes outside ``[0, num_vars)`` (reads the codes back to the host; the quantizers
    pass False for their own argmax codes, which are in range by construction). Counts
    by ``scatter_add_`` rather than ``torch.bincount``, which syncs on GPUs.
    """
    if indices.dtype.is_floating_point:
        raise ValueError("code indices must be integers")
    if indices.dim() == 1:
        indices = indices.unsqueeze(1)
    indices = indices.reshape(-1, indices.shape[-1])
    if check and indices.numel() and (int(indices.min()) < 0 or int(indices.max()) >= num_vars):
        raise ValueError(f"code indices must lie in [0, {num_vars})")
    groups = indices.shape[1]
    offsets = torch.arange(groups, device=indices.device) * num_vars
    flat = (indices.long() + offsets).flatten()
    counts = torch.zeros(groups * num_vars, dtype=torch.long, device=indices.device)
    if mask is None:
        ones = torch.ones(1, dtype=torch.long, device=indices.device).expand(flat.numel())
    else:
        if tuple(mask.shape) != (indices.shape[0],):
            raise ValueError(f"mask must have shape ({indices.shape[0]},), got {tuple(mask.shape)}")
        ones = mask.to(device=indices.device, dtype=torch.long).unsqueeze(1).expand(-1, groups).reshape(-1)
    return counts.scatter_add_(0, flat, ones).view(groups, num_vars)


def uniform_usage_ceiling(num_counted: float, num_vars: int) -> float:
    """``M * (1 - (1 - 1/M)^n)``: the expected number of distinct entries among ``n``
    draws from ``M`` equally likely entries (per group; a share, not a hard maximum:
    a run can exceed it by chance)."""
    if num_vars < 1:
        raise ValueError(f"num_vars must be >= 1, got {num_vars}")
    if num_counted <= 0:
        return 0.0
    if num_vars == 1:
        return 1.0
    return num_vars * -math.expm1(num_counted * math.log1p(-1.0 / num_vars))


def codebook_stats(codes: Union[CodeUsage, Tensor], num_vars: Optional[int] = None) -> Dict[str, float]:
    """Codebook metrics.

    ``codes`` is a :class:`CodeUsage`, a count histogram ``(G, M)`` / ``(M,)`` (leave
    ``num_vars`` out), or integer code indices ``(N,)`` / ``(..., G)`` together with
    ``num_vars`` (M). Returns the names the logs use: ``code_usage`` (share of the G*M
    entries used), ``used_codes``, ``num_codes`` (G*M), ``code_perplexity``,
    ``used_codes_ceiling`` (:func:`uniform_usage_ceiling` summed over the groups) and
    ``code_usage_of_ceiling`` (``used_codes / used_codes_ceiling``)
    and, when the soft sums are known, ``prob_perplexity``, ``tightness_max_prob`` and
    ``tightness_vertex_l2``.
    """
    if isinstance(codes, CodeUsage):
        usage = codes
    elif torch.is_tensor(codes):
        if num_vars is None:
            counts = codes if codes.dim() == 2 else codes.reshape(1, -1)
            if codes.dim() not in (1, 2) or codes.dtype.is_floating_point:
                raise ValueError("a count histogram must be an integer tensor (G, M) or (M,)")
            usage = CodeUsage(counts=counts.long())
        else:
            if num_vars < 1:
                raise ValueError(f"num_vars must be >= 1, got {num_vars}")
            usage = CodeUsage(counts=count_codes(codes, num_vars))
    else:
        raise ValueError(f"codes must be a CodeUsage or a tensor, got {type(codes).__name__}")

    counts = usage.counts.double()
    total = counts.sum(-1, keepdim=True)
    used = int((usage.counts > 0).sum())
    out: Dict[str, float] = {
        "code_usage": used / counts.numel(),
        "used_codes": float(used),
        "num_codes": float(counts.numel()),
        "code_perplexity": float(entropy_perplexity(counts / total.clamp_min(1.0))),
    }
    n = float(total[0, 0]) if counts.numel() else 0.0
    ceiling = sum(uniform_usage_ceiling(float(t), usage.num_vars) for t in total.flatten())
    out["used_codes_ceiling"] = ceiling
    out["code_usage_of_ceiling"] = used / ceiling if ceiling > 0 else float("nan")
    if usage.prob_sums is not None and n > 0:
        out["prob_perplexity"] = float(entropy_perplexity(usage.prob_sums.double() / n))
    if usage.max_prob_sums is not None and n > 0:
        out["tightness_max_prob"] = float(usage.max_prob_sums.sum()) / (n * usage.groups)
    if usage.vertex_l2_sums is not None and n > 0:
        out["tightness_vertex_l2"] = float(usage.vertex_l2_sums.sum()) / (n * usage.groups)
    return out
