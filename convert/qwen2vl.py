"""Qwen2-VL (``Qwen2VLForConditionalGeneration``) converter.

Text model: Qwen2 (q/k/v biases, NEOX-style rotary, so no Q/K permutation)
-> llama.cpp arch ``qwen2vl`` with ``rope.dimension_sections`` = the M-RoPE
(t, h, w) sections plus a 0 fourth section.

Vision: the Qwen2-VL ViT + patch merger -> clip GGUF with
``clip.projector_type = "qwen2vl_merger"``. Facts this follows (llama.cpp's
``tools/mtmd/models/qwen2vl.cpp`` and ``clip.cpp``):

* The Conv3d patch embedding (embed, 3, t=2, p, p) becomes two Conv2d kernels
  ``v.patch_embd.weight`` (frame 0) and ``v.patch_embd.weight.1`` (frame 1);
  a still image feeds the same frame to both, as transformers repeats it. The
  conv has no bias.
* ``attn.qkv`` is split row-wise into ``attn_q`` / ``attn_k`` / ``attn_v``;
  the vision rotary is applied by ggml in HF's layout (no permutation), with
  theta 10000 and a quarter of the head width per section.
* ``merger.ln_q`` -> ``v.post_ln``, ``merger.mlp.0`` / ``merger.mlp.2`` ->
  ``mm.0`` / ``mm.2`` (GELU between them); the 2x2 merge is hard-wired.
* Norms use eps 1e-6 (hard-coded in transformers); image min/max pixels are
  llama.cpp's own (8..4096 merged tokens), not the HF processor's.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Mapping
from typing import Any

import numpy as np

from edgevlm import constants
from edgevlm.errors import ConversionError, UnsupportedModelError

from .base import Converter, register
from .config import Qwen2VLConfig
from .llm_writer import llama_tensor_specs, write_llama_hparams
from .projector_writer import (check_projector_shapes, image_processor_config, vision_tensor_type,
                               write_vision_hparams)
from .tensors import TensorSpec
from .tokenizer import write_vocab

QWEN2VL_ARCH = "qwen2vl"
PROJECTOR_TYPE = "qwen2vl_merger"
IMAGE_SIZE = 560
"""``clip.vision.image_size``: Qwen2-VL has none; llama.cpp's converter writes 560."""
VISION_EPS = 1e-6
VISION_ROPE_THETA = 10000.0
_BLOCK_RE = re.compile(r"blocks\.(\d+)\.(.+)\.(weight|bias)$")
_BLOCK_PARTS = {"norm1": "ln1", "norm2": "ln2", "attn.proj": "attn_out",
                "mlp.fc1": "ffn_up", "mlp.fc2": "ffn_down"}
_MERGER_PARTS = {"merger.ln_q": "v.post_ln", "merger.mlp.0": "mm.0", "merger.mlp.2": "mm.2"}
_PATCH = "patch_embed.proj.weight"


def _rows(array: np.ndarray, index: int, parts: int) -> np.ndarray:
    """The ``index``-th of ``parts`` equal row blocks (fused QKV -> Q, K or V)."""
    size = array.shape[0] // parts
    return np.ascontiguousarray(array[index * size:(index + 1) * size])


def _frame(array: np.ndarray, index: int) -> np.ndarray:
    """Temporal slice ``index`` of a Conv3d kernel (out, in, t, h, w) -> (out, in, h, w)."""
    return np.ascontiguousarray(array[:, :, index])


