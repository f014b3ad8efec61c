"""Tensor-level round trips: every tensor present, right shape, f32 values exact."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from tests.helpers import (as_f16_matrices, assert_gguf_roundtrip, checkpoint_state,
                           expected_llm_tensors as expected_llm)

_CLIP_PARTS = {
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.out_proj": "attn_out", "layer_norm1": "ln1", "layer_norm2": "ln2",
    "mlp.fc1": "ffn_up", "mlp.fc2": "ffn_down",
}


def expected_mmproj(folder: Path, n_keep: int) -> dict[str, np.ndarray]:
    """Reference projector tensors: first ``n_keep`` tower blocks, no post-LN, no head."""
    out = {}
    static = {"embeddings.class_embedding": "v.class_embd",
              "embeddings.patch_embedding.weight": "v.patch_embd.weight",
              "embeddings.patch_embedding.bias": "v.patch_embd.bias",
              "embeddings.position_embedding.weight": "v.position_embd.weight",
              "pre_layrnorm.weight": "v.pre_ln.weight", "pre_layrnorm.bias": "v.pre_ln.bias"}
    for name, value in checkpoint_state(folder).items():
        if "multi_modal_projector." in name:
            local = name.split("multi_modal_projector.")[1]
            out[local.replace("linear_1", "mm.0").replace("linear_2", "mm.2")] = value
            continue
        if "vision_tower." not in name:
            continue
        local = name.split("vision_tower.")[1].replace("vision_model.", "")
        if local in static:
            out[static[local]] = value
        elif local.startswith("encoder.layers."):
            _, _, idx, rest = local.split(".", 3)
            part, kind = rest.rsplit(".", 1)
            if int(idx) < n_keep:
                out[f"v.blk.{idx}.{_CLIP_PARTS[part]}.{kind}"] = value
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
    assert_gguf_roundtrip(result.llm_path, as_f16_matrices(expected_llm(llava_clip_checkpoint)))


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
