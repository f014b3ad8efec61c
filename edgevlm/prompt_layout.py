"""Prompt layouts: normalised messages -> the chunks the context must hold.

A family chooses its layout (:meth:`edgevlm.families.base.Family.prompt_layout`):
most render a chat template with media markers and let the vision encoder
split the text at the markers (:class:`TemplateLayout`); a family prompted
with learned embeddings builds chunks itself (OmniFusion).
"""

from __future__ import annotations

from typing import Protocol

from edgevlm import constants as C
from edgevlm.chunks import Chunk, TextChunk
from edgevlm.errors import InvalidRequestError, UnsupportedModelError
from edgevlm.llm import LlamaModel
from edgevlm.prompt import ImagePart, Message, build_prompt, precompile
from edgevlm.vision.encoder import VisionEncoder


class PromptLayout(Protocol):
    """Messages -> chunks, for one loaded model."""

    name: str

    def chunks(self, messages: list[Message], *, gen: bool = True) -> list[Chunk]:
        """The chunks of a conversation (``gen``: end with the reply's opening)."""
        ...

    def text(self, messages: list[Message], *, gen: bool = True) -> str:
        """A readable rendering of the prompt (images as the media marker)."""
        ...

    def text_prefix(self, messages: list[Message]) -> tuple[int, ...]:
        """Tokens of a text-only prompt before its last user message (a snapshot candidate).

        () when there is nothing to snapshot: images in the prompt (their
        boundaries come from the chunks), no earlier message, or a layout
        that cannot render the partial chat.
        """
        ...


class TemplateLayout:
    """A chat template (the GGUF's, else the family's built-in one) with media markers.

    Args:
        llm: the language model (tokenizer, BOS/EOS).
        encoder: the vision encoder splitting text at markers, or None.
        template: a Jinja chat template (None: use ``chat_format``).
        chat_format: a key of ``edgevlm.prompt.CHAT_FORMATS``.
    """

    name = "chat-template"

    def __init__(self, llm: LlamaModel, encoder: VisionEncoder | None, *, template: str | None,
                 chat_format: str) -> None:
        self.llm = llm
        self.encoder = encoder
        self.template = template
        self.chat_format = chat_format
        self.marker = encoder.marker if encoder is not None else C.MEDIA_MARKER
        self._bos = llm.token_text(llm.bos) if llm.add_bos and llm.bos >= 0 else ""
        self._eos = llm.token_text(llm.eos) if llm.eos >= 0 else ""
        if template:
            precompile(template)  # one-time work belongs to load, not to the first request

    def text(self, messages: list[Message], *, gen: bool = True) -> str:
        return build_prompt(messages, self.marker, template=self.template, chat_format=self.chat_format,
                            gen=gen, bos=self._bos, eos=self._eos)[0]

    def chunks(self, messages: list[Message], *, gen: bool = True) -> list[Chunk]:
        """Render, then split at markers (images) or tokenise (text only).

        Raises:
            UnsupportedModelError: images given to a model without a projector.
        """
        text, images = build_prompt(messages, self.marker, template=self.template,
                                    chat_format=self.chat_format, gen=gen, bos=self._bos, eos=self._eos)
        if images and self.encoder is None:
            raise UnsupportedModelError(
                "this model was loaded without a vision projector; pass mmproj=... / --mmproj")
        if self.encoder is not None:
            return self.encoder.tokenize(text, images, add_special=True)
        return [TextChunk(tuple(self.llm.tokenize(text, add_special=True)))]

    def text_prefix(self, messages: list[Message]) -> tuple[int, ...]:
        users = [i for i, m in enumerate(messages) if m.role == "user"]
        if not users or users[-1] == 0 or any(isinstance(p, ImagePart) for m in messages for p in m.parts):
            return ()
        try:
            text = self.text(messages[:users[-1]], gen=False)
        except InvalidRequestError:
            return ()
        return tuple(self.llm.tokenize(text, add_special=True))