@register("Qwen2VLForConditionalGeneration")
class Qwen2VLConverter(Converter):
    """Qwen2-VL: Qwen2 text model with M-RoPE, ViT with a 2x2 patch merger."""

    prompt_family = "chatml"
    llm_arch = QWEN2VL_ARCH
    text_prefixes = (("model.language_model.", "model."), ("model.layers.", "model.layers."),
                     ("model.embed_tokens.", "model.embed_tokens."),
                     ("model.norm.", "model.norm."), ("lm_head.", "lm_head."))
    vision_prefixes = (("model.visual.", ""), ("visual.", ""))
    config_class = Qwen2VLConfig
    config: Qwen2VLConfig

    def validate(self) -> None:
        """Reject variants llama.cpp's qwen2vl text model or vision graph cannot run.

        Raises:
            UnsupportedModelError: naming the setting and what is supported.
        """
        cfg, text, v = self.config, self.config.text, self.config.vision
        checks = (
            (cfg.model_type == "qwen2_vl", f"model_type {cfg.model_type!r} is not qwen2_vl"),
            (not cfg.use_sliding_window, "use_sliding_window=true (llama.cpp's qwen2vl "
                                         "attends globally)"),
            (text.hidden_act == "silu", f"text hidden_act {text.hidden_act!r} (silu only)"),
            (text.num_attention_heads * text.head_dim == text.hidden_size,
             "a text head_dim other than hidden_size / num_attention_heads"),
            (v.temporal_patch_size == 2, f"temporal_patch_size {v.temporal_patch_size} (2 only)"),
            (v.spatial_merge_size == 2, f"spatial_merge_size {v.spatial_merge_size} (2 only)"),
            (v.in_channels == 3, f"{v.in_channels} input channels (RGB only)"),
            (v.head_dim % 4 == 0, f"a vision head width of {v.head_dim} (must split into 4 "
                                  "rotary sections)"),
            (self._vision_rope_theta() == VISION_ROPE_THETA,
             f"vision rope_theta {self._vision_rope_theta()} (llama.cpp uses 10000)"),
        )
        for ok, what in checks:
            if not ok:
                raise UnsupportedModelError(f"this Qwen2-VL checkpoint has {what}; llama.cpp "
                                            "cannot run it.")

    def _vision_rope_theta(self) -> float:
        vision = self.raw_config.get("vision_config") or {}
        rope = vision.get("rope_parameters") or {}
        return float(rope.get("rope_theta", VISION_ROPE_THETA))

    # --- LLM ---------------------------------------------------------------
    def llm_tensors(self, ggml_type: str) -> list[TensorSpec]:
        """Plan the qwen2vl tensors (HF rotary layout kept; biases included)."""
        return llama_tensor_specs(self.text_names, self.reader, self.config.text, ggml_type,
                                  arch=QWEN2VL_ARCH, interleaved_rope=False)

    def write_llm_metadata(self, writer: Any) -> None:
        """Write qwen2vl hparams with the M-RoPE sections, vocabulary and edgevlm keys."""
        writer.add_name(self.folder.name)
        write_llama_hparams(writer, self.config.text, self.vocab_rows())
        writer.add_rope_dimension_sections([*self.config.mrope_section, 0])
        write_vocab(writer, self.folder, self.vocab_rows(), self.log)
        self.write_edgevlm_keys(writer, self.config.architecture)

    # --- projector -----------------------------------------------------------
    def projector_tensors(self, vision_type: str) -> list[TensorSpec]:
        """Plan tower, merger and projector tensors (split patch kernel and QKV)."""
        specs: list[TensorSpec] = []
        for local, source in self.vision_names.items():
            specs += self._vision_specs(local, source)
        specs = [TensorSpec(s.name, s.source, s.shape,
                            vision_tensor_type(s.name, s.shape, vision_type), s.transform)
                 for s in specs]
        self._check_projector_shapes({s.name: s for s in specs})
        return specs

    def _vision_specs(self, local: str, source: str) -> list[TensorSpec]:
        """The GGUF tensor(s) one checkpoint tensor of the tower becomes (types later)."""
        shape = tuple(self.reader.shape(source))
        if local == _PATCH:
            if len(shape) != 5 or shape[2] != 2:
                raise ConversionError(f"tensor {source!r} has shape {list(shape)}; expected a "
                                      "Conv3d kernel with 2 frames.")
            out = (shape[0], shape[1], shape[3], shape[4])
            return [TensorSpec(name, source, out, "", functools.partial(_frame, index=t))
                    for t, name in enumerate(("v.patch_embd.weight", "v.patch_embd.weight.1"))]
        match = _BLOCK_RE.match(local)
        if match and match.group(2) == "attn.qkv":
            block, kind = match.group(1), match.group(3)
            out = (shape[0] // 3, *shape[1:])
            return [TensorSpec(f"v.blk.{block}.attn_{part}.{kind}", source, out, "",
                               functools.partial(_rows, index=i, parts=3))
                    for i, part in enumerate("qkv")]
        if match and match.group(2) in _BLOCK_PARTS:
            name = f"v.blk.{match.group(1)}.{_BLOCK_PARTS[match.group(2)]}.{match.group(3)}"
            return [TensorSpec(name, source, shape, "")]
        stem, _, kind = local.rpartition(".")
        if stem in _MERGER_PARTS:
            return [TensorSpec(f"{_MERGER_PARTS[stem]}.{kind}", source, shape, "")]
        raise ConversionError(f"vision tensor {source!r} is not understood; this Qwen2-VL "
                              "vision variant is not supported.")

    def _check_projector_shapes(self, specs: Mapping[str, TensorSpec]) -> None:
        v, width = self.config.vision, self.config.text.hidden_size
        p = v.patch_size
        expected = {
            "v.patch_embd.weight": (v.embed_dim, v.in_channels, p, p),
            "v.patch_embd.weight.1": (v.embed_dim, v.in_channels, p, p),
            "v.post_ln.weight": (v.embed_dim,),
            "mm.0.weight": (v.merged_size, v.merged_size),
            "mm.2.weight": (width, v.merged_size),
        }
        for i in range(v.depth):
            expected[f"v.blk.{i}.attn_q.weight"] = (v.embed_dim, v.embed_dim)
            expected[f"v.blk.{i}.attn_out.weight"] = (v.embed_dim, v.embed_dim)
            expected[f"v.blk.{i}.ffn_up.weight"] = (v.intermediate_size, v.embed_dim)
            expected[f"v.blk.{i}.ffn_down.weight"] = (v.embed_dim, v.intermediate_size)
        check_projector_shapes(specs, expected)

    def write_projector_metadata(self, writer: Any) -> None:
        """Write the ``clip.*`` keys of a ``qwen2vl_merger`` projector and edgevlm keys."""
        cfg, v = self.config, self.config.vision
        data = image_processor_config(self.folder)
        mean, std = ((list(data["image_mean"]), list(data["image_std"])) if "image_mean" in data
                     and "image_std" in data else (list(constants.CLIP_MEAN), list(constants.CLIP_STD)))
        writer.add_name(f"mmproj-{self.folder.name}")
        write_vision_hparams(
            writer, projector_type=PROJECTOR_TYPE, hidden_act=v.hidden_act,
            image_size=IMAGE_SIZE, patch_size=v.patch_size, width=v.embed_dim,
            ffn=v.intermediate_size, n_layers=v.depth, n_heads=v.num_heads, eps=VISION_EPS,
            projection_dim=cfg.text.hidden_size, image_mean=mean, image_std=std)
        writer.add_uint32("clip.vision.spatial_merge_size", v.spatial_merge_size)
        self.write_edgevlm_keys(writer, self.config.architecture)
        writer.add_string(constants.KEY_VISION_ACTIVATION, v.hidden_act)
