"""A folder of small structured images, for the tiny image demo, the docs' studies and tests.

Written in ImageNet's layout (``<root>/<split>/<kind>/<file>``), which
:class:`fairseq_knnvq.data.image_folder.ImageFolderDataset` reads. Needs numpy and Pillow;
nothing here imports torch or fairseq.
"""

from __future__ import annotations

import os
from typing import Dict, List

import numpy as np
from PIL import Image


def write_synthetic_image_folder(
    root: str,
    splits: Dict[str, int],
    size: int = 40,
    seed: int = 0,
    jpeg_every: int = 4,
) -> Dict[str, List[str]]:
    """Writes an ImageNet-style folder of small structured images (not noise): coloured
    rectangles and discs on gradients, stripes at random angles, and checkerboards, in
    ``<root>/<split>/<kind>/``. Every ``jpeg_every``-th image is a JPEG, the rest PNG.
    For tests and the tiny demo; returns the paths per split."""
    from PIL import ImageDraw

    rng = np.random.default_rng(seed)
    kinds = ("shapes", "stripes", "checkers")
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / max(1, size - 1)
    written: Dict[str, List[str]] = {}

    def colour():
        return rng.integers(0, 256, size=3)

    for split, count in splits.items():
        written[split] = []
        for i in range(count):
            kind = kinds[i % len(kinds)]
            if kind == "shapes":
                a, b = colour(), colour()
                t = (xx * rng.uniform(-1, 1) + yy * rng.uniform(-1, 1)) % 1.0
                pixels = a[None, None] * (1 - t[..., None]) + b[None, None] * t[..., None]
                im = Image.fromarray(pixels.astype(np.uint8))
                draw = ImageDraw.Draw(im)
                for _ in range(int(rng.integers(1, 4))):
                    x0, y0 = rng.integers(0, size - 8, size=2)
                    w, h = rng.integers(6, size // 2, size=2)
                    box = (int(x0), int(y0), int(min(size - 1, x0 + w)), int(min(size - 1, y0 + h)))
                    fill = tuple(int(c) for c in colour())
                    (draw.ellipse if rng.random() < 0.5 else draw.rectangle)(box, fill=fill)
            elif kind == "stripes":
                angle = rng.uniform(0, np.pi)
                period = rng.uniform(4, 12)
                phase = (xx * np.cos(angle) + yy * np.sin(angle)) * size / period
                t = (np.sin(2 * np.pi * phase) > 0).astype(np.float32)[..., None]
                pixels = colour()[None, None] * t + colour()[None, None] * (1 - t)
                im = Image.fromarray(pixels.astype(np.uint8))
            else:
                cell = int(rng.integers(4, 11))
                t = ((np.arange(size)[:, None] // cell) + (np.arange(size)[None, :] // cell)) % 2
                t = t.astype(np.float32)[..., None]
                pixels = colour()[None, None] * t + colour()[None, None] * (1 - t)
                im = Image.fromarray(pixels.astype(np.uint8))
            folder = os.path.join(root, split, kind)
            os.makedirs(folder, exist_ok=True)
            ext = ".JPEG" if i % jpeg_every == 0 else ".png"
            path = os.path.join(folder, f"{split}_{i:05d}{ext}")
            im.save(path, quality=95) if ext == ".JPEG" else im.save(path)
            written[split].append(path)
    return written
