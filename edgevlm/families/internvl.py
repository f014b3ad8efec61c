"""InternVL (transformers-native ``InternVLForConditionalGeneration``, the ``*-hf`` checkpoints).

An InternViT tower with pixel shuffle and an MLP projector (``clip.projector_type
= internvl``) in front of a plain Qwen2 LLM (1-D positions: tokens, positions
and KV cells are the same count).

Images are tiled as transformers' processor tiles them
(:mod:`edgevlm.vision.internvl_tiles`): the grid closest to the image's aspect
within ``clip.vision.preproc_min_tiles`` .. ``preproc_max_tiles`` (a budget
lowers the maximum), the tiles row by row, then a thumbnail when there is more
than one tile. libmtmd computes one tile exactly but tiles larger images by a
different rule and wraps every bitmap in ``<img>...</img>`` text, so the family
cuts the tiles itself (:class:`~edgevlm.vision.mtmd.TiledImage`, each tile one
bitmap) and lays the prompt out as ``InternVLProcessor`` writes it: the chat
template's ``<IMG_CONTEXT>`` becomes ``<img>``, every view's embeddings back to
back, ``</img>``.

An image's cost (:meth:`InternVLFamily.image_cost`) and its image-token budget
count the views' embeddings plus the ``<img>`` / ``</img>`` tokens around them.
"""

from __future__ import annotations

import logging

import threading
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from edgevlm import constants as C
from edgevlm.chunks import Chunk, TextChunk
from edgevlm.descriptor import ModelDescriptor
from edgevlm.errors import IncompatibleModelError, InvalidModelError, InvalidRequestError
from edgevlm.families.base import Family, FamilyOptions, ImageCost, blank_image, register
from edgevlm.llm import LlamaModel
from edgevlm.prompt import ImagePart, Message, build_prompt, render_parts
from edgevlm.prompt_layout import NO_BUDGET, ImageBudget, TemplateLayout, check_image_tokens
from edgevlm.vision.encoder import VisionEncoder
from edgevlm.vision.images import LoadedImage, load_image, to_pil
from edgevlm.vision.internvl_tiles import (DEFAULT_MAX_TILES, DEFAULT_MIN_TILES, TilePlan,
                                           budget_max_tiles, plan_tiles, tile_images)
from edgevlm.vision.mtmd import MtmdEncoder, TiledImage

LOG = logging.getLogger("edgevlm")
INTERNVL_PROJECTOR_TYPES = ("internvl",)

# InternVLProcessor's image tokens (tokenizer_config.json "extra_special_tokens" of the
# OpenGVLab/InternVL3-*-hf checkpoints; libmtmd writes the same <img> / </img> for internvl).
IMAGE_START = "<img>"
IMAGE_END = "</img>"
IMAGE_CONTEXT = "<IMG_CONTEXT>"
"""What the chat template writes where an image goes (the processor expands it)."""
TILE_CACHE_IMAGES = 4
"""Images whose tiles are kept for follow-up requests (cutting a 1920x1080 photo into
448-px tiles takes ~80 ms on 2 cores; at most ~8 MB of tiles per image)."""


@dataclass(frozen=True)
class Tiling:
    """The projector's tiling settings.

    Attributes:
        tile_size: the tower's input side (``clip.vision.image_size``).
        min_tiles, max_tiles: grid tile limits (the processor's ``min_patches`` / ``max_patches``).
        use_thumbnail: multi-tile images get a whole-image thumbnail (always, in the -hf processor).
    """

    tile_size: int
    min_tiles: int = DEFAULT_MIN_TILES
    max_tiles: int = DEFAULT_MAX_TILES
    use_thumbnail: bool = True

    @classmethod
    def from_meta(cls, meta: Mapping[str, Any], where: str) -> Tiling:
        """The settings an InternVL projector file records.

        Raises:
            InvalidModelError: a missing tile size or limits that are not ``1 <= min <= max``.
        """
        try:
            tiling = cls(int(meta["clip.vision.image_size"]),
                         int(meta.get("clip.vision.preproc_min_tiles", DEFAULT_MIN_TILES)),
                         int(meta.get("clip.vision.preproc_max_tiles", DEFAULT_MAX_TILES)))
        except (KeyError, TypeError, ValueError):
            raise InvalidModelError(f"{where} has no usable clip.vision.image_size or tile limits; "
                                    "reconvert it with edgevlm convert") from None
        if tiling.tile_size < 1 or not 1 <= tiling.min_tiles <= tiling.max_tiles:
            raise InvalidModelError(
                f"{where}: tile size {tiling.tile_size}, tiles {tiling.min_tiles}..{tiling.max_tiles} "
                "are not a positive size with 1 <= min <= max; reconvert it with edgevlm convert")
        return tiling

    def max_tiles_within(self, max_tokens: int | None, per_view: int) -> int:
        """The largest tile limit whose worst case fits ``max_tokens`` (the minimum if none does)."""
        smallest = (self.min_tiles + int(self.use_thumbnail and self.min_tiles > 1)) * per_view
        if max_tokens is None:
            return self.max_tiles
        if max_tokens < smallest:
            return self.min_tiles  # an explicit budget is refused by the layout (check_image_tokens)
        return budget_max_tiles(max_tokens, per_view, self.min_tiles, self.max_tiles, self.use_thumbnail)

    def plan(self, width: int, height: int, max_tokens: int | None, per_view: int) -> TilePlan:
        """The processor's plan for a ``width`` x ``height`` image under ``max_tokens``."""
        return plan_tiles(width, height, self.min_tiles, self.max_tiles_within(max_tokens, per_view),
                          self.tile_size, self.use_thumbnail)


