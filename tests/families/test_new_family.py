"""A new LLaVA-like family plugs in with one converter class and one runtime family class, nothing else edited."""

from __future__ import annotations

import pytest

import edgevlm
from edgevlm import constants as C
from edgevlm.convert import ARCHITECTURES, convert
from edgevlm.descriptor import ModelDescriptor
from edgevlm.families import FAMILIES, Family, register

ARCH = "TinyLlavaLikeForConditionalGeneration"


@pytest.fixture()
def new_family():
    from edgevlm.convert.base import register as register_converter
    from edgevlm.convert.llava import LlavaConverter

    @register_converter(ARCH)
    class TinyConverter(LlavaConverter):
        """Same tensors as LLaVA-1.5; its own architecture name."""

    @register
    class TinyFamily(Family):
        name = "tiny-llava-like"
        describes = "a LLaVA-like test family"
        priority = 50
        engines = (C.VISION_ENGINE_KERNELS,)
        chat_format = "llava-1.5"

        @classmethod
        def matches(cls, model: ModelDescriptor) -> bool:
            return model.projector is not None and model.projector.metadata.get(
                C.KEY_SOURCE_ARCHITECTURE) == ARCH

    try:
        yield TinyFamily
    finally:
        ARCHITECTURES.pop(ARCH, None)
        FAMILIES.pop(TinyFamily.name, None)


def test_new_family_converts_and_runs(new_family, llava_clip_checkpoint, painting, tmp_path):
    from tests.helpers import copy_checkpoint, edit_config

    source = copy_checkpoint(llava_clip_checkpoint, tmp_path / "tiny-llava-like")
    edit_config(source, architectures=[ARCH])
    result = convert(source, tmp_path / "out", quant="f16")
    assert result.architecture == ARCH
    with edgevlm.load(tmp_path / "out", n_ctx=512, n_threads=2, cache=False) as vlm:
        assert vlm.family == "tiny-llava-like" and vlm.vision_engine == "kernels"
        reply = vlm.chat([{"role": "user", "content": [{"type": "image", "image": str(painting)},
                                                       {"type": "text", "text": "Genre?"}]}],
                         max_tokens=3, temperature=0)
        assert reply.prompt_tokens > 16 and reply.completion_tokens >= 1
    with pytest.raises(edgevlm.EdgeVLMError, match="libmtmd cannot run"):
        edgevlm.load(tmp_path / "out", n_ctx=512, n_threads=2, cache=False, vision_engine="mtmd")
