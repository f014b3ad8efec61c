"""Any other projector libmtmd knows (SmolVLM, Qwen2.5-VL, Gemma 3, LLaVA-NeXT, ...): run by libmtmd.

libmtmd preprocesses, tiles and encodes these itself; edgevlm adds its
caches on top. Projector types libmtmd does not know are refused at load with
the list of families, instead of failing inside llama.cpp.

An image-token budget is met as Qwen2-VL's family meets it: the image is
downscaled (keeping its aspect) until libmtmd's own plan for it fits
(:func:`fit_size`, asking libmtmd for the token count of a size-only image).
For the projector types in :data:`AREA_PROJECTOR_TYPES` the cost follows the
pixel area (native dynamic resolution: patches merged into tokens), so the
projector header says a smaller image costs less. For every other type the
cost is measured: when a half-size image costs no less than the image, libmtmd
plans that type at a fixed count and no budget below it can be met; the error
then says so (:meth:`LibmtmdFamily.budget_note`).
"""

from __future__ import annotations

import math
from collections.abc import Callable

from edgevlm import constants as C
from edgevlm.descriptor import ModelDescriptor
from edgevlm.families.base import Family, blank_image, register
from edgevlm.vision.encoder import VisionEncoder
from edgevlm.vision.images import LoadedImage, resized

# PROJECTOR_TYPE_NAMES of tools/mtmd/clip-impl.h in the llama.cpp that
# llama-cpp-python 0.3.36 vendors (read from libmtmd.so's string table);
# audio-only types are left out (edgevlm runs images).
LIBMTMD_PROJECTOR_TYPES = (
    "mlp", "mlp_norm", "ldp", "ldpv2", "resampler", "adapter", "qwen2vl_merger", "qwen2.5vl_merger",
    "qwen3vl_merger", "ling3vl", "step3vl", "gemma3", "gemma3nv", "gemma4v", "gemma4uv", "phi4",
    "idefics3", "pixtral", "internvl", "llama4", "qwen2.5o", "lfm2", "kimivl", "paddleocr",
    "lightonocr", "cogvlm", "janus_pro", "dots_ocr", "dots3note_v", "deepseekocr", "deepseekocr2",
    "deepseek4v", "glm4v", "glm5v", "youtuvl", "yasa2", "kimik25", "nemotron_v2_vl", "exaone4_5",
    "hunyuanvl", "minicpmv4_6", "mimovl", "minimax_m3", "granite4_vision",
)
#: Older LLaVA-style projectors prompted like LLaVA-1.5 (MobileVLM's LDP, mlp_norm).
LLAVA_STYLE_TYPES = ("mlp_norm", "ldp", "ldpv2")
#: Native dynamic resolution in libmtmd (clip.cpp resizes to a multiple of patch x merge within
#: the header's pixel bounds): tokens follow the pixel area.
AREA_PROJECTOR_TYPES = ("qwen2vl_merger", "qwen2.5vl_merger", "qwen3vl_merger", "pixtral", "lightonocr",
                        "kimivl", "glm4v")
#: Attempts at shrinking an image into its budget (each aims a little lower).
_FIT_STEPS = 8


def image_tokens(encoder: VisionEncoder, width: int, height: int) -> int:
    """libmtmd's token count for a ``width`` x ``height`` image (no pixels of ours allocated)."""
    return sum(c.n_tokens for c in encoder.image_chunks(blank_image(width, height)))


def fit_size(width: int, height: int, max_tokens: int, tokens_at: Callable[[int, int], int],
             need: int | None = None) -> tuple[int, int]:
    """The largest size (same aspect, found in a few steps) whose token count fits ``max_tokens``.

    ``need``: the count at ``width`` x ``height`` when the caller has it already.
    """
    need = tokens_at(width, height) if need is None else need
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


@register
class LibmtmdFamily(Family):
    name = "libmtmd"
    describes = "any image projector libmtmd knows"
    priority = -10

    @classmethod
    def matches(cls, model: ModelDescriptor) -> bool:
        proj = model.projector
        return (proj is not None and not proj.metadata.get(C.KEY_PROJECTOR_KIND)
                and proj.projector_type in LIBMTMD_PROJECTOR_TYPES)

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._fixed: set[tuple[int, int]] = set()  # sizes whose count libmtmd keeps fixed

    @property
    def projector_type(self) -> str:
        return self.model.projector.projector_type if self.model.projector is not None else ""

    def prepare_image(self, image: LoadedImage, max_tokens: int | None, encoder: VisionEncoder) -> LoadedImage:
        """Downscale until libmtmd's plan has at most ``max_tokens`` embeddings (else the smallest).

        A type outside :data:`AREA_PROJECTOR_TYPES` whose half-size image costs no less is
        left as it is (its count is fixed; :meth:`budget_note` explains the refusal).
        """
        if max_tokens is None:
            return image
        need = image_tokens(encoder, image.width, image.height)
        if need <= max_tokens:
            return image
        if self.projector_type not in AREA_PROJECTOR_TYPES:
            half = image_tokens(encoder, max(1, image.width // 2), max(1, image.height // 2))
            if half >= need:
                self._fixed.add((image.width, image.height))
                return image
        size = fit_size(image.width, image.height, max_tokens, lambda w, h: image_tokens(encoder, w, h), need)
        return resized(image, *size)

    def budget_note(self, image: LoadedImage, tokens: int) -> str:
        """Why ``image`` cannot be planned within a smaller budget (hook of the budget error)."""
        if (image.width, image.height) in self._fixed:
            return (f"; libmtmd plans {self.projector_type} images itself at a fixed {tokens} tokens "
                    "whatever their size (a half-size image costs as much), so no smaller budget can be met")
        return (f"; libmtmd plans {self.projector_type} images itself and downscaling this one costs no "
                f"fewer than {tokens} tokens")

    def default_chat_format(self) -> str:
        if self.model.projector is not None and self.model.projector.projector_type in LLAVA_STYLE_TYPES:
            return "llava-1.5"
        return super().default_chat_format()
