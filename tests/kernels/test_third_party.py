"""Third-party LLaVA mmproj files on the kernels engine.

Two layouts, no ``clip.vision.feature_layer`` and no ``edgevlm.*`` keys in either:

* what llama.cpp's legacy converter really writes (``tests/llama_cpp_mmproj.py``):
  last block already dropped, ``block_count`` = blocks kept, no ``v.post_ln``,
  ``fc1`` stored as ``ffn_down``; every stored block runs, the FFN swap is undone;
* every tower block plus ``v.post_ln`` (a full export): ``block_count - 1``
  blocks run (HF ``hidden_states[-2]``), without the post-LN.

Tolerance: per-token cosine >= 0.9999 against transformers.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import edgevlm
from edgevlm.errors import InvalidModelError
from edgevlm.kernels.vision import VisionTower
from tests.llama_cpp_mmproj import add_value, hf_tensors, write_llama_cpp_mmproj
from tests.reference import cosine_rows, hf_image_embeddings

_PARTS = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
          "self_attn.out_proj": "attn_out", "layer_norm1": "ln1", "layer_norm2": "ln2",
          "mlp.fc1": "ffn_up", "mlp.fc2": "ffn_down"}


def _write_third_party(ours: Path, checkpoint: Path, out: Path) -> Path:
    """Our mmproj's tensors + the missing last block + post-LN, ``clip.*`` keys only (a full export)."""
    import gguf

    reader = gguf.GGUFReader(str(ours))
    meta = {k: f.contents() for k, f in reader.fields.items()
            if k.startswith("clip.") and k not in ("clip.vision.feature_layer", "clip.vision.block_count")}
    hf = hf_tensors(checkpoint)
    prefix = next(k for k in hf if k.endswith("encoder.layers.0.layer_norm1.weight")).split("encoder.layers.0")[0]
    n_blocks = 1 + max(int(k[len(prefix):].split(".")[2]) for k in hf
                       if k.startswith(prefix + "encoder.layers."))
    writer = gguf.GGUFWriter(str(out), "clip")
    for key, value in meta.items():
        add_value(writer, key, value)
    writer.add_uint32("clip.vision.block_count", n_blocks)
    for t in reader.tensors:
        writer.add_tensor(t.name, np.array(t.data))
    last = n_blocks - 1
    for part, short in _PARTS.items():
        for kind in ("weight", "bias"):
            writer.add_tensor(f"v.blk.{last}.{short}.{kind}",
                              hf[f"{prefix}encoder.layers.{last}.{part}.{kind}"].astype(np.float32))
    for kind in ("weight", "bias"):
        writer.add_tensor(f"v.post_ln.{kind}", hf[f"{prefix}post_layernorm.{kind}"].astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out


@pytest.fixture(scope="module")
def third_party_pair(clip_f32, llava_clip_checkpoint, tmp_path_factory):
    folder = tmp_path_factory.mktemp("third_party")
    llm = next(clip_f32.glob("hf-*.gguf"))
    mmproj = _write_third_party(next(clip_f32.glob("mmproj-*.gguf")), llava_clip_checkpoint,
                                folder / "mmproj-model-f32.gguf")
    return llm, mmproj


def test_third_party_clip_mmproj_matches_transformers(third_party_pair, llava_clip_checkpoint, square_image):
    import gguf

    llm, mmproj = third_party_pair
    fields = gguf.GGUFReader(str(mmproj)).fields
    assert "clip.vision.feature_layer" not in fields and "v.post_ln.weight" in {
        t.name for t in gguf.GGUFReader(str(mmproj)).tensors}
    image = square_image(32, seed=9)
    with edgevlm.load(llm, mmproj=mmproj, n_ctx=512, kv_type="f32", n_threads=2, cache=False) as vlm:
        assert vlm.vision_engine == "kernels"
        tower = vlm.engine.encoder.tower.config
        assert tower.n_layers == tower.block_count - 1 and not tower.post_ln
        ours = vlm.embed_image(image)
    ref = hf_image_embeddings(llava_clip_checkpoint, image)
    assert cosine_rows(ours, ref).min() >= 0.9999
    with edgevlm.load(llm, mmproj=mmproj, n_ctx=512, n_threads=2, cache=False, vision_engine="mtmd") as vlm:
        assert vlm.embed_image(image).shape == ref.shape  # libmtmd reads the same file


@pytest.fixture(scope="module")
def llama_cpp_mmproj(clip_f32, llava_clip_checkpoint, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("llama_cpp_layout")
    return write_llama_cpp_mmproj(next(clip_f32.glob("mmproj-*.gguf")), llava_clip_checkpoint,
                                  folder / "mmproj-model-f16.gguf")


def test_llama_cpp_converted_llava15_mmproj_matches_transformers(clip_f32, llama_cpp_mmproj,
                                                                 llava_clip_checkpoint, square_image):
    import gguf

    reader = gguf.GGUFReader(str(llama_cpp_mmproj))
    names = {t.name: tuple(int(x) for x in t.shape) for t in reader.tensors}
    n_hf = sum(1 for n in names if n.endswith(".ln1.weight")) + 1
    width = int(reader.fields["clip.vision.embedding_length"].contents())
    assert reader.fields["clip.vision.block_count"].contents() == n_hf - 1
    assert "clip.vision.feature_layer" not in reader.fields and "v.post_ln.weight" not in names
    assert names["v.blk.0.ffn_down.weight"][0] == width  # fc1 stored as ffn_down
    image = square_image(32, seed=9)
    llm = next(clip_f32.glob("hf-*.gguf"))
    with edgevlm.load(llm, mmproj=llama_cpp_mmproj, n_ctx=512, kv_type="f32", n_threads=2, cache=False) as vlm:
        assert vlm.vision_engine == "kernels"
        tower = vlm.engine.encoder.tower.config
        assert tower.n_layers == tower.block_count == n_hf - 1 and not tower.post_ln
        ours = vlm.embed_image(image)
    ref = hf_image_embeddings(llava_clip_checkpoint, image)
    assert ours.shape == ref.shape and cosine_rows(ours, ref).min() >= 0.9999


def test_mismatched_matrix_is_an_error_not_an_abort(llama_cpp_mmproj, tmp_path, square_image):
    """A matrix whose input width does not fit its layer: InvalidModelError when the graph is
    built, before ggml's GGML_ASSERT(ggml_can_mul_mat) would abort the process."""
    import gguf

    reader = gguf.GGUFReader(str(llama_cpp_mmproj))
    out = tmp_path / "broken.gguf"
    writer = gguf.GGUFWriter(str(out), "clip")
    for key, field in reader.fields.items():
        if key.startswith("clip."):
            add_value(writer, key, field.contents())
    for t in reader.tensors:
        data = np.array(t.data)
        if t.name == "mm.0.weight":
            data = data[:, :-1]  # one input column short
        writer.add_tensor(t.name, data)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    tower = VisionTower(out, device="cpu", n_threads=2)
    try:
        with pytest.raises(InvalidModelError, match="mm.0.weight.*cannot multiply"):
            tower.encode(np.zeros((3, tower.config.image_size, tower.config.image_size), np.float32))
    finally:
        tower.close()
