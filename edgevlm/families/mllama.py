"""Llama-3.2-Vision (mllama): run by :class:`edgevlm.mllama_engine.MllamaEngine`.

llama.cpp has no graph for mllama's cross-attention layers (its loader stops at
"unknown model architecture 'mllama'"), so this family opens its own engine
(:meth:`open_engine`): edgevlm's ggml graphs for the vision encoder and the
text decoder, llama.cpp's vocabulary-only load for the tokenizer and its
sampler chain for sampling. The LLM file alone is refused: the text decoder
needs the images' cross-attention states only the projector file gives.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from edgevlm import constants as C
from edgevlm.descriptor import ModelDescriptor
from edgevlm.errors import UnsupportedModelError
from edgevlm.families.base import Family, FamilyOptions, ImageCost, register

if TYPE_CHECKING:  # pragma: no cover
    from edgevlm.engine_protocol import EngineRequest, VLMEngine


@register
class MllamaFamily(Family):
    name = "mllama"
    describes = "Llama-3.2-Vision (mllama), run on edgevlm's kernels (cross-attention text decoder)"
    priority = 10
    engines = (C.VISION_ENGINE_KERNELS,)

    @classmethod
    def matches(cls, model: ModelDescriptor) -> bool:
        proj = model.projector
        return model.llm_architecture == C.LLM_ARCH_MLLAMA or (
            proj is not None and proj.metadata.get(C.KEY_PROJECTOR_KIND) == C.PROJECTOR_KIND_MLLAMA)

    def __init__(self, model: ModelDescriptor, options: FamilyOptions | None = None) -> None:
        if model.projector is None or model.llm_architecture != C.LLM_ARCH_MLLAMA:
            raise UnsupportedModelError(
                f"{model.files.llm.name} is part of a Llama-3.2-Vision (mllama) model: edgevlm runs it from "
                "the pair (the mllama LLM GGUF and its edgevlm-mllama projector GGUF; llama.cpp cannot run "
                "its cross-attention layers alone); give both files (model=folder, or mmproj=...)")
        super().__init__(model, options)

    def planned_image_cost(self, width: int, height: int, max_tokens: int | None,
                           engine: str) -> ImageCost | None:
        """Not priced yet: ``edgevlm.plan`` / ``memory_budget`` refuse mllama.

        Raises:
            UnsupportedModelError: always.
        """
        raise UnsupportedModelError("edgevlm.plan does not price Llama-3.2-Vision (mllama) models yet "
                                    "(load them without memory_budget)")

    def open_engine(self, request: EngineRequest) -> VLMEngine:
        """The mllama engine on edgevlm's kernels (see :mod:`edgevlm.mllama_engine`)."""
        from edgevlm.mllama_engine import open_mllama_engine

        return open_mllama_engine(self, request)
