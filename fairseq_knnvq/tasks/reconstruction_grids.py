"""PNG grids of validation reconstructions: originals in the top row, their
reconstructions below, one grid per validation pass, named by the update.

The ``image_vq_reconstruction`` criterion computes; :class:`ValidationGrids` keeps the
first images of a validation pass and their reconstructions (:meth:`~ValidationGrids.keep`),
and the ``image_autoencoding`` task writes them after the step
(:meth:`~ValidationGrids.write_pending`), on rank 0 only, atomically.
"""

from __future__ import annotations

import logging
import os
from typing import Optional, Tuple

import numpy as np
import torch

from ..files import atomic_path
from ..models.update_count import model_num_updates

logger = logging.getLogger(__name__)


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """(B, 3, H, W) in [-1, 1] -> (B, H, W, 3) uint8."""
    pixels = ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return pixels.permute(0, 2, 3, 1).cpu().numpy()


def write_reconstruction_grid(
    originals: torch.Tensor, reconstructions: torch.Tensor, path: str, padding: int = 2
) -> None:
    """Writes a PNG: originals in the top row, reconstructions below; atomically (a
    temporary file in the same folder, then a rename)."""
    from PIL import Image

    top, bottom = to_uint8(originals), to_uint8(reconstructions)
    n, h, w, _ = top.shape
    grid = np.full((2 * h + 3 * padding, n * (w + padding) + padding, 3), 255, dtype=np.uint8)
    for row, images in enumerate((top, bottom)):
        y = padding + row * (h + padding)
        for i in range(n):
            x = padding + i * (w + padding)
            grid[y : y + h, x : x + w] = images[i]
    with atomic_path(path) as partial:
        Image.fromarray(grid).save(partial, format="PNG")


def _is_main_rank() -> bool:
    dist = torch.distributed
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


class ValidationGrids:
    """One grid of ``grid_images`` images per validation pass into ``grid_dir`` (None or
    ``grid_images`` 0: none)."""

    def __init__(self, grid_dir: Optional[str], grid_images: int):
        self.grid_dir = grid_dir
        self.grid_images = grid_images
        self._written_at: Optional[int] = None
        self._last_train_update: Optional[int] = None
        self._pending: Optional[Tuple[int, torch.Tensor, torch.Tensor]] = None

    @property
    def enabled(self) -> bool:
        return self.grid_dir is not None and self.grid_images > 0 and _is_main_rank()

    def note_training(self, model: torch.nn.Module) -> None:
        """Called at every training step: the next validation follows this update."""
        self._last_train_update = model_num_updates(model)

    def keep(self, model: torch.nn.Module, images: torch.Tensor, recon: torch.Tensor) -> None:
        """Keeps the first images of a validation batch (detached) when this pass has no
        grid yet."""
        if not self.enabled:
            return
        # The model holds the update count that fairseq last gave it: during training
        # the number of updates before the current step, after a checkpoint load the
        # number completed. Validation follows the last training step, so the grid is
        # named by the updates completed.
        num_updates = model_num_updates(model)
        if num_updates is None:
            return
        if self._last_train_update is not None:
            num_updates = max(num_updates, self._last_train_update + 1)
        if num_updates == self._written_at or self._pending is not None:
            return
        n = min(self.grid_images, images.shape[0])
        self._pending = (num_updates, images[:n].detach(), recon[:n].detach())

    def write_pending(self) -> Optional[str]:
        """Writes the kept images, if any; returns the file written."""
        if self._pending is None:
            return None
        num_updates, images, recon = self._pending
        self._pending = None
        self._written_at = num_updates
        path = os.path.join(self.grid_dir, f"reconstructions_update{num_updates:07d}.png")
        write_reconstruction_grid(images, recon, path)
        logger.info(f"wrote validation reconstructions to {path}")
        return path
