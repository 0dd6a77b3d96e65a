"""Rows: the shape every loss and statistic of the core reads its logits in.

A batch of logits is a tensor of rows ``l_n``, ``(N, G, M)``: N positions, G groups, M
entries per group. A mask enters as row weights

    w_n = 1 if position n is valid else 0,    N_valid = sum_n w_n,

never by indexing, so that nothing reads a value back to the host. Softmax-sized
temporaries are made over blocks of rows, so that a statistic costs O(block * G * M)
extra memory instead of a second N x G x M tensor.
"""

from __future__ import annotations

import contextlib
from typing import Iterator, Optional, Tuple

import torch
from torch import Tensor

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
        raise ValueError(f"logits must have shape (N, M) or (..., G, M), got {tuple(logits.shape)}")
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


# The device types whose autocast :func:`without_autocast` turns off.
AUTOCAST_DEVICE_TYPES: Tuple[str, ...] = ("cpu", "cuda")


@contextlib.contextmanager
def without_autocast() -> Iterator[None]:
    """Turns ``torch.autocast`` off (CPU and CUDA) inside; usable as a decorator.

    The core's losses and statistics are reductions over many rows: under autocast a
    matrix product or ``linalg.vecdot`` would run in fp16 / bf16 (rounding each sum to
    3 significant digits, and overflowing beyond 65,504 in fp16). Inside, every
    operation runs in the dtype of its inputs, which the core makes at least float32,
    so a computation gives the same values with and without an enclosing autocast.
    """
    with contextlib.ExitStack() as stack:
        for device_type in AUTOCAST_DEVICE_TYPES:
            if _autocast_enabled(device_type):
                stack.enter_context(torch.autocast(device_type, enabled=False))
        yield


def _autocast_enabled(device_type: str) -> bool:
    try:
        return torch.is_autocast_enabled(device_type)
    except TypeError:  # torch < 2.4 takes no device type (untested here: torch 2.13)
        return torch.is_autocast_cpu_enabled() if device_type == "cpu" else torch.is_autocast_enabled()


def check_finite(logits: Tensor) -> None:
    """Raises ValueError on NaN or infinite logits (reads one value back to the host)."""
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


def valid_count(rows: Tensor, valid: Optional[Tensor]) -> Tensor:
    """``N_valid`` as a 0-d int64 tensor on the rows' device (no host sync)."""
    if valid is None:
        return torch.full((), rows.shape[0], dtype=torch.long, device=rows.device)
    return valid.sum()


def row_weights(rows: Tensor, valid: Optional[Tensor]) -> Optional[Tensor]:
    """``w_n`` in the rows' computation dtype (at least float32); None without a mask."""
    return None if valid is None else valid.to(at_least_float32(rows).dtype)


def rows_per_block(rows: Tensor, budget: int) -> int:
    """Rows per block so that a block of ``(rows, G, M)`` temporaries stays within
    ``budget`` values."""
    return max(1, budget // max(1, rows.shape[1] * rows.shape[2]))


def row_blocks(rows: Tensor, budget: int):
    """``(start, stop)`` of consecutive blocks of at most :func:`rows_per_block` rows."""
    n, block = rows.shape[0], rows_per_block(rows, budget)
    return ((start, min(n, start + block)) for start in range(0, n, block))
