"""Images from an ImageNet-style folder or a file list, as a fairseq dataset.

A split is ``<root>/<split>/<class>/*.JPEG`` (any depth, any common image extension)
or a file list ``<root>/<split>.txt`` with one image path per line (absolute or
relative to ``root``). Images are decoded with Pillow, the shorter side is resized to
``resize_size`` and a square of ``image_size`` is cropped (random crop and horizontal
flip for training, centre crop otherwise); pixels are scaled to [-1, 1].

Unreadable files. Checking 1.28 M ImageNet files at start-up would take longer than an
epoch of a small model, so files are only listed up front and a corrupt or unreadable
one is found when it is loaded. Depending on ``on_unreadable`` it is then either
replaced by the next readable image of the split (training and validation: batches
keep their size, which the KNN loss depends on) or dropped (evaluation: every image
counts once). Either way the batch carries ``unreadable``: the files and the reasons,
so that the main process can warn once per file and count them, also when the
loading runs in data-loader worker processes (see :mod:`fairseq_knnvq.tasks.unreadable_files`).
"""

from __future__ import annotations

import logging
import os
from typing import Any, Dict, List, Optional, Sequence

import numpy as np
import torch
from PIL import Image

from fairseq.data import FairseqDataset

from .unreadable import MAX_REPLACEMENT_TRIES

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (
    ".jpeg",
    ".jpg",
    ".png",
    ".bmp",
    ".webp",
    ".ppm",
    ".pgm",
    ".tif",
    ".tiff",
    ".gif",
)
# fairseq's valid subset is called "valid"; ImageNet calls its folder "val".
SPLIT_ALIASES = {"valid": ("val",), "val": ("valid",)}
_DECODE_ERRORS = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)


def is_image_file(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS)


def list_image_folder(folder: str) -> List[str]:
    """All image files under ``folder`` (recursively), sorted, as absolute paths."""
    found = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        dirnames.sort()
        found.extend(os.path.join(dirpath, f) for f in sorted(filenames) if is_image_file(f))
    return [os.path.abspath(p) for p in found]


