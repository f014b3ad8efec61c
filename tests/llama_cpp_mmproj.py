"""Test-side writer of the mmproj layout llama.cpp's legacy LLaVA converter produces.

llama.cpp's ``tools/mtmd/legacy-models/convert_image_encoder_to_gguf.py`` (with
``--llava-projector``; vendored in llama-cpp-python 0.3.36's sdist) writes, for a
CLIP tower and a LLaVA MLP projector:

* ``clip.has_llava_projector = true``, ``clip.projector_type = "mlp"``,
  ``clip.use_gelu`` (true only for ``hidden_act == "gelu"``), the tower's sizes
  under ``clip.vision.*`` and, for LLaVA-1.6, the pinpoints and merge type;
* without a ``vision_feature_layer`` in the config: the last encoder block
  *dropped* and ``clip.vision.block_count = num_hidden_layers - 1``, no
  ``clip.vision.feature_layer``;
* no ``v.post_ln`` (``post_layernorm`` is skipped for LLaVA projectors);
* CLIP's ``mlp.fc1`` stored as ``ffn_down`` and ``mlp.fc2`` as ``ffn_up``
  (its name mapping swaps them);
* 4-d tensors (the patch embedding) and the projector's matrices in f16, the
  rest in f32 (``ftype`` 0); LLaVA-1.6's newline as ``model.image_newline``.

Only the layout is reproduced here (from those facts), from the HF checkpoint
and the projector tensors of edgevlm's own conversion.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

#: HF CLIP vision-model name (after ``vision_model.``) -> the converter's name (after ``v.``).
_TOWER_NAMES = {"embeddings.class_embedding": "class_embd",
                "embeddings.patch_embedding.weight": "patch_embd.weight",
                "embeddings.position_embedding.weight": "position_embd.weight",
                "pre_layrnorm.weight": "pre_ln.weight", "pre_layrnorm.bias": "pre_ln.bias"}
_BLOCK_NAMES = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
                "self_attn.out_proj": "attn_out", "layer_norm1": "ln1", "layer_norm2": "ln2",
                "mlp.fc1": "ffn_down", "mlp.fc2": "ffn_up"}  # the converter's swap


def hf_tensors(checkpoint: Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    out: dict[str, np.ndarray] = {}
    for path in sorted(checkpoint.glob("*.safetensors")):
        out.update(load_file(path))
    return out


def _tower_tensors(checkpoint: Path) -> tuple[dict[str, np.ndarray], int]:
    """The converter's tower tensors (last block dropped, no post-LN) and the blocks kept."""
    hf = hf_tensors(checkpoint)
    prefix = next(k for k in hf if k.endswith("encoder.layers.0.layer_norm1.weight")).split("encoder.layers.0")[0]
    n_layers = 1 + max(int(k[len(prefix):].split(".")[2]) for k in hf if k.startswith(prefix + "encoder.layers."))
    out: dict[str, np.ndarray] = {}
    for name, short in _TOWER_NAMES.items():
        out[f"v.{short}"] = hf[prefix + name]
    for il in range(n_layers - 1):
        for part, short in _BLOCK_NAMES.items():
            for kind in ("weight", "bias"):
                out[f"v.blk.{il}.{short}.{kind}"] = hf[f"{prefix}encoder.layers.{il}.{part}.{kind}"]
    return {n: (t.astype(np.float16) if t.ndim == 4 else t.astype(np.float32)) for n, t in out.items()}, n_layers - 1


def _metadata(checkpoint: Path, block_count: int, anyres: bool) -> dict[str, object]:
    config = json.loads((checkpoint / "config.json").read_text())
    vision = config["vision_config"]
    pre_path = checkpoint / "preprocessor_config.json"
    if pre_path.exists():
        pre = json.loads(pre_path.read_text())
    else:  # transformers 5 keeps it inside processor_config.json
        pre = json.loads((checkpoint / "processor_config.json").read_text())["image_processor"]
    size = pre.get("crop_size", {}).get("height", vision["image_size"])
    meta: dict[str, object] = {
        "clip.has_text_encoder": False, "clip.has_vision_encoder": True, "clip.has_llava_projector": True,
        "general.file_type": 0, "general.name": checkpoint.name, "general.description": "image encoder for LLaVA",
        "clip.projector_type": "mlp", "clip.vision.image_size": int(size),
        "clip.vision.patch_size": vision["patch_size"], "clip.vision.embedding_length": vision["hidden_size"],
        "clip.vision.feed_forward_length": vision["intermediate_size"],
        "clip.vision.projection_dim": vision.get("projection_dim", 512),
        "clip.vision.attention.head_count": vision["num_attention_heads"],
        "clip.vision.attention.layer_norm_epsilon": float(vision.get("layer_norm_eps", 1e-5)),
        "clip.vision.block_count": block_count,
        "clip.vision.image_mean": [float(x) for x in pre["image_mean"]],
        "clip.vision.image_std": [float(x) for x in pre["image_std"]],
        "clip.use_gelu": vision.get("hidden_act") == "gelu"}
    if anyres:
        meta["clip.vision.image_grid_pinpoints"] = [int(x) for p in config["image_grid_pinpoints"] for x in p]
        meta["clip.vision.image_aspect_ratio"] = "anyres"
        meta["clip.vision.mm_patch_merge_type"] = "spatial_unpad"
    return meta


def add_value(writer, key: str, value: object) -> None:
    """One metadata value with the GGUF type the converter gives it."""
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


def write_llama_cpp_mmproj(ours: Path, checkpoint: Path, out: Path) -> Path:
    """An mmproj laid out as llama.cpp's legacy converter writes it (see the module doc).

    Args:
        ours: edgevlm's own mmproj of ``checkpoint`` (its ``mm.*`` projector tensors and,
            for LLaVA-1.6, ``v.image_newline`` are taken from it).
        checkpoint: the llava-hf checkpoint (tower tensors, config, image processor config).
        out: where to write.
    """
    import gguf

    reader = gguf.GGUFReader(str(ours))
    projector = {t.name: np.array(t.data) for t in reader.tensors
                 if t.name.startswith("mm.") or t.name == "v.image_newline"}
    anyres = "v.image_newline" in projector
    tower, block_count = _tower_tensors(checkpoint)
    writer = gguf.GGUFWriter(str(out), "clip")
    for key, value in _metadata(checkpoint, block_count, anyres).items():
        if key == "general.file_type":
            writer.add_file_type(int(value))
        elif key == "general.name":
            writer.add_name(str(value))
        elif key == "general.description":
            writer.add_description(str(value))
        else:
            add_value(writer, key, value)
    for name, data in projector.items():  # the projector first, as the converter
        name = "model.image_newline" if name == "v.image_newline" else name
        writer.add_tensor(name, data.astype(np.float16) if data.ndim in (2, 4) else data.astype(np.float32))
    for name, data in tower.items():
        writer.add_tensor(name, data)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out
