"""The ``vq_image_autoencoder`` model: a convolutional VQ autoencoder for images.

encoder (residual blocks, ``log2 f`` stride-2 downsamplings) -> latent grid
(B, code_dim, H/f, W/f) -> quantizer on the B*(H/f)*(W/f) positions -> mirrored decoder.

Quantizers (``quantizer``):
- ``vqvae``: classic VQ-VAE, nearest codeword with straight-through (STE) gradients,
  codebook + beta-commitment loss, optional rotation trick
  (:class:`~fairseq_knnvq.quantization.VQVAEQuantizer`).
- ``smoothed``: smoothed VQ (:class:`~fairseq_knnvq.quantization.SmoothedVectorQuantizer`)
  with ``smoothing`` softmax / gumbel / gumbel_hard / ste and ``regularizer`` knn
  (``knn_distance`` l2 or ce), diversity (wav2vec 2.0's perplexity loss) or none.
"""

import math
from dataclasses import dataclass, field
from typing import Any, Dict, Tuple

import torch
import torch.nn as nn

from fairseq.dataclass import ChoiceEnum
from fairseq.models import BaseFairseqModel, register_model

from . import dummy_batches
from ..preflight import RunConfigError
from ..quantization import SmoothedVectorQuantizer, VQVAEQuantizer
from .smoothed_quantizer_config import (
    SMOOTHING_CHOICES,
    SmoothedQuantizerConfig,
    checked_temperature,
    shared_field,
    smoothed_quantizer_options,
)

QUANTIZERS = ("vqvae", "smoothed")
DOWNSAMPLE_FACTORS = (4, 8, 16)


@dataclass
class VQImageAutoencoderConfig(SmoothedQuantizerConfig):
    """The network's options, the codebook's (named as wav2vec 2.0 names them) and the
    smoothed quantizer's (shared with ``wav2vec2_knnvq``; here ``smoothing`` defaults to
    gumbel)."""

    downsample_factor: int = field(
        default=8,
        metadata={"help": "f: the latent grid is (H/f, W/f); one of 4, 8, 16"},
    )
    channels: int = field(default=128, metadata={"help": "channels at full resolution; doubled per downsampling"})
    max_channels: int = field(default=512, metadata={"help": "cap on the doubled channels"})
    num_res_blocks: int = field(default=2, metadata={"help": "residual blocks per resolution (encoder and decoder)"})
    code_dim: int = field(
        default=256,
        metadata={"help": "channels of the latent grid and dimension of a codeword (all groups)"},
    )
    latent_vars: int = field(default=1024, metadata={"help": "M: entries per codebook group"})
    latent_groups: int = field(
        default=1, metadata={"help": "G: codebook groups; each position picks one entry per group"}
    )
    quantizer: ChoiceEnum(QUANTIZERS) = field(
        default="smoothed",
        metadata={
            "help": "vqvae: nearest codeword with straight-through gradients; smoothed: smoothed VQ with a regulariser"
        },
    )
    smoothing: SMOOTHING_CHOICES = shared_field("smoothing", "gumbel")  # type: ignore[valid-type]
    latent_temp: Tuple[float, float, float] = field(
        default=(2.0, 0.5, 0.999995),
        metadata={"help": "smoothing temperature (start, end, decay per update)"},
    )
    commitment_beta: float = field(
        default=0.25, metadata={"help": "vqvae: weight of the commitment term inside vq_loss"}
    )
    rotation_trick: bool = field(default=False, metadata={"help": "vqvae: rotation trick instead of the plain STE"})


def group_norm(channels: int) -> nn.GroupNorm:
    """GroupNorm with up to 32 groups of at least 2 channels each."""
    groups = 1
    for g in (32, 16, 8, 4, 2):
        if channels % g == 0 and channels >= 2 * g:
            groups = g
            break
    return nn.GroupNorm(groups, channels)


class ResidualBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.body = nn.Sequential(
            group_norm(in_channels),
            nn.SiLU(),
            nn.Conv2d(in_channels, out_channels, 3, padding=1),
            group_norm(out_channels),
            nn.SiLU(),
            nn.Conv2d(out_channels, out_channels, 3, padding=1),
        )
        self.skip = nn.Identity() if in_channels == out_channels else nn.Conv2d(in_channels, out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.skip(x) + self.body(x)


def stage_channels(cfg: VQImageAutoencoderConfig) -> list:
    """Channels at each resolution, full resolution first."""
    num_down = int(math.log2(cfg.downsample_factor))
    return [min(cfg.channels * 2**i, cfg.max_channels) for i in range(num_down + 1)]


class Encoder(nn.Module):
    def __init__(self, cfg: VQImageAutoencoderConfig):
        super().__init__()
        chans = stage_channels(cfg)
        layers = [nn.Conv2d(3, chans[0], 3, padding=1)]
        for i in range(len(chans) - 1):
            layers += [ResidualBlock(chans[i], chans[i]) for _ in range(cfg.num_res_blocks)]
            layers.append(nn.Conv2d(chans[i], chans[i + 1], 4, stride=2, padding=1))
        layers += [ResidualBlock(chans[-1], chans[-1]) for _ in range(cfg.num_res_blocks)]
        layers += [group_norm(chans[-1]), nn.SiLU(), nn.Conv2d(chans[-1], cfg.code_dim, 1)]
        self.layers = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class Decoder(nn.Module):
    def __init__(self, cfg: VQImageAutoencoderConfig):
        super().__init__()
        chans = stage_channels(cfg)[::-1]
        layers = [nn.Conv2d(cfg.code_dim, chans[0], 3, padding=1)]
        layers += [ResidualBlock(chans[0], chans[0]) for _ in range(cfg.num_res_blocks)]
        for i in range(len(chans) - 1):
            layers += [nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(chans[i], chans[i + 1], 3, padding=1)]
            layers += [ResidualBlock(chans[i + 1], chans[i + 1]) for _ in range(cfg.num_res_blocks)]
        layers += [group_norm(chans[-1]), nn.SiLU(), nn.Conv2d(chans[-1], 3, 3, padding=1)]
        self.layers = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


@register_model("vq_image_autoencoder", dataclass=VQImageAutoencoderConfig)
class VQImageAutoencoder(dummy_batches.MarksDummyBatches, BaseFairseqModel):
    def __init__(self, cfg: VQImageAutoencoderConfig):
        super().__init__()
        if cfg.downsample_factor not in DOWNSAMPLE_FACTORS:
            raise ValueError(
                f"model.downsample_factor must be one of {DOWNSAMPLE_FACTORS}, got {cfg.downsample_factor}"
            )
        if cfg.latent_vars < 2:
            # One entry per group is no code choice at all (every position gets the same code).
            raise RunConfigError(
                f"model.latent_vars must be at least 2 (codebook entries per group), got {cfg.latent_vars}; "
                f"e.g. model.latent_vars=1024"
            )
        if cfg.code_dim % cfg.latent_groups:
            raise ValueError(
                f"model.code_dim ({cfg.code_dim}) must be divisible by model.latent_groups ({cfg.latent_groups})"
            )
        temperature = checked_temperature(cfg.latent_temp) if cfg.quantizer == "smoothed" else None
        self.cfg = cfg
        self.downsample_factor = cfg.downsample_factor
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        if cfg.quantizer == "vqvae":
            self.quantizer = VQVAEQuantizer(
                cfg.code_dim,
                cfg.latent_vars,
                groups=cfg.latent_groups,
                beta=cfg.commitment_beta,
                rotation_trick=cfg.rotation_trick,
            )
        else:
            self.quantizer = SmoothedVectorQuantizer(
                cfg.code_dim,
                cfg.latent_vars,
                temp=temperature,
                groups=cfg.latent_groups,
                combine_groups=False,
                vq_dim=cfg.code_dim,
                time_first=True,
                **smoothed_quantizer_options(cfg),
            )
        self.num_updates = 0

    @classmethod
    def build_model(cls, cfg: VQImageAutoencoderConfig, task=None):
        return cls(cfg)

    def set_num_updates(self, num_updates: int) -> None:
        super().set_num_updates(num_updates)
        self.num_updates = num_updates

    def check_images(self, images: torch.Tensor) -> None:
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"expected images (B, 3, H, W), got {tuple(images.shape)}")
        f = self.downsample_factor
        if images.shape[2] % f or images.shape[3] % f:
            raise ValueError(
                f"image height and width ({images.shape[2]}x{images.shape[3]}) must be "
                f"multiples of model.downsample_factor={f}"
            )

    def quantize(self, latents: torch.Tensor, is_dummy: bool = False) -> Dict[str, Any]:
        """Quantizes a latent grid (B, C, h, w); ``x`` comes back in the same shape.
        ``is_dummy``: one of fairseq's dummy batches, whose positions the smoothed
        quantizer leaves out of its regulariser and statistics (an all-False mask; see
        :class:`~fairseq_knnvq.models.dummy_batches.MarksDummyBatches`)."""
        bsz, chans, h, w = latents.shape
        positions = latents.flatten(2).transpose(1, 2)  # (B, h*w, C)
        if isinstance(self.quantizer, VQVAEQuantizer):
            result = self.quantizer(positions)
        else:
            mask = torch.zeros(positions.shape[:2], dtype=torch.bool, device=positions.device) if is_dummy else None
            result = self.quantizer(positions, produce_targets=True, mask=mask)
        result["x"] = result["x"].transpose(1, 2).reshape(bsz, -1, h, w)
        # The selected entry per position and group (hard argmax in evaluation).
        result["codes"] = result.pop("targets").reshape(bsz, h, w, -1)
        return result

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        self.check_images(images)
        return self.encoder(images)

    def decode(self, quantized: torch.Tensor) -> torch.Tensor:
        return self.decoder(quantized)

    def training_losses(self) -> Tuple[str, ...]:
        """The quantizer losses that train the model; others it returns (e.g. a KNN loss
        tracked under another regulariser) are only for the logs."""
        if self.cfg.quantizer == "vqvae":
            return ("vq_loss",)
        return {"knn": ("knn_loss",), "diversity": ("diversity_loss",)}.get(str(self.cfg.regularizer), ())

    def forward(self, images: torch.Tensor) -> Dict[str, Any]:
        """Returns the quantizer's outputs (losses, ``usage_sums``, ``codes``
        (B, h, w, G), perplexities, ``temp``) with ``x`` replaced by the reconstruction
        (B, 3, H, W), and ``training_losses``: the keys of the losses to optimise."""
        result = self.quantize(self.encode(images), is_dummy=self.take_dummy_mark())
        result["x"] = self.decode(result["x"])
        result["training_losses"] = self.training_losses()
        return result


dummy_batches.install()
