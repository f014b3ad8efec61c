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

from collections.abc import Container, Sequence
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
        n_views: views of the image the vision tower encodes for this chunk.
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


def settled_prefix(a: Sequence[Chunk], b: Sequence[Chunk], unmergeable: Container[int] = ()) -> list[Chunk]:
    """The chunks two renderings of a request share, less the last shared text token.

    ``a`` and ``b`` are the same conversation ending in two different
    questions; what they share is what the real question cannot change, except
    that tokenisation may still merge the last shared token with the
    question's first characters, so that token is left out, unless it is
    one of ``unmergeable`` (special tokens, which never merge).
    """
    shared: list[Chunk] = []
    for first, second in zip(a, b):
        if isinstance(first, TextChunk) and isinstance(second, TextChunk):
            n = 0
            while n < min(len(first.tokens), len(second.tokens)) and first.tokens[n] == second.tokens[n]:
                n += 1
            if n:
                shared.append(TextChunk(first.tokens[:n]))
            if first.tokens != second.tokens:
                break
        elif isinstance(first, TextChunk) or isinstance(second, TextChunk) or first.units() != second.units():
            break
        else:
            shared.append(first)
    last = shared[-1] if shared else None
    if isinstance(last, TextChunk) and last.tokens[-1] not in unmergeable:
        shared[-1:] = [TextChunk(last.tokens[:-1])] if len(last.tokens) > 1 else []
    return shared


#: Context kept free for the text and the answer when images are capped (tokens, at most
#: a quarter of the context).
ANSWER_RESERVE_TOKENS = 512


def answer_reserve(n_ctx: int) -> int:
    """Cells a request's images leave free for the text and the answer."""
    return min(ANSWER_RESERVE_TOKENS, n_ctx // 4)


def image_groups(chunks: Sequence[Chunk]) -> list[list[ImageChunk]]:
    """Image chunks grouped per image, in order (a new group at each change of image or non-image chunk)."""
    groups: list[list[ImageChunk]] = []
    previous: str | None = None
    for chunk in chunks:
        if not isinstance(chunk, ImageChunk):
            previous = None
            continue
        digest = chunk.key.split("/", 1)[0]
        if digest != previous:
            groups.append([])
        groups[-1].append(chunk)
        previous = digest
    return groups


def overflow_detail(chunks: list[Chunk], n_ctx: int) -> tuple[str, str]:
    """What a prompt's KV cells are made of, for a too-small-context message: the text and
    what each image needs (marking plans already at their smallest, i.e. over the budget they
    were planned under); and, unless every image is at its smallest, the ``--image-tokens``
    budget that would leave :func:`answer_reserve` for an answer. ("", "") without images."""
    groups = image_groups(chunks)
    if not groups:
        return "", ""
    needs = [sum(c.n_cells for c in g) for g in groups]
    smallest = [g[0].budget is not None and n > g[0].budget for g, n in zip(groups, needs)]
    text = kv_cells(chunks) - sum(needs)
    if len(set(zip(needs, smallest))) == 1 and len(needs) > 1:
        listed = f"{needs[0]} tokens each{' (their smallest plans)' if smallest[0] else ''}"
    else:
        listed = ", ".join(f"{n}{' (its smallest plan)' if low else ''}" for n, low in zip(needs, smallest)) + " tokens"
    what = f": {text} text tokens + {len(needs)} image{'s' if len(needs) > 1 else ''} needing {listed}"
    room = n_ctx - text
    fit = (room - min(answer_reserve(n_ctx), room // 4)) // len(needs)
    if fit < 1 or all(smallest):
        return what, ""
    return what, (f"give each image at most {fit} tokens with --image-tokens {fit} / max_image_tokens={fit} "
                  "(where the model can plan an image that small)")
