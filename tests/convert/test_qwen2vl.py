"""Qwen2-VL conversion: metadata, tensor round trips, tokenizer, parity with transformers.

Tolerances (f32 GGUF, f32 KV cache, CPU): LLM logits max-abs <= 1e-4 (measured
~5e-6); image embeddings cosine >= 0.9999 per token (measured > 0.99999) and
max-abs <= 5e-3 (measured ~6e-4; the merger's GELU runs through ggml's
approximation); next-token logits of prompts with images max-abs <= 2e-3
(measured ~2e-4). Images have sides that are multiples of 28 and at least 8
merged tokens, so neither transformers (min 56x56 pixels) nor libmtmd (min 8
tokens) resizes them and both see the same pixels.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

import edgevlm
from edgevlm import constants
from edgevlm.chunks import ImageChunk
from edgevlm.errors import ConversionError, UnsupportedModelError
from tests.convert.test_tokenizer import TEXTS
from tests.fixtures.qwen2vl import QWEN2VL_CHAT_TEMPLATE, SPECIAL_TOKENS
from tests.helpers import (as_f16_matrices, assert_gguf_roundtrip, checkpoint_state,
                           copy_checkpoint, edit_config, expected_llm_tensors, gguf_fields,
                           gguf_tensors)
from tests.reference import cosine_rows, hf_image_embeddings, hf_logits, reference_ids

_VISION_PARTS = {"norm1": "ln1", "norm2": "ln2", "attn.proj": "attn_out", "mlp.fc1": "ffn_up",
                 "mlp.fc2": "ffn_down"}
_MERGER = {"merger.ln_q": "v.post_ln", "merger.mlp.0": "mm.0", "merger.mlp.2": "mm.2"}


def _image_token_id(checkpoint: Path) -> int:
    return int(json.loads((checkpoint / "config.json").read_text())["image_token_id"])


def expected_qwen2vl_llm(folder: Path) -> dict[str, np.ndarray]:
    """Reference qwen2vl GGUF tensors: HF layout kept (NEOX rotary), biases included."""
    return expected_llm_tensors(folder, interleaved=False)


def expected_qwen2vl_mmproj(folder: Path) -> dict[str, np.ndarray]:
    """Reference projector tensors: Conv3d split per frame, QKV split, merger as mm.0/mm.2."""
    out = {}
    for name, value in checkpoint_state(folder).items():
        if not name.startswith("visual."):
            continue
        local = name.removeprefix("visual.")
        stem, kind = local.rsplit(".", 1)
        if local == "patch_embed.proj.weight":
            out["v.patch_embd.weight"] = value[:, :, 0]
            out["v.patch_embd.weight.1"] = value[:, :, 1]
        elif stem in _MERGER:
            out[f"{_MERGER[stem]}.{kind}"] = value
        else:
            _, idx, part = stem.split(".", 2)
            if part == "attn.qkv":
                for i, letter in enumerate("qkv"):
                    rows = value.shape[0] // 3
                    out[f"v.blk.{idx}.attn_{letter}.{kind}"] = value[i * rows:(i + 1) * rows]
            else:
                out[f"v.blk.{idx}.{_VISION_PARTS[part]}.{kind}"] = value
    return out


# --- metadata ----------------------------------------------------------------
def test_registry_lists_qwen2vl():
    from edgevlm.convert import supported_architectures

    assert "Qwen2VLForConditionalGeneration" in supported_architectures()


def test_llm_hparams_and_vocab(qwen2vl_f32_result, qwen2vl_checkpoint):
    f = gguf_fields(qwen2vl_f32_result.llm_path)
    assert f["general.architecture"] == "qwen2vl"
    assert f["qwen2vl.rope.dimension_sections"] == [4, 6, 6, 0]
    assert f["qwen2vl.rope.dimension_count"] == 32
    assert f["qwen2vl.rope.freq_base"] == pytest.approx(1e6)
    assert f["qwen2vl.attention.layer_norm_rms_epsilon"] == pytest.approx(1e-6)
    assert (f["qwen2vl.embedding_length"], f["qwen2vl.block_count"]) == (128, 2)
    assert (f["qwen2vl.attention.head_count"], f["qwen2vl.attention.head_count_kv"]) == (4, 2)
    assert f["tokenizer.ggml.model"] == "gpt2" and f["tokenizer.ggml.pre"] == "qwen2"
    tokens = f["tokenizer.ggml.tokens"]
    assert len(tokens) == f["qwen2vl.vocab_size"] == 448
    first = tokens.index("<|endoftext|>")
    assert tokens[first:first + len(SPECIAL_TOKENS)] == list(SPECIAL_TOKENS)
    assert all(t == 3 for t in f["tokenizer.ggml.token_type"][first:first + len(SPECIAL_TOKENS)])
    assert tokens[_image_token_id(qwen2vl_checkpoint)] == "<|image_pad|>"
    assert f["tokenizer.ggml.eos_token_id"] == tokens.index("<|im_end|>")
    assert f.get("tokenizer.ggml.add_bos_token", False) is False
    assert len(f["tokenizer.ggml.merges"]) > 100
    assert f["tokenizer.chat_template"] == QWEN2VL_CHAT_TEMPLATE
    assert f[constants.KEY_PROMPT_FAMILY] == "chatml"


def test_projector_keys(qwen2vl_f32_result):
    f = gguf_fields(qwen2vl_f32_result.mmproj_path)
    assert f["general.architecture"] == "clip"
    assert f["clip.projector_type"] == "qwen2vl_merger"
    assert f["clip.has_vision_encoder"] is True
    assert f["clip.use_gelu"] is False  # quick_gelu
    assert f["clip.vision.spatial_merge_size"] == 2
    assert f["clip.vision.patch_size"] == 14
    assert f["clip.vision.embedding_length"] == 48
    assert f["clip.vision.feed_forward_length"] == 192
    assert f["clip.vision.projection_dim"] == 128
    assert f["clip.vision.block_count"] == 2
    assert f["clip.vision.attention.head_count"] == 2
    assert f["clip.vision.attention.layer_norm_epsilon"] == pytest.approx(1e-6)
    assert f["clip.vision.image_mean"] == pytest.approx([0.48145466, 0.4578275, 0.40821073])
    assert "clip.vision.feature_layer" not in f


# --- tensors -------------------------------------------------------------------
def test_llm_f32_roundtrip(qwen2vl_f32_result, qwen2vl_checkpoint):
    expected = expected_qwen2vl_llm(qwen2vl_checkpoint)
    assert "blk.0.attn_q.bias" in expected and "output.weight" in expected
    assert_gguf_roundtrip(qwen2vl_f32_result.llm_path, expected)


def test_mmproj_f32_roundtrip(qwen2vl_f32_result, qwen2vl_checkpoint):
    expected = expected_qwen2vl_mmproj(qwen2vl_checkpoint)
    assert expected["v.patch_embd.weight.1"].shape == (48, 3, 14, 14)
    assert_gguf_roundtrip(qwen2vl_f32_result.mmproj_path, expected)


def test_f16_and_q8_0_types(qwen2vl_checkpoint, tmp_path):
    from edgevlm.convert import convert

    result = convert(qwen2vl_checkpoint, tmp_path, quant="f16", vision_type="q8_0")
    expected = as_f16_matrices(expected_qwen2vl_llm(qwen2vl_checkpoint))
    assert_gguf_roundtrip(result.llm_path, expected)
    types = {name: t.tensor_type.name for name, t in gguf_tensors(result.mmproj_path).items()}
    assert types["v.patch_embd.weight"] == types["v.patch_embd.weight.1"] == "F16"
    assert types["mm.0.weight"] == types["v.blk.0.ffn_down.weight"] == "Q8_0"
    assert types["v.blk.0.attn_q.weight"] == "F16"  # rows of 48: not a multiple of 32
    assert types["v.post_ln.weight"] == types["v.blk.0.attn_q.bias"] == "F32"


# --- tokenizer (byte-level BPE, "gpt2" + pre "qwen2") ----------------------------
@pytest.fixture(scope="module")
def qwen_vocab(qwen2vl_f32_result):
    import llama_cpp

    return llama_cpp.Llama(model_path=str(qwen2vl_f32_result.llm_path), vocab_only=True,
                           verbose=False)


@pytest.mark.parametrize("text", [*TEXTS, "<|im_start|>user\n<|vision_start|><|image_pad|>"
                                  "<|vision_end|>What is it?<|im_end|>\n", "  two  spaces 1234"])
def test_tokenizer_matches_hf(qwen_vocab, qwen2vl_checkpoint, text):
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(qwen2vl_checkpoint)
    ids = qwen_vocab.tokenize(text.encode(), add_bos=True, special=True)
    assert ids == hf(text).input_ids
    assert qwen_vocab.detokenize(ids, special=True).decode() == text


# --- parity with transformers --------------------------------------------------
def test_pair_loads_with_mrope(qwen2vl_vlm, square_image):
    assert qwen2vl_vlm.engine.encoder.uses_mrope
    assert qwen2vl_vlm.engine.model.n_embd_inp == 128
    messages = [{"role": "user", "content": [
        {"type": "image", "image": str(square_image(168, height=56))},
        {"type": "text", "text": "What is it?"}]}]
    image = [c for c in qwen2vl_vlm.prompt_chunks(messages) if isinstance(c, ImageChunk)]
    assert [(c.n_tokens, c.n_pos) for c in image] == [(6 * 2, 6)]  # max(w, h) positions


def test_text_logits_match_transformers(qwen2vl_vlm, qwen2vl_checkpoint):
    ids = np.random.default_rng(3).integers(0, 400, 48).tolist()
    vlm = qwen2vl_vlm
    vlm.reset()
    vlm.engine.ctx.decode_tokens(ids, 0, logits_all=True)
    ours = np.stack([vlm.engine.ctx.logits_at(i) for i in range(len(ids))])
    vlm.reset()
    ref = hf_logits(qwen2vl_checkpoint, ids)
    assert float(np.abs(ref).max()) > 0.5, "degenerate reference logits"
    assert float(np.abs(ours - ref).max()) <= 1e-4


@pytest.mark.parametrize("size", [(112, 112), (168, 56), (56, 224)])
def test_image_embeddings_match_transformers(qwen2vl_vlm, qwen2vl_checkpoint, square_image,
                                             size):
    image = square_image(size[0], seed=4, height=size[1])
    ours = qwen2vl_vlm.embed_image(image)
    ref = hf_image_embeddings(qwen2vl_checkpoint, image)
    assert ours.shape == ref.shape == (size[0] * size[1] // 28 ** 2, 128)
    cos = cosine_rows(ours, ref)
    assert cos.min() >= 0.9999, f"min per-token cosine {cos.min():.6f}"
    assert float(np.abs(ours - ref).max()) <= 5e-3


@pytest.mark.parametrize("n_images", [1, 2])
def test_multimodal_logits_match_transformers(qwen2vl_vlm, qwen2vl_checkpoint, square_image,
                                              n_images):
    images = [square_image(112, seed=5), square_image(168, seed=6, height=56)][:n_images]
    content = [{"type": "image", "image": str(p)} for p in images]
    messages = [{"role": "user", "content": [*content, {"type": "text", "text": "Compare."}]}]
    ids = reference_ids(qwen2vl_vlm.prompt_chunks(messages), _image_token_id(qwen2vl_checkpoint))
    ours = qwen2vl_vlm.next_token_logits(messages)
    ref = hf_logits(qwen2vl_checkpoint, ids, images, _image_token_id(qwen2vl_checkpoint))[-1]
    assert float(np.abs(ours - ref).max()) <= 2e-3


def test_q8_0_pair_tracks_reference(qwen2vl_checkpoint, square_image, tmp_path):
    from edgevlm.convert import convert

    result = convert(qwen2vl_checkpoint, tmp_path, quant="q8_0", vision_type="q8_0")
    ids = np.random.default_rng(8).integers(0, 400, 64).tolist()
    image = square_image(112, seed=7)
    with edgevlm.load(tmp_path, n_ctx=512, kv_type="f32", n_threads=2, cache=False) as vlm:
        vlm.engine.ctx.decode_tokens(ids, 0, logits_all=True)
        ours = np.stack([vlm.engine.ctx.logits_at(i) for i in range(len(ids))])
        emb = vlm.embed_image(image)
    ref = hf_logits(qwen2vl_checkpoint, ids)
    assert float((ours.argmax(-1) == ref.argmax(-1)).mean()) >= 0.95
    assert cosine_rows(emb, hf_image_embeddings(qwen2vl_checkpoint, image)).min() >= 0.99
    assert result.vision_type == "q8_0"


def test_tied_embeddings(tmp_path):
    from edgevlm.convert import convert
    from tests.fixtures.qwen2vl import build_qwen2vl_checkpoint

    folder = build_qwen2vl_checkpoint(tmp_path / "tied", tie_word_embeddings=True, text_layers=1,
                                      vision_depth=1, seed=2)
    result = convert(folder, tmp_path / "out", quant="f32", vision_type="f32")
    assert "output.weight" not in gguf_tensors(result.llm_path)
    ids = [401, 17, 250, 33, 99, 5]
    with edgevlm.load(tmp_path / "out", n_ctx=256, kv_type="f32", n_threads=2,
                      cache=False) as vlm:
        vlm.engine.ctx.decode_tokens(ids, 0, logits_all=True)
        ours = np.stack([vlm.engine.ctx.logits_at(i) for i in range(len(ids))])
    assert float(np.abs(ours - hf_logits(folder, ids)).max()) <= 1e-4


# --- validation ------------------------------------------------------------------
@pytest.mark.parametrize("changes, error, match", [
    ({"vision_config": {"temporal_patch_size": 3}}, UnsupportedModelError, "temporal_patch_size"),
    ({"vision_config": {"spatial_merge_size": 4}}, UnsupportedModelError, "spatial_merge_size"),
    ({"vision_config": {"hidden_size": 64}}, ConversionError, "merger output"),
    ({"text_config": {"use_sliding_window": True}}, UnsupportedModelError, "sliding"),
    ({"text_config": {"rope_parameters": {"rope_type": "default", "mrope_section": [4, 6, 4]}}},
     ConversionError, "mrope_section"),
    ({"architectures": ["Qwen2_5_VLForConditionalGeneration"]}, UnsupportedModelError,
     "Qwen2VLForConditionalGeneration"),
])
def test_unsupported_variants_are_refused(qwen2vl_checkpoint, tmp_path, changes, error, match):
    from edgevlm.convert import convert

    folder = copy_checkpoint(qwen2vl_checkpoint, tmp_path / "m")
    edit_config(folder, **changes)
    with pytest.raises(error, match=match):
        convert(folder, tmp_path / "out")
    assert not list(tmp_path.rglob("*.gguf"))


def test_transformers4_flat_config_is_read():
    """Qwen2-VL-2B-Instruct's config.json: no text_config, mrope in top-level rope_scaling."""
    from edgevlm.convert.config import Qwen2VLConfig

    flat = {
        "architectures": ["Qwen2VLForConditionalGeneration"], "model_type": "qwen2_vl",
        "hidden_size": 1536, "intermediate_size": 8960, "num_attention_heads": 12,
        "num_hidden_layers": 28, "num_key_value_heads": 2, "rms_norm_eps": 1e-6,
        "rope_theta": 1000000.0, "tie_word_embeddings": True, "vocab_size": 151936,
        "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]},
        "vision_config": {"depth": 32, "embed_dim": 1280, "mlp_ratio": 4, "num_heads": 16,
                          "in_chans": 3, "hidden_size": 1536, "patch_size": 14,
                          "spatial_merge_size": 2, "temporal_patch_size": 2},
    }
    cfg = Qwen2VLConfig.from_dict(flat)
    assert cfg.mrope_section == (16, 24, 24)
    assert cfg.text.rope_scaling is None and cfg.text.rope_theta == 1e6
    assert cfg.text.tie_word_embeddings and cfg.text.head_dim == 128
    assert cfg.vision.intermediate_size == 5120 and cfg.vision.merged_size == 5120
    assert cfg.image_token_id == 151655
