"""A language model loaded without a vision projector: text chats only."""

from __future__ import annotations

from edgevlm.descriptor import ModelDescriptor
from edgevlm.families.base import Family, register


@register
class TextFamily(Family):
    name = "text"
    describes = "an LLM without a projector"
    priority = -100
    engines = ()

    @classmethod
    def matches(cls, model: ModelDescriptor) -> bool:
        return model.projector is None
