"""LLaVA-1.5: a CLIP or SigLIP ViT with a two-layer MLP projector (``clip.projector_type = mlp``).

Ours (``edgevlm convert``) and third-party ``mmproj`` files alike. CLIP towers
(class embedding) run on the kernels engine by default: at the pinned
llama.cpp, libmtmd's LLaVA graph puts the class embedding after the patches
while positions and patch selection assume it first (upstream issue 25814),
so libmtmd's CLIP-tower features are wrong. SigLIP towers (no class
embedding) agree on both engines and keep libmtmd, which every build has.
"""

from __future__ import annotations

from edgevlm import constants as C
from edgevlm.descriptor import ModelDescriptor
from edgevlm.families.base import Family, register

LLAVA_PROJECTOR_TYPES = ("mlp",)


@register
class LlavaFamily(Family):
    name = "llava"
    describes = "LLaVA-1.5 MLP"
    priority = 10
    chat_format = "llava-1.5"
    single_view = True

    @classmethod
    def matches(cls, model: ModelDescriptor) -> bool:
        proj = model.projector
        return (proj is not None and not proj.metadata.get(C.KEY_PROJECTOR_KIND)
                and proj.projector_type in LLAVA_PROJECTOR_TYPES
                and bool(proj.metadata.get("clip.has_vision_encoder", True)))

    def supported_engines(self) -> tuple[str, ...]:
        clip_tower = self.model.projector is not None and "v.class_embd" in self.model.projector.tensor_names
        if clip_tower:
            return (C.VISION_ENGINE_KERNELS, C.VISION_ENGINE_MTMD)
        return (C.VISION_ENGINE_MTMD, C.VISION_ENGINE_KERNELS)
