"""The image metrics (fairseq_knnvq.image_metrics): SSIM against an
independent scipy implementation, the Frechet distance against its closed form, and the
rFID feature path with a real TorchScript module."""

import numpy as np
import pytest
import torch
from scipy import ndimage

from fairseq_knnvq.image_metrics import FeatureStats, InceptionFeatures, frechet_distance, ssim


def scipy_ssim(x: np.ndarray, y: np.ndarray, data_range: float) -> float:
    """scikit-image's algorithm (gaussian_weights=True, sigma=1.5, truncate=3.5,
    population covariance, borders of the filtered maps cropped), per channel."""
    values = []
    for c in range(x.shape[0]):
        a, b = x[c].astype(np.float64), y[c].astype(np.float64)

        def blur(t):
            return ndimage.gaussian_filter(t, sigma=1.5, truncate=3.5, mode="reflect")

        ux, uy = blur(a), blur(b)
        vx, vy, vxy = blur(a * a) - ux * ux, blur(b * b) - uy * uy, blur(a * b) - ux * uy
        c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
        s = ((2 * ux * uy + c1) * (2 * vxy + c2)) / ((ux**2 + uy**2 + c1) * (vx + vy + c2))
        values.append(s[5:-5, 5:-5].mean())
    return float(np.mean(values))


def structured(seed: int, size: int = 32) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.linspace(0, 1, size), torch.linspace(0, 1, size), indexing="ij")
    phase = torch.rand(3, 1, 1, generator=g) * 6
    return torch.sin(6 * xx + 4 * yy + phase) * 0.8


def test_ssim_matches_scipy_reference():
    x = torch.stack([structured(0), structured(1)])
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(2)) * 0.2
    y = (x + noise).clamp(-1, 1)
    ours = ssim(y, x)
    for i in range(2):
        assert float(ours[i]) == pytest.approx(scipy_ssim(y[i].numpy(), x[i].numpy(), 2.0), abs=1e-6)


def test_ssim_is_one_for_identical_images_and_falls_with_noise():
    x = torch.stack([structured(3)])
    assert float(ssim(x, x)) == pytest.approx(1.0, abs=1e-9)
    g = torch.Generator().manual_seed(4)
    noise = torch.randn(x.shape, generator=g)
    values = [float(ssim((x + s * noise).clamp(-1, 1), x)) for s in (0.05, 0.1, 0.3, 0.6)]
    assert all(a > b for a, b in zip(values, values[1:]))
    with pytest.raises(ValueError, match="at least 11 pixels"):
        ssim(torch.zeros(1, 3, 8, 8), torch.zeros(1, 3, 8, 8))


def test_frechet_distance_closed_form():
    mu1, mu2 = np.array([0.0, 1.0, 2.0]), np.array([1.0, 1.0, 0.0])
    s1, s2 = np.diag([1.0, 4.0, 9.0]), np.diag([4.0, 1.0, 1.0])
    # Commuting (diagonal) covariances: tr(S1 + S2 - 2 sqrt(S1 S2)) = sum (sqrt a - sqrt b)^2.
    expected = 1.0 + 4.0 + (1 - 2) ** 2 + (2 - 1) ** 2 + (3 - 1) ** 2
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-9)
    assert frechet_distance(mu1, s1, mu1, s1) == pytest.approx(0.0, abs=1e-6)


class PooledColours(torch.nn.Module):
    """A stand-in feature extractor with the calling convention of
    inception-2015-12-05.pt: uint8 (B, 3, H, W), return_features=True -> (B, D)."""

    def forward(self, x: torch.Tensor, return_features: bool = False) -> torch.Tensor:
        assert x.dtype == torch.uint8
        x = x.float() / 255.0
        return torch.cat([x.mean((2, 3)), x.std((2, 3)), x[:, :, ::8, ::8].flatten(1)], 1)


def test_inception_features_load_a_torchscript_file(tmp_path):
    path = str(tmp_path / "features.pt")
    torch.jit.script(PooledColours()).save(path)
    extractor = InceptionFeatures(path, torch.device("cpu"))
    x = torch.stack([structured(i) for i in range(6)])
    feats = extractor(x)
    assert feats.shape == (6, 6 + 3 * 16)
    real, same = FeatureStats(), FeatureStats()
    real.add(feats[:3])
    real.add(feats[3:])
    same.add(feats)
    mu_r, cov_r = real.mean_cov()
    mu_s, cov_s = same.mean_cov()
    np.testing.assert_allclose(mu_r, feats.double().mean(0).numpy(), rtol=1e-9)
    np.testing.assert_allclose(cov_r, np.cov(feats.double().numpy().T), rtol=1e-6, atol=1e-12)
    assert frechet_distance(mu_r, cov_r, mu_s, cov_s) == pytest.approx(0.0, abs=1e-6)


def test_inception_weights_that_are_not_torchscript_are_refused(tmp_path):
    state_dict = tmp_path / "pt_inception.pth"
    torch.save({"conv.weight": torch.zeros(2)}, state_dict)
    with pytest.raises(ValueError, match="not a TorchScript module.*inception-2015-12-05.pt"):
        InceptionFeatures(str(state_dict), torch.device("cpu"))
    with pytest.raises(FileNotFoundError, match="is not a file"):
        InceptionFeatures(str(tmp_path / "missing.pt"), torch.device("cpu"))
