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
downloaded. The work is done by :mod:`fairseq_knnvq.evaluation.image`.
"""

import argparse
import json
import logging
import sys
from typing import Optional, Sequence

import torch

from fairseq_knnvq.cli.outputs import output_file_problem
from fairseq_knnvq.evaluation.image import evaluate
from fairseq_knnvq.files import atomic_write_text


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
    parser.add_argument(
        "--image-size", type=int, default=None, help="crop side (default: the checkpoint's task.image_size)"
    )
    parser.add_argument(
        "--resize-size", type=int, default=None, help="shorter side before the centre crop (default: the checkpoint's)"
    )
    parser.add_argument(
        "--inception-weights",
        default=None,
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
            args.checkpoint,
            args.images,
            batch_size=args.batch_size,
            num_workers=args.num_workers,
            device=args.device,
            image_size=args.image_size,
            resize_size=args.resize_size,
            inception_weights=args.inception_weights,
            progress=not args.no_progress,
        )
    except (FileNotFoundError, ValueError) as e:
        print(f"knnvq-eval-image: error: {e}", file=sys.stderr)
        return 2
    atomic_write_text(args.output, json.dumps(result, indent=2, sort_keys=True) + "\n")
    summary = {
        k: result[k]
        for k in ("num_images", "mse", "psnr", "ssim", "code_usage", "code_perplexity", "rfid")
        if k in result
    }
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
