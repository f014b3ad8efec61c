"""Qwen2-VL: a ViT with a 2x2 patch merger (``qwen2vl_merger``) and an M-RoPE Qwen2 LLM.

Run by libmtmd, which implements native dynamic resolution (the image is
resized to a multiple of 28 px within the projector's pixel bounds) and
M-RoPE positions: an image of w x h merged tokens fills w * h KV cells but
advances max(w, h) positions. The KV accounting therefore comes from the
encoder's chunks (``image_cost`` asks the encoder for a blank image of that
size), never from a token count alone.

An image-token budget lowers the pixels: the image is downscaled (keeping
its aspect) until libmtmd's plan for it fits, as a smaller ``max_pixels``
would in transformers' processor.
"""

from __future__ import annotations

from edgevlm.descriptor import ModelDescriptor
from edgevlm.families.base import register
from edgevlm.families.libmtmd import LibmtmdFamily

QWEN2VL_PROJECTOR_TYPES = ("qwen2vl_merger",)


@register
class Qwen2VLFamily(LibmtmdFamily):
    """libmtmd's Qwen2-VL; the budget is met by :meth:`LibmtmdFamily.prepare_image`."""

    name = "qwen2vl"
    describes = "Qwen2-VL patch merger"
    priority = 10

    @classmethod
    def matches(cls, model: ModelDescriptor) -> bool:
        return model.projector is not None and model.projector.projector_type in QWEN2VL_PROJECTOR_TYPES
