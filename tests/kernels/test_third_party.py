"""A third-party LLaVA mmproj (llama.cpp's own conversion style) on the kernels engine.

Such files hold every tower block plus ``v.post_ln``, no
``clip.vision.feature_layer`` and no ``edgevlm.*`` keys; libmtmd then runs
``block_count - 1`` blocks (HF ``hidden_states[-2]``) and so must we, without
the post-LN. Tolerance: per-token cosine >= 0.9999 against transformers.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import edgevlm
from tests.reference import cosine_rows, hf_image_embeddings

_PARTS = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
          "self_attn.out_proj": "attn_out", "layer_norm1": "ln1", "layer_norm2": "ln2",
          "mlp.fc1": "ffn_up", "mlp.fc2": "ffn_down"}


def _hf_tensors(checkpoint: Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    out: dict[str, np.ndarray] = {}
    for path in sorted(checkpoint.glob("*.safetensors")):
        out.update(load_file(path))
    return out


def _write_third_party(ours: Path, checkpoint: Path, out: Path,
                       rename: dict[str, str] | None = None) -> Path:
    """Our mmproj's tensors + the missing last block + post-LN, llama.cpp-style keys only.

    ``rename`` maps some of our tensor names to the third party's (e.g. the legacy
    llava-1.6 converter's ``model.image_newline``).
    """
    import gguf

    reader = gguf.GGUFReader(str(ours))
    meta = {k: f.contents() for k, f in reader.fields.items()
            if k.startswith("clip.") and k not in ("clip.vision.feature_layer", "clip.vision.block_count")}
    hf = _hf_tensors(checkpoint)
    prefix = next(k for k in hf if k.endswith("encoder.layers.0.layer_norm1.weight")).split("encoder.layers.0")[0]
    n_blocks = 1 + max(int(k[len(prefix):].split(".")[2]) for k in hf
                       if k.startswith(prefix + "encoder.layers."))
    writer = gguf.GGUFWriter(str(out), "clip")
    for key, value in meta.items():
        if isinstance(value, bool):
            writer.add_bool(key, value)
        elif isinstance(value, str):
            writer.add_string(key, value)
        elif isinstance(value, list):
            writer.add_array(key, value)
        elif isinstance(value, float):
            writer.add_float32(key, value)
        else:
            writer.add_uint32(key, int(value))
    writer.add_uint32("clip.vision.block_count", n_blocks)
    for t in reader.tensors:
        writer.add_tensor((rename or {}).get(t.name, t.name), np.array(t.data))
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