def plan_name(plan: TilePlan) -> str:
    """A plan's name in chunk keys: ``internvl:<columns>x<rows>[+t]:<tile size>``."""
    return f"internvl:{plan.columns}x{plan.rows}{'+t' if plan.thumbnail else ''}:{plan.tile_size}"


def as_mtmd(encoder: VisionEncoder | None) -> MtmdEncoder:
    """The encoder as libmtmd's (the only engine running InternVL towers here).

    Raises:
        IncompatibleModelError: another engine.
    """
    if not isinstance(encoder, MtmdEncoder):
        raise IncompatibleModelError("InternVL projectors run on the mtmd vision engine only; "
                                     "use vision_engine='mtmd' (or 'auto')")
    return encoder


@register
class InternVLFamily(Family):
    name = "internvl"
    describes = "InternVL tiles + MLP"
    priority = 10  # before the generic libmtmd family, which would let libmtmd tile
    engines = (C.VISION_ENGINE_MTMD,)

    def __init__(self, model: ModelDescriptor, options: FamilyOptions | None = None) -> None:
        super().__init__(model, options)
        proj = model.projector
        where = model.files.mmproj.name if model.files.mmproj else "the projector"
        self.tiling = Tiling.from_meta(proj.metadata if proj else {}, where)
        if proj is not None and proj.metadata.get(C.KEY_POSITION_LAYOUT) != "cls-last":
            LOG.warning("%s was not converted by edgevlm: libmtmd adds InternViT's class embedding after "
                        "the patches, so with positions in transformers' order its image features are wrong "
                        "(cosine ~0.45 measured); reconvert the checkpoint with `edgevlm convert`", where)
        self._view_costs: dict[str, tuple[int, int]] = {}
        self._delimiters: dict[str, int] = {}
        self._tiles: OrderedDict[tuple[str, str], tuple[LoadedImage, ...]] = OrderedDict()
        self._tiles_lock = threading.Lock()

    @classmethod
    def matches(cls, model: ModelDescriptor) -> bool:
        return model.projector is not None and model.projector.projector_type in INTERNVL_PROJECTOR_TYPES

    # --- images --------------------------------------------------------------
    def view_cost(self, encoder: MtmdEncoder) -> tuple[int, int]:
        """(tokens, positions) libmtmd makes of one tile (asked once per projector).

        Raises:
            InvalidModelError: libmtmd cuts a tile-sized image into several chunks.
        """
        cost = self._view_costs.get(encoder.identity)
        if cost is None:
            chunks = encoder.image_chunks(blank_image(self.tiling.tile_size, self.tiling.tile_size))
            if len(chunks) != 1:
                raise InvalidModelError(f"libmtmd makes {len(chunks)} chunks of one "
                                        f"{self.tiling.tile_size}-px tile of {encoder.path.name}; "
                                        "this edgevlm expects one")
            cost = self._view_costs[encoder.identity] = (chunks[0].n_tokens, chunks[0].n_pos)
        return cost

    def delimiter_tokens(self, llm: LlamaModel) -> int:
        """Text tokens of ``<img>`` plus ``</img>`` (one each with InternVL's vocabulary)."""
        key = str(llm.path)
        if key not in self._delimiters:
            self._delimiters[key] = sum(len(llm.tokenize(t, add_special=False)) for t in (IMAGE_START, IMAGE_END))
        return self._delimiters[key]

    def plan(self, width: int, height: int, max_tokens: int | None, encoder: VisionEncoder) -> TilePlan:
        """The tiles of a ``width`` x ``height`` image whose views and delimiters fit ``max_tokens``."""
        mtmd = as_mtmd(encoder)
        views_budget = None if max_tokens is None else max_tokens - self.delimiter_tokens(mtmd.model)
        return self.tiling.plan(width, height, views_budget, self.view_cost(mtmd)[0])

    def prepare_image(self, image: LoadedImage, max_tokens: int | None, encoder: VisionEncoder) -> TiledImage:
        """The image cut into the processor's tiles (each tile one libmtmd bitmap)."""
        plan = self.plan(image.width, image.height, max_tokens, encoder)
        return TiledImage(image.width, image.height, image.rgb, image.digest, image.source,
                          views=self.views(image, plan), plan=plan_name(plan))

    def views(self, image: LoadedImage, plan: TilePlan) -> tuple[LoadedImage, ...]:
        """The tiles of ``image`` cut by ``plan`` (kept for the last :data:`TILE_CACHE_IMAGES` images)."""
        key = (image.digest, plan_name(plan))
        with self._tiles_lock:
            views = self._tiles.get(key)
            if views is not None:
                self._tiles.move_to_end(key)
                return views
        views = tuple(load_image(tile) for tile in tile_images(to_pil(image), plan))
        with self._tiles_lock:
            self._tiles[key] = views
            while len(self._tiles) > TILE_CACHE_IMAGES:
                self._tiles.popitem(last=False)
        return views

    def image_cost(self, width: int, height: int, encoder: VisionEncoder,
                   max_tokens: int | None = None) -> ImageCost:
        """Views x one tile's tokens, plus the ``<img>`` / ``</img>`` tokens around them."""
        mtmd = as_mtmd(encoder)
        tokens, positions = self.view_cost(mtmd)
        plan = self.plan(width, height, max_tokens, mtmd)
        delimiters = self.delimiter_tokens(mtmd.model)
        return ImageCost(tokens=plan.n_tiles * tokens + delimiters,
                         positions=plan.n_tiles * positions + delimiters,
                         cells=plan.n_tiles * tokens + delimiters, views=plan.n_tiles)

    # --- prompts -------------------------------------------------------------
    def prompt_layout(self, llm: LlamaModel, encoder: VisionEncoder | None,
                      template: str | None, chat_format: str | None) -> TemplateLayout:
        if encoder is None:
            return super().prompt_layout(llm, encoder, template, chat_format)
        return InternVLLayout(llm, as_mtmd(encoder), self, template=template,
                              chat_format=chat_format or self.default_chat_format())


