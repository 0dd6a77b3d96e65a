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
downloaded.
"""
import argparse
import json
import logging
import math
import os
import sys
import tempfile
from typing import Any, Dict, List, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from fairseq_knnvq.cli.outputs import output_file_problem

logger = logging.getLogger("fairseq_knnvq.cli.eval_image")

PIXEL_RANGE = 2.0  # images in [-1, 1]


def gaussian_window(size: int = 11, sigma: float = 1.5, dtype=torch.float64) -> torch.Tensor:
    radius = size // 2
    x = torch.arange(-radius, radius + 1, dtype=dtype)
    g = torch.exp(-0.5 * (x / sigma) ** 2)
    return g / g.sum()


def ssim(
    x: torch.Tensor,
    y: torch.Tensor,
    data_range: float = PIXEL_RANGE,
    window_size: int = 11,
    sigma: float = 1.5,
) -> torch.Tensor:
    """Structural similarity per image of (B, C, H, W) tensors: local statistics under a
    Gaussian window (population (co)variances), averaged over the positions where the
    window fits and over the channels. Equals scikit-image's ``structural_similarity``
    with ``gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
    data_range=data_range`` averaged over channels."""
    if x.shape != y.shape or x.dim() != 4:
        raise ValueError(f"ssim needs two (B, C, H, W) tensors of one shape, got {tuple(x.shape)} and {tuple(y.shape)}")
    if min(x.shape[-2:]) < window_size:
        raise ValueError(f"images must be at least {window_size} pixels per side for SSIM, got {tuple(x.shape[-2:])}")
    x, y = x.double(), y.double()
    channels = x.shape[1]
    g = gaussian_window(window_size, sigma).to(x.device)
    row = g.view(1, 1, 1, -1).expand(channels, 1, 1, -1)
    col = g.view(1, 1, -1, 1).expand(channels, 1, -1, 1)

    def blur(t):
        return F.conv2d(F.conv2d(t, row, groups=channels), col, groups=channels)

    mu_x, mu_y = blur(x), blur(y)
    var_x = blur(x * x) - mu_x**2
    var_y = blur(y * y) - mu_y**2
    cov = blur(x * y) - mu_x * mu_y
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    ssim_map = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))
    return ssim_map.flatten(1).mean(1)


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """``||mu1 - mu2||^2 + tr(S1 + S2 - 2 (S1 S2)^(1/2))`` of two Gaussians."""
    from scipy import linalg

    covmean, _ = linalg.sqrtm(sigma1.dot(sigma2), disp=False)
    if not np.isfinite(covmean).all():
        # Near-singular product (few images): regularise as the reference FID code does.
        eps = 1e-6 * np.eye(sigma1.shape[0])
        covmean = linalg.sqrtm((sigma1 + eps).dot(sigma2 + eps))
    covmean = np.real(covmean)
    diff = mu1 - mu2
    return float(diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2.0 * np.trace(covmean))


class FeatureStats:
    """Running sums for the mean and covariance of feature vectors."""

    def __init__(self):
        self.n, self.sum, self.outer = 0, None, None

    def add(self, feats: torch.Tensor) -> None:
        feats = feats.detach().double().cpu()
        if self.sum is None:
            self.sum = torch.zeros(feats.shape[1], dtype=torch.float64)
            self.outer = torch.zeros(feats.shape[1], feats.shape[1], dtype=torch.float64)
        self.n += feats.shape[0]
        self.sum += feats.sum(0)
        self.outer += feats.T @ feats

    def mean_cov(self):
        mu = self.sum / self.n
        cov = (self.outer - self.n * torch.outer(mu, mu)) / (self.n - 1)
        return mu.numpy(), cov.numpy()


class InceptionFeatures:
    """A local TorchScript Inception-v3 feature extractor (``inception-2015-12-05.pt``)."""

    def __init__(self, path: str, device: torch.device):
        if not os.path.isfile(path):
            raise FileNotFoundError(f"--inception-weights {path!r} is not a file")
        try:
            self.model = torch.jit.load(path, map_location=device).eval()
        except Exception as e:
            raise ValueError(
                f"--inception-weights {path!r} is not a TorchScript module ({type(e).__name__}: {e}). "
                f"rFID needs the TorchScript Inception-v3 file inception-2015-12-05.pt (the one "
                f"StyleGAN2-ADA and clean-fid use); state dicts of pytorch-fid or torchvision "
                f"are not supported because they need torchvision to build the network"
            ) from e
        self.device = device

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """images (B, 3, H, W) in [-1, 1] -> features (B, D)."""
        pixels = ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).to(self.device)
        try:
            feats = self.model(pixels, return_features=True)
        except Exception as e:
            raise ValueError(
                f"the Inception module failed on a uint8 batch {tuple(pixels.shape)} with "
                f"return_features=True ({type(e).__name__}: {e}); it must accept that call "
                f"like inception-2015-12-05.pt"
            ) from e
        if not torch.is_tensor(feats) or feats.dim() != 2 or feats.shape[0] != images.shape[0]:
            raise ValueError(f"the Inception module must return (B, D) features, got {getattr(feats, 'shape', type(feats))}")
        return feats


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
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint {path!r} does not exist")
    import fairseq  # noqa: F401  (before the plugin, so that it registers its parts)
    import fairseq_knnvq
    from fairseq import checkpoint_utils

    fairseq_knnvq.register_with_fairseq()
    try:
        models, cfg, task = checkpoint_utils.load_model_ensemble_and_task([path])
    except Exception as e:
        raise ValueError(f"could not load checkpoint {path!r}: {type(e).__name__}: {e}") from e
    model = models[0]
    if not hasattr(model, "quantize") or not hasattr(model, "decode"):
        raise ValueError(f"{path!r} holds a {type(model).__name__}, not a vq_image_autoencoder checkpoint")
    return model.to(device).eval(), cfg, task


def write_json_atomically(data: Dict[str, Any], path: str) -> None:
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".eval-", suffix=".json")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=2, sort_keys=True)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


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
        "psnr": 10.0 * math.log10(PIXEL_RANGE**2 / mse) if mse > 0 else float("inf"),
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
    write_json_atomically(result, args.output)
    summary = {k: result[k] for k in ("num_images", "mse", "psnr", "ssim", "code_usage", "code_perplexity", "rfid") if k in result}
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
