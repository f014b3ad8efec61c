"""LLaVA-NeXT ("anyres") packing of per-view features, as transformers' ``pack_image_features``.

One image becomes a base view and a grid of tiles (the runtime's LLaVA-NeXT
family plans and cuts them); all views run through the tower in one batched
graph (:meth:`edgevlm.kernels.vision.VisionTower.encode_views`), and
:func:`pack_anyres` lays the features out: base view first, then the tiles'
features as one grid, cut to the unpadded window (``unpad_image``), with the
learned ``image_newline`` after each row.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np

from edgevlm.errors import InvalidModelError


class PackingLayout(Protocol):
    """What packing needs of an image's plan (``edgevlm.vision.anyres.AnyresPlan`` has it)."""

    grid: tuple[int, int]
    window: tuple[int, int, int, int]
    tile_size: int
    patch_size: int

    @property
    def n_views(self) -> int: ...


def pack_anyres(features: np.ndarray, plan: PackingLayout, image_newline: np.ndarray) -> np.ndarray:
    """Lay out per-view features as transformers' ``pack_image_features``.

    Base view first; then the tiles' features arranged as one grid of
    ``rows * g`` x ``cols * g`` tokens (``g`` patches per tile side), cut to
    ``plan.window`` (``unpad_image``), with ``image_newline`` after each row.

    Args:
        features: ``(plan.n_views, g * g, width)``: base view, then tiles row-major.
        plan: The image's plan (grid ``(cols, rows)``, window ``(r0, r1, c0, c1)``).
        image_newline: ``(width,)``.

    Returns:
        float32 ``(n_tokens, width)``.

    Raises:
        InvalidModelError: shapes that do not match the plan.
    """
    g = plan.tile_size // plan.patch_size
    cols, rows = plan.grid
    if features.ndim != 3 or features.shape[:2] != (plan.n_views, g * g):
        raise InvalidModelError(f"features of shape {features.shape}; the plan needs "
                                f"({plan.n_views}, {g * g}, width)")
    width = features.shape[2]
    if image_newline.shape != (width,):
        raise InvalidModelError(f"image newline of shape {image_newline.shape}; features are {width} wide")
    grid = features[1:].reshape(rows, cols, g, g, width).transpose(0, 2, 1, 3, 4)
    grid = grid.reshape(rows * g, cols * g, width)
    r0, r1, c0, c1 = plan.window
    kept = grid[r0:r1, c0:c1]
    newline = np.broadcast_to(image_newline.astype(np.float32), (kept.shape[0], 1, width))
    packed = np.concatenate([kept, newline], axis=1).reshape(-1, width)
    return np.ascontiguousarray(np.concatenate([features[0], packed]), dtype=np.float32)
