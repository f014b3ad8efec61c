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

    def plan(self, width: int, height: int) -> ViewPlan:
        """The plan for an image of this size (no pixels needed: images are priced before encoding)."""
        ...

    def embed(self, tower: VisionTower, image: LoadedImage) -> np.ndarray:
        """The image's embeddings (n_tokens, LLM width) float32."""
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

    def plan(self, width: int, height: int) -> ViewPlan:
        return ViewPlan(self.config.n_tokens, f"{self.config.resize}:{self.config.image_size}")

    def embed(self, tower: VisionTower, image: LoadedImage) -> np.ndarray:
        return tower.encode(self.processor(image))
