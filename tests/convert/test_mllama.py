"""Llama-3.2-Vision (mllama) conversion: metadata, tensor round trips, types, refusals.

The encoder's numerical parity with transformers is in tests/kernels/test_mllama_vision.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from edgevlm import constants
from edgevlm.errors import ConversionError, UnsupportedModelError
from tests.fixtures.mllama import IMAGE_TOKEN, MLLAMA_CHAT_TEMPLATE, SPECIAL_TOKENS, MllamaSizes
from tests.helpers import (LLAMA_PARTS, assert_gguf_roundtrip, checkpoint_state, copy_checkpoint,
                           edit_config, gguf_fields, gguf_tensors)

SIZES = MllamaSizes()
# transformers' MllamaVisionModel names -> our GGUF names (independent of convert/mllama.py).
_VISION = {"patch_embedding.weight": "v.patch_embd.weight", "class_embedding": "v.class_embd",
           "gated_positional_embedding.embedding": "v.position_embd.weight",
           "gated_positional_embedding.gate": "v.position_embd.gate",
           "gated_positional_embedding.tile_embedding.weight": "v.tile_position_embd.weight",
           "layernorm_pre.weight": "v.pre_ln.weight", "layernorm_pre.bias": "v.pre_ln.bias",
           "layernorm_post.weight": "v.post_ln.weight", "layernorm_post.bias": "v.post_ln.bias"}
_BLOCK = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
          "self_attn.o_proj": "attn_out", "input_layernorm": "ln1",
          "post_attention_layernorm": "ln2", "mlp.fc1": "ffn_up", "mlp.fc2": "ffn_down"}


def _vision_name(local: str) -> str:
    if local in _VISION:
        return _VISION[local]
    for which in ("pre", "post"):
        stem = f"{which}_tile_positional_embedding."
        if local.startswith(stem):
            rest = local.removeprefix(stem)
            return f"v.{which}_tile_position_embd." + ("gate" if rest == "gate" else "weight")
    stack, _, rest = local.partition(".layers.")
    idx, _, part = rest.partition(".")
    prefix = "v.global.blk" if stack == "global_transformer" else "v.blk"
    if part in ("gate_attn", "gate_ffn"):
        return f"{prefix}.{idx}.{'attn' if part == 'gate_attn' else 'ffn'}_gate"
    module, kind = part.rsplit(".", 1)
    return f"{prefix}.{idx}.{_BLOCK[module]}.{kind}"


def _text_name(local: str) -> str:
    fixed = {"embed_tokens.weight": "token_embd.weight", "norm.weight": "output_norm.weight"}
    if local in fixed:
        return fixed[local]
    _, idx, part = local.split(".", 2)
    if part.startswith("cross_attn_"):
        return f"blk.{idx}.{part}"
    module = part.removesuffix(".weight")
    if module.startswith("cross_attn."):
        return f"blk.{idx}.cross_attn_{module.split('.')[1]}.weight"
    return f"blk.{idx}.{LLAMA_PARTS[module]}.weight"


def expected_mllama(folder: Path) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Reference (LLM, projector) tensors from the checkpoint; nothing is permuted."""
    llm, proj = {}, {}
    for name, value in checkpoint_state(folder).items():
        name = name.removeprefix("model.")  # transformers 5 names; 4.x names have no "model."
        if name.startswith("vision_model."):
            proj[_vision_name(name.removeprefix("vision_model."))] = value
        elif name.startswith("multi_modal_projector."):
            proj["mm.0." + name.rsplit(".", 1)[1]] = value
        elif name.endswith("lm_head.weight"):
            llm["output.weight"] = value
        else:
            llm[_text_name(name.removeprefix("language_model.").removeprefix("model."))] = value
    return llm, proj


def test_registry_lists_mllama():
    from edgevlm.convert import supported_architectures

    assert "MllamaForConditionalGeneration" in supported_architectures()


