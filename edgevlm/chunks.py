"""What goes into the LLM context: text tokens, image chunks, raw embeddings.

A prompt is a list of chunks. Each chunk has an *identity*; two prompts that
share a prefix of identities share the KV cache for that prefix. Text tokens
are their own identity; an image chunk is identified by the image's pixel
hash, the projector's identity and the chunk's index within the image's
chunks (tiling can turn one image into several).

The KV cache is tracked as a list of *units*, one per identity: a token id
(an ``int``) per text token, one :class:`ImageUnit` per image chunk and one
:class:`EmbeddingUnit` per raw-embedding chunk. Two prompts share the KV
cache of their longest common prefix of units.

A chunk advances the position by ``n_pos`` and fills ``n_cells`` KV cells.
The two differ for M-RoPE models (Qwen2-VL): an image of w x h merged tokens
takes w * h cells but only max(w, h) positions. The context size bounds
cells, so capacity checks count cells.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Union

import numpy as np

from edgevlm.vision.images import LoadedImage


@dataclass(frozen=True, slots=True)
class ImageUnit:
    """The KV-ledger identity of an image chunk."""

    key: str


@dataclass(frozen=True, slots=True)
class EmbeddingUnit:
    """The KV-ledger identity of a raw-embedding chunk."""

    key: str


#: One identity in the KV ledger: a text token id, an image chunk or an embedding chunk.
Unit = Union[int, ImageUnit, EmbeddingUnit]


def unit_json(unit: Unit) -> int | list[str]:
    """A unit as JSON (for snapshot keys): the token id, or ``["i", key]`` / ``["e", key]``."""
    if isinstance(unit, ImageUnit):
        return ["i", unit.key]
    if isinstance(unit, EmbeddingUnit):
        return ["e", unit.key]
    return unit


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

    def units(self) -> list[Unit]:
        return list(self.tokens)


@dataclass(frozen=True, eq=False)
class ImageChunk:
    """An image (or one view of it) that becomes ``n_tokens`` embeddings.

    Attributes:
        key: cache identity (image digest / projector identity / view).
        n_tokens: number of embeddings the LLM receives.
        n_pos: number of positions consumed (differs from n_tokens for M-RoPE).
        image: the decoded image the chunk comes from.
        native: the encoder's own handle for the chunk (libmtmd's chunk), if any.
        budget: the image-token budget the chunk was planned under (None: the model's own).
        n_views: views the vision tower encodes for the chunk (tiles + overview).
    """

    key: str
    n_tokens: int
    n_pos: int
    image: LoadedImage | None = field(repr=False, default=None)
    native: object | None = field(repr=False, default=None)
    budget: int | None = None
    n_views: int = 1

    @property
    def n_cells(self) -> int:
        return self.n_tokens

    def units(self) -> list[Unit]:
        return [ImageUnit(self.key)]


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

    def units(self) -> list[Unit]:
        return [EmbeddingUnit(self.key)]


Chunk = Union[TextChunk, ImageChunk, EmbeddingChunk]


def kv_cells(chunks: list[Chunk]) -> int:
    """KV cells the chunks fill (at least their positions; more with M-RoPE images)."""
    return sum(chunk.n_cells for chunk in chunks)


def unit_positions(chunks: list[Chunk]) -> tuple[list[Unit], list[int], list[Chunk]]:
    """Flatten chunks into identity units, each unit's start position and owning chunk."""
    units: list[Unit] = []
    starts: list[int] = []
    owners: list[Chunk] = []
    pos = 0
    for chunk in chunks:
        if isinstance(chunk, TextChunk):
            n = len(chunk.tokens)
            units.extend(chunk.tokens)
            starts.extend(range(pos, pos + n))
            owners.extend([chunk] * n)
            pos += n
        else:
            units.extend(chunk.units())
            starts.append(pos)
            owners.append(chunk)
            pos += chunk.n_pos
    starts.append(pos)  # sentinel: total positions
    return units, starts, owners
