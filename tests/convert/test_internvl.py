"""InternVL-hf conversion: metadata, tensor round trips, libmtmd / llama.cpp load the files.

Numerical parity of the loaded files with transformers is in
tests/runtime/test_internvl_engine.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from edgevlm import constants
from edgevlm.errors import UnsupportedModelError
from tests.fixtures.internvl import INTERNVL_CHAT_TEMPLATE, SPECIAL_TOKENS, InternVLSizes
from tests.helpers import (as_f16_matrices, assert_gguf_roundtrip, checkpoint_state,
                           copy_checkpoint, edit_config, expected_llm_tensors, gguf_fields,
                           gguf_tensors)

SIZES = InternVLSizes()
# transformers-native tower names -> llama.cpp GGUF names (independent of convert/internvl.py).
_LAYER = {"attention.q_proj": "attn_q", "attention.k_proj": "attn_k",
          "attention.v_proj": "attn_v", "attention.projection_layer": "attn_out",
          "layernorm_before": "ln1", "layernorm_after": "ln2", "mlp.fc1": "ffn_up",
          "mlp.fc2": "ffn_down"}
_PROJ = {"layer_norm": "mm.model.mlp.0", "linear_1": "mm.model.mlp.1",
         "linear_2": "mm.model.mlp.3"}


def expected_internvl_mmproj(folder: Path,
                             n_layers: int = SIZES.vision_layers) -> dict[str, np.ndarray]:
    """Reference projector tensors; the position table has CLS's row moved last."""
    out = {}
    for name, value in checkpoint_state(folder).items():
        if name.startswith("vision_tower."):
            local = name.removeprefix("vision_tower.")
            if local == "embeddings.cls_token":
                out["v.class_embd"] = value.reshape(-1)
            elif local == "embeddings.position_embeddings":
                table = value[0]
                out["v.position_embd.weight"] = np.concatenate([table[1:], table[:1]])
            elif local.startswith("embeddings.patch_embeddings.projection."):
                out[f"v.patch_embd.{local.rsplit('.', 1)[1]}"] = value
            else:
                _, _, idx, rest = local.split(".", 3)
                if int(idx) >= n_layers:
                    continue
                if rest in ("lambda_1", "lambda_2"):
                    out[f"v.blk.{idx}.ls{rest[-1]}.weight"] = value
                else:
                    part, kind = rest.rsplit(".", 1)
                    out[f"v.blk.{idx}.{_LAYER[part]}.{kind}"] = value
        elif name.startswith("multi_modal_projector."):
            part, kind = name.removeprefix("multi_modal_projector.").rsplit(".", 1)
            out[f"{_PROJ[part]}.{kind}"] = value
    return out


def test_registry_lists_internvl():
    from edgevlm.convert import supported_architectures

    assert "InternVLForConditionalGeneration" in supported_architectures()


def test_llm_hparams_and_vocab(internvl_f32_result, internvl_checkpoint):
    f = gguf_fields(internvl_f32_result.llm_path)
    assert f["general.architecture"] == "qwen2"
    assert (f["qwen2.embedding_length"], f["qwen2.block_count"]) == (64, 2)
    assert (f["qwen2.attention.head_count"], f["qwen2.attention.head_count_kv"]) == (4, 2)
    assert f["qwen2.rope.freq_base"] == pytest.approx(1e6)
    assert f["qwen2.rope.dimension_count"] == 16
    assert f["tokenizer.ggml.model"] == "gpt2" and f["tokenizer.ggml.pre"] == "qwen2"
    tokens = f["tokenizer.ggml.tokens"]
    first = tokens.index("<|endoftext|>")
    assert tokens[first:first + len(SPECIAL_TOKENS)] == list(SPECIAL_TOKENS)
    image_token = json.loads((internvl_checkpoint / "config.json").read_text())["image_token_id"]
    assert tokens[image_token] == "<IMG_CONTEXT>"
    assert f["tokenizer.ggml.eos_token_id"] == tokens.index("<|im_end|>")
    assert f["tokenizer.chat_template"] == INTERNVL_CHAT_TEMPLATE
    assert f[constants.KEY_PROMPT_FAMILY] == "chatml"
    assert f[constants.KEY_SOURCE_ARCHITECTURE] == "InternVLForConditionalGeneration"


