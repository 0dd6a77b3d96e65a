"""``knnvq-eval-image``: evaluate a ``vq_image_autoencoder`` checkpoint on an image folder.

    knnvq-eval-image CHECKPOINT IMAGES --output metrics.json [--batch-size 32]
        [--num-workers 4] [--device cpu|cuda] [--inception-weights inception-2015-12-05.pt]

IMAGES is a folder (searched recursively, e.g. ImageNet's ``val/``) or a file list
(one path per line). Every image is resized and centre-cropped as in validation and
counted once; unreadable files are skipped and listed. The JSON holds MSE and PSNR
(pooled over all pixels, images in [-1, 1], PSNR = 10 log10(2^2 / MSE)), SSIM (mean over
images; Gaussian window 11, sigma 1.5, as scikit-image's ``gaussian_weights=True``),
codebook usage and perplexities over the whole set, and rFID when
``--inception-weights`` names a local TorchScript Inception-v3 feature extractor: the
``inception-2015-12-05.pt`` file that StyleGAN2-ADA and clean-fid use, called as
``model(uint8 images (B, 3, H, W), return_features=True)`` -> (B, 2048). Nothing is
downloaded. The metrics are those of :mod:`fairseq_knnvq.evaluation.image_metrics`.
"""
import argparse
import json
import logging
import os
import sys
from typing import Any, Dict, List, Optional, Sequence

import torch

from fairseq_knnvq.checkpoints import CheckpointError, load_model
from fairseq_knnvq.cli.outputs import output_file_problem
from fairseq_knnvq.evaluation.image_metrics import FeatureStats, InceptionFeatures, frechet_distance, psnr_from_mse, ssim
from fairseq_knnvq.files import atomic_write_text

logger = logging.getLogger("fairseq_knnvq.cli.eval_image")

def list_images(source: str) -> List[str]:
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
        dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers,
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
        "code_usage": stats["usage"],
        "used_codes": int(stats["used_entries"]),
        "num_codes": int(stats["num_entries"]),
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="knnvq-eval-image",
        description="Evaluate a vq_image_autoencoder checkpoint on an image folder and write JSON.",
    )
    parser.add_argument("checkpoint", help="fairseq checkpoint (checkpoint_best.pt)")
    parser.add_argument("images", help="image folder (searched recursively) or file list")
    parser.add_argument("--output", "-o", required=True, help="JSON file to write")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--num-workers", type=int, default=0, help="data-loader worker processes")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--image-size", type=int, default=None, help="crop side (default: the checkpoint's task.image_size)")
    parser.add_argument("--resize-size", type=int, default=None, help="shorter side before the centre crop (default: the checkpoint's)")
    parser.add_argument(
        "--inception-weights", default=None,
        help="local TorchScript Inception-v3 (inception-2015-12-05.pt) for rFID; without it no rFID",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    problem = output_file_problem(args.output, "--output")
    if problem:
        print(f"knnvq-eval-image: error: {problem}", file=sys.stderr)
        return 2
    try:
        result = evaluate(
            args.checkpoint, args.images, batch_size=args.batch_size, num_workers=args.num_workers,
            device=args.device, image_size=args.image_size, resize_size=args.resize_size,
            inception_weights=args.inception_weights, progress=not args.no_progress,
        )
    except (FileNotFoundError, ValueError) as e:
        print(f"knnvq-eval-image: error: {e}", file=sys.stderr)
        return 2
    atomic_write_text(args.output, json.dumps(result, indent=2, sort_keys=True) + "\n")
    summary = {k: result[k] for k in ("num_images", "mse", "psnr", "ssim", "code_usage", "code_perplexity", "rfid") if k in result}
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
