"""LLaVA-NeXT ("anyres") geometry, token counts and pixel views.

What transformers 5 does (``image_processing_utils.select_best_resolution``,
``LlavaNextImageProcessorPil``, ``LlavaNextProcessor._get_number_of_features``,
``modeling_llava_next.pack_image_features`` / ``unpad_image``):

* Pinpoints are ``(height, width)`` pairs. The best one maximises the image
  area kept after an aspect-preserving downscale (capped at the original area),
  ties broken by the least wasted canvas; the first wins among equals.
* Views: the *base* view is the whole image squashed to ``tile x tile``
  (bicubic); then the image is resized keeping its aspect to fit the best
  resolution (``ceil`` of the scaled side, capped), pasted centred on a black
  (pixel value 0, before normalisation) canvas of the best resolution and cut
  into ``tile x tile`` tiles, row-major. Every view then goes through
  resize-shortest-edge + centre-crop (a no-op for square tiles), ``/255`` and
  ``(x - mean) / std``. Resizing is PIL bicubic on 8-bit RGB (the PIL backend,
  which transformers uses when torchvision is absent).
* Tokens: the base view's ``(tile // patch)^2`` patch tokens, then the tiles'
  patch features arranged as one ``rows*g x cols*g`` grid (``g = tile //
  patch``), the padding rows (or columns) removed (:func:`unpadded_window`),
  and one ``image_newline`` token after each remaining grid row.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image

from edgevlm.errors import ContextOverflowError, InvalidModelError

from .preprocess import preprocess

Pinpoint = tuple[int, int]
"""A candidate resolution ``(height, width)``, as in ``image_grid_pinpoints``."""


def _check_pinpoints(pinpoints: Sequence[Sequence[int]], tile_size: int | None = None) -> list[Pinpoint]:
    """Normalise pinpoints to ``(height, width)`` tuples and check them.

    Raises:
        InvalidModelError: empty, not pairs of positive ints, or (with ``tile_size``)
            not multiples of the tile size.
    """
    out: list[Pinpoint] = []
    for p in pinpoints:
        if len(p) != 2 or any(int(x) != x or int(x) <= 0 for x in p):
            raise InvalidModelError(f"image grid pinpoint {list(p)} is not a (height, width) pair "
                                    "of positive integers; check image_grid_pinpoints.")
        out.append((int(p[0]), int(p[1])))
    if not out:
        raise InvalidModelError("image_grid_pinpoints is empty; a LLaVA-NeXT model needs at least one.")
    if tile_size is not None:
        bad = [p for p in out if p[0] % tile_size or p[1] % tile_size]
        if bad:
            raise InvalidModelError(f"image grid pinpoint {list(bad[0])} is not a multiple of the "
                                    f"{tile_size}-pixel tile size.")
    return out


def select_best_resolution(size_wh: tuple[int, int], pinpoints: Sequence[Sequence[int]]) -> Pinpoint:
    """The pinpoint transformers picks for an image (``select_best_resolution``).

    Args:
        size_wh: Image ``(width, height)`` in pixels (PIL's ``Image.size``).
        pinpoints: Candidate ``(height, width)`` pairs (``image_grid_pinpoints``).

    Returns:
        The chosen ``(height, width)``.

    Raises:
        InvalidModelError: malformed pinpoints.
    """
    width, height = size_wh
    best: Pinpoint | None = None
    best_effective, best_wasted = 0, float("inf")
    for ph, pw in _check_pinpoints(pinpoints):
        scale = min(pw / width, ph / height)
        effective = min(int(width * scale) * int(height * scale), width * height)
        wasted = pw * ph - effective
        if effective > best_effective or (effective == best_effective and wasted < best_wasted):
            best, best_effective, best_wasted = (ph, pw), effective, wasted
    if best is None:  # only when every candidate keeps zero pixels (a 0-sized image)
        raise InvalidModelError(f"no image grid pinpoint fits a {width}x{height} image.")
    return best


def unpadded_window(size_wh: tuple[int, int], grid_hw: tuple[int, int]) -> tuple[int, int, int, int]:
    """Rows and columns of a padded feature grid that hold image (``unpad_image``).

    Args:
        size_wh: Original image ``(width, height)``.
        grid_hw: The full feature grid ``(rows, cols)`` (tiles x patches per tile side).

    Returns:
        ``(row0, row1, col0, col1)``: keep rows ``row0:row1`` and columns ``col0:col1``.
    """
    width, height = size_wh
    rows, cols = grid_hw
    if width / height > cols / rows:
        new_rows = int(round(height * (cols / width), 7))
        pad = (rows - new_rows) // 2
        return pad, rows - pad, 0, cols
    new_cols = int(round(width * (rows / height), 7))
    pad = (cols - new_cols) // 2
    return 0, rows, pad, cols - pad


@dataclass(frozen=True)
class AnyresPlan:
    """How one image is cut and how many embeddings it becomes.

    Attributes:
        image_size: Original ``(width, height)``.
        best_resolution: Chosen pinpoint ``(height, width)``.
        grid: Tiles ``(cols, rows)``.
        tile_size: Side of every view in pixels (the tower's image size).
        patch_size: Side of a tower patch in pixels.
        window: Kept ``(row0, row1, col0, col1)`` of the tiles' feature grid.
    """

    image_size: tuple[int, int]
    best_resolution: Pinpoint
    grid: tuple[int, int]
    tile_size: int
    patch_size: int
    window: tuple[int, int, int, int]

    @property
    def n_views(self) -> int:
        """Base view plus tiles."""
        return 1 + self.grid[0] * self.grid[1]

    @property
    def tokens_per_view(self) -> int:
        """Patch tokens the tower gives for one view (CLS excluded)."""
        return (self.tile_size // self.patch_size) ** 2

    @property
    def unpadded_hw(self) -> tuple[int, int]:
        """Feature rows and columns kept after unpadding."""
        r0, r1, c0, c1 = self.window
        return r1 - r0, c1 - c0

    @property
    def n_tokens(self) -> int:
        """Embeddings handed to the LLM: base view + unpadded grid + one newline per row."""
        rows, cols = self.unpadded_hw
        return self.tokens_per_view + rows * (cols + 1)


def _plan_for(size_wh: tuple[int, int], best: Pinpoint, tile_size: int, patch_size: int) -> AnyresPlan:
    cols, rows = best[1] // tile_size, best[0] // tile_size
    g = tile_size // patch_size
    window = unpadded_window(size_wh, (rows * g, cols * g))
    return AnyresPlan(size_wh, best, (cols, rows), tile_size, patch_size, window)


def plan_anyres(width: int, height: int, pinpoints: Sequence[Sequence[int]], tile_size: int,
                patch_size: int, max_tokens: int | None = None) -> AnyresPlan:
    """Plan the views and token count of one ``width x height`` image.

    Without ``max_tokens`` this is exactly transformers' choice. With it, only
    pinpoints whose plan has at most ``max_tokens`` embeddings are candidates
    (the best among them by the same rule); the model itself then sees a
    different tiling than transformers would give it.

    Args:
        width, height: Image size in pixels.
        pinpoints: ``(height, width)`` candidates, multiples of ``tile_size``.
        tile_size: The tower's input side.
        patch_size: The tower's patch side.
        max_tokens: Optional budget of embeddings for this image.

    Returns:
        The plan.

    Raises:
        InvalidModelError: bad pinpoints or sizes.
        ContextOverflowError: no pinpoint fits ``max_tokens`` (the message gives the
            smallest possible count); edgevlm never silently exceeds the budget.
    """
    if width <= 0 or height <= 0:
        raise InvalidModelError(f"image size {width}x{height} is empty.")
    if tile_size <= 0 or patch_size <= 0 or tile_size % patch_size:
        raise InvalidModelError(f"tile size {tile_size} is not a positive multiple of the "
                                f"patch size {patch_size}.")
    candidates = _check_pinpoints(pinpoints, tile_size)
    size = (width, height)
    if max_tokens is not None:
        plans = {p: _plan_for(size, p, tile_size, patch_size) for p in candidates}
        fitting = [p for p in candidates if plans[p].n_tokens <= max_tokens]
        if not fitting:
            least = min(plan.n_tokens for plan in plans.values())
            raise ContextOverflowError(
                f"a {width}x{height} image needs at least {least} image tokens with this model's "
                f"grid pinpoints, more than the budget of {max_tokens}; raise the image token "
                "budget or the context size.")
        candidates = fitting
    return _plan_for(size, select_best_resolution(size, candidates), tile_size, patch_size)


def fit_anyres(width: int, height: int, pinpoints: Sequence[Sequence[int]], tile_size: int,
               patch_size: int, max_tokens: int | None) -> AnyresPlan:
    """:func:`plan_anyres` within ``max_tokens`` if any pinpoint fits, else the plan with fewest tokens.

    The caller decides whether a plan over the budget is an error (an explicit
    budget) or acceptable (the context-derived default cap).
    """
    try:
        return plan_anyres(width, height, pinpoints, tile_size, patch_size, max_tokens)
    except ContextOverflowError:
        size = (width, height)
        plans = [_plan_for(size, p, tile_size, patch_size) for p in _check_pinpoints(pinpoints, tile_size)]
        return min(plans, key=lambda plan: plan.n_tokens)


def image_tokens(width: int, height: int, pinpoints: Sequence[Sequence[int]], tile_size: int,
                 patch_size: int, max_tokens: int | None = None) -> int:
    """Embeddings a ``width x height`` image becomes (LlavaNextProcessor's count).

    Equals ``LlavaNextProcessor._get_number_of_features`` minus the CLS token
    (``vision_feature_select_strategy="default"``, ``num_additional_image_tokens=1``).

    Raises:
        InvalidModelError, ContextOverflowError: see :func:`plan_anyres`.
    """
    return plan_anyres(width, height, pinpoints, tile_size, patch_size, max_tokens).n_tokens


def fit_and_pad(img: Image.Image, best: Pinpoint) -> Image.Image:
    """Aspect-preserving bicubic resize into ``best`` (h, w), pasted centred on black."""
    (th, tw), (w, h) = best, img.size
    if tw / w < th / h:
        new_w, new_h = tw, min(math.ceil(h * (tw / w)), th)
    else:
        new_w, new_h = min(math.ceil(w * (th / h)), tw), th
    resized = img.resize((new_w, new_h), Image.Resampling.BICUBIC)
    canvas = Image.new("RGB", (tw, th), (0, 0, 0))
    canvas.paste(resized, ((tw - new_w) // 2, (th - new_h) // 2))
    return canvas


def tile_crops(img: Image.Image, best: Pinpoint, tile_size: int) -> list[Image.Image]:
    """``img`` fitted into ``best`` (h, w) on black, cut into ``tile_size`` tiles row-major."""
    canvas = fit_and_pad(img, best)
    s = tile_size
    return [canvas.crop((x * s, y * s, x * s + s, y * s + s))
            for y in range(best[0] // s) for x in range(best[1] // s)]


def anyres_views(image: Image.Image, plan: AnyresPlan, mean: Sequence[float],
                 std: Sequence[float]) -> np.ndarray:
    """Normalised pixels of every view: base first, then the tiles row-major.

    Args:
        image: The picture (any PIL mode; converted to RGB).
        plan: From :func:`plan_anyres` for this image's size.
        mean, std: Per-channel normalisation.

    Returns:
        float32 array ``(plan.n_views, 3, tile, tile)``.

    Raises:
        InvalidModelError: the plan was made for another image size.
    """
    img = image.convert("RGB")
    if img.size != plan.image_size:
        raise InvalidModelError(f"the anyres plan is for a {plan.image_size[0]}x{plan.image_size[1]} "
                                f"image, not {img.size[0]}x{img.size[1]}; plan this image first.")
    s = plan.tile_size
    views = [img.resize((s, s), Image.Resampling.BICUBIC)] + tile_crops(img, plan.best_resolution, s)
    return np.stack([preprocess(v, size=s, mode="shortest-edge-crop", mean=mean, std=std)
                     for v in views])
