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
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import numpy as np

from edgevlm import constants as C
from edgevlm.descriptor import ModelDescriptor
from edgevlm.errors import InvalidRequestError, UnsupportedModelError
from edgevlm.vision.images import LoadedImage, intake_size

if TYPE_CHECKING:  # pragma: no cover
    from edgevlm.engine_protocol import EngineRequest, VLMEngine
    from edgevlm.kernels.vision import TowerConfig, VisionTower
    from edgevlm.llm import LlamaModel
    from edgevlm.planner import MemoryPart, PlanRequest, PlanSettings
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


@dataclass(frozen=True)
class FamilyOptions:
    """What the user chose that a family interprets.

    Attributes:
        tiles: "none" (the model's own image handling) or "grid" (tiles + an
            overview for models trained on one view; kernels engine only).
    """

    tiles: str = "none"

    def __post_init__(self) -> None:
        if self.tiles not in TILE_MODES:
            raise InvalidRequestError(f"unknown tiles mode {self.tiles!r}; choose one of {', '.join(TILE_MODES)}")


TILE_MODES = ("none", "grid")


def family_for(model: ModelDescriptor, options: FamilyOptions | None = None) -> Family:
    """The family that runs ``model``: the highest-priority one whose ``matches`` accepts it.

    Raises:
        UnsupportedModelError: no family matches; the message names the
            projector type and lists the families.
    """
    load_builtin_families()
    for cls in sorted(FAMILIES.values(), key=lambda c: (-c.priority, c.name)):
        if cls.matches(model):
            return cls(model, options or FamilyOptions())
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
    """A size-only image (no pixels are allocated), for pricing an image without having it.

    Plans that read only the size (the kernels pipelines, tile grids) never touch pixels;
    libmtmd, which plans from a bitmap, gets a zeroed one of the size when it asks
    (``edgevlm.vision.mtmd``), so callers cap the size at intake's first
    (:func:`edgevlm.vision.images.intake_size`).
    """
    if width < 1 or height < 1:
        raise InvalidRequestError(f"an image of {width}x{height} pixels has no pixels")
    return LoadedImage(width, height, b"", f"blank-{width}x{height}", f"<blank {width}x{height} image>")


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

    smallest_quant: ClassVar[str] = "q4_k_m"
    """The smallest LLM quantisation its converter writes (what a refused memory budget suggests)."""
    prices_own_engine: ClassVar[bool] = False
    """:meth:`own_memory_plan` prices the engine :meth:`open_engine` opens (a budget is checked before it)."""

    single_view: ClassVar[bool] = False
    """Trained on one view per image: ``tiles="grid"`` may add tiles + an overview."""

    def __init__(self, model: ModelDescriptor, options: FamilyOptions | None = None) -> None:
        self.model = model
        self.options = options or FamilyOptions()
        if self.options.tiles == "grid" and not self.single_view:
            raise InvalidRequestError(
                f"tiles='grid' adds tiles to models trained on one view; {self.describes} models "
                "already choose their own views (use an image-token budget instead)")

    # --- recognition -----------------------------------------------------
    @classmethod
    def matches(cls, model: ModelDescriptor) -> bool:
        """Whether this family runs ``model`` (hook)."""
        raise NotImplementedError

    # --- vision engine -----------------------------------------------------
    def supported_engines(self) -> tuple[str, ...]:
        """The engines able to run this model's projector, preferred first (hook)."""
        return self.engines

    def engines_for_options(self) -> tuple[str, ...]:
        """:meth:`supported_engines`, narrowed by the options (grid tiles need the kernels)."""
        engines = self.supported_engines()
        if self.options.tiles == "grid":
            return tuple(e for e in engines if e == C.VISION_ENGINE_KERNELS)
        return engines

    def choose_engine(self, requested: str) -> str:
        """The engine for ``requested`` ("auto", "kernels" or "mtmd").

        Raises:
            InvalidRequestError: an unknown engine name.
            UnsupportedModelError: an engine that cannot run this family.
        """
        if requested not in C.VISION_ENGINES:
            raise InvalidRequestError(f"unknown vision engine {requested!r}; choose one of "
                                      f"{', '.join(C.VISION_ENGINES)}")
        engines = self.engines_for_options()
        if not engines:
            raise UnsupportedModelError(f"{self.describes} has no vision engine for these options")
        if requested == C.VISION_ENGINE_AUTO:
            return engines[0]
        if requested not in engines and requested in self.supported_engines():
            raise InvalidRequestError(f"tiles='grid' runs on the kernels vision engine, not {requested!r}; "
                                      "drop one of the two options")
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
        """How the kernels engine plans and embeds an image on a loaded tower."""
        return self.pipeline_for(tower.config, tower.special)

    def pipeline_for(self, config: TowerConfig, host_tensors: Mapping[str, np.ndarray]) -> KernelsPipeline:
        """The kernels image pipeline for a tower configuration (hook).

        Default: one preprocessed view; with ``tiles="grid"``, LLaVA-NeXT-style
        tiles of the best grid within the token budget plus that view as the
        overview. ``host_tensors`` are the projector's learned vectors (empty
        when planning without the weights).
        """
        from edgevlm.vision.pipeline import GridPipeline, SingleView

        single = SingleView(config, self.image_processor(config))
        return GridPipeline(single) if self.options.tiles == "grid" else single

    def planned_image_cost(self, width: int, height: int, max_tokens: int | None,
                           engine: str) -> ImageCost | None:
        """What an image costs, from the headers alone (no weights loaded), or None if unknown.

        Known for the kernels engine (its pipelines plan from the tower's
        metadata); libmtmd plans images itself, so the planner then prices the
        budget instead.
        """
        if engine != C.VISION_ENGINE_KERNELS or self.model.projector is None:
            return None
        from edgevlm.kernels.vision import read_tower_config

        proj = self.model.projector
        plan = self.pipeline_for(read_tower_config(proj.metadata, set(proj.tensor_names)), {}).plan(
            *intake_size(width, height), max_tokens)
        return ImageCost(tokens=plan.n_tokens, positions=plan.n_tokens, cells=plan.n_tokens, views=plan.n_views)

    def budget_note(self, image: LoadedImage, tokens: int) -> str:
        """Why ``image`` needs ``tokens``, more than an explicit budget, appended to that error (hook;
        default: nothing)."""
        return ""

    def delimiter_tokens(self, llm: LlamaModel) -> int:
        """Tokens the prompt layout puts around each image, counted in its budget (hook; default 0)."""
        return 0

    def prepare_image(self, image: LoadedImage, max_tokens: int | None, encoder: VisionEncoder) -> LoadedImage:
        """The image handed to the encoder under ``max_tokens`` (hook; default: as it is).

        Families whose encoder plans images itself (libmtmd's dynamic
        resolution) meet a budget by downscaling here.
        """
        return image

    # --- images in the context ---------------------------------------------
    def image_cost(self, width: int, height: int, encoder: VisionEncoder,
                   max_tokens: int | None = None) -> ImageCost:
        """What an image of ``width`` x ``height`` costs under ``max_tokens``, before encoding (hook).

        The default takes the size intake would give the image (the long side
        capped at :data:`~edgevlm.vision.images.MAX_SIDE`), prepares a
        size-only image of it as a request would and asks the encoder how it
        splits it (exact for every engine, cheap: nothing is encoded, no pixels
        are allocated but libmtmd's bitmap of at most the intake size).
        """
        image = self.prepare_image(blank_image(*intake_size(width, height)), max_tokens, encoder)
        chunks = encoder.image_chunks(image, max_tokens=max_tokens)
        tokens = sum(c.n_tokens for c in chunks)
        return ImageCost(tokens=tokens, positions=sum(c.n_pos for c in chunks),
                         cells=sum(c.n_cells for c in chunks), views=sum(c.n_views for c in chunks))

    # --- memory ------------------------------------------------------------
    def own_memory_plan(self, request: PlanRequest,
                        process_bytes: int) -> tuple[list[MemoryPart], PlanSettings] | None:
        """The parts and settings of a family that prices its own engine (hook; default None:
        :mod:`edgevlm.planner` prices llama.cpp and the vision engine).

        Args:
            request: what to plan for.
            process_bytes: the interpreter and libraries, measured by the caller.
        """
        return None

    # --- engine ------------------------------------------------------------
    def open_engine(self, request: EngineRequest) -> VLMEngine | None:
        """An engine of the family's own for :func:`edgevlm.load` (hook; default None: the
        llama.cpp :class:`~edgevlm.engine.Engine` with the chosen vision engine)."""
        return None

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

        return TemplateLayout(llm, encoder, self, template=template,
                              chat_format=chat_format or self.default_chat_format())
