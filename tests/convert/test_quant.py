"""Every LLM quantisation converts; projector q8_0."""

from __future__ import annotations

import numpy as np
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


def _kquant_role(name: str) -> tuple[str, int]:
    """(role, layer) of a Llama GGUF matrix for :func:`edgevlm.convert.kquant.mix_type`."""
    if name == "output.weight":
        return "output", 0
    parts = name.split(".")
    if parts[0] != "blk":
        return "other", 0
    return ("attn_v" if parts[2] == "attn_v" else "ffn_down" if parts[2] == "ffn_down" else "other"), int(parts[1])


@pytest.mark.parametrize(("checkpoint", "quant"), [("llava_clip_checkpoint", "q4_k_m"),
                                                   ("llava_clip_checkpoint", "q5_k_m"),
                                                   ("llava_odd_ffn_checkpoint", "q4_k_m"),
                                                   ("llava_odd_ffn_checkpoint", "q6_k")])
def test_kquant_mix_and_quantiser_equal_llama_cpp(checkpoint, quant, request, tmp_path):
    """The K-quant mixes edgevlm writes itself (mllama) restate llama.cpp's: on a Llama, which
    llama.cpp's quantiser handles, every tensor's type is what ``kquant.mix_type`` picks (fallbacks
    on the odd FFN of 320 included), and ggml's quantiser through ``quantize_rows`` (in several
    chunks and threads) writes the same bytes as llama.cpp's."""
    from edgevlm.convert import convert, kquant, quantize
    from tests.helpers import expected_llm_tensors

    folder = request.getfixturevalue(checkpoint)
    tensors = gguf_tensors(convert(folder, tmp_path, quant=quant, vision_type="f16").llm_path)
    n_layers = 1 + max(int(n.split(".")[1]) for n in tensors if n.startswith("blk."))
    mix = quant.upper()
    source = expected_llm_tensors(folder)
    checked = set()
    for name, tensor in tensors.items():
        if len(tensor.shape) < 2:
            continue
        role, layer = _kquant_role(name)
        assert tensor.tensor_type.name == kquant.mix_type(mix, role, int(tensor.shape[0]), layer, n_layers), name
        kind = tensor.tensor_type.name
        if kind in ("Q4_K", "Q5_K", "Q6_K", "Q5_0", "Q5_1") and kind not in checked:
            checked.add(kind)
            old_chunk = quantize.CHUNK_BYTES
            quantize.CHUNK_BYTES = 4 * int(tensor.shape[0]) * 3   # 3 rows a chunk: many chunks
            try:
                ours = quantize.quantize_rows(source[name], kind, nthread=2)
            finally:
                quantize.CHUNK_BYTES = old_chunk
            np.testing.assert_array_equal(ours.reshape(-1), np.asarray(tensor.data).reshape(-1), err_msg=name)
    print(f"{folder.name} {quant}: types as llama.cpp's, bytes equal for {sorted(checked)}")
    assert checked


def test_quantize_rows_refuses_rows_that_do_not_fit():
    from edgevlm.convert.quantize import quantize_rows
    from edgevlm.errors import ConversionError

    with pytest.raises(ConversionError, match="rows of length 48 cannot be stored as Q4_K"):
        quantize_rows(np.zeros((2, 48), np.float32), "Q4_K")
    f16 = np.random.default_rng(0).standard_normal((4, 256)).astype(np.float16)
    assert quantize_rows(f16, "Q6_K").shape == (4, 210)   # f16 input converted chunk by chunk
