"""The ``image_vq_reconstruction`` criterion for ``vq_image_autoencoder``.

loss = reconstruction (MSE or L1, per image, summed over the batch)
       + batch_size * (knn_weight * knn_loss + diversity_weight * diversity_loss
                       + vq_weight * vq_loss)
with ``sample_size`` = images, so fairseq's gradient normalisation averages per image
over all workers.

Logged (every value is a sum, so logs are right across workers and over the whole
validation subset): ``loss``, ``reconstruction_loss``, the quantizer's losses, ``temp``,
``mse`` and ``psnr`` derived from the pooled squared error, and the pooled codebook
metrics of :mod:`fairseq_knnvq.criterions.usage_logging` (``code_usage``, ``used_codes``,
``pooled_code_perplexity``, ``pooled_prob_perplexity``, ``tightness_*``).

PSNR convention: images live in [-1, 1] (peak-to-peak 2) and the reconstruction is
clamped to that range, so ``psnr = 10 log10(2**2 / mse)``; this equals the usual PSNR
of the same images scaled to [0, 1] (or 8-bit, up to rounding).

At the first validation batch after each training stretch, rank 0 writes a PNG grid
(originals above reconstructions) to ``grid_dir`` (default: ``checkpoint.save_dir``),
named by the update number.
"""

import logging
import os
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

import numpy as np
import torch
from omegaconf import II

from fairseq import utils
from fairseq.criterions import FairseqCriterion, register_criterion
from fairseq.dataclass import ChoiceEnum, FairseqDataclass
from fairseq.logging import metrics

from .usage_logging import KNN_ROWS_KEYS, FewKnnRowsCheck, log_code_usage, usage_logging_output
from ..models.update_count import model_num_updates
from ..image_metrics import psnr_from_mse
from ..files import atomic_path

logger = logging.getLogger(__name__)

# Quantizer output key -> config field of its weight.
AUX_LOSSES = {
    "knn_loss": "knn_weight",
    "diversity_loss": "diversity_weight",
    "vq_loss": "vq_weight",
}
# Also logged (as per-image averages) when the model returns them.
LOGGED_EXTRAS = ("codebook_loss", "commitment_loss", "temp") + KNN_ROWS_KEYS


@dataclass
class ImageVQReconstructionConfig(FairseqDataclass):
    reconstruction_loss: ChoiceEnum(["mse", "l1"]) = field(
        default="mse", metadata={"help": "pixel loss between image and reconstruction"}
    )
    knn_weight: float = field(default=0.1, metadata={"help": "lambda of the KNN-to-vertex loss"})
    diversity_weight: float = field(
        default=0.1, metadata={"help": "weight of wav2vec 2.0's diversity (perplexity) loss"}
    )
    vq_weight: float = field(default=1.0, metadata={"help": "weight of the VQ-VAE codebook + beta*commitment loss"})
    grid_dir: Optional[str] = field(
        default=II("checkpoint.save_dir"),
        metadata={"help": "folder for the validation PNG grids; empty to write none"},
    )
    grid_images: int = field(
        default=8, metadata={"help": "images per validation grid (originals above reconstructions)"}
    )


def _is_main_rank() -> bool:
    dist = torch.distributed
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


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


