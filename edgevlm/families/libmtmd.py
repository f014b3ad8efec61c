"""Any other projector libmtmd knows (SmolVLM, Qwen2.5-VL, Gemma 3, LLaVA-NeXT, ...): run by libmtmd.

libmtmd preprocesses, tiles and encodes these itself; edgevlm adds its
caches on top. Projector types libmtmd does not know are refused at load with
the list of families, instead of failing inside llama.cpp.
"""

from __future__ import annotations

from edgevlm import constants as C
from edgevlm.descriptor import ModelDescriptor
from edgevlm.families.base import Family, register

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

    def default_chat_format(self) -> str:
        if self.model.projector is not None and self.model.projector.projector_type in LLAVA_STYLE_TYPES:
            return "llava-1.5"
        return super().default_chat_format()
