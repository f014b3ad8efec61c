"""InternVL's dynamic tiling, exactly as transformers' image processor does it.

transformers-native InternVL checkpoints (``InternVLForConditionalGeneration``)
preprocess with ``GotOcr2ImageProcessor`` and ``crop_to_patches=True``
(``image_processing_pil_got_ocr2.py`` / the torchvision variant, transformers 5):

1. Among all ``columns x rows`` grids with ``min_tiles <= columns * rows <= max_tiles``
   (sorted by tile count, stable), take the one whose ``columns / rows`` is closest to
   ``width / height``; on an exact tie a later (larger) grid wins while the image area
   exceeds half the grid's pixel area.
2. Resize the whole image to ``(columns * S, rows * S)`` (bicubic, PIL on 8-bit RGB)
   and cut it into ``S x S`` tiles row by row (left to right, top to bottom).
3. When that gave more than one tile, append a thumbnail: the whole image resized
   straight to ``S x S``.
4. Each view: ``pixels / 255``, ``(x - mean) / std``, channels first.

With ``max_patches <= 1`` the processor skips step 1-3 and squashes the image to
``S x S``: the same as the 1x1 grid. Each view becomes
``(S / patch * downsample_ratio) ** 2`` LLM tokens (pixel shuffle), and
``InternVLProcessor`` writes one image as ``<img>`` + ``<IMG_CONTEXT>`` x
(tokens per tile x views) + ``</img>`` (no separator between tiles).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image

from edgevlm.errors import InvalidRequestError

DEFAULT_TILE_SIZE = 448
DEFAULT_MIN_TILES = 1
DEFAULT_MAX_TILES = 12
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
"""InternVL's normalisation (preprocessor_config.json of the -hf checkpoints)."""


@dataclass(frozen=True)
class TilePlan:
    """How one image is cut into tiles.

    Attributes:
        columns, rows: Grid of ``tile_size`` tiles the resized image is cut into.
        tile_size: Side of a tile in pixels (the tower's image size).
        thumbnail: Whether a whole-image thumbnail follows the grid tiles.
    """

    columns: int
    rows: int
    tile_size: int
    thumbnail: bool

    @property
    def grid_tiles(self) -> int:
        """Tiles cut from the resized image."""
        return self.columns * self.rows

    @property
    def n_tiles(self) -> int:
        """Views the tower encodes: grid tiles plus the thumbnail if any."""
        return self.grid_tiles + int(self.thumbnail)

    @property
    def canvas(self) -> tuple[int, int]:
        """``(width, height)`` the image is resized to before cutting."""
        return self.columns * self.tile_size, self.rows * self.tile_size


def _check_limits(min_tiles: int, max_tiles: int, tile_size: int) -> None:
    if tile_size <= 0:
        raise InvalidRequestError(f"tile size must be positive, got {tile_size}.")
    if not 1 <= min_tiles <= max_tiles:
        raise InvalidRequestError(
            f"tile limits must satisfy 1 <= min_tiles <= max_tiles, got min_tiles={min_tiles}, "
            f"max_tiles={max_tiles}; raise max_tiles or lower min_tiles.")


def candidate_grids(min_tiles: int, max_tiles: int) -> list[tuple[int, int]]:
    """All ``(columns, rows)`` grids with ``min_tiles..max_tiles`` tiles, in the processor's order.

    Args:
        min_tiles, max_tiles: Tile count limits (inclusive).

    Returns:
        Grids sorted (stably) by tile count, columns-major before that.
    """
    grids = [(c, r) for c in range(1, max_tiles + 1) for r in range(1, max_tiles + 1)
             if min_tiles <= c * r <= max_tiles]
    return sorted(grids, key=lambda g: g[0] * g[1])


def closest_grid(width: int, height: int, tile_size: int, min_tiles: int,
                 max_tiles: int) -> tuple[int, int]:
    """The grid transformers picks for a ``width x height`` image (``get_optimal_tiled_canvas``).

    Returns:
        ``(columns, rows)``.
    """
    aspect = width / height
    area = width * height
    best, best_diff = (1, 1), float("inf")
    for grid in candidate_grids(min_tiles, max_tiles):
        diff = abs(aspect - grid[0] / grid[1])
        if diff < best_diff:
            best, best_diff = grid, diff
        elif diff == best_diff and area > 0.5 * tile_size * tile_size * grid[0] * grid[1]:
            best = grid
    return best


def plan_tiles(width: int, height: int, min_tiles: int = DEFAULT_MIN_TILES,
               max_tiles: int = DEFAULT_MAX_TILES, tile_size: int = DEFAULT_TILE_SIZE,
               use_thumbnail: bool = True) -> TilePlan:
    """Plan the tiles of a ``width x height`` image as transformers' InternVL processor does.

    Args:
        width, height: Image size in pixels.
        min_tiles, max_tiles: Grid tile count limits (``min_patches`` / ``max_patches``).
        tile_size: Tile side (the processor's ``size``, the tower's ``image_size``).
        use_thumbnail: Append a thumbnail when the grid has more than one tile.

    Returns:
        The plan.

    Raises:
        InvalidRequestError: a non-positive image or tile size, or bad tile limits.
    """
    if width <= 0 or height <= 0:
        raise InvalidRequestError(f"image size must be positive, got {width}x{height}.")
    _check_limits(min_tiles, max_tiles, tile_size)
    columns, rows = closest_grid(width, height, tile_size, min_tiles, max_tiles)
    return TilePlan(columns, rows, tile_size, use_thumbnail and columns * rows > 1)


