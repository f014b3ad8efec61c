"""GGUF metadata of both outputs."""

from __future__ import annotations

import json

import pytest

from edgevlm import constants
from tests.fixtures.checkpoints import CLIP_MEAN, CLIP_STD, LLAVA15_CHAT_TEMPLATE
from tests.helpers import gguf_fields


def test_llm_hparams(clip_f32_result, llava_clip_checkpoint):
    f = gguf_fields(clip_f32_result.llm_path)
    assert f["general.architecture"] == "llama"
    assert f["general.file_type"] == 0  # ALL_F32
    assert f["llama.embedding_length"] == 256
    assert f["llama.block_count"] == 2
    assert f["llama.feed_forward_length"] == 512
    assert f["llama.attention.head_count"] == 4
    assert f["llama.attention.head_count_kv"] == 2
    assert f["llama.rope.dimension_count"] == 64
    assert f["llama.rope.freq_base"] == pytest.approx(10000.0)
    assert f["llama.attention.layer_norm_rms_epsilon"] == pytest.approx(1e-5)
    assert f["llama.context_length"] == 4096
    assert f["llama.vocab_size"] == 384


def test_llm_tokenizer_keys(clip_f32_result, llava_clip_checkpoint):
    f = gguf_fields(clip_f32_result.llm_path)
    config = json.loads((llava_clip_checkpoint / "config.json").read_text())
    tokens = f["tokenizer.ggml.tokens"]
    assert f["tokenizer.ggml.model"] == "llama"
    assert len(tokens) == len(f["tokenizer.ggml.scores"]) == len(f["tokenizer.ggml.token_type"])
    assert len(tokens) == config["text_config"]["vocab_size"] == 384
    assert tokens[:3] == ["<unk>", "<s>", "</s>"]
    assert tokens[config["image_token_index"]] == "<image>"
    assert tokens[321] == "<pad>" and tokens[-1] == "[PAD383]"
    types = f["tokenizer.ggml.token_type"]
    assert types[0] == 2 and types[1] == 3 and types[320] == 3 and types[383] == 5
    assert types[3] == 6  # <0x00> byte piece
    assert f["tokenizer.ggml.bos_token_id"] == 1
    assert f["tokenizer.ggml.eos_token_id"] == 2
    assert f["tokenizer.ggml.unknown_token_id"] == 0
    assert f["tokenizer.ggml.padding_token_id"] == 321
    assert f["tokenizer.ggml.add_bos_token"] is True
    assert f["tokenizer.chat_template"] == LLAVA15_CHAT_TEMPLATE
    assert f[constants.KEY_PROMPT_FAMILY] == "llava-1.5"
    assert f[constants.KEY_SOURCE_ARCHITECTURE] == "LlavaForConditionalGeneration"
    assert f[constants.KEY_EDGEVLM_VERSION]


def test_clip_projector_keys(clip_f32_result):
    f = gguf_fields(clip_f32_result.mmproj_path)
    assert f["general.architecture"] == "clip"
    assert f["clip.has_vision_encoder"] is True
    assert f["clip.projector_type"] == "mlp"
    assert f["clip.use_gelu"] is False  # quick_gelu
    assert f["clip.vision.image_size"] == 32
    assert f["clip.vision.patch_size"] == 8
    assert f["clip.vision.embedding_length"] == 64
    assert f["clip.vision.feed_forward_length"] == 256
    assert f["clip.vision.projection_dim"] == 256
    assert f["clip.vision.attention.head_count"] == 4
    assert f["clip.vision.attention.layer_norm_epsilon"] == pytest.approx(1e-5)
    assert f["clip.vision.image_mean"] == pytest.approx(CLIP_MEAN)
    assert f["clip.vision.image_std"] == pytest.approx(CLIP_STD)
    # feature layer -2 of a 3-layer tower = output of 2 layers
    assert f["clip.vision.feature_layer"] == [2]
    assert f["clip.vision.block_count"] == 2
    assert f[constants.KEY_VISION_FEATURE_LAYER] == -2
    assert f[constants.KEY_VISION_SELECT_STRATEGY] == "default"
    assert f[constants.KEY_VISION_ACTIVATION] == "quick_gelu"
    assert f[constants.KEY_PROJECTOR_ACTIVATION] == "gelu"


def test_siglip_projector_keys(siglip_f32_result):
    f = gguf_fields(siglip_f32_result.mmproj_path)
    assert f["clip.use_gelu"] is True
    assert f["clip.vision.feature_layer"] == [3]
    assert f["clip.vision.block_count"] == 3
    assert f["clip.vision.image_mean"] == pytest.approx([0.5] * 3)
    assert f[constants.KEY_VISION_FEATURE_LAYER] == -1
    assert f[constants.KEY_VISION_SELECT_STRATEGY] == "full"
    assert "v.post_ln.weight" not in str(f)


def test_result_fields(clip_f32_result, llava_clip_checkpoint):
    name = llava_clip_checkpoint.name.lower()
    assert clip_f32_result.llm_path.name == f"{name}-F32.gguf"
    assert clip_f32_result.mmproj_path.name == f"mmproj-{name}-f32.gguf"
    assert clip_f32_result.llm_bytes == clip_f32_result.llm_path.stat().st_size
    assert clip_f32_result.mmproj_bytes == clip_f32_result.mmproj_path.stat().st_size
    assert (clip_f32_result.architecture, clip_f32_result.llm_type, clip_f32_result.vision_type) == (
        "LlavaForConditionalGeneration", "f32", "f32")
    assert clip_f32_result.notes == ()
