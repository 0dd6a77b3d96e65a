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

TemperatureSpec = Union[str, Sequence[float], "TemperatureSchedule"]


def check_smoothing(mode: str) -> str:
    if mode not in SMOOTHING_MODES:
        raise ValueError(f"unknown smoothing {mode!r}; choose one of {', '.join(SMOOTHING_MODES)}")
    return mode


# What a temperature schedule needs, in the words of every message that checks it.
TEMPERATURE_RULE = "start > 0, end > 0 and 0 < decay <= 1"


@dataclass(frozen=True)
class TemperatureSchedule:
    """fairseq's Gumbel temperature schedule: ``max(start * decay**update, end)``."""

    start: float = 2.0
    end: float = 0.5
    decay: float = 0.999995

    @staticmethod
    def values_of(spec: TemperatureSpec) -> Optional[Tuple[float, float, float]]:
        """``(start, end, decay)`` from a sequence or fairseq's string form
        (``"(2, 0.5, 0.999995)"``); None unless ``spec`` is three numbers."""
        try:
            values = tuple(float(v) for v in (ast.literal_eval(spec) if isinstance(spec, str) else spec))
        except (TypeError, ValueError, SyntaxError):
            return None
        return values if len(values) == 3 else None

    @staticmethod
    def holds(start: float, end: float, decay: float) -> bool:
        """Whether ``(start, end, decay)`` meets :data:`TEMPERATURE_RULE`."""
        return start > 0 and end > 0 and 0 < decay <= 1

    @classmethod
    def parse(cls, spec: TemperatureSpec) -> "TemperatureSchedule":
        """Accepts ``(start, end, decay)`` as a sequence or as fairseq's string form;
        ValueError otherwise (the models' option ``latent_temp`` is checked by
        ``models/smoothed_quantizer_config.py``'s ``checked_temperature``, with the same
        rule and the option's name)."""
        if isinstance(spec, TemperatureSchedule):
            return spec
        values = cls.values_of(spec)
        if values is None:
            raise ValueError(f"temperature must be (start, end, decay), got {spec!r}")
        if not cls.holds(*values):
            raise ValueError(f"temperature needs {TEMPERATURE_RULE}, got {values}")
        return cls(*values)

    def __call__(self, num_updates: int) -> float:
        return max(self.start * self.decay**num_updates, self.end)


def sample_gumbel_like(logits: Tensor) -> Tensor:
    """Gumbel(0, 1) noise drawn exactly as ``torch.nn.functional.gumbel_softmax`` draws
    it, so that a seeded run matches fairseq's GumbelVectorQuantizer bit for bit."""
    return -torch.empty_like(logits, memory_format=torch.legacy_contiguous_format).exponential_().log()


def gumbel_noise_(out: Tensor, generator: Optional[torch.Generator] = None) -> Tensor:
    """Fills ``out`` with Gumbel(0, 1) noise in place, ``g = -log(E)``, ``E ~ Exp(1)``:
    from the same generator state, the values :func:`sample_gumbel_like` draws for a
    tensor of ``out``'s shape (in-place operations, same kernels), without a second
    tensor."""
    return out.exponential_(generator=generator).log_().neg_()


def default_generator(device: torch.device) -> Optional[torch.Generator]:
    """The generator that ``exponential_()`` draws from by default on ``device`` (CPU and
    CUDA; None on other devices)."""
    if device.type == "cpu":
        return torch.default_generator
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        return torch.cuda.default_generators[index]
    return None


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
