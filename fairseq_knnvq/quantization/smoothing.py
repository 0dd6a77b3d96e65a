"""Smoothed code selection: logits -> a point on the probability simplex.

For one group with logits ``l`` (M entries) and temperature ``tau``:

    softmax:      p = softmax(l / tau)
    gumbel:       p = softmax((l + g) / tau),  g ~ Gumbel(0, 1)
    gumbel_hard:  forward onehot(argmax(l + g)), backward through softmax((l + g) / tau)
    ste:          forward onehot(argmax l),      backward through softmax(l / tau)

At evaluation every mode selects ``onehot(argmax l)``.

Besides the selection used to form the quantized vector, :func:`smooth` returns the
*smoothed logits* ``s`` whose softmax is the smoothed vector the KNN regulariser
acts on (``(l + g) / tau`` for the Gumbel modes, ``l / tau`` otherwise).
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from typing import Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor

SMOOTHING_MODES: Tuple[str, ...] = ("softmax", "gumbel", "gumbel_hard", "ste")

TemperatureSpec = Union[str, Sequence[float]]


def check_smoothing(mode: str) -> str:
    if mode not in SMOOTHING_MODES:
        raise ValueError(f"unknown smoothing {mode!r}; choose one of {', '.join(SMOOTHING_MODES)}")
    return mode


@dataclass(frozen=True)
class TemperatureSchedule:
    """fairseq's Gumbel temperature schedule: ``max(start * decay**update, end)``."""

    start: float = 2.0
    end: float = 0.5
    decay: float = 0.999995

    @classmethod
    def parse(cls, spec: TemperatureSpec) -> "TemperatureSchedule":
        """Accepts ``(start, end, decay)`` as a sequence or as fairseq's string form."""
        if isinstance(spec, TemperatureSchedule):
            return spec
        if isinstance(spec, str):
            spec = ast.literal_eval(spec)
        values = tuple(float(v) for v in spec)
        if len(values) != 3:
            raise ValueError(f"temperature must be (start, end, decay), got {len(values)} values: {spec}")
        start, end, decay = values
        if start <= 0 or end <= 0 or not 0 < decay <= 1:
            raise ValueError(f"temperature needs start > 0, end > 0 and 0 < decay <= 1, got {values}")
        return cls(start, end, decay)

    def __call__(self, num_updates: int) -> float:
        return max(self.start * self.decay**num_updates, self.end)


def sample_gumbel_like(logits: Tensor) -> Tensor:
    """Gumbel(0, 1) noise drawn exactly as ``torch.nn.functional.gumbel_softmax`` draws
    it, so that a seeded run matches fairseq's GumbelVectorQuantizer bit for bit."""
    return -torch.empty_like(logits, memory_format=torch.legacy_contiguous_format).exponential_().log()


def onehot_argmax(logits: Tensor) -> Tensor:
    index = logits.argmax(dim=-1, keepdim=True)
    return torch.zeros_like(logits).scatter_(-1, index, 1.0)


def straight_through(hard: Tensor, soft: Tensor) -> Tensor:
    """Forward value ``hard``, gradient of ``soft``."""
    return hard - soft.detach() + soft


def smoothed_logits_of(logits: Tensor, mode: str, tau: float, training: bool = True) -> Tensor:
    """The logits of the smoothed vector: ``(l + g) / tau`` for the Gumbel modes in
    training, ``l / tau`` otherwise."""
    check_smoothing(mode)
    if tau <= 0:
        raise ValueError(f"temperature must be > 0, got {tau}")
    if training and mode in ("gumbel", "gumbel_hard"):
        return (logits + sample_gumbel_like(logits)) / tau
    return logits / tau


def select_codes(
    soft: Tensor, smoothed_logits: Optional[Tensor], logits: Tensor, mode: str, training: bool = True
) -> Tensor:
    """The code-selection vector that multiplies the codebook, given the soft vectors
    ``soft = softmax(smoothed_logits)`` (``smoothed_logits`` is read by ``gumbel_hard``
    only)."""
    if not training:
        return onehot_argmax(logits)
    if mode == "gumbel_hard":
        return straight_through(onehot_argmax(smoothed_logits), soft)
    if mode == "ste":
        return straight_through(onehot_argmax(logits), soft)
    return soft


def smooth(logits: Tensor, mode: str, tau: float, training: bool = True) -> Tuple[Tensor, Tensor]:
    """Turns logits ``(..., M)`` into ``(selection, smoothed_logits)``.

    ``selection`` is what multiplies the codebook; ``smoothed_logits`` are the logits of
    the smoothed vector (its softmax), the input of the KNN regulariser. In evaluation the
    selection is ``onehot(argmax logits)`` and the smoothed logits are ``logits / tau``.
    """
    smoothed_logits = smoothed_logits_of(logits, mode, tau, training)
    if not training:
        return onehot_argmax(logits), smoothed_logits
    soft = F.softmax(smoothed_logits, dim=-1)
    return select_codes(soft, smoothed_logits, logits, mode, training), smoothed_logits
