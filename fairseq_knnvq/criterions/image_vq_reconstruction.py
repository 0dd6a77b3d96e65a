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

The first images of each validation pass and their reconstructions become a PNG grid in
``grid_dir`` (default: ``checkpoint.save_dir``), named by the update number: the
criterion keeps them, the ``image_autoencoding`` task writes them after the step
(:mod:`fairseq_knnvq.tasks.reconstruction_grids`).
"""

import logging
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

import torch
from omegaconf import II

from fairseq import utils
from fairseq.criterions import FairseqCriterion, register_criterion
from fairseq.dataclass import ChoiceEnum, FairseqDataclass
from fairseq.logging import metrics

from .usage_logging import KNN_ROWS_KEYS, FewKnnRowsCheck, log_code_usage, usage_logging_output
from ..tasks.reconstruction_grids import ValidationGrids
from ..image_metrics import psnr_from_mse

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
        # Keeps the first images of each validation pass and their reconstructions; the
        # task writes them (ValidationGrids.write_pending) after the step.
        self.validation_grids = ValidationGrids(grid_dir or None, cfg.grid_images)
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
            self.validation_grids.note_training(model)
        else:
            self.validation_grids.keep(model, images, recon)
        return loss, bsz, logging_output

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
