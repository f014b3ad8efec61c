"""Prompt layouts that are not chat templates: chunks built directly.

Some models are prompted with learned embeddings that are not tokens, so a
text template cannot express them. A layout turns messages into chunks
(:mod:`edgevlm.chunks`) itself.

OmniFusion 1.1 (AIRI; layout as the release's ``gen_answer`` builds
``inputs_embeds``): no BOS, text encoded without special tokens::

    "This is a dialog with AI assistant.\\n" SOI <image embeddings> EOI USER <question> BOT

and, for more turns, ``<answer> [SOI <image> EOI] USER <question> BOT``. A
system message replaces the opening line. SOI/EOI/USER/BOT are learned
vectors stored in the projector file and decoded as raw embeddings.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from edgevlm import constants as C
from edgevlm.chunks import Chunk, EmbeddingChunk, TextChunk
from edgevlm.errors import InvalidModelError, UnsupportedModelError
from edgevlm.prompt import ImagePart, Message
from edgevlm.vision.images import LoadedImage

OMNIFUSION_PREFIX = C.OMNIFUSION_PROMPT_PREFIX


class OmniFusionLayout:
    """Messages -> OmniFusion chunks.

    Args:
        model: the LLM (its tokenizer).
        encoder: a :class:`~edgevlm.vision.kernels_encoder.KernelsEncoder` on an
            OmniFusion projector (gives image chunks and the special vectors).

    Raises:
        InvalidModelError: the projector lacks a special embedding or it has the
            wrong width.
    """

    name = C.PROMPT_LAYOUT_OMNIFUSION

    def __init__(self, model: Any, encoder: Any) -> None:
        self.model = model
        self.encoder = encoder
        meta: Mapping[str, Any] = encoder.meta
        self.prefix = str(meta.get(C.KEY_PROMPT_PREFIX, OMNIFUSION_PREFIX))
        self.special: dict[str, EmbeddingChunk] = {}
        for label, tensor in C.SPECIAL_EMBEDDING_TENSORS.items():
            vec = encoder.tower.special.get(tensor)
            if vec is None or vec.shape != (model.n_embd_inp,):
                raise InvalidModelError(
                    f"projector {encoder.path.name}: special embedding {tensor} is missing or not "
                    f"{model.n_embd_inp}-wide; re-convert the OmniFusion checkpoint")
            self.special[label] = EmbeddingChunk(key=f"{label}/{encoder.identity}",
                                                 embeddings=np.asarray(vec, np.float32)[None, :])

    def _text(self, text: str) -> list[Chunk]:
        tokens = self.model.tokenize(text, add_special=False, parse_special=False) if text else []
        return [TextChunk(tuple(tokens))] if tokens else []

    def build_chunks(self, messages: list[Message], *, gen: bool = True) -> list[Chunk]:
        """The chunks of a conversation (``gen``: end with BOT for the reply).

        Raises:
            UnsupportedModelError: an unknown role.
        """
        chunks: list[Chunk] = []
        rest = messages
        prefix = self.prefix
        if messages and messages[0].role == "system":
            prefix, rest = messages[0].text.rstrip("\n") + "\n", messages[1:]
        chunks += self._text(prefix)
        awaiting_bot = False
        for message in rest:
            if message.role == "user":
                if awaiting_bot:
                    chunks.append(self.special["BOT"])
                for image in _images(message):
                    chunks += [self.special["SOI"], self.encoder.image_chunk(image), self.special["EOI"]]
                chunks.append(self.special["USER"])
                chunks += self._text(message.text)
                awaiting_bot = True
            elif message.role == "assistant":
                if awaiting_bot:
                    chunks.append(self.special["BOT"])
                chunks += self._text(message.text)
                awaiting_bot = False
            else:
                raise UnsupportedModelError(f"OmniFusion prompts have no place for a {message.role!r} message "
                                            "after the first; use user/assistant turns")
        if gen and awaiting_bot:
            chunks.append(self.special["BOT"])
        return chunks

    def text(self, messages: list[Message], *, gen: bool = True) -> tuple[str, list[LoadedImage]]:
        """A readable rendering: special vectors as ``<SOI>`` etc, images as the marker."""
        out, images = [], []
        for chunk in self.build_chunks(messages, gen=gen):
            if isinstance(chunk, TextChunk):
                out.append(self.model.detokenize(chunk.tokens))
            elif isinstance(chunk, EmbeddingChunk):
                out.append(f"<{chunk.key.split('/')[0]}>")
            else:
                out.append(self.encoder.marker)
                images.append(chunk.handle)
        return "".join(out), images


def _images(message: Message) -> list[LoadedImage]:
    return [p.image for p in message.parts if isinstance(p, ImagePart)]


def layout_for(model: Any, encoder: Any) -> OmniFusionLayout | None:
    """The layout a projector file asks for (``edgevlm.prompt.layout``), or None.

    Raises:
        UnsupportedModelError: a layout this edgevlm does not know.
    """
    meta = getattr(encoder, "meta", None) or {}
    layout = meta.get(C.KEY_PROMPT_LAYOUT)
    if not layout:
        return None
    if layout == C.PROMPT_LAYOUT_OMNIFUSION:
        return OmniFusionLayout(model, encoder)
    raise UnsupportedModelError(f"prompt layout {layout!r} is not supported by this edgevlm "
                                f"(known: {', '.join(C.PROMPT_LAYOUTS)}); upgrade edgevlm")
