"""What goes into the LLM context: text tokens, image chunks, raw embeddings.

A prompt is a list of chunks. Each chunk has an *identity*; two prompts that
share a prefix of identities share the KV cache for that prefix. Text tokens
are their own identity; an image chunk is identified by the image's pixel
hash, the projector's identity and the chunk's index within the image's
chunks (tiling can turn one image into several).

A chunk advances the position by ``n_pos`` and fills ``n_cells`` KV cells.
The two differ for M-RoPE models (Qwen2-VL): an image of w x h merged tokens
takes w * h cells but only max(w, h) positions. The context size bounds
cells, so capacity checks count cells.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Union

import numpy as np


@dataclass(frozen=True)
class TextChunk:
    """Token ids, decoded causally at consecutive positions."""

    tokens: tuple[int, ...]

    @property
    def n_pos(self) -> int:
        return len(self.tokens)

    @property
    def n_cells(self) -> int:
        return len(self.tokens)

    def units(self) -> list[tuple[str, Any]]:
        return [("t", t) for t in self.tokens]


@dataclass(frozen=True, eq=False)
class ImageChunk:
    """An image (or one tile of it) that becomes ``n_tokens`` embeddings.

    Attributes:
        key: cache identity (image digest / projector identity / index).
        n_tokens: number of embeddings the LLM receives.
        n_pos: number of positions consumed (differs from n_tokens for M-RoPE).
        handle: encoder-specific data needed to encode/decode the chunk.
    """

    key: str
    n_tokens: int
    n_pos: int
    handle: Any = field(repr=False, default=None)

    @property
    def n_cells(self) -> int:
        return self.n_tokens

    def units(self) -> list[tuple[str, Any]]:
        return [("i", self.key)]


@dataclass(frozen=True, eq=False)
class EmbeddingChunk:
    """Raw input embeddings (e.g. learned start/end-of-image vectors)."""

    key: str
    embeddings: np.ndarray = field(repr=False)
    causal: bool = True

    @property
    def n_pos(self) -> int:
        return int(self.embeddings.shape[0])

    @property
    def n_cells(self) -> int:
        return int(self.embeddings.shape[0])

    def units(self) -> list[tuple[str, Any]]:
        return [("e", self.key)]


Chunk = Union[TextChunk, ImageChunk, EmbeddingChunk]


def kv_cells(chunks: list[Chunk]) -> int:
    """KV cells the chunks fill (at least their positions; more with M-RoPE images)."""
    return sum(chunk.n_cells for chunk in chunks)


def unit_positions(chunks: list[Chunk]) -> tuple[list[tuple[str, Any]], list[int], list[Chunk]]:
    """Flatten chunks into identity units, each unit's start position and owning chunk."""
    units: list[tuple[str, Any]] = []
    starts: list[int] = []
    owners: list[Chunk] = []
    pos = 0
    for chunk in chunks:
        if isinstance(chunk, TextChunk):
            for tok in chunk.tokens:
                units.append(("t", tok))
                starts.append(pos)
                owners.append(chunk)
                pos += 1
        else:
            units.extend(chunk.units())
            starts.append(pos)
            owners.append(chunk)
            pos += chunk.n_pos
    starts.append(pos)  # sentinel: total positions
    return units, starts, owners