def test_projector_keys(internvl_f32_result):
    f = gguf_fields(internvl_f32_result.mmproj_path)
    assert f["general.architecture"] == "clip"
    assert f["clip.projector_type"] == "internvl"
    assert f["clip.use_gelu"] is True
    assert (f["clip.vision.image_size"], f["clip.vision.patch_size"]) == (56, 7)
    assert (f["clip.vision.embedding_length"], f["clip.vision.feed_forward_length"]) == (48, 96)
    assert (f["clip.vision.block_count"], f["clip.vision.attention.head_count"]) == (2, 2)
    assert f["clip.vision.projection_dim"] == 64
    assert f["clip.vision.attention.layer_norm_epsilon"] == pytest.approx(1e-6)
    assert f["clip.vision.projector.scale_factor"] == 2
    assert (f["clip.vision.preproc_min_tiles"], f["clip.vision.preproc_max_tiles"]) == (1, 12)
    assert f["clip.vision.image_mean"] == pytest.approx([0.485, 0.456, 0.406])
    assert f["clip.vision.image_std"] == pytest.approx([0.229, 0.224, 0.225])
    assert f[constants.KEY_POSITION_LAYOUT] == "cls-last"


def test_llm_f32_roundtrip(internvl_f32_result, internvl_checkpoint):
    expected = expected_llm_tensors(internvl_checkpoint, interleaved=False)
    assert "blk.0.attn_q.bias" in expected and "output.weight" in expected
    assert_gguf_roundtrip(internvl_f32_result.llm_path, expected)


def test_mmproj_f32_roundtrip(internvl_f32_result, internvl_checkpoint):
    expected = expected_internvl_mmproj(internvl_checkpoint)
    assert expected["v.position_embd.weight"].shape == (65, 48)
    assert "v.blk.1.ls2.weight" in expected and "mm.model.mlp.0.bias" in expected
    assert_gguf_roundtrip(internvl_f32_result.mmproj_path, expected)


def test_f16_and_q8_0_types(internvl_checkpoint, tmp_path):
    from edgevlm.convert import convert

    result = convert(internvl_checkpoint, tmp_path, quant="f16", vision_type="q8_0")
    assert_gguf_roundtrip(result.llm_path, as_f16_matrices(
        expected_llm_tensors(internvl_checkpoint, interleaved=False)))
    types = {name: t.tensor_type.name for name, t in gguf_tensors(result.mmproj_path).items()}
    assert types["v.patch_embd.weight"] == "F16"
    assert types["v.position_embd.weight"] == types["v.class_embd"] == "F32"
    assert types["mm.model.mlp.1.weight"] == types["v.blk.0.ffn_down.weight"] == "Q8_0"
    assert types["v.blk.0.attn_q.weight"] == "F16"  # rows of 48: not a multiple of 32
    assert types["v.blk.0.ls1.weight"] == types["mm.model.mlp.0.weight"] == "F32"


def test_llama_cpp_and_libmtmd_load_the_files(internvl_f32_result):
    from edgevlm.llm import LlamaModel
    from edgevlm.vision.mtmd import MtmdEncoder

    llm = LlamaModel(internvl_f32_result.llm_path, n_gpu_layers=0)
    try:
        assert (llm.n_embd, llm.n_vocab) == (64, 448)
        enc = MtmdEncoder(internvl_f32_result.mmproj_path, llm, n_threads=2, use_gpu=False)
        assert not enc.uses_mrope and not enc.non_causal
        enc.close()
    finally:
        llm.close()


def test_feature_layer_keeps_that_many_blocks(internvl_checkpoint, tmp_path):
    from edgevlm.convert import convert

    src = copy_checkpoint(internvl_checkpoint, tmp_path / "src")
    edit_config(src, vision_feature_layer=-2)
    result = convert(src, tmp_path / "out", quant="f32", vision_type="f32")
    assert gguf_fields(result.mmproj_path)["clip.vision.block_count"] == 1
    assert_gguf_roundtrip(result.mmproj_path, expected_internvl_mmproj(src, n_layers=1))


@pytest.mark.parametrize(("changes", "message"), [
    ({"vision_config": {"use_qk_norm": True}}, "use_qk_norm"),
    ({"vision_config": {"norm_type": "rms_norm"}}, "norm_type 'rms_norm'"),
    ({"vision_config": {"use_mean_pooling": False}}, "use_mean_pooling"),
    ({"vision_feature_select_strategy": "full"}, "'default' only"),
    ({"text_config": {"model_type": "llama"}}, "qwen2 only"),
    ({"downsample_ratio": 0.3}, "downsample_ratio 0.3"),
])
def test_unsupported_variants_are_named(internvl_checkpoint, tmp_path, changes, message):
    from edgevlm.convert import convert

    src = copy_checkpoint(internvl_checkpoint, tmp_path / "src")
    edit_config(src, **changes)
    with pytest.raises(UnsupportedModelError, match=message):
        convert(src, tmp_path / "out", quant="f32")
