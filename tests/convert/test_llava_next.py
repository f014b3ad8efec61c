"""LLaVA-NeXT conversion: tensors, llama.cpp's llava-v1.6 keys, loading by llama.cpp / libmtmd.

F32 files must hold the checkpoint's tensors bit-exactly; quantised projectors
are checked against the f32 one through libmtmd (per-token cosine >= 0.99).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from edgevlm import constants
from edgevlm.chunks import ImageChunk
from edgevlm.errors import ConversionError, UnsupportedModelError
from edgevlm.vision.anyres import image_tokens
from tests.fixtures.checkpoints import IMAGE_TOKEN
from tests.fixtures.llava_next import TINY_PINPOINTS
from tests.helpers import (assert_gguf_roundtrip, checkpoint_state, copy_checkpoint, edit_config,
                           expected_llm_tensors, expected_tower, gguf_fields)
from tests.reference import cosine_rows



def _picture(width: int, height: int, seed: int = 0):
    from PIL import Image

    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def mtmd_embeddings(llm: Path, mmproj: Path, picture) -> list[np.ndarray]:
    """libmtmd's embeddings of one image, one array per image chunk it makes."""
    from edgevlm.llm import LlamaModel
    from edgevlm.vision.images import load_image
    from edgevlm.vision.mtmd import MtmdEncoder

    model = LlamaModel(llm, n_gpu_layers=0)
    encoder = MtmdEncoder(mmproj, model, n_threads=2, use_gpu=False)
    try:
        chunks = encoder.tokenize(f"USER: {encoder.marker}\nhi", [load_image(picture)], add_special=True)
        return [encoder.encode(c) for c in chunks if isinstance(c, ImageChunk)]
    finally:
        encoder.close()
        model.close()


def test_llm_f32_roundtrip(llava_next_f32_result, llava_next_checkpoint):
    assert llava_next_f32_result.architecture == "LlavaNextForConditionalGeneration"
    assert_gguf_roundtrip(llava_next_f32_result.llm_path, expected_llm_tensors(llava_next_checkpoint))


def test_mmproj_f32_roundtrip_has_the_newline(llava_next_f32_result, llava_next_checkpoint):
    state = checkpoint_state(llava_next_checkpoint)
    # transformers 5 saves llava-hf's 4.x names (vision_tower.vision_model.*, image_newline)
    tower = next(k for k in state if k.endswith("embeddings.class_embedding")).split("embeddings.")[0]
    expected = expected_tower(state, tower, 2)  # feature layer -2 of 3 blocks
    for src, dst in (("linear_1", "mm.0"), ("linear_2", "mm.2")):
        for kind in ("weight", "bias"):
            expected[f"{dst}.{kind}"] = next(v for k, v in state.items()
                                             if k.endswith(f"multi_modal_projector.{src}.{kind}"))
    expected["v.image_newline"] = next(v for k, v in state.items() if k.endswith("image_newline"))
    assert_gguf_roundtrip(llava_next_f32_result.mmproj_path, expected)


def test_mmproj_has_llama_cpp_llava16_keys(llava_next_f32_result):
    fields = gguf_fields(llava_next_f32_result.mmproj_path)
    assert fields["clip.projector_type"] == "mlp"
    assert fields[constants.KEY_IMAGE_GRID_PINPOINTS] == [x for p in TINY_PINPOINTS for x in p]
    assert fields[constants.KEY_MM_PATCH_MERGE_TYPE] == "spatial_unpad"
    assert fields["clip.vision.feature_layer"] == [2] and fields["clip.vision.block_count"] == 2
    assert fields[constants.KEY_SOURCE_ARCHITECTURE] == "LlavaNextForConditionalGeneration"
    assert fields[constants.KEY_VISION_SELECT_STRATEGY] == "default"


@pytest.mark.parametrize("size", [(64, 64), (90, 45), (20, 15)])
def test_processor_token_count_equals_image_tokens(llava_next_checkpoint, size):
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(llava_next_checkpoint)
    out = processor(images=[_picture(*size)], text=f"USER: {IMAGE_TOKEN}\nhi", return_tensors="np")
    n_image = int((out["input_ids"] == processor.image_token_id).sum())
    assert n_image == image_tokens(*size, TINY_PINPOINTS, 32, 8)


def test_llama_cpp_and_libmtmd_load_the_pair(llava_next_f32_result):
    """libmtmd takes the file as llava-1.6: overview + one chunk per tile (no unpad, no newline)."""
    res = llava_next_f32_result
    wide = mtmd_embeddings(res.llm_path, res.mmproj_path, _picture(90, 45))
    assert [e.shape for e in wide] == [(16, 128)] * 3 and all(np.isfinite(e).all() for e in wide)
    small = mtmd_embeddings(res.llm_path, res.mmproj_path, _picture(20, 15))
    assert [e.shape for e in small] == [(16, 128)]  # no tiles for an image within one tile


@pytest.mark.parametrize("quant,vision_type", [("q8_0", "q8_0"), ("q4_k_m", "f16")])
def test_quantised_types_load_and_track_f32(llava_next_checkpoint, llava_next_f32_result, tmp_path,
                                            quant, vision_type):
    from edgevlm.convert import convert

    res = convert(llava_next_checkpoint, tmp_path, quant=quant, vision_type=vision_type)
    assert gguf_fields(res.mmproj_path)[constants.KEY_IMAGE_GRID_PINPOINTS]
    picture = _picture(64, 64, seed=3)
    ref = np.concatenate(mtmd_embeddings(llava_next_f32_result.llm_path, llava_next_f32_result.mmproj_path,
                                         picture))
    ours = np.concatenate(mtmd_embeddings(res.llm_path, res.mmproj_path, picture))
    assert ours.shape == ref.shape == (80, 128)
    assert cosine_rows(ours, ref).min() >= 0.99


def test_pinpoints_off_the_tile_grid_are_rejected(llava_next_checkpoint, tmp_path):
    from edgevlm.convert import convert

    folder = copy_checkpoint(llava_next_checkpoint, tmp_path / "ckpt")
    edit_config(folder, image_grid_pinpoints=[[32, 60]])
    with pytest.raises(ConversionError, match=r"pinpoint \[32, 60\] is not a multiple .* image_size 32"):
        convert(folder, tmp_path / "out")
    edit_config(folder, image_grid_pinpoints=[[32]])
    with pytest.raises(ConversionError, match="image_grid_pinpoints must be a non-empty list"):
        convert(folder, tmp_path / "out")


def test_missing_newline_is_a_clear_error(llava_next_checkpoint, tmp_path):
    from safetensors.numpy import load_file, save_file

    from edgevlm.convert import convert

    folder = copy_checkpoint(llava_next_checkpoint, tmp_path / "ckpt")
    state = load_file(folder / "model.safetensors")
    state = {k: v for k, v in state.items() if not k.endswith("image_newline")}
    save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ConversionError, match="'model.image_newline' is missing"):
        convert(folder, tmp_path / "out")


def test_processor_tile_size_must_match_the_tower(llava_next_checkpoint, tmp_path):
    import json

    from edgevlm.convert import convert

    folder = copy_checkpoint(llava_next_checkpoint, tmp_path / "ckpt")
    path = folder / "processor_config.json"
    data = json.loads(path.read_text())
    data["image_processor"]["crop_size"] = {"height": 48, "width": 48}
    path.write_text(json.dumps(data))
    with pytest.raises(UnsupportedModelError, match="crop_size is 48 but the vision tower takes 32"):
        convert(folder, tmp_path / "out")
