"""Image preprocessing for the kernels vision engine (what HF image processors do).

Modes (``edgevlm.image.resize``):

* ``shortest-edge-crop`` — CLIPImageProcessor: resize so the shortest side is
  ``size`` (bicubic, the longer side ``int(size * long / short)``), centre-crop
  ``size x size`` (offsets ``(dim - size) // 2``).
* ``squash`` — SiglipImageProcessor: resize straight to ``size x size`` (bicubic).
* ``pad-square`` — original LLaVA-1.5: pad to a square with the mean colour,
  then resize to ``size x size`` (bicubic).

Then ``pixels / 255``, ``(x - mean) / std``, channels first, float32. Resizing
uses PIL on 8-bit RGB as the "slow" HF processors do.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

from edgevlm.errors import InvalidModelError
from edgevlm.vision.images import LoadedImage

if TYPE_CHECKING:  # pragma: no cover
    from edgevlm.kernels.vision import TowerConfig

RESIZE_MODES = ("shortest-edge-crop", "squash", "pad-square")


def _shortest_edge_crop(img: Image.Image, size: int) -> Image.Image:
    w, h = img.size
    if (w, h) != (size, size):
        short, long = (w, h) if w <= h else (h, w)
        new_long = int(size * long / short)
        new = (size, new_long) if w <= h else (new_long, size)
        if new != (w, h):
            img = img.resize(new, Image.Resampling.BICUBIC)
    w, h = img.size
    left, top = (w - size) // 2, (h - size) // 2
    if (left, top) != (0, 0) or (w, h) != (size, size):
        img = img.crop((left, top, left + size, top + size))
    return img


def _pad_square(img: Image.Image, mean: Sequence[float]) -> Image.Image:
    w, h = img.size
    if w == h:
        return img
    side = max(w, h)
    canvas = Image.new("RGB", (side, side), tuple(int(m * 255) for m in mean))
    canvas.paste(img, ((side - w) // 2, (side - h) // 2))
    return canvas


def preprocess(img: Image.Image, *, size: int, mode: str, mean: Sequence[float],
               std: Sequence[float]) -> np.ndarray:
    """An RGB image -> normalised pixels (3, size, size) float32.

    Raises:
        InvalidModelError: an unknown resize mode in the projector file.
    """
    if mode not in RESIZE_MODES:
        raise InvalidModelError(f"unknown image resize mode {mode!r} in the projector file; "
                                f"supported: {', '.join(RESIZE_MODES)}")
    img = img.convert("RGB")
    if mode == "pad-square":
        img = _pad_square(img, mean)
    if mode == "shortest-edge-crop":
        img = _shortest_edge_crop(img, size)
    elif img.size != (size, size):
        img = img.resize((size, size), Image.Resampling.BICUBIC)
    arr = np.asarray(img, dtype=np.float32) * np.float32(1 / 255)
    arr = (arr - np.asarray(mean, dtype=np.float32)) / np.asarray(std, dtype=np.float32)
    return np.ascontiguousarray(arr.transpose(2, 0, 1), dtype=np.float32)


def tower_pixels(image: LoadedImage, tower: TowerConfig) -> np.ndarray:
    """``image`` preprocessed as the tower's projector file declares: (3, S, S) float32."""
    pil = Image.frombytes("RGB", (image.width, image.height), image.rgb)
    return preprocess(pil, size=tower.image_size, mode=tower.resize, mean=tower.image_mean,
                      std=tower.image_std)
