"""LLaVA-NeXT (llava-v1.6, llava-hf ``LlavaNextForConditionalGeneration``): LLaVA-1.5 plus "anyres" tiling.

The projector is a LLaVA MLP projector with grid pinpoints
(``clip.vision.image_grid_pinpoints``) and a learned ``image_newline``. An
image becomes a base view plus the tiles of the best pinpoint
(:mod:`edgevlm.vision.anyres`, transformers' ``select_best_resolution`` and
processor); all views run through the tower in one batched graph and are
packed as transformers' ``pack_image_features`` does (base first, the tile
grid unpadded, a newline per row: :func:`edgevlm.kernels.anyres.pack_anyres`).

The kernels engine is the default: at the pinned llama.cpp libmtmd
concatenates overview and tiles without unpadding or newlines (and its CLIP
graph puts the class embedding last), so its features differ from the
model's; ``vision_engine="mtmd"`` stays available for comparison.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from edgevlm import constants as C
from edgevlm.descriptor import ModelDescriptor
from edgevlm.errors import InvalidModelError
from edgevlm.families.base import Family, register
from edgevlm.vision.anyres import AnyresPlan, anyres_views, fit_anyres, plan_anyres
from edgevlm.vision.images import LoadedImage, to_pil
from edgevlm.vision.pipeline import ViewPlan

if TYPE_CHECKING:  # pragma: no cover
    from PIL import Image

    from edgevlm.kernels.vision import TowerConfig, VisionTower

#: Where a projector keeps the newline vector: clip.cpp's name, then the legacy converter's.
NEWLINE_TENSORS = (C.TENSOR_IMAGE_NEWLINE, C.TENSOR_IMAGE_NEWLINE_LEGACY)


def is_anyres(meta: Mapping[str, Any]) -> bool:
    """Whether a projector file's metadata describes a LLaVA-NeXT (anyres) MLP projector."""
    kind = meta.get(C.KEY_PROJECTOR_KIND) or meta.get("clip.projector_type")
    return kind == "mlp" and bool(meta.get(C.KEY_IMAGE_GRID_PINPOINTS))


@dataclass(frozen=True)
class AnyresSpec:
    """What planning and packing need from a LLaVA-NeXT projector file.

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

    def fit(self, width: int, height: int, max_tokens: int | None) -> AnyresPlan:
        """:func:`edgevlm.vision.anyres.fit_anyres` with this file's geometry."""
        return fit_anyres(width, height, self.pinpoints, self.tile_size, self.patch_size, max_tokens)


def anyres_spec(meta: Mapping[str, Any], host_tensors: Mapping[str, np.ndarray], where: str) -> AnyresSpec:
    """The spec from a projector's metadata and its host-side tensors (the newline).

    Raises:
        InvalidModelError: not an anyres projector, odd pinpoint list, no newline tensor.
    """
    if not is_anyres(meta):
        raise InvalidModelError(f"{where} is not a LLaVA-NeXT projector (no "
                                f"{C.KEY_IMAGE_GRID_PINPOINTS} on an mlp projector).")
    flat = [int(x) for x in meta[C.KEY_IMAGE_GRID_PINPOINTS]]
    if len(flat) % 2:
        raise InvalidModelError(f"{where}: {C.KEY_IMAGE_GRID_PINPOINTS} has an odd number of entries.")
    name = next((n for n in NEWLINE_TENSORS if n in host_tensors), None)
    if name is None:
        raise InvalidModelError(f"{where} has no image newline tensor ({' or '.join(NEWLINE_TENSORS)}); "
                                "reconvert the model with edgevlm convert.")
    return AnyresSpec(pinpoints=tuple(zip(flat[::2], flat[1::2])),
                      tile_size=int(meta["clip.vision.image_size"]),
                      patch_size=int(meta["clip.vision.patch_size"]),
                      newline=np.asarray(host_tensors[name], dtype=np.float32).reshape(-1).copy())


def read_anyres_spec(path: str | Path) -> AnyresSpec:
    """:func:`anyres_spec` of a projector file.

    Raises:
        InvalidModelError: see :func:`anyres_spec`; the newline must be F32.
    """
    from edgevlm.kernels.vision import read_gguf_tensors

    meta, tensors = read_gguf_tensors(Path(path))
    for name in NEWLINE_TENSORS:
        if name in tensors and tensors[name].ggml_type != 0:  # GGML_TYPE_F32
            raise InvalidModelError(f"{path}: tensor {name} must be F32.")
    host = {n: np.asarray(t.data) for n, t in tensors.items() if n in NEWLINE_TENSORS}
    return anyres_spec(meta, host, str(path))


def encode_anyres(tower: VisionTower, spec: AnyresSpec, image: Image.Image,
                  max_tokens: int | None = None) -> np.ndarray:
    """Embeddings of one PIL image for the LLM: plan, views, one batched tower run, packing.

    Returns:
        float32 ``(plan.n_tokens, LLM width)``.

    Raises:
        InvalidModelError, ContextOverflowError: see ``plan_anyres`` / ``pack_anyres``.
    """
    return embed_plan(tower, spec, image, spec.plan(*image.size, max_tokens=max_tokens))


def embed_plan(tower: VisionTower, spec: AnyresSpec, image: Image.Image, plan: AnyresPlan) -> np.ndarray:
    """The packed embeddings of ``image`` cut by ``plan`` (one batched tower run)."""
    from edgevlm.kernels.anyres import pack_anyres

    cfg = tower.config
    views = anyres_views(image, plan, cfg.image_mean, cfg.image_std)
    return pack_anyres(tower.encode_views(views), plan, spec.newline)


class AnyresPipeline:
    """The kernels engine's image pipeline for LLaVA-NeXT: base view + best-pinpoint tiles, packed."""

    def __init__(self, spec: AnyresSpec) -> None:
        self.spec = spec

    def plan(self, width: int, height: int, max_tokens: int | None = None) -> ViewPlan:
        plan = self.spec.fit(width, height, max_tokens)
        (ph, pw), (cols, rows) = plan.best_resolution, plan.grid
        return ViewPlan(plan.n_tokens, f"anyres:{pw}x{ph}:{cols}x{rows}", plan.n_views)

    def embed(self, tower: VisionTower, image: LoadedImage, max_tokens: int | None = None) -> np.ndarray:
        plan = self.spec.fit(image.width, image.height, max_tokens)
        return embed_plan(tower, self.spec, to_pil(image), plan)


@register
class LlavaNextFamily(Family):
    name = "llava-next"
    describes = "LLaVA-NeXT anyres MLP"
    priority = 15  # before plain LLaVA: the same projector type, plus pinpoints
    engines = (C.VISION_ENGINE_KERNELS, C.VISION_ENGINE_MTMD)
    chat_format = "llava-1.5"

    @classmethod
    def matches(cls, model: ModelDescriptor) -> bool:
        return model.projector is not None and is_anyres(model.projector.metadata)

    def pipeline_for(self, config: TowerConfig, host_tensors: Mapping[str, np.ndarray]) -> AnyresPipeline:
        """Anyres planning; without the weights (planning) a zero newline stands in for the learned one."""
        assert self.model.projector is not None
        where = self.model.projector.path.name
        if not host_tensors:
            width = self.model.projector.output_width or 1
            host_tensors = {C.TENSOR_IMAGE_NEWLINE: np.zeros(width, np.float32)}
        return AnyresPipeline(anyres_spec(self.model.projector.metadata, host_tensors, where))
