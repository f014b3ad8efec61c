"""LLaVA-NeXT ("anyres") image features on the kernels engine.

A LLaVA-NeXT projector is a LLaVA MLP projector plus grid pinpoints
(``clip.vision.image_grid_pinpoints``) and a learned newline vector
(``v.image_newline``; llama.cpp's legacy converter named it
``model.image_newline``). One image becomes a base view and a grid of tiles
(:mod:`edgevlm.vision.anyres`); all views run through the tower in one
batched graph (:meth:`VisionTower.encode_views`) and :func:`pack_anyres`
lays the features out as transformers' ``pack_image_features`` does.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edgevlm import constants as C
from edgevlm.errors import InvalidModelError
from edgevlm.vision.anyres import AnyresPlan, anyres_views, plan_anyres

from .vision import VisionTower, projector_kind, read_gguf_tensors

NEWLINE_TENSORS = (C.TENSOR_IMAGE_NEWLINE, C.TENSOR_IMAGE_NEWLINE_LEGACY)
"""Where a projector keeps the newline vector: clip.cpp's name, then the legacy converter's."""


def is_anyres(meta: Mapping[str, Any]) -> bool:
    """Whether a projector file's metadata describes a LLaVA-NeXT (anyres) MLP projector."""
    return projector_kind(meta) == "mlp" and bool(meta.get(C.KEY_IMAGE_GRID_PINPOINTS))


@dataclass(frozen=True)
class AnyresSpec:
    """What packing needs from a LLaVA-NeXT projector file.

    Attributes:
        pinpoints: ``(height, width)`` candidates.
        tile_size: The tower's input side (``clip.vision.image_size``).
        patch_size: The tower's patch side.
        newline: The ``image_newline`` vector (LLM width), float32.
    """

    pinpoints: tuple[tuple[int, int], ...]
    tile_size: int
    patch_size: int
    newline: np.ndarray

    def plan(self, width: int, height: int, max_tokens: int | None = None) -> AnyresPlan:
        """:func:`edgevlm.vision.anyres.plan_anyres` with this file's geometry."""
        return plan_anyres(width, height, self.pinpoints, self.tile_size, self.patch_size, max_tokens)


def read_anyres_spec(path: str | Path) -> AnyresSpec:
    """Read pinpoints, tile/patch size and the newline vector of a LLaVA-NeXT projector.

    Raises:
        InvalidModelError: not an anyres projector, odd pinpoint list, no newline tensor.
    """
    meta, tensors = read_gguf_tensors(Path(path))
    if not is_anyres(meta):
        raise InvalidModelError(f"{path} is not a LLaVA-NeXT projector (no "
                                f"{C.KEY_IMAGE_GRID_PINPOINTS} on an mlp projector).")
    flat = [int(x) for x in meta[C.KEY_IMAGE_GRID_PINPOINTS]]
    if len(flat) % 2:
        raise InvalidModelError(f"{path}: {C.KEY_IMAGE_GRID_PINPOINTS} has an odd number of entries.")
    name = next((n for n in NEWLINE_TENSORS if n in tensors), None)
    if name is None:
        raise InvalidModelError(f"{path} has no image newline tensor ({' or '.join(NEWLINE_TENSORS)}); "
                                "reconvert the model with edgevlm convert.")
    raw = tensors[name]
    if raw.ggml_type != 0:  # GGML_TYPE_F32
        raise InvalidModelError(f"{path}: tensor {name} must be F32.")
    return AnyresSpec(pinpoints=tuple(zip(flat[::2], flat[1::2])),
                      tile_size=int(meta["clip.vision.image_size"]),
                      patch_size=int(meta["clip.vision.patch_size"]),
                      newline=np.asarray(raw.data, dtype=np.float32).reshape(-1).copy())


def pack_anyres(features: np.ndarray, plan: AnyresPlan, image_newline: np.ndarray) -> np.ndarray:
    """Lay out per-view features as transformers' ``pack_image_features``.

    Base view first; then the tiles' features arranged as one grid of
    ``rows * g`` x ``cols * g`` tokens (``g`` patches per tile side), cut to
    ``plan.window`` (``unpad_image``), with ``image_newline`` after each row.

    Args:
        features: ``(plan.n_views, g * g, width)``: base view, then tiles row-major.
        plan: The image's plan.
        image_newline: ``(width,)``.

    Returns:
        float32 ``(plan.n_tokens, width)``.

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


def encode_anyres(tower: VisionTower, spec: AnyresSpec, image: Any,
                  max_tokens: int | None = None) -> np.ndarray:
    """Embeddings of one PIL image for the LLM: plan, views, one batched tower run, packing.

    Args:
        tower: The projector loaded on the kernels engine.
        spec: :func:`read_anyres_spec` of the same file.
        image: A PIL image.
        max_tokens: Optional budget of embeddings (see ``plan_anyres``).

    Returns:
        float32 ``(plan.n_tokens, LLM width)``.

    Raises:
        InvalidModelError, ContextOverflowError: see ``plan_anyres`` / :func:`pack_anyres`.
    """
    plan = spec.plan(*image.size, max_tokens=max_tokens)
    cfg = tower.config
    views = anyres_views(image, plan, cfg.image_mean, cfg.image_std)
    return pack_anyres(tower.encode_views(views), plan, spec.newline)
