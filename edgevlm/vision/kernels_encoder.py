"""Vision encoding on edgevlm's own ggml graphs (:mod:`edgevlm.kernels`).

Implements :class:`edgevlm.vision.encoder.VisionEncoder`: split a prompt at
media markers into text and image chunks, encode an image chunk into
embeddings, put embeddings into the LLM context (through ``llama_batch``
embeddings, so the engine's prefix and embedding caches work unchanged).
Which projectors it runs, and how their images are preprocessed, is the
model family's choice (:mod:`edgevlm.families`).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from edgevlm import constants as C
from edgevlm.cache import file_identity
from edgevlm.chunks import Chunk, ImageChunk, TextChunk
from edgevlm.descriptor import ProjectorInfo
from edgevlm.errors import InvalidRequestError
from edgevlm.llm import LlamaContext, LlamaModel
from edgevlm.vision.images import LoadedImage

from edgevlm.vision.pipeline import KernelsPipeline, SingleView

if TYPE_CHECKING:  # pragma: no cover
    from edgevlm.kernels.vision import VisionTower

PipelineFactory = Callable[["VisionTower"], KernelsPipeline]
"""The family's image pipeline for a loaded tower (``Family.kernels_pipeline``)."""


class KernelsEncoder:
    """A projector file run by :class:`edgevlm.kernels.vision.VisionTower`.

    Args:
        projector: the projector file's header, as the model descriptor read it
            (the tower reads only its tensor data).
        model: the LLM it feeds (the pair's widths are checked by
            :func:`edgevlm.descriptor.check_pair` before the projector is opened).
        pipeline: the family's image pipeline factory (tower -> plan and embed images).
        n_threads: CPU threads for the tower.
        device: ggml device for the tower ("auto", "cpu", "cuda", ...).
        weight_type: the tower's matrix type ("auto", "as-file", "bf16", "q8_0"; see
            :class:`edgevlm.kernels.vision.VisionTower`).

    Raises:
        InvalidModelError, UnsupportedModelError, KernelsUnavailableError.
    """

    name = C.VISION_ENGINE_KERNELS
    marker = C.MEDIA_MARKER
    uses_mrope = False
    non_causal = False

    def __init__(self, projector: ProjectorInfo, model: LlamaModel, *, pipeline: PipelineFactory,
                 n_threads: int, device: str = "auto", weight_type: str = "auto") -> None:
        from edgevlm.kernels.vision import VisionTower

        self.path = projector.path
        self.projector = projector
        self.model = model
        self.tower = VisionTower(self.path, header=projector.header, device=device, n_threads=n_threads,
                                 weight_type=weight_type)
        try:
            self.identity = file_identity(self.path)
            self.pipeline = pipeline(self.tower)
        except BaseException:
            self.tower.close()
            raise
        if isinstance(self.pipeline, SingleView):  # one graph serves every image: set it up at load
            self.tower.prepare()
        self.n_encode_calls = 0
        self._lock = threading.Lock()

    @property
    def meta(self) -> Mapping[str, Any]:
        """The projector's metadata (the descriptor's)."""
        return self.projector.metadata

    @property
    def device(self) -> str:
        return self.tower.device

    @property
    def extra_tensors(self) -> Mapping[str, np.ndarray]:
        """Tensors of the projector file the tower does not run (learned ``special.*`` embeddings)."""
        return self.tower.special

    def close(self) -> None:
        if getattr(self, "tower", None) is not None:
            self.tower.close()

    # ------------------------------------------------------------------
    def pixels(self, image: LoadedImage) -> np.ndarray:
        """The single view's pixels (3, S, S) of a one-view pipeline (for tests and the torch reference)."""
        if not isinstance(self.pipeline, SingleView):
            raise InvalidRequestError("this model's images have several views; see its family's pipeline")
        return self.pipeline.processor(image)

    def image_chunks(self, image: LoadedImage, *, max_tokens: int | None = None) -> list[ImageChunk]:
        """The chunk of one image: all its views, packed as the family plans them."""
        plan = self.pipeline.plan(image.width, image.height, max_tokens)
        return [ImageChunk(key=f"{image.digest}/{self.identity}/kernels:{plan.variant}/0",
                           n_tokens=plan.n_tokens, n_pos=plan.n_tokens, image=image, budget=max_tokens,
                           n_views=plan.n_views)]

    def tokenize(self, prompt: str, images: list[LoadedImage], *, add_special: bool,
                 max_tokens: int | None | Sequence[int | None] = None) -> list[Chunk]:
        """Split ``prompt`` at media markers into text and image chunks (``max_tokens``: one budget
        for every image, or one per image).

        Raises:
            InvalidRequestError: the number of markers differs from the number of images.
        """
        parts = prompt.split(self.marker)
        if len(parts) - 1 != len(images):
            raise InvalidRequestError(f"the prompt has {len(parts) - 1} image markers but "
                                      f"{len(images)} images were given")
        budgets = list(max_tokens) if isinstance(max_tokens, Sequence) else [max_tokens] * len(images)
        out: list[Chunk] = []
        for i, text in enumerate(parts):
            if i:
                out.extend(self.image_chunks(images[i - 1], max_tokens=budgets[i - 1]))
            tokens = self.model.tokenize(text, add_special=add_special and i == 0) if text or i == 0 else []
            if tokens:
                out.append(TextChunk(tuple(tokens)))
        return out

    def encode(self, chunk: ImageChunk, cancelled: Callable[[], bool] | None = None) -> np.ndarray:
        """Run tower + projector: (n_tokens, n_embd_inp) float32 (``cancelled``: asked while the
        tower's graphs run; True raises :class:`~edgevlm.errors.ComputeCancelled`)."""
        if chunk.image is None:
            raise InvalidRequestError("an image chunk without its image cannot be encoded")
        with self._lock, self.tower.cancellable(cancelled):
            out = self.pipeline.embed(self.tower, chunk.image, chunk.budget)
            self.n_encode_calls += 1
        return out

    def decode(self, ctx: LlamaContext, chunk: ImageChunk, embd: np.ndarray, pos: int) -> int:
        """Put ``embd`` into the context at ``pos``; return the next position."""
        ctx.check_fits(pos + chunk.n_pos, "the prompt with its images")
        ctx.decode_embeddings(embd, pos, causal=True)
        return pos + chunk.n_pos
