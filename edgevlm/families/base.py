"""The runtime family registry and the hooks a family overrides.

A model family is one small module in this package defining a :class:`Family`
subclass decorated with :func:`register`. From the model's GGUF headers
(:class:`~edgevlm.descriptor.ModelDescriptor`) a family says whether it
matches, and then owns everything family-specific at run time:

* ``choose_engine``: which vision engine runs its projector ("kernels" or "mtmd");
* ``image_processor``: how an image becomes pixels for the kernels engine;
* ``image_cost``: what an image of w x h pixels costs (tokens, positions, KV
  cells) before anything is encoded — the tiling hook the planner and the
  server price images with;
* ``prompt_layout``: how messages become chunks (a chat template with media
  markers, or chunks built directly with learned embeddings);
* ``chat_format``: the built-in template used when the GGUF has no usable one.

Generic code (``edgevlm.api``, the engine) asks the family and never names one.
Adding a family = one converter module + one module here (+ a kernels graph
if libmtmd cannot run it) + tests.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import numpy as np

from edgevlm import constants as C
from edgevlm.descriptor import ModelDescriptor
from edgevlm.errors import InvalidRequestError, UnsupportedModelError
from edgevlm.vision.images import LoadedImage

if TYPE_CHECKING:  # pragma: no cover
    from edgevlm.kernels.vision import TowerConfig, VisionTower
    from edgevlm.llm import LlamaModel
    from edgevlm.prompt_layout import PromptLayout
    from edgevlm.vision.encoder import VisionEncoder
    from edgevlm.vision.pipeline import KernelsPipeline

FAMILIES: dict[str, type[Family]] = {}
"""Family name -> class, filled by :func:`register`."""




def register(cls: type[Family]) -> type[Family]:
    """Class decorator adding a family to :data:`FAMILIES` under ``cls.name``.

    Raises:
        ValueError: the name is taken by another class.
    """
    if FAMILIES.get(cls.name, cls) is not cls:
        raise ValueError(f"runtime family {cls.name!r} is already registered")
    FAMILIES[cls.name] = cls
    return cls


def load_builtin_families() -> None:
    """Import every module of this package but this one: each registers its family.

    A new family is one new file here; nothing else is edited.
    """
    import pkgutil
    from pathlib import Path

    folder = Path(__file__).resolve().parent
    for module in sorted(m.name for m in pkgutil.iter_modules([str(folder)])):
        if not module.startswith("_") and module != "base":
            importlib.import_module(f"{__package__}.{module}")


def family_for(model: ModelDescriptor) -> Family:
    """The family that runs ``model``: the highest-priority one whose ``matches`` accepts it.

    Raises:
        UnsupportedModelError: no family matches; the message names the
            projector type and lists the families.
    """
    load_builtin_families()
    for cls in sorted(FAMILIES.values(), key=lambda c: (-c.priority, c.name)):
        if cls.matches(model):
            return cls(model)
    kind = model.projector.kind if model.projector else "none"
    known = ", ".join(f"{c.name} ({c.describes})" for c in sorted(FAMILIES.values(), key=lambda c: c.name))
    raise UnsupportedModelError(
        f"no edgevlm model family runs projector type {kind!r} of "
        f"{model.files.mmproj.name if model.files.mmproj else model.files.llm.name}; "
        f"supported families: {known}. Use a projector converted by `edgevlm convert` or llama.cpp")


@dataclass(frozen=True)
class ImageCost:
    """What one image costs in the LLM context.

    Attributes:
        tokens: embeddings the LLM receives (learned delimiters included).
        positions: positions they advance (fewer than tokens with M-RoPE).
        cells: KV cells they fill (what the context size bounds).
        views: how many views the vision tower encodes (tiles + overview).
    """

    tokens: int
    positions: int
    cells: int
    views: int = 1


def blank_image(width: int, height: int) -> LoadedImage:
    """A mid-grey image of the given size (for pricing an image without having it)."""
    if width < 1 or height < 1:
        raise InvalidRequestError(f"an image of {width}x{height} pixels has no pixels")
    return LoadedImage(width, height, b"\x80" * (width * height * 3), f"blank-{width}x{height}",
                       f"<blank {width}x{height} image>")


ImageProcessor = Callable[[LoadedImage], np.ndarray]
"""An image -> normalised pixels (3, S, S) float32 for the kernels engine."""


class Family:
    """Base class: what every family must answer, with the common defaults.

    Subclasses set :attr:`name`, :attr:`describes`, :attr:`engines` (the
    vision engines able to run them, preferred first) and override
    :meth:`matches` plus whichever hooks differ.
    """

    name: ClassVar[str] = ""
    describes: ClassVar[str] = ""
    priority: ClassVar[int] = 0
    """Higher is asked first (generic fallbacks are negative)."""
    engines: ClassVar[tuple[str, ...]] = (C.VISION_ENGINE_MTMD,)
    """Vision engines able to run the family, preferred first (see :meth:`supported_engines`)."""
    chat_format: ClassVar[str] = "chatml"
    """Built-in template (``edgevlm.prompt.CHAT_FORMATS``) when the GGUF has none that works."""

    def __init__(self, model: ModelDescriptor) -> None:
        self.model = model

    # --- recognition -----------------------------------------------------
    @classmethod
    def matches(cls, model: ModelDescriptor) -> bool:
        """Whether this family runs ``model`` (hook)."""
        raise NotImplementedError

    # --- vision engine -----------------------------------------------------
    def supported_engines(self) -> tuple[str, ...]:
        """The engines able to run this model's projector, preferred first (hook)."""
        return self.engines

    def choose_engine(self, requested: str) -> str:
        """The engine for ``requested`` ("auto", "kernels" or "mtmd").

        Raises:
            InvalidRequestError: an unknown engine name.
            UnsupportedModelError: an engine that cannot run this family.
        """
        if requested not in C.VISION_ENGINES:
            raise InvalidRequestError(f"unknown vision engine {requested!r}; choose one of "
                                      f"{', '.join(C.VISION_ENGINES)}")
        engines = self.supported_engines()
        if not engines:
            raise UnsupportedModelError(f"{self.describes} has no vision engine")
        if requested == C.VISION_ENGINE_AUTO:
            return engines[0]
        if requested not in engines:
            kind = self.model.projector.kind if self.model.projector else ""
            what = ("libmtmd cannot run" if requested == C.VISION_ENGINE_MTMD
                    else "the kernels vision engine does not implement")
            raise UnsupportedModelError(f"{what} {kind} projectors ({self.describes}); "
                                        f"use vision_engine={engines[0]!r} (or 'auto')")
        return requested

    def image_processor(self, tower: TowerConfig) -> ImageProcessor:
        """Pixels for the kernels engine (hook; default: the HF processor the tower declares)."""
        from edgevlm.vision.preprocess import tower_pixels

        return lambda image: tower_pixels(image, tower)

    def kernels_pipeline(self, tower: VisionTower) -> KernelsPipeline:
        """How the kernels engine plans and embeds an image (hook; default: one preprocessed view)."""
        from edgevlm.vision.pipeline import SingleView

        return SingleView(tower.config, self.image_processor(tower.config))

    # --- images in the context ---------------------------------------------
    def image_cost(self, width: int, height: int, encoder: VisionEncoder) -> ImageCost:
        """What an image of ``width`` x ``height`` costs, before encoding (hook).

        The default asks the encoder how it splits a blank image of that size
        (exact for every engine, cheap: nothing is encoded).
        """
        chunks = encoder.image_chunks(blank_image(width, height))
        tokens = sum(c.n_tokens for c in chunks)
        return ImageCost(tokens=tokens, positions=sum(c.n_pos for c in chunks),
                         cells=sum(c.n_cells for c in chunks), views=len(chunks))

    # --- prompts -----------------------------------------------------------
    def default_chat_format(self) -> str:
        """The built-in template: the one the converter recorded, else the family's (hook)."""
        from edgevlm.prompt import CHAT_FORMATS

        recorded = self.model.llm_metadata.get(C.KEY_PROMPT_FAMILY)
        return str(recorded) if recorded in CHAT_FORMATS else self.chat_format

    def prompt_layout(self, llm: LlamaModel, encoder: VisionEncoder | None,
                      template: str | None, chat_format: str | None) -> PromptLayout:
        """How messages become chunks (hook; default: the chat template with media markers)."""
        from edgevlm.prompt_layout import TemplateLayout

        return TemplateLayout(llm, encoder, template=template,
                              chat_format=chat_format or self.default_chat_format())