def read_file_list(list_path: str, root: Optional[str] = None) -> List[str]:
    """Paths of a file list: one per line, blank lines and ``#`` comments ignored;
    relative paths are taken relative to ``root`` (default: the list's folder)."""
    root = root if root is not None else os.path.dirname(os.path.abspath(list_path))
    paths = []
    with open(list_path, encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            paths.append(os.path.abspath(os.path.join(root, line)))
    return paths


def find_split(root: str, split: str) -> List[str]:
    """The image paths of ``split`` under ``root``; raises ``FileNotFoundError`` naming
    every place it looked when the split is missing or holds no image."""
    if not os.path.isdir(root):
        raise FileNotFoundError(
            f"image data folder {root!r} does not exist; set task.data to the folder that "
            f"holds the splits (e.g. <root>/train/<class>/*.JPEG)"
        )
    tried = []
    for name in (split,) + SPLIT_ALIASES.get(split, ()):
        folder = os.path.join(root, name)
        list_file = os.path.join(root, name + ".txt")
        if os.path.isdir(folder):
            paths = list_image_folder(folder)
            if not paths:
                raise FileNotFoundError(
                    f"split {split!r}: folder {folder!r} holds no image file "
                    f"({', '.join(IMAGE_EXTENSIONS)}); put the images there or remove it"
                )
            return paths
        if os.path.isfile(list_file):
            paths = read_file_list(list_file, root)
            if not paths:
                raise FileNotFoundError(f"split {split!r}: file list {list_file!r} is empty")
            return paths
        tried += [folder + "/", list_file]
    raise FileNotFoundError(
        f"split {split!r} not found: looked for {', '.join(tried)}. Create the folder "
        f"(<root>/{split}/<class>/<image>) or a file list, or point "
        f"dataset.train_subset / dataset.valid_subset at an existing split"
    )


# Modes whose pixels are integers on a 16-bit scale (0 = black, 65535 = white):
# 16-bit PNGs and TIFFs; Pillow's convert("RGB") clips them at 255, i.e. saturates.
_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")
# Transparent pixels are shown over this colour (as an image viewer shows them on a
# white page); their stored colour is often arbitrary.
ALPHA_BACKGROUND = 255


def to_rgb(im: Image.Image) -> Image.Image:
    """Any image Pillow opens, as 8-bit RGB with its intended brightness.

    * 16-bit grey (``I;16*``, and ``I``, which Pillow uses for 16-bit PNGs and TIFFs):
      0..65535 is mapped linearly to 0..255 (``round(v / 257)``), values outside
      clipped; ``convert("RGB")`` would clip at 255 and turn almost all of it white.
    * 32-bit float (``F``): taken as 0..1 (TIFF convention), clipped, times 255.
    * alpha (``RGBA``, ``LA``, ``PA``, ``La``, ``RGBa``, palettes with a transparent
      entry): composited over white, ``round(c * a + 255 * (1 - a))`` with ``a`` in 0..1.
    * palette (``P``), ``CMYK``, ``YCbCr``, ``L``, ``1``: Pillow's own conversion.
    """
    mode = im.mode
    if mode in _SIXTEEN_BIT_MODES:
        grey = np.clip(np.rint(np.asarray(im, dtype=np.float64) / 257.0), 0, 255).astype(np.uint8)
        return Image.fromarray(grey, "L").convert("RGB")
    if mode == "F":
        grey = np.clip(np.rint(np.asarray(im, dtype=np.float64) * 255.0), 0, 255).astype(np.uint8)
        return Image.fromarray(grey, "L").convert("RGB")
    has_alpha = mode in ("RGBA", "LA", "PA", "La", "RGBa") or (mode in ("P", "L", "RGB") and "transparency" in im.info)
    if not has_alpha:
        return im.convert("RGB")
    rgba = np.asarray(im.convert("RGBA"), dtype=np.float64)
    alpha = rgba[..., 3:] / 255.0
    rgb = np.rint(rgba[..., :3] * alpha + ALPHA_BACKGROUND * (1.0 - alpha))
    return Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8), "RGB")


def load_image(path: str, resize_size: int) -> Image.Image:
    """Decodes ``path`` as RGB (see :func:`to_rgb` for the modes) with its shorter side
    resized to ``resize_size``."""
    with Image.open(path) as im:
        # JPEG only: decode at a reduced DCT scale that is still >= the target size.
        im.draft("RGB", (resize_size, resize_size))
        im = to_rgb(im)
    width, height = im.size
    scale = resize_size / min(width, height)
    if scale != 1.0:
        size = (max(resize_size, round(width * scale)), max(resize_size, round(height * scale)))
        im = im.resize(size, Image.BICUBIC)
    return im


def crop_and_scale(im: Image.Image, image_size: int, rng: Optional[np.random.Generator]) -> torch.Tensor:
    """Crops a square (random offsets and a coin-flip mirror when ``rng`` is given, the
    centre otherwise) and returns a float tensor (3, S, S) in [-1, 1]."""
    width, height = im.size
    if rng is None:
        left, top = (width - image_size) // 2, (height - image_size) // 2
    else:
        left = int(rng.integers(0, width - image_size + 1))
        top = int(rng.integers(0, height - image_size + 1))
    im = im.crop((left, top, left + image_size, top + image_size))
    if rng is not None and rng.random() < 0.5:
        im = im.transpose(Image.FLIP_LEFT_RIGHT)
    pixels = torch.from_numpy(np.asarray(im, dtype=np.uint8).copy())
    return pixels.permute(2, 0, 1).float().div_(127.5).sub_(1.0)