def _normalise(img: Image.Image, mean: np.ndarray, std: np.ndarray) -> np.ndarray:
    arr = np.asarray(img, dtype=np.float32) * np.float32(1 / 255)
    return ((arr - mean) / std).transpose(2, 0, 1)


def tile_images(img: Image.Image, plan: TilePlan) -> list[Image.Image]:
    """Cut ``img`` into the 8-bit RGB tiles of ``plan`` (each exactly ``S x S``).

    These are what libmtmd should be given, one bitmap per tile: an image of
    exactly the tower's size goes through libmtmd's internvl preprocessing
    unchanged (no slicing, no resize), whereas a larger image would be sliced
    by libmtmd's own grid rule, which differs from transformers'.

    Args:
        img: The image (converted to RGB here).
        plan: From :func:`plan_tiles` for this image's size.

    Returns:
        ``plan.n_tiles`` images: grid tiles row by row, then the thumbnail.
    """
    img = img.convert("RGB")
    s = plan.tile_size
    canvas = img if img.size == plan.canvas else img.resize(plan.canvas, Image.Resampling.BICUBIC)
    tiles = [canvas.crop((c * s, r * s, (c + 1) * s, (r + 1) * s))
             for r in range(plan.rows) for c in range(plan.columns)]
    if plan.thumbnail:
        tiles.append(img if img.size == (s, s) else img.resize((s, s), Image.Resampling.BICUBIC))
    return tiles


def tile_views(img: Image.Image, plan: TilePlan, mean: Sequence[float] = IMAGENET_MEAN,
               std: Sequence[float] = IMAGENET_STD) -> np.ndarray:
    """Cut ``img`` into the normalised views of ``plan`` (transformers' ``pixel_values``).

    Args:
        img: The image (converted to RGB here).
        plan: From :func:`plan_tiles` for this image's size.
        mean, std: Per-channel normalisation.

    Returns:
        ``(plan.n_tiles, 3, S, S)`` float32: grid tiles row by row, then the thumbnail.
    """
    m = np.asarray(mean, dtype=np.float32)
    d = np.asarray(std, dtype=np.float32)
    return np.ascontiguousarray(np.stack([_normalise(t, m, d) for t in tile_images(img, plan)]),
                                dtype=np.float32)


def tokens_per_tile(tile_size: int, patch_size: int, downsample_ratio: float = 0.5) -> int:
    """LLM tokens one view becomes: the patch grid after pixel shuffle, squared.

    Raises:
        InvalidRequestError: the patch grid does not divide by the shuffle factor.
    """
    if patch_size <= 0 or tile_size % patch_size:
        raise InvalidRequestError(f"tile size {tile_size} is not a multiple of the patch size "
                                  f"{patch_size}.")
    side = tile_size // patch_size * downsample_ratio
    if side != int(side) or side < 1:
        raise InvalidRequestError(f"a {tile_size // patch_size}-patch grid does not shuffle by "
                                  f"{downsample_ratio}.")
    return int(side) ** 2


def budget_max_tiles(max_tokens: int, per_tile: int, min_tiles: int = DEFAULT_MIN_TILES,
                     max_tiles: int = DEFAULT_MAX_TILES, use_thumbnail: bool = True) -> int:
    """The largest ``max_tiles`` (at most the given one) whose worst case fits ``max_tokens``.

    The worst case of a limit ``m > 1`` is ``m`` grid tiles plus the thumbnail.

    Args:
        max_tokens: Image token budget.
        per_tile: :func:`tokens_per_tile`.
        min_tiles, max_tiles: The model's tile limits.
        use_thumbnail: Whether multi-tile images get a thumbnail.

    Returns:
        The lowered ``max_tiles`` (never below ``min_tiles``).

    Raises:
        InvalidRequestError: not even ``min_tiles`` tiles fit the budget.
    """
    _check_limits(min_tiles, max_tiles, 1)
    for limit in range(max_tiles, min_tiles - 1, -1):
        views = limit + int(use_thumbnail and limit > 1)
        if views * per_tile <= max_tokens:
            return limit
    worst = (min_tiles + int(use_thumbnail and min_tiles > 1)) * per_tile
    raise InvalidRequestError(f"an image needs at least {worst} tokens with this model "
                              f"({per_tile} per tile); raise max_tokens (got {max_tokens}).")


def image_tokens(width: int, height: int, *, tile_size: int = DEFAULT_TILE_SIZE,
                 patch_size: int = 14, downsample_ratio: float = 0.5,
                 min_tiles: int = DEFAULT_MIN_TILES, max_tiles: int = DEFAULT_MAX_TILES,
                 use_thumbnail: bool = True, max_tokens: int | None = None) -> int:
    """``<IMG_CONTEXT>`` tokens of a ``width x height`` image (the processor's count).

    Args:
        width, height: Image size.
        tile_size, patch_size, downsample_ratio: Tower geometry.
        min_tiles, max_tiles, use_thumbnail: Tiling settings.
        max_tokens: Optional budget that lowers ``max_tiles`` (:func:`budget_max_tiles`).

    Returns:
        Tokens per tile times views (grid tiles plus thumbnail).

    Raises:
        InvalidRequestError: bad sizes or limits, or a budget below one tile.
    """
    per_tile = tokens_per_tile(tile_size, patch_size, downsample_ratio)
    if max_tokens is not None:
        max_tiles = budget_max_tiles(max_tokens, per_tile, min_tiles, max_tiles, use_thumbnail)
    plan = plan_tiles(width, height, min_tiles, max_tiles, tile_size, use_thumbnail)
    return per_tile * plan.n_tiles
