"""The interface every vision encoder implements (libmtmd's and edgevlm.kernels').

An encoder turns images into :class:`~edgevlm.chunks.ImageChunk` s (how many
embeddings each image becomes, under which cache identity), computes a
chunk's embeddings, and puts embeddings into the LLM context. The engine and
its caches only ever talk to this protocol; which encoder runs a projector is
the model family's choice (:mod:`edgevlm.families`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import numpy as np

from edgevlm.chunks import Chunk, ImageChunk
from edgevlm.vision.images import LoadedImage

if TYPE_CHECKING:  # pragma: no cover
    from edgevlm.llm import LlamaContext


@runtime_checkable
class VisionEncoder(Protocol):
    """A projector file bound to one LLM.

    Attributes:
        name: the engine ("kernels" or "mtmd").
        identity: the projector's cache identity (file identity, plus what
            else changes the embeddings); part of every image chunk's key.
        marker: the media marker prompts carry where an image goes.
        non_causal: image embeddings attend to each other (must be decoded
            in one batch).
        uses_mrope: image positions follow M-RoPE (fewer positions than
            embeddings).
        n_encode_calls: how often the tower ran (cache hits do not count).
    """

    name: str
    identity: str
    marker: str
    non_causal: bool
    uses_mrope: bool
    n_encode_calls: int

    @property
    def meta(self) -> Mapping[str, Any]:
        """The projector file's metadata."""
        ...

    @property
    def device(self) -> str:
        """Where the tower runs ("CPU", "CUDA0", "gpu", ...)."""
        ...

    def image_chunks(self, image: LoadedImage, *, max_tokens: int | None = None) -> list[ImageChunk]:
        """The chunks one image becomes (one, or several for tiled models).

        ``max_tokens``: plan the image's views within this many embeddings when the
        model can (tiled models pick a smaller grid; others ignore it).
        """
        ...

    def tokenize(self, prompt: str, images: list[LoadedImage], *, add_special: bool,
                 max_tokens: int | None | Sequence[int | None] = None) -> list[Chunk]:
        """Split ``prompt`` at media markers into text and image chunks (``max_tokens`` per image:
        one budget for all, or one per image)."""
        ...

    def encode(self, chunk: ImageChunk, cancelled: Callable[[], bool] | None = None) -> np.ndarray:
        """The chunk's embeddings: (n_tokens, n_embd_inp) float32.

        ``cancelled``: asked while the encoder's graph runs, where it can be stopped;
        True raises :class:`~edgevlm.errors.ComputeCancelled`.
        """
        ...

    def decode(self, ctx: LlamaContext, chunk: ImageChunk, embd: np.ndarray, pos: int) -> int:
        """Put ``embd`` into the context at ``pos``; returns the next position."""
        ...

    def close(self) -> None:
        """Free native memory."""
        ...
