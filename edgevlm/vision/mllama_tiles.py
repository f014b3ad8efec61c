"""Llama-3.2-Vision (mllama) image preprocessing: what transformers' ``MllamaImageProcessor`` does.

An image becomes a canvas of ``tiles high x tiles wide`` square tiles (at most
``max_image_tiles`` in all), chosen as the processor does:

1. every arrangement with ``h * w <= max_image_tiles``, enumerated as
   ``(1, 1), (1, 2), ..., (2, 1), ...`` (first number: tiles high);
2. for each canvas the scale that fits the image inside it (the smaller of
   the height and width scales); the smallest scale >= 1 (the least
   up-scaling) if any canvas needs no down-scaling, else the largest scale
   below 1; ties go to the smallest canvas area;
3. the image is resized keeping its aspect ratio so that it fits the canvas
   but is at least one tile on each side (PIL, the processor's filter,
   bilinear by default, on 8-bit RGB), padded with black at the bottom and
   right to the canvas, then ``x / 255`` and ``(x - mean) / std``;
4. the canvas is cut into tiles in raster order, and tiles up to the
   encoder's ``max_num_tiles`` are zero (already normalised: exactly 0).

``aspect_ratio_id`` is ``1 +`` the arrangement's index in the model's
``supported_aspect_ratios``; ``aspect_ratio_mask`` is 1 for the real tiles.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image

from edgevlm.errors import InvalidModelError, InvalidRequestError

RESAMPLE_FILTERS = {"nearest": Image.Resampling.NEAREST, "bilinear": Image.Resampling.BILINEAR,
                    "bicubic": Image.Resampling.BICUBIC, "lanczos": Image.Resampling.LANCZOS}


@dataclass(frozen=True)
class MllamaTiles:
    """One image ready for the mllama vision encoder.

    Attributes:
        pixels: ``(max_num_tiles, 3, S, S)`` float32; tiles past ``n_tiles`` are zero.
        arrangement: ``(tiles high, tiles wide)``.
        aspect_ratio_id: ``1 +`` the arrangement's index in the model's supported list.
        resized: ``(height, width)`` of the image on the canvas before padding.
    """

    pixels: np.ndarray
    arrangement: tuple[int, int]
    aspect_ratio_id: int
    resized: tuple[int, int]

    @property
    def n_tiles(self) -> int:
        return self.arrangement[0] * self.arrangement[1]

    @property
    def aspect_ratio_mask(self) -> np.ndarray:
        """``(max_num_tiles,)`` int64: 1 for the image's tiles, 0 for padding tiles."""
        mask = np.zeros(len(self.pixels), dtype=np.int64)
        mask[:self.n_tiles] = 1
        return mask


def tile_arrangements(max_tiles: int) -> list[tuple[int, int]]:
    """Every ``(tiles high, tiles wide)`` with at most ``max_tiles`` tiles, in the processor's order."""
    if max_tiles < 1:
        raise InvalidRequestError(f"max_image_tiles must be at least 1, not {max_tiles}")
    return [(h, w) for h in range(1, max_tiles + 1) for w in range(1, max_tiles + 1) if h * w <= max_tiles]


def best_canvas(height: int, width: int, max_tiles: int, tile: int) -> tuple[int, int]:
    """The canvas ``(height, width)`` in pixels an image of ``height x width`` is placed on."""
    options = []
    for h, w in tile_arrangements(max_tiles):
        scale = min(h * tile / height, w * tile / width)
        options.append((scale, h * tile, w * tile))
    up = [o for o in options if o[0] >= 1]
    chosen = min(o[0] for o in up) if up else max(o[0] for o in options)
    best = min((o for o in options if o[0] == chosen), key=lambda o: o[1] * o[2])
    return best[1], best[2]


