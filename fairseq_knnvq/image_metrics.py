"""Image reconstruction metrics, for images in [-1, 1].

- PSNR from the mean squared error pooled over all pixels:
  ``PSNR = 10 log10(R^2 / MSE)`` with the peak-to-peak range ``R = 2``; this equals the
  usual PSNR of the same images scaled to [0, 1] (R = 1).
- SSIM per image (:func:`ssim`): local means, variances and covariance under a Gaussian
  window ``w`` (size 11, sigma 1.5),
  ``SSIM = mean over positions and channels of
  ((2 mu_x mu_y + c1)(2 s_xy + c2)) / ((mu_x^2 + mu_y^2 + c1)(s_x^2 + s_y^2 + c2))``,
  ``c1 = (0.01 R)^2``, ``c2 = (0.03 R)^2``, as scikit-image's ``gaussian_weights=True``.
- The Fréchet distance of two Gaussians (:func:`frechet_distance`),
  ``||mu1 - mu2||^2 + tr(S1 + S2 - 2 (S1 S2)^(1/2))``; rFID is that distance between the
  Inception-v3 features (:class:`InceptionFeatures`) of the originals and of the
  reconstructions, their means and covariances accumulated by :class:`FeatureStats`.

Nothing here imports fairseq; the fairseq criterion logs :func:`psnr_from_mse` too.
"""

import math
import os
from typing import Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F

PIXEL_RANGE = 2.0  # images in [-1, 1]


def psnr_from_mse(mse: float, pixel_range: float = PIXEL_RANGE) -> float:
    """PSNR in dB for images with peak-to-peak ``pixel_range`` (2 for [-1, 1])."""
    if mse <= 0:
        return float("inf")
    return 10.0 * math.log10(pixel_range**2 / mse)


def gaussian_window(size: int = 11, sigma: float = 1.5, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """The normalised 1-D Gaussian ``exp(-x^2 / (2 sigma^2))`` at ``x = -size//2 .. size//2``."""
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

    def __init__(self) -> None:
        self.n = 0
        self.sum: Optional[torch.Tensor] = None
        self.outer: Optional[torch.Tensor] = None

    def add(self, feats: torch.Tensor) -> None:
        feats = feats.detach().double().cpu()
        if self.sum is None:
            self.sum = torch.zeros(feats.shape[1], dtype=torch.float64)
            self.outer = torch.zeros(feats.shape[1], feats.shape[1], dtype=torch.float64)
        self.n += feats.shape[0]
        self.sum += feats.sum(0)
        self.outer += feats.T @ feats

    def mean_cov(self) -> Tuple[np.ndarray, np.ndarray]:
        """The mean and the (n - 1)-normalised covariance of the features added."""
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
            raise ValueError(
                f"the Inception module must return (B, D) features, got {getattr(feats, 'shape', type(feats))}"
            )
        return feats
