"""OmniFusion 1.1 (AIRI): CLIP ViT-L/14-336 + a transformer-layer adapter, prompted with learned embeddings.

libmtmd cannot run the adapter, so the kernels engine does. The prompt is
the release's ``gen_answer`` layout (no BOS, text encoded without special
tokens)::

    "This is a dialog with AI assistant.\\n" SOI <image embeddings> EOI USER <question> BOT

and, for more turns, ``<answer> [SOI <image> EOI] USER <question> BOT``. A
system message replaces the opening line. SOI/EOI/USER/BOT are learned
vectors stored in the projector file (``special.*``) and decoded as raw
embeddings.
"""

from __future__ import annotations

import numpy as np

from edgevlm import constants as C
from edgevlm.chunks import Chunk, EmbeddingChunk, ImageChunk, TextChunk
from edgevlm.descriptor import ModelDescriptor
from edgevlm.errors import IncompatibleModelError, InvalidModelError, UnsupportedModelError
from edgevlm.families.base import Family, ImageCost, register
from edgevlm.llm import LlamaModel
from edgevlm.prompt import ImagePart, Message
from edgevlm.prompt_layout import NO_BUDGET, ImageBudget, PromptLayout
from edgevlm.vision.encoder import VisionEncoder
from edgevlm.vision.kernels_encoder import KernelsEncoder


@register
class OmniFusionFamily(Family):
    name = "omnifusion"
    describes = "OmniFusion adapter"
    priority = 20
    engines = (C.VISION_ENGINE_KERNELS,)
    single_view = True

    @classmethod
    def matches(cls, model: ModelDescriptor) -> bool:
        return model.projector is not None and model.projector.kind == C.PROJECTOR_KIND_OMNIFUSION

    def delimiter_tokens(self, llm: LlamaModel) -> int:
        """SOI and EOI."""
        return 2

    def image_cost(self, width: int, height: int, encoder: VisionEncoder,
                   max_tokens: int | None = None) -> ImageCost:
        """The views between the SOI and EOI embeddings (the budget counts both)."""
        cost = super().image_cost(width, height, encoder, _minus(max_tokens, 2))
        return ImageCost(tokens=cost.tokens + 2, positions=cost.positions + 2, cells=cost.cells + 2,
                         views=cost.views)

    def prompt_layout(self, llm: LlamaModel, encoder: VisionEncoder | None,
                      template: str | None, chat_format: str | None) -> PromptLayout:
        if not isinstance(encoder, KernelsEncoder):
            raise IncompatibleModelError("OmniFusion projectors run on the kernels vision engine only")
        layout = self.model.projector.metadata.get(C.KEY_PROMPT_LAYOUT) if self.model.projector else None
        if layout not in (None, C.PROMPT_LAYOUT_OMNIFUSION):
            raise UnsupportedModelError(f"prompt layout {layout!r} is not supported by this edgevlm "
                                        f"(known: {', '.join(C.PROMPT_LAYOUTS)}); upgrade edgevlm")
        return OmniFusionLayout(llm, encoder)


class OmniFusionLayout:
    """Messages -> OmniFusion chunks.

    Args:
        llm: the LLM (its tokenizer).
        encoder: the kernels encoder of an OmniFusion projector (image chunks
            and the learned special embeddings).

    Raises:
        InvalidModelError: the projector lacks a special embedding or it has the
            wrong width.
    """

    name = C.PROMPT_LAYOUT_OMNIFUSION

    def __init__(self, llm: LlamaModel, encoder: KernelsEncoder) -> None:
        self.llm = llm
        self.encoder = encoder
        self.prefix = str(encoder.meta.get(C.KEY_PROMPT_PREFIX, C.OMNIFUSION_PROMPT_PREFIX))
        self.special: dict[str, EmbeddingChunk] = {}
        for label, tensor in C.SPECIAL_EMBEDDING_TENSORS.items():
            vec = encoder.extra_tensors.get(tensor)
            if vec is None or vec.shape != (llm.n_embd_inp,):
                raise InvalidModelError(
                    f"projector {encoder.path.name}: special embedding {tensor} is missing or not "
                    f"{llm.n_embd_inp}-wide; re-convert the OmniFusion checkpoint")
            self.special[label] = EmbeddingChunk(key=f"{label}/{encoder.identity}",
                                                 embeddings=np.asarray(vec, np.float32)[None, :])

    def _text(self, text: str) -> list[Chunk]:
        tokens = self.llm.tokenize(text, add_special=False, parse_special=False) if text else []
        return [TextChunk(tuple(tokens))] if tokens else []

    def chunks(self, messages: list[Message], *, gen: bool = True,
               budget: ImageBudget = NO_BUDGET) -> list[Chunk]:
        """The chunks of a conversation (``gen``: end with BOT for the reply).

        With ``tiles="grid"`` an image's views share one SOI ... EOI; the
        budget counts those two delimiters too.

        Raises:
            UnsupportedModelError: a system message after the first.
        """
        rest, prefix = messages, self.prefix
        if messages and messages[0].role == "system":
            prefix, rest = messages[0].text.rstrip("\n") + "\n", messages[1:]
        chunks = self._text(prefix)
        awaiting_bot = False
        for message in rest:
            if message.role == "system":
                raise UnsupportedModelError("OmniFusion prompts have no place for a 'system' message "
                                            "after the first; use user/assistant turns")
            if awaiting_bot:
                chunks.append(self.special["BOT"])
            if message.role == "user":
                for part in message.parts:
                    if isinstance(part, ImagePart):
                        views = self.encoder.image_chunks(
                            part.image, max_tokens=_minus(budget.for_image(part.image).tokens, 2))
                        chunks += [self.special["SOI"], *views, self.special["EOI"]]
                chunks.append(self.special["USER"])
            chunks += self._text(message.text)
            awaiting_bot = message.role == "user"
        if gen and awaiting_bot:
            chunks.append(self.special["BOT"])
        return chunks

    def text(self, messages: list[Message], *, gen: bool = True) -> str:
        """A readable rendering: special vectors as ``<SOI>`` etc, images as the marker."""
        out = []
        for chunk in self.chunks(messages, gen=gen):
            if isinstance(chunk, TextChunk):
                out.append(self.llm.detokenize(chunk.tokens))
            elif isinstance(chunk, EmbeddingChunk):
                out.append(f"<{chunk.key.split('/')[0]}>")
            elif isinstance(chunk, ImageChunk):
                out.append(self.encoder.marker)
        return "".join(out)

    def text_prefix(self, messages: list[Message]) -> tuple[int, ...]:
        """Text snapshots are not taken for OmniFusion prompts (every turn holds learned embeddings)."""
        return ()


def _minus(tokens: int | None, n: int) -> int | None:
    return None if tokens is None else max(tokens - n, 0)