@register_criterion("image_vq_reconstruction", dataclass=ImageVQReconstructionConfig)
class ImageVQReconstructionCriterion(FairseqCriterion):
    def __init__(self, cfg: ImageVQReconstructionConfig, task):
        super().__init__(task)
        self.reconstruction_loss = str(cfg.reconstruction_loss)
        self.weights = {key: float(getattr(cfg, name)) for key, name in AUX_LOSSES.items()}
        try:
            grid_dir = cfg.grid_dir
        except Exception:  # the interpolation has no checkpoint config to resolve against
            grid_dir = None
        self.grid_dir = grid_dir or None
        self.grid_images = cfg.grid_images
        self._grid_written_at: Optional[int] = None
        self._last_train_update: Optional[int] = None
        self.check_knn_rows = FewKnnRowsCheck()

    def forward(self, model, sample, reduce=True):
        images = sample["net_input"]["images"]
        net_output = model(**sample["net_input"])
        recon = net_output["x"]
        bsz = images.shape[0]

        diff = recon.float() - images.float()
        per_image = (diff.pow(2) if self.reconstruction_loss == "mse" else diff.abs()).flatten(1).mean(1)
        recon_loss = per_image.sum()
        loss = recon_loss
        logging_output: Dict[str, Any] = {
            "reconstruction_loss": utils.item(recon_loss.detach()),
        }
        for key, weight in self.weights.items():
            if key in net_output:
                value = net_output[key]
                if key in net_output.get("training_losses", (key,)):
                    loss = loss + weight * bsz * value.float()
                logging_output[key] = utils.item(value.detach().float()) * bsz
        for key in LOGGED_EXTRAS:
            if key in net_output:
                value = net_output[key]
                value = utils.item(value.detach().float()) if torch.is_tensor(value) else float(value)
                logging_output[key] = value * bsz

        with torch.no_grad():
            clamped_err = (recon.float().clamp(-1, 1) - images.float()).pow(2)
        logging_output.update(
            {
                "loss": utils.item(loss.detach()),
                "sample_size": bsz,
                "nsentences": bsz,
                "ntokens": bsz,
                "_sq_err": utils.item(clamped_err.sum()),
                "_num_values": clamped_err.numel(),
            }
        )
        logging_output.update(usage_logging_output(net_output["usage_sums"]))
        self.check_knn_rows(model, net_output)

        if model.training:
            self._last_train_update = model_num_updates(model)
        else:
            self._maybe_write_grid(model, images, recon)
        return loss, bsz, logging_output

    def _maybe_write_grid(self, model, images, recon) -> None:
        if self.grid_dir is None or self.grid_images <= 0 or not _is_main_rank():
            return
        # The model holds the update count that fairseq last gave it: during training
        # the number of updates before the current step, after a checkpoint load the
        # number completed. Validation follows the last training step, so name the
        # grid by the updates completed.
        num_updates = model_num_updates(model)
        if num_updates is None:
            return
        if self._last_train_update is not None:
            num_updates = max(num_updates, self._last_train_update + 1)
        if num_updates == self._grid_written_at:
            return
        self._grid_written_at = num_updates
        n = min(self.grid_images, images.shape[0])
        path = os.path.join(self.grid_dir, f"reconstructions_update{num_updates:07d}.png")
        write_reconstruction_grid(images[:n], recon[:n], path)
        logger.info(f"wrote validation reconstructions to {path}")

    @staticmethod
    def reduce_metrics(logging_outputs: List[Dict[str, Any]]) -> None:
        def total(key):
            return sum(float(log.get(key, 0)) for log in logging_outputs)

        sample_size = total("sample_size")
        nsentences = total("nsentences")
        if sample_size == 0:
            return
        metrics.log_scalar("loss", total("loss") / sample_size, sample_size, round=4)
        metrics.log_scalar("reconstruction_loss", total("reconstruction_loss") / sample_size, sample_size, round=4)
        for key in list(AUX_LOSSES) + list(LOGGED_EXTRAS):
            if any(key in log for log in logging_outputs):
                metrics.log_scalar(key, total(key) / nsentences, nsentences, round=4)

        metrics.log_scalar_sum("_sq_err", total("_sq_err"))
        metrics.log_scalar_sum("_num_values", total("_num_values"))
        metrics.log_derived("mse", lambda m: round(m["_sq_err"].sum / max(1.0, m["_num_values"].sum), 6))
        metrics.log_derived(
            "psnr", lambda m: round(psnr_from_mse(m["_sq_err"].sum / max(1.0, m["_num_values"].sum)), 3)
        )
        log_code_usage(logging_outputs)

    @staticmethod
    def logging_outputs_can_be_summed() -> bool:
        # Every entry is a sum (the usage entry a flat tensor of sums), see the
        # module docstring; this also selects fairseq's all-reduce sync, which works
        # with gloo on CPU.
        return True
