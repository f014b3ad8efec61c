"""Both vision encoders implement the VisionEncoder protocol fully, on the fixture models."""

from __future__ import annotations

import numpy as np
import pytest

import edgevlm
from edgevlm.chunks import ImageChunk
from edgevlm.vision.encoder import VisionEncoder
from edgevlm.vision.kernels_encoder import KernelsEncoder
from edgevlm.vision.mtmd import MtmdEncoder


@pytest.mark.parametrize("engine, cls", [("kernels", KernelsEncoder), ("mtmd", MtmdEncoder)])
def test_encoder_conforms_to_the_protocol(clip_f32, painting, engine, cls):
    with edgevlm.load(clip_f32, n_ctx=512, n_threads=2, cache=False, vision_engine=engine) as vlm:
        encoder = vlm.engine.encoder
        assert isinstance(encoder, cls) and isinstance(encoder, VisionEncoder)
        assert encoder.name == engine
        assert isinstance(encoder.identity, str) and encoder.identity
        assert encoder.marker and isinstance(encoder.non_causal, bool) and isinstance(encoder.uses_mrope, bool)
        assert encoder.meta["general.architecture"] == "clip"
        assert isinstance(encoder.device, str) and encoder.device
        image = edgevlm.load_image(painting)
        chunks = encoder.image_chunks(image)
        assert chunks and all(isinstance(c, ImageChunk) for c in chunks)
        assert all(encoder.identity in c.key for c in chunks)  # cache keys carry the projector identity
        calls = encoder.n_encode_calls
        embd = encoder.encode(chunks[0])
        assert encoder.n_encode_calls == calls + 1
        assert embd.dtype == np.float32 and embd.shape == (chunks[0].n_tokens, vlm.engine.model.n_embd_inp)
        split = encoder.tokenize(f"a {encoder.marker} b", [image], add_special=True)
        assert sum(isinstance(c, ImageChunk) for c in split) == len(chunks)


def test_qwen2vl_encoder_reports_mrope(qwen2vl_vlm):
    encoder = qwen2vl_vlm.engine.encoder
    assert isinstance(encoder, VisionEncoder) and encoder.uses_mrope