class ImageFolderDataset(FairseqDataset):
    """Square image crops in [-1, 1].

    Args:
        paths: image files.
        image_size: side of the square crop.
        resize_size: the shorter side is resized to this before cropping
            (default ``image_size``; must be >= ``image_size``).
        augment: random crop and flip (training); centre crop otherwise.
        shuffle: ``ordered_indices`` permutes the images (fairseq seeds numpy with
            ``seed + epoch`` around that call, so the order changes every epoch).
        seed: with the epoch and the index, seeds each image's crop and flip, so the
            augmentation is reproducible whatever the number of data-loader workers.
        on_unreadable: ``replace`` (by the next readable image) or ``drop``.
    """

    def __init__(
        self,
        paths: Sequence[str],
        image_size: int,
        resize_size: Optional[int] = None,
        augment: bool = False,
        shuffle: bool = False,
        seed: int = 1,
        on_unreadable: str = "replace",
    ):
        super().__init__()
        if image_size < 1:
            raise ValueError(f"image_size must be >= 1, got {image_size}")
        resize_size = image_size if resize_size is None else resize_size
        if resize_size < image_size:
            raise ValueError(
                f"resize_size ({resize_size}) must be >= image_size ({image_size}): the "
                f"crop is taken from the resized image"
            )
        if on_unreadable not in ("replace", "drop"):
            raise ValueError(f"on_unreadable must be 'replace' or 'drop', got {on_unreadable!r}")
        if not paths:
            raise ValueError("ImageFolderDataset needs at least one image path")
        self.paths = list(paths)
        self.image_size, self.resize_size = image_size, resize_size
        self.augment, self.shuffle, self.seed = augment, shuffle, seed
        self.on_unreadable = on_unreadable
        self.epoch = 1

    def __len__(self) -> int:
        return len(self.paths)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _rng(self, index: int) -> Optional[np.random.Generator]:
        if not self.augment:
            return None
        return np.random.default_rng([self.seed, self.epoch, index])

    def _load(self, index: int) -> torch.Tensor:
        return crop_and_scale(load_image(self.paths[index], self.resize_size), self.image_size, self._rng(index))

    def __getitem__(self, index: int) -> Dict[str, Any]:
        unreadable = []
        tries = 1 if self.on_unreadable == "drop" else min(MAX_REPLACEMENT_TRIES, len(self))
        for step in range(tries):
            current = (index + step) % len(self)
            try:
                image = self._load(current)
            except _DECODE_ERRORS as e:
                unreadable.append((self.paths[current], f"{type(e).__name__}: {e}"))
                continue
            return {"id": index, "image": image, "unreadable": unreadable}
        if self.on_unreadable == "drop":
            return {"id": index, "image": None, "unreadable": unreadable}
        raise RuntimeError(
            f"could not read any of {tries} consecutive images starting at "
            f"{self.paths[index]!r} (first error: {unreadable[0][1]}); check the data"
        )

    def collater(self, samples: List[Dict[str, Any]]) -> Dict[str, Any]:
        unreadable = [u for s in samples for u in s["unreadable"]]
        samples = [s for s in samples if s["image"] is not None]
        if not samples:
            # An empty dict is fairseq's marker for "nothing to do" (a dummy batch).
            return {"unreadable": unreadable} if unreadable else {}
        return {
            "id": torch.tensor([s["id"] for s in samples], dtype=torch.long),
            "net_input": {"images": torch.stack([s["image"] for s in samples])},
            "nsentences": len(samples),
            "ntokens": len(samples),
            "unreadable": unreadable,
        }

    def num_tokens(self, index: int) -> int:
        # One image counts as one "token", so dataset.max_tokens also counts images.
        return 1

    def size(self, index: int) -> int:
        return self.image_size

    def ordered_indices(self) -> np.ndarray:
        if self.shuffle:
            return np.random.permutation(len(self))
        return np.arange(len(self), dtype=np.int64)

    @property
    def supports_prefetch(self) -> bool:
        return False
