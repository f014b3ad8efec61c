"""Every LLM quantisation converts; projector q8_0."""

from __future__ import annotations

import pytest

from edgevlm.constants import LLM_QUANT_TYPES
from tests.helpers import gguf_fields, gguf_tensors

EXPECTED_ATTN_Q = {"f32": "F32", "f16": "F16", "bf16": "BF16", "q8_0": "Q8_0", "q6_k": "Q6_K",
                   "q5_k_m": "Q5_K", "q4_k_m": "Q4_K", "q4_0": "Q4_0"}


def test_table_covers_constants():
    assert set(EXPECTED_ATTN_Q) == set(LLM_QUANT_TYPES)


@pytest.mark.parametrize("quant", LLM_QUANT_TYPES)
def test_every_quant_type(quant, llava_clip_checkpoint, tmp_path):
    import llama_cpp

    from edgevlm.convert import convert

    out = tmp_path / "out"
    result = convert(llava_clip_checkpoint, out, quant=quant, vision_type="f16")
    tensors = gguf_tensors(result.llm_path)
    assert tensors["blk.0.attn_q.weight"].tensor_type.name == EXPECTED_ATTN_Q[quant]
    assert tensors["blk.0.attn_norm.weight"].tensor_type.name == "F32"
    assert result.llm_path.name == f"{llava_clip_checkpoint.name.lower()}-{quant.upper()}.gguf"
    assert result.notes == ()
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [result.llm_path.name, result.mmproj_path.name])  # no intermediates left
    fields = gguf_fields(result.llm_path)
    assert fields["tokenizer.ggml.model"] == "llama"
    model = llama_cpp.Llama(model_path=str(result.llm_path), n_ctx=64, verbose=False)
    assert model.n_vocab() == 384


def test_fallback_note_for_odd_rows(llava_odd_ffn_checkpoint, tmp_path):
    from edgevlm.convert import convert

    result = convert(llava_odd_ffn_checkpoint, tmp_path, quant="q4_k_m")
    assert len(result.notes) == 1
    note = result.notes[0]
    assert "2 tensors fall back" in note and "multiples of 256" in note  # ffn_down x 2 blocks
    tensors = gguf_tensors(result.llm_path)
    assert tensors["blk.0.ffn_down.weight"].tensor_type.name not in ("Q4_K", "Q6_K")
    assert tensors["blk.0.attn_q.weight"].tensor_type.name == "Q4_K"


def test_vision_q8_0(llava_clip_checkpoint, tmp_path):
    from edgevlm.convert import convert

    result = convert(llava_clip_checkpoint, tmp_path, quant="f16", vision_type="q8_0")
    assert result.mmproj_path.name == f"mmproj-{llava_clip_checkpoint.name.lower()}-q8_0.gguf"
    tensors = gguf_tensors(result.mmproj_path)
    assert tensors["mm.0.weight"].tensor_type.name == "Q8_0"
    assert tensors["mm.2.weight"].tensor_type.name == "Q8_0"
    assert tensors["v.blk.0.attn_q.weight"].tensor_type.name == "Q8_0"
    assert tensors["v.patch_embd.weight"].tensor_type.name == "F16"
    assert tensors["v.position_embd.weight"].tensor_type.name == "F32"
    assert tensors["mm.0.bias"].tensor_type.name == "F32"