class InternVLLayout(TemplateLayout):
    """The chat template with InternVLProcessor's image spans.

    The template is rendered with transformers-style part lists; where it
    writes ``<IMG_CONTEXT>`` (one per image) the image goes. A template that
    does not write it falls back to media markers (:func:`edgevlm.prompt.build_prompt`).
    Each image becomes the text token(s) of ``<img>``, one chunk per view, and
    those of ``</img>``; the text between is tokenised by the LLM with special
    tokens parsed, as the processor's tokenizer does.
    """

    name = "internvl"

    def __init__(self, llm: LlamaModel, encoder: MtmdEncoder, family: InternVLFamily, *,
                 template: str | None, chat_format: str) -> None:
        super().__init__(llm, encoder, family, template=template, chat_format=chat_format)
        self.mtmd = encoder
        self.delimiters = family.delimiter_tokens(llm)

    def render(self, messages: list[Message], gen: bool) -> tuple[str, str, list[LoadedImage]]:
        """(prompt text, the string standing for each image in it, the images in order)."""
        images = [p.image for m in messages for p in m.parts if isinstance(p, ImagePart)]
        if self.template and images:
            text = render_parts(self.template, messages, gen=gen, bos=self._bos, eos=self._eos)
            if text is not None and text.count(IMAGE_CONTEXT) == len(images):
                return text, IMAGE_CONTEXT, images
        text, images = build_prompt(messages, self.marker, template=self.template,
                                    chat_format=self.chat_format, gen=gen, bos=self._bos, eos=self._eos)
        return text, self.marker, images

    def text(self, messages: list[Message], *, gen: bool = True) -> str:
        text, at, _ = self.render(messages, gen)
        return text.replace(at, self.marker)

    def chunks(self, messages: list[Message], *, gen: bool = True,
               budget: ImageBudget = NO_BUDGET) -> list[Chunk]:
        """Text tokens and per image ``<img>``, the views' chunks, ``</img>``.

        Raises:
            InvalidRequestError: the text itself holds image placeholders.
            ContextOverflowError: an image (views and delimiters) over an explicit budget.
        """
        text, at, images = self.render(messages, gen)
        if not images:
            return super().chunks(messages, gen=gen, budget=budget)
        pieces = text.split(at)
        if len(pieces) != len(images) + 1:
            raise InvalidRequestError(f"the prompt holds {len(pieces) - 1} image placeholders "
                                      f"({at}) for {len(images)} images; remove them from the text")
        out: list[Chunk] = []
        for i, piece in enumerate(pieces):
            framed = (IMAGE_END if i else "") + piece + (IMAGE_START if i < len(images) else "")
            tokens = self.llm.tokenize(framed, add_special=i == 0, parse_special=True)
            if tokens:
                out.append(TextChunk(tuple(tokens)))
            if i < len(images):
                own = budget.for_image(images[i])
                tiled = self.family.prepare_image(images[i], own.tokens, self.mtmd)
                views = self.mtmd.image_chunks(tiled, max_tokens=own.tokens)
                check_image_tokens(sum(c.n_tokens for c in views) + self.delimiters, own, self.family,
                                   images[i])
                out.extend(views)
        return out
