"""Tensor-level round trips: every tensor present, right shape, f32 values exact."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from tests.helpers import assert_gguf_roundtrip, expected_tower
from tests.helpers import checkpoint_state as _state
from tests.helpers import expected_llm_tensors as expected_llm

def expected_mmproj(folder: Path, n_keep: int) -> dict[str, np.ndarray]:
    """Reference projector tensors: first ``n_keep`` tower blocks, no post-LN, no head."""
    out = {}
    tower = {}
    for name, value in _state(folder).items():
        if "multi_modal_projector." in name:
            local = name.split("multi_modal_projector.")[1]
            out[local.replace("linear_1", "mm.0").replace("linear_2", "mm.2")] = value
        elif "vision_tower." in name:
            tower[name.split("vision_tower.")[1].replace("vision_model.", "")] = value
    out.update(expected_tower(tower, "", n_keep))
    return out


def test_llm_f32_roundtrip_clip(clip_f32_result, llava_clip_checkpoint):
    assert_gguf_roundtrip(clip_f32_result.llm_path, expected_llm(llava_clip_checkpoint))


def test_mmproj_f32_roundtrip_clip_drops_last_layer(clip_f32_result, llava_clip_checkpoint):
    # vision_feature_layer=-2 on a 3-layer tower -> 2 layers kept
    expected = expected_mmproj(llava_clip_checkpoint, n_keep=2)
    assert "v.class_embd" in expected and "v.pre_ln.weight" in expected
    assert_gguf_roundtrip(clip_f32_result.mmproj_path, expected)


def test_mmproj_f32_roundtrip_siglip_keeps_all_layers(siglip_f32_result, llava_siglip_checkpoint):
    expected = expected_mmproj(llava_siglip_checkpoint, n_keep=3)
    assert "v.patch_embd.bias" in expected and "v.class_embd" not in expected
    assert_gguf_roundtrip(siglip_f32_result.mmproj_path, expected)


def test_f16_roundtrip_shapes_and_close_values(llava_clip_checkpoint, tmp_path):
    from edgevlm.convert import convert

    result = convert(llava_clip_checkpoint, tmp_path, quant="f16", vision_type="f16")
    # matrices are stored as F16, 1-D tensors (norms) stay F32
    expected = {k: v.astype(np.float16).astype(np.float32) if v.ndim > 1 else v
                for k, v in expected_llm(llava_clip_checkpoint).items()}
    assert_gguf_roundtrip(result.llm_path, expected)


def test_bf16_checkpoint_converts_exactly(tmp_path):
    """A bfloat16 checkpoint is decoded without torch and written bit-exactly as f32."""
    import torch

    from edgevlm.convert import convert
    from tests.fixtures.checkpoints import build_llava_checkpoint

    folder = build_llava_checkpoint(tmp_path / "bf16-llava", torch_dtype="bfloat16",
                                    vision_layers=2, text_layers=1)
    result = convert(folder, tmp_path / "out", quant="f32", vision_type="f32")
    state = {}
    from safetensors.torch import load_file as load_torch

    for name, value in load_torch(folder / "model.safetensors").items():
        state[name] = value.to(torch.float32).numpy()
    ref = state["language_model.lm_head.weight" if "language_model.lm_head.weight" in state
                else "lm_head.weight"]
    from tests.helpers import gguf_tensors

    data = np.asarray(gguf_tensors(result.llm_path)["output.weight"].data).reshape(ref.shape)
    np.testing.assert_array_equal(data, ref)