def fit_to_canvas(height: int, width: int, canvas_h: int, canvas_w: int, tile: int) -> tuple[int, int]:
    """The resized ``(height, width)``: aspect ratio kept, within the canvas, at least a tile."""
    target_w = min(max(width, tile), canvas_w)
    target_h = min(max(height, tile), canvas_h)
    scale_h, scale_w = target_h / height, target_w / width
    if scale_w < scale_h:
        return min(math.floor(height * scale_w) or 1, target_h), target_w
    return target_h, min(math.floor(width * scale_h) or 1, target_w)


def _normalise(rgb: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """uint8 (H, W, 3) -> float32 (3, H, W): ``x / 255`` (in float64, as the processor), then standardised."""
    scaled = (rgb.astype(np.float64) * (1 / 255)).astype(np.float32).transpose(2, 0, 1)
    m = np.asarray(mean, dtype=np.float32).reshape(3, 1, 1)
    s = np.asarray(std, dtype=np.float32).reshape(3, 1, 1)
    return (scaled - m) / s


def mllama_tiles(img: Image.Image, *, tile_size: int, max_image_tiles: int, max_num_tiles: int,
                 aspect_ratios: Sequence[tuple[int, int]], mean: Sequence[float],
                 std: Sequence[float], resample: str = "bilinear") -> MllamaTiles:
    """Preprocess one RGB image as ``MllamaImageProcessor`` does (see the module docstring).

    Args:
        img: The image (converted to RGB if it is not).
        tile_size: The encoder's tile side in pixels (``vision_config.image_size``).
        max_image_tiles: The processor's ``max_image_tiles``.
        max_num_tiles: Tiles the encoder takes (``vision_config.max_num_tiles``).
        aspect_ratios: The model's ``supported_aspect_ratios`` (tiles high, tiles wide).
        mean, std: Normalisation per channel.
        resample: One of :data:`RESAMPLE_FILTERS`.

    Returns:
        The tiles, their arrangement and aspect-ratio id.

    Raises:
        InvalidModelError: the arrangement is not among the model's aspect ratios, or
            ``max_image_tiles`` exceeds ``max_num_tiles``, or an unknown filter.
    """
    if max_image_tiles > max_num_tiles:
        raise InvalidModelError(f"max_image_tiles {max_image_tiles} exceeds the encoder's "
                                f"max_num_tiles {max_num_tiles}")
    if resample not in RESAMPLE_FILTERS:
        raise InvalidModelError(f"unknown resample filter {resample!r}; known: {', '.join(RESAMPLE_FILTERS)}")
    rgb = img if img.mode == "RGB" else _to_rgb(img)
    width, height = rgb.size
    canvas_h, canvas_w = best_canvas(height, width, max_image_tiles, tile_size)
    new_h, new_w = fit_to_canvas(height, width, canvas_h, canvas_w, tile_size)
    resized = rgb.resize((new_w, new_h), RESAMPLE_FILTERS[resample])
    canvas = np.zeros((canvas_h, canvas_w, 3), dtype=np.uint8)
    canvas[:new_h, :new_w] = np.asarray(resized, dtype=np.uint8)
    rows, cols = canvas_h // tile_size, canvas_w // tile_size
    pixels = _normalise(canvas, mean, std)
    tiles = pixels.reshape(3, rows, tile_size, cols, tile_size).transpose(1, 3, 0, 2, 4)
    out = np.zeros((max_num_tiles, 3, tile_size, tile_size), dtype=np.float32)
    out[:rows * cols] = tiles.reshape(rows * cols, 3, tile_size, tile_size)
    ratios = [tuple(r) for r in aspect_ratios]
    if (rows, cols) not in ratios:
        raise InvalidModelError(f"the image needs {rows}x{cols} tiles, which is not among the "
                                f"model's supported_aspect_ratios {ratios}")
    return MllamaTiles(out, (rows, cols), ratios.index((rows, cols)) + 1, (new_h, new_w))


def _to_rgb(img: Image.Image) -> Image.Image:
    """As the processor's ``convert_to_rgb``: alpha composited on white."""
    rgba = img.convert("RGBA")
    background = Image.new("RGBA", rgba.size, (255, 255, 255))
    return Image.alpha_composite(background, rgba).convert("RGB")
