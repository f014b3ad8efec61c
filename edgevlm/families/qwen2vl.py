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

import math

from collections.abc import Callable

from edgevlm.descriptor import ModelDescriptor
from edgevlm.families.base import Family, blank_image, register
from edgevlm.vision.encoder import VisionEncoder
from edgevlm.vision.images import LoadedImage, resized

QWEN2VL_PROJECTOR_TYPES = ("qwen2vl_merger",)
#: Attempts at shrinking an image into its budget (each aims a little lower).
_FIT_STEPS = 8


@register
class Qwen2VLFamily(Family):
    name = "qwen2vl"
    describes = "Qwen2-VL patch merger"
    priority = 10

    @classmethod
    def matches(cls, model: ModelDescriptor) -> bool:
        return model.projector is not None and model.projector.projector_type in QWEN2VL_PROJECTOR_TYPES

    def prepare_image(self, image: LoadedImage, max_tokens: int | None, encoder: VisionEncoder) -> LoadedImage:
        """Downscale until libmtmd's plan has at most ``max_tokens`` embeddings (else the smallest)."""
        if max_tokens is None:
            return image
        size = fit_size(image.width, image.height, max_tokens, lambda w, h: _tokens(encoder, w, h))
        return resized(image, *size)


def _tokens(encoder: VisionEncoder, width: int, height: int) -> int:
    return sum(c.n_tokens for c in encoder.image_chunks(blank_image(width, height)))


def fit_size(width: int, height: int, max_tokens: int, tokens_at: Callable[[int, int], int]) -> tuple[int, int]:
    """The largest size (same aspect, found in a few steps) whose token count fits ``max_tokens``."""
    need = tokens_at(width, height)
    w, h = width, height
    for _ in range(_FIT_STEPS):
        if need <= max_tokens:
            return w, h
        scale = math.sqrt(max_tokens / need) * 0.97
        w, h = max(1, int(w * scale)), max(1, int(h * scale))
        before, need = need, tokens_at(w, h)
        if need >= before:  # the encoder's floor: smaller images cost no less
            return w, h
    return w, h
