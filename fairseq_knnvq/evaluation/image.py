"""Evaluation of a ``vq_image_autoencoder`` checkpoint on a folder of images: the work of
``knnvq-eval-image`` (:mod:`fairseq_knnvq.cli.eval_image`).

Every image is resized and centre-cropped as in validation and counted once; unreadable
files are skipped and listed. MSE is pooled over all pixels and PSNR derived from it,
SSIM is the mean over images, the codebook statistics are pooled over the whole set
from the quantizer's ``usage_sums``, and rFID is the Fréchet distance of the Inception
features of originals and reconstructions (:mod:`.image_metrics`).
"""

import logging
import os
from typing import Any, Dict, List, Optional, Sequence

import torch

from ..checkpoints import CheckpointError, load_model
from ..image_metrics import FeatureStats, InceptionFeatures, frechet_distance, psnr_from_mse, ssim

logger = logging.getLogger(__name__)


def list_images(source: str) -> List[str]:
    """The image files of a folder (searched recursively) or of a file list."""
    from ..data.image_folder import list_image_folder, read_file_list

    if os.path.isdir(source):
        paths = list_image_folder(source)
    elif os.path.isfile(source):
        paths = read_file_list(source)
    else:
        raise FileNotFoundError(f"{source!r} is neither an image folder nor a file list")
    if not paths:
        raise FileNotFoundError(f"no image file found in {source!r}")
    return paths


def load_checkpoint(path: str, device: torch.device):
    """(model, cfg, task) of a ``vq_image_autoencoder`` checkpoint, the model in eval mode."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint {path!r} does not exist")
    try:
        model, cfg, task = load_model(path, device=device)
    except CheckpointError as e:
        raise ValueError(f"could not load checkpoint {path!r}: {e.detail or e}") from e
    if not hasattr(model, "quantize") or not hasattr(model, "decode"):
        raise ValueError(f"{path!r} holds a {type(model).__name__}, not a vq_image_autoencoder checkpoint")
    return model, cfg, task


@torch.no_grad()
def evaluate(
    checkpoint: str,
    images: str,
    batch_size: int = 32,
    num_workers: int = 0,
    device: str = "cpu",
    image_size: Optional[int] = None,
    resize_size: Optional[int] = None,
    inception_weights: Optional[str] = None,
    progress: bool = True,
) -> Dict[str, Any]:
    """Reconstructs every readable image of ``images`` (resized and centre-cropped as in
    validation, once each) and returns what ``knnvq-eval-image`` writes as JSON: pooled
    MSE and PSNR, mean SSIM, the codebook statistics over the whole set, the unreadable
    files, and ``rfid`` with ``inception_weights``. FileNotFoundError / ValueError name
    a missing or wrong input."""
    from tqdm import tqdm

    from ..data.image_folder import ImageFolderDataset
    from ..quantization import codebook_stats

    if batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {batch_size}")
    if not os.path.isfile(checkpoint):
        raise FileNotFoundError(f"checkpoint {checkpoint!r} does not exist")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda was asked for, but torch sees no CUDA device; use --device cpu")
    paths = list_images(images)
    inception = InceptionFeatures(inception_weights, dev) if inception_weights else None
    model, cfg, task = load_checkpoint(checkpoint, dev)
    image_size = image_size or cfg.task.image_size
    resize_size = resize_size or cfg.task.get("resize_size", None)
    if resize_size is not None and resize_size < image_size:
        resize_size = image_size
    dataset = ImageFolderDataset(
        paths, image_size=image_size, resize_size=resize_size, augment=False, on_unreadable="drop"
    )
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=False,
        num_workers=num_workers,
        collate_fn=dataset.collater,
    )
    sq_err, num_values, ssim_sum, num_images = 0.0, 0, 0.0, 0
    usage = None
    unreadable: List[Sequence[str]] = []
    real_stats, fake_stats = FeatureStats(), FeatureStats()
    for batch in tqdm(loader, desc="evaluating", unit="batch", disable=not progress):
        unreadable.extend(batch.get("unreadable", []))
        if "net_input" not in batch:
            continue
        x = batch["net_input"]["images"].to(dev)
        out = model(x)
        recon = out["x"].float().clamp(-1, 1)
        sq_err += float((recon - x).pow(2).sum())
        num_values += x.numel()
        ssim_sum += float(ssim(recon, x).sum())
        num_images += x.shape[0]
        batch_usage = out["usage_sums"]
        usage = batch_usage if usage is None else usage + batch_usage
        if inception is not None:
            real_stats.add(inception(x))
            fake_stats.add(inception(recon))
    for path, reason in unreadable:
        logger.warning(f"skipped unreadable image {path} ({reason})")
    if num_images == 0:
        raise ValueError(f"none of the {len(paths)} files in {images!r} could be read")
    mse = sq_err / num_values
    stats = codebook_stats(usage)
    result: Dict[str, Any] = {
        "checkpoint": os.path.abspath(checkpoint),
        "images": os.path.abspath(images),
        "num_images": num_images,
        "unreadable_images": [p for p, _ in unreadable],
        "image_size": image_size,
        "mse": mse,
        "psnr": psnr_from_mse(mse),
        "psnr_convention": "images in [-1, 1], PSNR = 10 log10(2^2 / MSE); equals PSNR of [0, 1] images",
        "ssim": ssim_sum / num_images,
        "code_usage": stats["code_usage"],
        "used_codes": int(stats["used_codes"]),
        "num_codes": int(stats["num_codes"]),
        "code_perplexity": stats["code_perplexity"],
    }
    for key in ("prob_perplexity", "tightness_max_prob", "tightness_vertex_l2"):
        if key in stats:
            result[key] = stats[key]
    if inception is not None:
        if num_images < 2:
            raise ValueError("rFID needs at least 2 readable images")
        mu_r, cov_r = real_stats.mean_cov()
        mu_f, cov_f = fake_stats.mean_cov()
        result["rfid"] = frechet_distance(mu_r, cov_r, mu_f, cov_f)
        result["rfid_inception_weights"] = os.path.abspath(inception_weights)
    return result
