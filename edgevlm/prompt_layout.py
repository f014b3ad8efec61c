"""Prompt layouts: normalised messages -> the chunks the context must hold.

A family chooses its layout (:meth:`edgevlm.families.base.Family.prompt_layout`):
most render a chat template with media markers and let the vision encoder
split the text at the markers (:class:`TemplateLayout`); a family prompted
with learned embeddings builds chunks itself (OmniFusion).
"""

from __future__ import annotations

from dataclasses import dataclass
from collections.abc import Mapping
from typing import TYPE_CHECKING, Protocol

from edgevlm import constants as C
from edgevlm.chunks import Chunk, ImageChunk, TextChunk
from edgevlm.errors import ContextOverflowError, InvalidRequestError, UnsupportedModelError
from edgevlm.llm import LlamaModel
from edgevlm.prompt import ImagePart, Message, build_prompt, precompile
from edgevlm.vision.encoder import VisionEncoder
from edgevlm.vision.images import LoadedImage

if TYPE_CHECKING:  # pragma: no cover
    from edgevlm.families.base import Family


@dataclass(frozen=True)
class ImageBudget:
    """The image-token budget of each image of a request.

    Attributes:
        tokens: embeddings one image may become (None: the model's own choice).
        explicit: the user asked for it (``max_image_tokens``); otherwise it is
            the cap that keeps the request's images and an answer in the context.
    """

    tokens: int | None = None
    explicit: bool = False
    kept: tuple[tuple[str, int | None], ...] = ()
    """(digest, tokens) of images that keep the budget of their earlier plan (still in a KV
    state; see :mod:`edgevlm.image_plans`); every other image gets ``tokens``."""

    def for_image(self, image: LoadedImage) -> ImageBudget:
        """The budget of one image of the request."""
        for digest, tokens in self.kept:
            if digest == image.digest:
                return ImageBudget(tokens, self.explicit)
        return ImageBudget(self.tokens, self.explicit) if self.kept else self


NO_BUDGET = ImageBudget()


def enforce_image_budget(chunks: list[Chunk], budget: ImageBudget, family: Family, delimiters: int = 0,
                         budgets: Mapping[str, ImageBudget] | None = None) -> None:
    """Refuse an image over an explicit budget when the family plans views by budget.

    Models trained on one view have a fixed cost and ignore the budget.
    ``delimiters``: tokens around each image that its budget also counts.
    ``budgets``: per image digest (of the chunks' images), where not ``budget``.

    Raises:
        ContextOverflowError: the smallest plan of an image needs more tokens
            than the budget; the message says how many and what to change.
    """
    per_image: dict[str, int] = {}
    sources: dict[str, LoadedImage] = {}
    for chunk in chunks:
        if isinstance(chunk, ImageChunk) and chunk.image is not None:
            per_image[chunk.image.digest] = per_image.get(chunk.image.digest, 0) + chunk.n_tokens
            sources.setdefault(chunk.image.digest, chunk.image)
    for digest, tokens in per_image.items():
        check_image_tokens(tokens + delimiters, (budgets or {}).get(digest, budget), family, sources[digest])


def check_image_tokens(tokens: int, budget: ImageBudget, family: Family, image: LoadedImage) -> None:
    """Raise when ``image``, costing ``tokens``, exceeds an explicit budget the family must meet.

    Raises:
        ContextOverflowError: saying how many tokens the image needs and what to change.
    """
    if budget.tokens is None or not budget.explicit or family.single_view or tokens <= budget.tokens:
        return
    raise ContextOverflowError(
        f"{image.source}: a {image.width}x{image.height} image needs at least {tokens} image "
        f"tokens with this model, more than the budget of {budget.tokens}"
        f"{family.budget_note(image, tokens)}; raise --image-tokens / max_image_tokens= to at least "
        f"{tokens} (and --ctx if needed)")


class PromptLayout(Protocol):
    """Messages -> chunks, for one loaded model."""

    name: str

    def chunks(self, messages: list[Message], *, gen: bool = True,
               budget: ImageBudget = NO_BUDGET) -> list[Chunk]:
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
        family: the model family (prepares images under a budget).
        template: a Jinja chat template (None: use ``chat_format``).
        chat_format: a key of ``edgevlm.prompt.CHAT_FORMATS``.
    """

    name = "chat-template"

    def __init__(self, llm: LlamaModel, encoder: VisionEncoder | None, family: Family, *,
                 template: str | None, chat_format: str) -> None:
        self.llm = llm
        self.encoder = encoder
        self.family = family
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

    def chunks(self, messages: list[Message], *, gen: bool = True,
               budget: ImageBudget = NO_BUDGET) -> list[Chunk]:
        """Render, then split at markers (images) or tokenise (text only).

        Raises:
            UnsupportedModelError: images given to a model without a projector.
            ContextOverflowError: an image over an explicit budget.
        """
        text, images = build_prompt(messages, self.marker, template=self.template,
                                    chat_format=self.chat_format, gen=gen, bos=self._bos, eos=self._eos)
        if images and self.encoder is None:
            raise UnsupportedModelError(
                "this model was loaded without a vision projector; pass mmproj=... / --mmproj")
        if self.encoder is None:
            return [TextChunk(tuple(self.llm.tokenize(text, add_special=True)))]
        budgets = [budget.for_image(image) for image in images]
        prepared = [self.family.prepare_image(image, b.tokens, self.encoder) for image, b in zip(images, budgets)]
        per_image = [b.tokens for b in budgets]
        same = len(set(per_image)) <= 1
        chunks = self.encoder.tokenize(text, prepared, add_special=True,
                                       max_tokens=budget.tokens if same else per_image)
        enforce_image_budget(chunks, budget, self.family,
                             budgets={p.digest: b for p, b in zip(prepared, budgets)})
        return chunks

    def text_prefix(self, messages: list[Message]) -> tuple[int, ...]:
        users = [i for i, m in enumerate(messages) if m.role == "user"]
        if not users or users[-1] == 0 or any(isinstance(p, ImagePart) for m in messages for p in m.parts):
            return ()
        try:
            text = self.text(messages[:users[-1]], gen=False)
        except InvalidRequestError:
            return ()
        return tuple(self.llm.tokenize(text, add_special=True))