def test_llm_metadata(mllama_f32_result, mllama_checkpoint):
    f = gguf_fields(mllama_f32_result.llm_path)
    cfg = json.loads((mllama_checkpoint / "config.json").read_text())
    text = cfg["text_config"]
    assert f["general.architecture"] == "mllama"
    assert (f["mllama.embedding_length"], f["mllama.block_count"]) == (64, 5)
    assert (f["mllama.attention.head_count"], f["mllama.attention.head_count_kv"]) == (4, 2)
    assert f["mllama.rope.freq_base"] == pytest.approx(500000.0)
    assert f[constants.KEY_MLLAMA_CROSS_ATTENTION_LAYERS] == [1, 3]
    image_id = cfg["image_token_index"]
    assert f[constants.KEY_MLLAMA_IMAGE_TOKEN_ID] == image_id == text["vocab_size"]
    tokens = f["tokenizer.ggml.tokens"]
    assert len(tokens) == text["vocab_size"] + 8 and tokens[image_id] == IMAGE_TOKEN
    first = tokens.index(SPECIAL_TOKENS[0])
    assert tokens[first:first + len(SPECIAL_TOKENS)] == list(SPECIAL_TOKENS)
    assert f["tokenizer.ggml.model"] == "gpt2" and f["tokenizer.ggml.pre"] == "llama-bpe"
    assert f["tokenizer.ggml.eos_token_id"] == tokens.index("<|eot_id|>")
    assert f["tokenizer.chat_template"] == MLLAMA_CHAT_TEMPLATE
    assert f[constants.KEY_SOURCE_ARCHITECTURE] == "MllamaForConditionalGeneration"


def test_rope_freq_factors_match_transformers(mllama_f32_result, mllama_checkpoint):
    """base frequencies / factors == transformers' llama3 inv_freq."""
    from transformers import MllamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    text = MllamaConfig.from_pretrained(mllama_checkpoint).text_config
    inv_freq, scale = ROPE_INIT_FUNCTIONS["llama3"](text, "cpu")
    factors = np.asarray(gguf_fields(mllama_f32_result.llm_path)[constants.KEY_ROPE_FREQ_FACTORS])
    head_dim = 16
    base = 1.0 / 500000.0 ** (np.arange(0, head_dim, 2) / head_dim)
    assert scale == 1.0 and len(factors) == head_dim // 2
    assert factors.min() == 1.0 and factors.max() == pytest.approx(8.0)  # both regimes present
    np.testing.assert_allclose(base / factors, inv_freq.numpy(), rtol=1e-6)


def test_projector_metadata(mllama_f32_result):
    f = gguf_fields(mllama_f32_result.mmproj_path)
    assert f["general.architecture"] == "clip"
    assert f["clip.projector_type"] == "edgevlm-mllama"
    assert f[constants.KEY_PROJECTOR_KIND] == "mllama"
    assert (f["clip.vision.image_size"], f["clip.vision.patch_size"]) == (56, 14)
    assert (f["clip.vision.embedding_length"], f["clip.vision.block_count"]) == (32, 3)
    assert f[constants.KEY_MLLAMA_GLOBAL_BLOCK_COUNT] == 2
    assert f[constants.KEY_MLLAMA_INTERMEDIATE_LAYERS] == [0, 2]
    assert f[constants.KEY_MLLAMA_MAX_NUM_TILES] == f[constants.KEY_MLLAMA_MAX_IMAGE_TILES] == 4
    assert f[constants.KEY_MLLAMA_ASPECT_RATIOS] == [1, 1, 1, 2, 1, 3, 1, 4, 2, 1, 2, 2, 3, 1, 4, 1]
    assert f["clip.vision.projection_dim"] == 64
    assert f[constants.KEY_IMAGE_RESAMPLE] == "bilinear"
    assert f["clip.vision.image_mean"] == pytest.approx([0.48145466, 0.4578275, 0.40821073])


def test_f32_roundtrip(mllama_f32_result, mllama_checkpoint):
    llm, proj = expected_mllama(mllama_checkpoint)
    assert llm["token_embd.weight"].shape[0] == llm["output.weight"].shape[0] + 8
    assert "blk.3.cross_attn_mlp_gate" in llm and "blk.3.attn_q.weight" not in llm
    assert proj["v.tile_position_embd.weight"].shape == (9, 4 * 17 * 32)
    assert "v.global.blk.1.ffn_gate" in proj and len(proj) == 13 + 2 + 3 * 12 + 2 * 14
    assert_gguf_roundtrip(mllama_f32_result.llm_path, llm)
    assert_gguf_roundtrip(mllama_f32_result.mmproj_path, proj)


