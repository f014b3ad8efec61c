"""Write the vision tower + projector GGUF that llama.cpp's libmtmd (clip.cpp) loads.

Facts this follows (from llama.cpp's ``tools/mtmd``):

* ``general.architecture = "clip"``; keys ``clip.vision.*``; the llava graph
  runs layers ``il < max_feature_layer`` where ``max_feature_layer`` is the
  deepest ``clip.vision.feature_layer`` entry (else ``block_count - 1``), and
  takes the output of the last run layer. ``v.post_ln`` would be applied after
  that, so it is never written (HF llava takes ``hidden_states[k]`` before it).
* HF ``hidden_states[k]`` is the output of ``k`` layers, so a negative
  ``vision_feature_layer`` ``f`` becomes ``L + 1 + f`` and only those layers are
  written (``block_count`` = that count).
* The patch embedding is a conv kernel whose numpy shape (out, in, kh, kw) is
  exactly the ``ne = [kw, kh, in, out]`` ggml_conv_2d expects.
* ``clip.use_gelu`` selects erf/tanh GELU in the tower MLP, otherwise quick-GELU.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edgevlm.constants import CLIP_MEAN, CLIP_STD
from edgevlm.errors import ConversionError, UnsupportedModelError

from .config import VisionConfig
from .tensors import TensorSpec, write_gguf

if TYPE_CHECKING:
    from .base import Converter
    from .progress import Stage

CLIP_ARCH = "clip"
SIGLIP_MEAN = SIGLIP_STD = (0.5, 0.5, 0.5)
_VISION_STATIC = {
    "embeddings.class_embedding": "v.class_embd",
    "embeddings.patch_embedding.weight": "v.patch_embd.weight",
    "embeddings.patch_embedding.bias": "v.patch_embd.bias",
    "embeddings.position_embedding.weight": "v.position_embd.weight",
    "pre_layrnorm.weight": "v.pre_ln.weight",
    "pre_layrnorm.bias": "v.pre_ln.bias",
}
_LAYER_RE = re.compile(r"encoder\.layers\.(\d+)\.(.+)\.(weight|bias)$")
_LAYER_PARTS = {
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.out_proj": "attn_out", "layer_norm1": "ln1", "layer_norm2": "ln2",
    "mlp.fc1": "ffn_up", "mlp.fc2": "ffn_down",
}
_IGNORED_RE = re.compile(r"^(post_layernorm|head)\.|^embeddings\.position_ids$")
GELU_ACTS = {"gelu", "gelu_pytorch_tanh", "gelu_new", "gelu_fast"}
QUICK_GELU_ACTS = {"quick_gelu"}


def feature_layer_count(cfg: VisionConfig, feature_layer: int) -> int:
    """Convert HF ``vision_feature_layer`` into the number of layers to run.

    Args:
        cfg: Vision tower config (``num_hidden_layers`` = L).
        feature_layer: HF index into ``hidden_states`` (L + 1 entries).

    Returns:
        Non-negative layer count ``k`` in ``1..L``.

    Raises:
        ConversionError: out of range.
    """
    n_layers = cfg.num_hidden_layers
    count = feature_layer if feature_layer >= 0 else n_layers + 1 + feature_layer
    if not 1 <= count <= n_layers:
        raise ConversionError(f"config.json: vision_feature_layer {feature_layer} is out of "
                              f"range for a {n_layers}-layer vision tower.")
    return count


def _matrix_type(shape: tuple[int, ...], vision_type: str) -> str:
    if vision_type == "q8_0":
        return "Q8_0" if shape[-1] % 32 == 0 else "F16"
    return vision_type.upper()


def vision_tensor_type(name: str, shape: tuple[int, ...], vision_type: str) -> str:
    """GGUF type of projector tensor ``name`` for ``--vision-type`` ``vision_type``.

    Patch-embedding kernels are F16 (F32 for ``f32``): ggml's conv path takes no
    quantised (or bf16) kernels. Other matrices follow ``vision_type`` (Q8_0 rows must be
    multiples of 32, else F16); position embeddings, norms and biases stay F32.
    """
    if name.startswith("v.patch_embd.weight"):
        return "F32" if vision_type == "f32" else "F16"
    if len(shape) == 2 and "position_embd" not in name:
        return _matrix_type(shape, vision_type)
    return "F32"


def vision_tower_specs(vision_names: Mapping[str, str], reader: Any, n_layers: int,
                       vision_type: str) -> list[TensorSpec]:
    """Plan ``v.*`` tensors of a CLIP/SigLIP tower, keeping the first ``n_layers`` blocks.

    Args:
        vision_names: Local tower names (``encoder.layers.0.mlp.fc1.weight``) -> checkpoint.
        reader: Checkpoint reader (shapes).
        n_layers: Blocks to keep.
        vision_type: ``f32``, ``f16`` or ``q8_0`` for matrices.

    Returns:
        Tensor specs.

    Raises:
        ConversionError: a tensor of an unknown kind.
    """
    specs = []
    for local, source in vision_names.items():
        shape = tuple(reader.shape(source))
        match = _LAYER_RE.match(local)
        if local in _VISION_STATIC:
            name = _VISION_STATIC[local]
        elif match and match.group(2) in _LAYER_PARTS:
            if int(match.group(1)) >= n_layers:
                continue
            name = f"v.blk.{match.group(1)}.{_LAYER_PARTS[match.group(2)]}.{match.group(3)}"
        elif _IGNORED_RE.match(local):
            continue
        else:
            raise ConversionError(f"vision tensor {source!r} is not understood; this vision "
                                  "tower variant is not supported.")
        specs.append(TensorSpec(name, source, shape, vision_tensor_type(name, shape, vision_type)))
    return specs


def check_projector_shapes(specs: Mapping[str, TensorSpec],
                           expected: Mapping[str, tuple[int, ...]]) -> None:
    """Require every ``expected`` GGUF tensor, with the shape config.json implies.

    Raises:
        ConversionError: naming the missing tensor, or the source tensor and both shapes.
    """
    for name, shape in expected.items():
        if name not in specs:
            raise ConversionError(f"vision tensor for {name!r} is missing from the "
                                  "checkpoint; the download may be incomplete.")
        if specs[name].shape != shape:
            raise ConversionError(
                f"tensor {specs[name].source!r} gives {name} shape {list(specs[name].shape)} "
                f"but config.json implies {list(shape)}.")


def mlp_projector_specs(projector_names: Mapping[str, str], reader: Any,
                        vision_type: str) -> list[TensorSpec]:
    """Plan ``mm.0`` / ``mm.2`` tensors of a llava 2-layer MLP projector.

    Raises:
        ConversionError: missing linear_1/linear_2 or extra projector tensors.
    """
    table = {"linear_1": "mm.0", "linear_2": "mm.2"}
    specs = []
    for local, source in projector_names.items():
        layer, _, suffix = local.partition(".")
        if layer not in table:
            raise ConversionError(f"projector tensor {source!r} is not understood; only the "
                                  "2-layer MLP projector (linear_1, linear_2) is supported.")
        shape = tuple(reader.shape(source))
        kind = _matrix_type(shape, vision_type) if len(shape) == 2 else "F32"
        specs.append(TensorSpec(f"{table[layer]}.{suffix}", source, shape, kind))
    if not {"mm.0.weight", "mm.2.weight"} <= {s.name for s in specs}:
        raise ConversionError("tensor 'multi_modal_projector.linear_1/linear_2.weight' is "
                              "missing from the checkpoint.")
    return specs


def write_clip_hparams(writer: Any, cfg: VisionConfig, *, n_layers: int, projection_dim: int,
                       image_mean: list[float], image_std: list[float],
                       projector_type: str = "mlp") -> None:
    """Add the ``clip.*`` keys llama.cpp needs for a projector (llava MLP by default).

    Args:
        writer: A ``gguf.GGUFWriter`` for arch ``clip``.
        cfg: Vision tower config.
        n_layers: Tower blocks written (``block_count`` and ``feature_layer``).
        projection_dim: Width of the embeddings the projector outputs.
        image_mean, image_std: Pixel normalisation.
        projector_type: ``clip.projector_type``.

    Raises:
        UnsupportedModelError: see :func:`write_vision_hparams`.
    """
    write_vision_hparams(
        writer, projector_type=projector_type, hidden_act=cfg.hidden_act, image_size=cfg.image_size,
        patch_size=cfg.patch_size, width=cfg.hidden_size, ffn=cfg.intermediate_size,
        n_layers=n_layers, n_heads=cfg.num_attention_heads, eps=cfg.layer_norm_eps,
        projection_dim=projection_dim, image_mean=image_mean, image_std=image_std)
    writer.add_array("clip.vision.feature_layer", [n_layers])


def write_vision_hparams(writer: Any, *, projector_type: str, hidden_act: str, image_size: int,
                         patch_size: int, width: int, ffn: int, n_layers: int, n_heads: int,
                         eps: float, projection_dim: int, image_mean: list[float],
                         image_std: list[float]) -> None:
    """Add the ``clip.*`` keys every libmtmd vision projector has.

    Args:
        writer: A ``gguf.GGUFWriter`` for arch ``clip``.
        projector_type: ``clip.projector_type`` (``"mlp"``, ``"qwen2vl_merger"``...).
        hidden_act: HF activation of the tower MLP.
        image_size, patch_size: Input side and patch side in pixels.
        width, ffn, n_layers, n_heads, eps: Tower sizes and LayerNorm epsilon.
        projection_dim: Width of the embeddings the projector outputs (the LLM's).
        image_mean, image_std: Per-channel normalisation.

    Raises:
        UnsupportedModelError: unknown tower activation, or ffn == width (clip.cpp
            would mistake fc1/fc2 for swapped legacy tensors).
    """
    if hidden_act not in GELU_ACTS | QUICK_GELU_ACTS:
        raise UnsupportedModelError(f"vision_config.hidden_act {hidden_act!r} is not "
                                    "supported (gelu*, quick_gelu are).")
    if ffn == width:
        raise UnsupportedModelError("vision towers whose intermediate_size equals hidden_size "
                                    "cannot be loaded by llama.cpp's clip loader.")
    writer.add_bool("clip.has_vision_encoder", True)
    writer.add_string("clip.projector_type", projector_type)
    writer.add_bool("clip.use_gelu", hidden_act in GELU_ACTS)
    p = "clip.vision."
    writer.add_uint32(p + "image_size", image_size)
    writer.add_uint32(p + "patch_size", patch_size)
    writer.add_uint32(p + "embedding_length", width)
    writer.add_uint32(p + "feed_forward_length", ffn)
    writer.add_uint32(p + "projection_dim", projection_dim)
    writer.add_uint32(p + "block_count", n_layers)
    writer.add_uint32(p + "attention.head_count", n_heads)
    writer.add_float32(p + "attention.layer_norm_epsilon", eps)
    writer.add_array(p + "image_mean", [float(x) for x in image_mean])
    writer.add_array(p + "image_std", [float(x) for x in image_std])


def check_tower_shapes(specs: Mapping[str, TensorSpec], cfg: VisionConfig, n_layers: int,
                       extra: Mapping[str, tuple[int, ...]] | None = None) -> None:
    """Compare the planned tower tensors (plus ``extra`` ones) with the config.

    Args:
        specs: GGUF name -> planned tensor.
        cfg: Vision tower config.
        n_layers: Blocks that were kept.
        extra: More ``GGUF name -> expected shape`` pairs (projector tensors).

    Raises:
        ConversionError: a tensor is missing or its shape disagrees with config.json.
    """
    n_pos = cfg.n_patches + (1 if cfg.has_cls_token else 0)
    expected = {
        "v.patch_embd.weight": (cfg.hidden_size, cfg.num_channels, cfg.patch_size,
                                cfg.patch_size),
        "v.position_embd.weight": (n_pos, cfg.hidden_size),
        **(extra or {}),
    }
    if cfg.has_cls_token:
        expected["v.class_embd"] = (cfg.hidden_size,)
    for i in range(n_layers):
        expected[f"v.blk.{i}.attn_q.weight"] = (cfg.hidden_size, cfg.hidden_size)
        expected[f"v.blk.{i}.ffn_up.weight"] = (cfg.intermediate_size, cfg.hidden_size)
    check_projector_shapes(specs, expected)


def image_processor_config(folder: Path) -> dict[str, Any]:
    """Return the image processor settings saved in ``folder`` (empty if none).

    Reads ``preprocessor_config.json``, else ``processor_config.json["image_processor"]``.

    Raises:
        ConversionError: the file is not valid JSON.
    """
    for file, key in (("preprocessor_config.json", None),
                      ("processor_config.json", "image_processor")):
        path = Path(folder) / file
        if path.is_file():
            try:
                data = json.loads(path.read_text(encoding="utf-8"))
            except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                raise ConversionError(f"{path} is not valid JSON ({exc}).") from exc
            data = data.get(key, {}) if key else data
            if isinstance(data, dict) and data:
                return data
    return {}


def image_normalisation(folder: Path, cfg: VisionConfig) -> tuple[list[float], list[float]]:
    """Return (mean, std) from the processor config in ``folder``, or the tower's defaults."""
    data = image_processor_config(folder)
    if "image_mean" in data and "image_std" in data:
        return list(data["image_mean"]), list(data["image_std"])
    if cfg.has_cls_token:
        return list(CLIP_MEAN), list(CLIP_STD)
    return list(SIGLIP_MEAN), list(SIGLIP_STD)


def write_projector(converter: Converter, path: Path, vision_type: str, written: Stage) -> int:
    """Write the projector GGUF of ``converter`` to ``path``.

    Args:
        converter: A converter for the checkpoint.
        path: Output file.
        vision_type: ``f32``, ``f16`` or ``q8_0``.
        written: The tensors (``converter.projector_tensors(vision_type)``), reported as each is written.

    Returns:
        Size of the written file in bytes.
    """
    import gguf

    writer = gguf.GGUFWriter(None, CLIP_ARCH)
    converter.write_projector_metadata(writer)
    file_types = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                  "bf16": gguf.LlamaFileType.MOSTLY_BF16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}
    writer.add_file_type(int(file_types[vision_type]))
    write_gguf(path, writer, converter.projector_reader, written.plan, written.tensor)
    return path.stat().st_size
