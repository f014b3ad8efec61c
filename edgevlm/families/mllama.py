"""Llama-3.2-Vision (mllama): recognised, and refused by ``edgevlm.load`` for now.

The engine behind ``edgevlm.load`` runs the LLM through llama.cpp, which has
no graph for mllama's cross-attention layers (its loader stops at "unknown
model architecture 'mllama'"). mllama runs on ``edgevlm.kernels`` through
:class:`edgevlm.mllama_runtime.MllamaPipeline` until the engine can drive a
kernels LLM; this family makes ``load`` (and so ``chat``, ``plan``, the CLI)
say that, whether the pair or the LLM file alone is given, instead of "no
family runs projector type 'mllama'" or llama.cpp's load failure.
"""

from __future__ import annotations

from edgevlm import constants as C
from edgevlm.descriptor import ModelDescriptor
from edgevlm.errors import UnsupportedModelError
from edgevlm.families.base import Family, FamilyOptions, register


@register
class MllamaFamily(Family):
    name = "mllama"
    describes = "Llama-3.2-Vision (mllama), run by edgevlm.mllama_runtime for now"
    priority = 10
    engines = (C.VISION_ENGINE_KERNELS,)

    @classmethod
    def matches(cls, model: ModelDescriptor) -> bool:
        proj = model.projector
        return model.llm_architecture == C.LLM_ARCH_MLLAMA or (
            proj is not None and proj.metadata.get(C.KEY_PROJECTOR_KIND) == C.PROJECTOR_KIND_MLLAMA)

    def __init__(self, model: ModelDescriptor, options: FamilyOptions | None = None) -> None:
        raise UnsupportedModelError(
            f"{model.files.llm.name} is a Llama-3.2-Vision (mllama) model: llama.cpp cannot run its "
            "cross-attention layers, so edgevlm.load / chat / the CLI do not run it yet. Run it with "
            "edgevlm.mllama_runtime.MllamaPipeline(llm_path, mmproj_path) (edgevlm's own ggml graphs).")