def test_f16_and_q8_0_types(mllama_checkpoint, tmp_path):
    from edgevlm.convert import convert

    result = convert(mllama_checkpoint, tmp_path, quant="q8_0", vision_type="q8_0")
    llm = {n: t.tensor_type.name for n, t in gguf_tensors(result.llm_path).items()}
    assert llm["blk.0.attn_q.weight"] == llm["blk.1.cross_attn_k_proj.weight"] == "Q8_0"
    assert llm["blk.1.cross_attn_attn_gate"] == llm["blk.1.cross_attn_q_norm.weight"] == "F32"
    assert llm["blk.0.ffn_down.weight"] == "Q8_0" and llm["output.weight"] == "Q8_0"
    proj = {n: t.tensor_type.name for n, t in gguf_tensors(result.mmproj_path).items()}
    assert proj["v.blk.0.attn_q.weight"] == proj["mm.0.weight"] == "Q8_0"
    assert proj["v.patch_embd.weight"] == proj["v.tile_position_embd.weight"] == "F16"
    assert proj["v.position_embd.weight"] == proj["v.global.blk.0.attn_gate"] == "F32"
    f16 = convert(mllama_checkpoint, tmp_path / "f16", quant="f16", vision_type="f16")
    llm_ref, _ = expected_mllama(mllama_checkpoint)
    tensors = gguf_tensors(f16.llm_path)
    assert tensors["blk.2.attn_k.weight"].tensor_type.name == "F16"
    np.testing.assert_array_equal(np.asarray(tensors["blk.2.attn_k.weight"].data),
                                  llm_ref["blk.2.attn_k.weight"].astype(np.float16))


def test_inspect_says_edgevlm_only(mllama_f32_result):
    from edgevlm.gguf_info import describe

    assert describe(mllama_f32_result.llm_path)["loadable_by"] == ["edgevlm"]
    assert describe(mllama_f32_result.mmproj_path)["loadable_by"] == ["edgevlm"]


def test_llama_cpp_refuses_the_llm_file(mllama_f32_result):
    from edgevlm.llm import LlamaModel

    with pytest.raises(Exception, match="(?i)mllama|load"):
        LlamaModel(mllama_f32_result.llm_path, n_gpu_layers=0)


def _text(**changes):
    return {"text_config": changes}


@pytest.mark.parametrize(("changes", "error", "message"), [
    (_text(cross_attention_layers=None), ConversionError, "text_config.cross_attention_layers is missing"),
    (_text(cross_attention_layers=[1, 7]), ConversionError, r"cross_attention_layers \[1, 7\]"),
    (_text(cross_attention_layers=[]), ConversionError, "cross_attention_layers must be a non-empty list"),
    ({"vision_config": {"vision_output_dim": 64}}, ConversionError, "vision_output_dim 64"),
    ({"vision_config": {"intermediate_layers_indices": [0, 5]}}, ConversionError,
     "intermediate_layers_indices"),
    ({"vision_config": {"hidden_act": "relu"}}, UnsupportedModelError, "hidden_act 'relu'"),
    (_text(rope_parameters={"rope_type": "yarn", "rope_theta": 1e4, "factor": 2.0}),
     UnsupportedModelError, "rope_scaling type 'yarn'"),
])
def test_bad_configs_are_named(mllama_checkpoint, tmp_path, changes, error, message):
    from edgevlm.convert import convert

    src = copy_checkpoint(mllama_checkpoint, tmp_path / "src")
    if changes.get("text_config", {}).get("cross_attention_layers", 0) is None:
        data = json.loads((src / "config.json").read_text())
        del data["text_config"]["cross_attention_layers"]
        (src / "config.json").write_text(json.dumps(data))
    else:
        edit_config(src, **changes)
    with pytest.raises(error, match=message):
        convert(src, tmp_path / "out", quant="f32")


def test_transformers_4_config_layout(mllama_checkpoint, mllama_f32_result, tmp_path):
    """The hub checkpoints' config.json (transformers 4.45): rope_scaling + rope_theta,
    attention_heads, no rope_parameters; the same file comes out."""
    from edgevlm.convert import convert

    src = copy_checkpoint(mllama_checkpoint, tmp_path / "src")
    data = json.loads((src / "config.json").read_text())
    rope = data["text_config"].pop("rope_parameters")
    data["text_config"]["rope_theta"] = rope.pop("rope_theta")
    data["text_config"]["rope_scaling"] = rope
    (src / "config.json").write_text(json.dumps(data))
    result = convert(src, tmp_path / "out", quant="f32", vision_type="f32")
    old, new = gguf_fields(mllama_f32_result.llm_path), gguf_fields(result.llm_path)
    assert new[constants.KEY_ROPE_FREQ_FACTORS] == old[constants.KEY_ROPE_FREQ_FACTORS]
    assert new["mllama.rope.freq_base"] == old["mllama.rope.freq_base"]
