"""How the kernels engine turns one image into the LLM's embeddings (a family's choice).

A :class:`KernelsPipeline` plans an image (how many embeddings it becomes,
and an identity for the views it uses, which goes into the cache keys so
that a different plan never reuses the wrong embeddings) and computes them
on the tower. :class:`SingleView` is the common case (one preprocessed view);
tiled families (LLaVA-NeXT) bring their own.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import numpy as np

from edgevlm.vision.images import LoadedImage

if TYPE_CHECKING:  # pragma: no cover
    from edgevlm.kernels.vision import TowerConfig, VisionTower


@dataclass(frozen=True)
class ViewPlan:
    """What one image becomes.

    Attributes:
        n_tokens: embeddings the LLM receives.
        variant: identity of the views (size, grid, ...), part of the cache key.
        n_views: views the tower encodes.
    """

    n_tokens: int
    variant: str
    n_views: int = 1


class KernelsPipeline(Protocol):
    """Plan and embed images on a :class:`~edgevlm.kernels.vision.VisionTower`."""

    def plan(self, width: int, height: int, max_tokens: int | None = None) -> ViewPlan:
        """The plan for an image of this size (no pixels needed: images are priced before encoding).

        With ``max_tokens``, the best plan within it, else the smallest one.
        """
        ...

    def embed(self, tower: VisionTower, image: LoadedImage, max_tokens: int | None = None) -> np.ndarray:
        """The image's embeddings (n_tokens, LLM width) float32, by ``plan(..., max_tokens)``."""
        ...


class SingleView:
    """One view per image, preprocessed by the family's image processor.

    Args:
        config: the tower's configuration.
        processor: image -> normalised pixels (3, S, S).
    """

    def __init__(self, config: TowerConfig, processor: Callable[[LoadedImage], np.ndarray]) -> None:
        self.config = config
        self.processor = processor

    def plan(self, width: int, height: int, max_tokens: int | None = None) -> ViewPlan:
        return ViewPlan(self.config.n_tokens, f"{self.config.resize}:{self.config.image_size}")

    def embed(self, tower: VisionTower, image: LoadedImage, max_tokens: int | None = None) -> np.ndarray:
        return tower.encode(self.processor(image))


#: Grids (rows, cols) of the llava-v1.6 pinpoints (336-px tiles: 336x672, 672x336,
#: 672x672, 1008x336, 336x1008), used for ``tiles="grid"`` at any tile size.
DEFAULT_GRIDS = ((1, 2), (2, 1), (2, 2), (3, 1), (1, 3))


class GridPipeline:
    """``tiles="grid"`` for models trained on one view: the overview, then LLaVA-NeXT-style tiles.

    The grid is the best of :data:`DEFAULT_GRIDS` by transformers'
    ``select_best_resolution`` among those whose tokens fit the budget
    (``(1 + tiles) * tokens_per_view``); when none fits, the overview alone.
    Each tile is the fitted-and-padded image cut at the tower's size; the
    views' embeddings are concatenated in order (overview first), with no
    separator (the model has no learned one).
    """

    def __init__(self, single: SingleView) -> None:
        self.single = single
        self.config = single.config

    def grid(self, width: int, height: int, max_tokens: int | None) -> tuple[int, int] | None:
        """The chosen pinpoint (height, width) in pixels, or None for the overview alone."""
        from edgevlm.vision.anyres import select_best_resolution

        side, per_view = self.config.image_size, self.config.n_tokens
        pinpoints = [(r * side, c * side) for r, c in DEFAULT_GRIDS
                     if max_tokens is None or (1 + r * c) * per_view <= max_tokens]
        return select_best_resolution((width, height), pinpoints) if pinpoints else None

    def plan(self, width: int, height: int, max_tokens: int | None = None) -> ViewPlan:
        base = self.single.plan(width, height)
        best = self.grid(width, height, max_tokens)
        if best is None:
            return ViewPlan(base.n_tokens, f"grid:1x1:{base.variant}")
        side = self.config.image_size
        rows, cols = best[0] // side, best[1] // side
        return ViewPlan(base.n_tokens * (1 + rows * cols), f"grid:{cols}x{rows}:{base.variant}", 1 + rows * cols)

    def embed(self, tower: VisionTower, image: LoadedImage, max_tokens: int | None = None) -> np.ndarray:
        from edgevlm.vision.anyres import tile_crops
        from edgevlm.vision.images import to_pil
        from edgevlm.vision.preprocess import preprocess

        cfg = self.config
        views = [self.single.processor(image)]
        best = self.grid(image.width, image.height, max_tokens)
        if best is not None:
            views += [preprocess(tile, size=cfg.image_size, mode=cfg.resize, mean=cfg.image_mean,
                                 std=cfg.image_std) for tile in tile_crops(to_pil(image), best, cfg.image_size)]
        if len(views) == 1:
            return tower.encode(views[0])
        return tower.encode_views(np.stack(views)).reshape(-1, cfg.output_width)
