"""InternVL (transformers-native ``InternVLForConditionalGeneration``) converter.

The ``OpenGVLab/InternVL*-hf`` checkpoints: an InternViT tower (CLS token,
learned position embeddings, layer scale), pixel shuffle 0.5 and a
LayerNorm + 2-layer GELU MLP projector, in front of a Qwen2 LLM.

Text model: Qwen2 (q/k/v biases, NEOX rotary in HF's layout) -> llama.cpp
arch ``qwen2``; the vocabulary is Qwen2's byte-level BPE (``tokenizer.json``).

Vision: clip GGUF with ``clip.projector_type = "internvl"``, under the tensor
names llama.cpp's own converter writes for InternVL (its
``conversion/internvl.py`` + ``gguf-py/gguf/tensor_mapping.py`` "Intern-S1"
rows, which are the transformers-native names) and that libmtmd's
``clip_graph_internvl`` (``tools/mtmd/models/internvl.cpp``) reads:

* ``v.class_embd`` (CLS, 1-D), ``v.position_embd.weight`` (F32, ``n_patches + 1`` rows),
  ``v.patch_embd.weight/bias`` (Conv2d), ``v.blk.N.{attn_q,attn_k,attn_v,attn_out,ln1,
  ln2,ffn_up,ffn_down}``, layer scales ``v.blk.N.ls1/ls2.weight``;
* projector ``mm.model.mlp.{0,1,3}``: 0 = LayerNorm (eps 1e-5 hard-coded there and in
  transformers), 1 and 3 = the linears with GELU between;
* keys ``clip.vision.projector.scale_factor`` (``1 / downsample_ratio``),
  ``clip.vision.preproc_min_tiles`` / ``preproc_max_tiles`` (the processor's
  ``min_patches`` / ``max_patches``), ``clip.use_gelu``.

libmtmd's graph differs from transformers in two ways that the converter can
only partly absorb (see :data:`POSITION_LAYOUT`): it appends the CLS token
after the patches (transformers prepends it) while adding the position table
in row order, and it uses tanh-approximated GELU where transformers uses erf.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from edgevlm import constants
from edgevlm.errors import ConversionError, UnsupportedModelError

from .base import Converter, register
from .config import (TextConfig, check_sections, check_tower_geometry, config_field,
                     square_field)
from .llm_writer import llama_tensor_specs, write_llama_hparams
from .projector_writer import (check_projector_shapes, feature_layer_count,
                               image_processor_config, vision_tensor_type, write_vision_hparams)
from .tensors import TensorSpec
from .tokenizer import write_vocab

QWEN2_ARCH = "qwen2"
PROJECTOR_TYPE = "internvl"
PROJECTOR_LN_EPS = 1e-5
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DEFAULT_MIN_TILES, DEFAULT_MAX_TILES = 1, 12

POSITION_LAYOUT = "cls-last"
"""Row order of ``v.position_embd.weight`` in our files.

libmtmd 0.3.36 builds ``[patches..., CLS]`` and adds position rows ``0..n`` in
that order, whereas transformers builds ``[CLS, patches...]`` with row 0 for
CLS. Writing the rows as ``[rows 1..n, row 0]`` gives every token the same
position vector as in transformers (attention has no other position signal),
so libmtmd's output matches. Recorded under
:data:`edgevlm.constants.KEY_POSITION_LAYOUT`."""

# transformers' Qwen2Config defaults (used when text_config omits a field).
_QWEN2_DEFAULTS: dict[str, Any] = {
    "vocab_size": 151936, "hidden_size": 4096, "intermediate_size": 22016,
    "num_hidden_layers": 32, "num_attention_heads": 32, "max_position_embeddings": 32768,
    "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "hidden_act": "silu",
    "tie_word_embeddings": False,
}
# transformers' InternVLVisionConfig defaults (InternViT-300M).
_VISION_DEFAULTS: dict[str, Any] = {
    "hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24,
    "num_attention_heads": 16, "num_channels": 3, "image_size": 448, "patch_size": 14,
    "hidden_act": "gelu", "layer_norm_eps": 1e-6, "norm_type": "layer_norm",
    "use_qk_norm": False, "use_mean_pooling": True, "use_absolute_position_embeddings": True,
}
_TOP_DEFAULTS: dict[str, Any] = {
    "image_token_id": 151667, "downsample_ratio": 0.5, "projector_hidden_act": "gelu",
    "vision_feature_layer": -1, "vision_feature_select_strategy": "default",
}

# transformers-native tower names (after the ``vision_tower.`` prefix) -> GGUF names.
# Source: llama.cpp gguf-py/gguf/tensor_mapping.py ("Intern-S1" rows) + conversion/internvl.py.
_TOWER_STATIC = {
    "embeddings.cls_token": "v.class_embd",
    "embeddings.position_embeddings": "v.position_embd.weight",
    "embeddings.patch_embeddings.projection.weight": "v.patch_embd.weight",
    "embeddings.patch_embeddings.projection.bias": "v.patch_embd.bias",
}
_LAYER_RE = re.compile(r"encoder\.layer\.(\d+)\.(.+?)(?:\.(weight|bias))?$")
_LAYER_PARTS = {
    "attention.q_proj": "attn_q", "attention.k_proj": "attn_k", "attention.v_proj": "attn_v",
    "attention.projection_layer": "attn_out", "layernorm_before": "ln1",
    "layernorm_after": "ln2", "mlp.fc1": "ffn_up", "mlp.fc2": "ffn_down",
    "lambda_1": "ls1", "lambda_2": "ls2",
}
# multi_modal_projector.* -> GGUF (llama.cpp maps HF's names onto InternVL's mlp1.{0,1,3}).
_PROJECTOR_PARTS = {"layer_norm": "mm.model.mlp.0", "linear_1": "mm.model.mlp.1",
                    "linear_2": "mm.model.mlp.3"}


@dataclass(frozen=True)
class InternVisionConfig:
    """Hyper-parameters of the InternViT tower (``vision_config``)."""

    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_channels: int
    image_size: int
    patch_size: int
    hidden_act: str
    layer_norm_eps: float
    norm_type: str
    use_qk_norm: bool
    use_mean_pooling: bool
    use_absolute_position_embeddings: bool

    def __post_init__(self) -> None:
        check_tower_geometry(self)

    @property
    def grid(self) -> int:
        """Patches per side of one tile."""
        return self.image_size // self.patch_size

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> InternVisionConfig:
        """Parse ``vision_config`` (``image_size`` / ``patch_size`` may be ``[h, w]`` lists).

        Raises:
            ConversionError: a field has the wrong type, or a non-square tile or patch.
        """
        data = dict(data)
        for key in ("image_size", "patch_size"):
            square_field(data, key)
        d = _VISION_DEFAULTS
        return cls(**{k: config_field(data, k, d, "vision_config.", type(d[k])) for k in d})


@dataclass(frozen=True)
class InternVLConfig:
    """The whole InternVL-hf ``config.json``."""

    architecture: str
    text: TextConfig
    vision: InternVisionConfig
    image_token_id: int
    downsample_ratio: float
    projector_hidden_act: str
    vision_feature_layer: int
    vision_feature_select_strategy: str
    raw: Mapping[str, Any] = field(repr=False, compare=False, default_factory=dict)

    @property
    def scale_factor(self) -> int:
        """Pixel-shuffle factor per side (``1 / downsample_ratio``)."""
        return round(1 / self.downsample_ratio)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> InternVLConfig:
        """Parse the top level of an InternVL-hf ``config.json``.

        Raises:
            ConversionError: a section or field is missing or malformed.
        """
        check_sections(data)
        d, archs = _TOP_DEFAULTS, data.get("architectures") or ["?"]
        text = data.get("text_config", {})
        return cls(
            architecture=str(archs[0]),
            text=TextConfig.from_dict(text, bool(data.get("tie_word_embeddings", False)),
                                      _QWEN2_DEFAULTS, "qwen2"),
            vision=InternVisionConfig.from_dict(data.get("vision_config", {})),
            image_token_id=config_field(data, "image_token_id", d, "", int),
            downsample_ratio=config_field(data, "downsample_ratio", d, "", float),
            projector_hidden_act=config_field(data, "projector_hidden_act", d, "", str),
            vision_feature_layer=config_field(data, "vision_feature_layer", d, "", int),
            vision_feature_select_strategy=config_field(data, "vision_feature_select_strategy", d, "",
                                                str),
            raw=data,
        )


def _flatten_cls(array: np.ndarray) -> np.ndarray:
    """``(1, 1, h)`` CLS token -> ``(h,)``."""
    return np.ascontiguousarray(array.reshape(-1))


def _cls_last_positions(array: np.ndarray) -> np.ndarray:
    """``(1, n + 1, h)`` with CLS first -> ``(n + 1, h)`` with CLS's row last."""
    table = array.reshape(array.shape[-2:])
    return np.ascontiguousarray(np.concatenate([table[1:], table[:1]]))


@register("InternVLForConditionalGeneration")
class InternVLConverter(Converter):
    """InternVL-hf: Qwen2 text model, InternViT tower, pixel shuffle + MLP projector."""

    prompt_family = "chatml"
    llm_arch = QWEN2_ARCH
    text_prefixes = (("model.language_model.", "model."), ("language_model.model.", "model."),
                     ("language_model.lm_head.", "lm_head."), ("lm_head.", "lm_head."))
    vision_prefixes = (("model.vision_tower.", ""), ("vision_tower.", ""))
    projector_prefixes = (("model.multi_modal_projector.", ""), ("multi_modal_projector.", ""))
    config_class = InternVLConfig
    config: InternVLConfig

    def validate(self) -> None:
        """Reject variants libmtmd's internvl graph or llama.cpp's qwen2 cannot run.

        Raises:
            UnsupportedModelError: naming the setting and what is supported.
        """
        cfg, v, text = self.config, self.config.vision, self.config.text
        checks = (
            (text.model_type == "qwen2", f"text_config.model_type {text.model_type!r} (qwen2 "
                                         "only)"),
            (text.hidden_act == "silu", f"text hidden_act {text.hidden_act!r} (silu only)"),
            (not cfg.raw.get("text_config", {}).get("use_sliding_window", False),
             "use_sliding_window=true (llama.cpp's qwen2 attends globally)"),
            (v.norm_type == "layer_norm", f"vision norm_type {v.norm_type!r} (layer_norm only: "
                                          "libmtmd picks RMS norm only for the 6B InternViT)"),
            (not v.use_qk_norm, "use_qk_norm=true (libmtmd would apply LayerNorm, not RMSNorm)"),
            (v.use_mean_pooling, "use_mean_pooling=false (a final tower LayerNorm libmtmd "
                                 "does not run)"),
            (v.use_absolute_position_embeddings, "no absolute position embeddings"),
            (v.hidden_act == "gelu", f"vision hidden_act {v.hidden_act!r} (gelu only)"),
            (cfg.projector_hidden_act == "gelu",
             f"projector_hidden_act {cfg.projector_hidden_act!r} (gelu only)"),
            (cfg.vision_feature_select_strategy == "default",
             f"vision_feature_select_strategy {cfg.vision_feature_select_strategy!r} (libmtmd "
             "always drops the CLS token: 'default' only)"),
            (cfg.scale_factor * cfg.downsample_ratio == 1 and v.grid % cfg.scale_factor == 0,
             f"downsample_ratio {cfg.downsample_ratio} for a {v.grid}-patch grid"),
            (v.num_channels == 3, f"{v.num_channels} input channels (RGB only)"),
        )
        for ok, what in checks:
            if not ok:
                raise UnsupportedModelError(f"this InternVL checkpoint has {what}; edgevlm "
                                            "cannot convert it for llama.cpp.")
        # feature_layer_count reads only num_hidden_layers, which InternVisionConfig has.
        self.n_vision_layers = feature_layer_count(
            v, cfg.vision_feature_layer)  # type: ignore[arg-type]

    # --- LLM ---------------------------------------------------------------
    def llm_tensors(self, ggml_type: str) -> list[TensorSpec]:
        """Plan the qwen2 tensors (HF rotary layout kept; q/k/v biases included)."""
        return llama_tensor_specs(self.text_names, self.reader, self.config.text, ggml_type,
                                  arch=QWEN2_ARCH, interleaved_rope=False)

    def write_llm_metadata(self, writer: Any) -> None:
        """Write qwen2 hparams, the byte-level BPE vocabulary and edgevlm keys."""
        writer.add_name(self.folder.name)
        write_llama_hparams(writer, self.config.text, self.vocab_rows())
        write_vocab(writer, self.folder, self.vocab_rows(), self.log)
        self.write_edgevlm_keys(writer, self.config.architecture)

    # --- projector -----------------------------------------------------------
    def projector_tensors(self, vision_type: str) -> list[TensorSpec]:
        """Plan tower (first ``n_vision_layers`` blocks) and projector tensors."""
        specs = [spec for local, source in self.vision_names.items()
                 if (spec := self._tower_spec(local, source)) is not None]
        for local, source in self.projector_names.items():
            stem, _, kind = local.rpartition(".")
            if stem not in _PROJECTOR_PARTS:
                raise ConversionError(f"projector tensor {source!r} is not understood; only "
                                      "InternVL's LayerNorm + 2-layer MLP is supported.")
            specs.append(TensorSpec(f"{_PROJECTOR_PARTS[stem]}.{kind}", source,
                                    tuple(self.reader.shape(source)), ""))
        specs = [TensorSpec(s.name, s.source, s.shape,
                            vision_tensor_type(s.name, s.shape, vision_type), s.transform)
                 for s in specs]
        self._check_projector_shapes({s.name: s for s in specs})
        return specs

    def _tower_spec(self, local: str, source: str) -> TensorSpec | None:
        """The GGUF tensor one tower tensor becomes (type set later); None if dropped."""
        shape = tuple(self.reader.shape(source))
        if local in _TOWER_STATIC:
            name = _TOWER_STATIC[local]
            if name == "v.class_embd":
                return TensorSpec(name, source, shape[-1:], "", _flatten_cls)
            if name == "v.position_embd.weight":
                return TensorSpec(name, source, shape[-2:], "", _cls_last_positions)
            return TensorSpec(name, source, shape, "")
        match = _LAYER_RE.match(local)
        if match and match.group(2) in _LAYER_PARTS:
            if int(match.group(1)) >= self.n_vision_layers:
                return None
            kind = match.group(3) or "weight"  # lambda_1/2 have no suffix
            return TensorSpec(f"v.blk.{match.group(1)}.{_LAYER_PARTS[match.group(2)]}.{kind}",
                              source, shape, "")
        raise ConversionError(f"vision tensor {source!r} is not understood; this InternViT "
                              "variant is not supported.")

    def _check_projector_shapes(self, specs: Mapping[str, TensorSpec]) -> None:
        cfg, v = self.config, self.config.vision
        h, p, merged = v.hidden_size, v.patch_size, v.hidden_size * cfg.scale_factor ** 2
        expected = {
            "v.class_embd": (h,),
            "v.position_embd.weight": (v.grid ** 2 + 1, h),
            "v.patch_embd.weight": (h, v.num_channels, p, p),
            "mm.model.mlp.0.weight": (merged,),
            "mm.model.mlp.1.weight": (cfg.text.hidden_size, merged),
            "mm.model.mlp.3.weight": (cfg.text.hidden_size, cfg.text.hidden_size),
        }
        for i in range(self.n_vision_layers):
            expected.update({f"v.blk.{i}.attn_q.weight": (h, h), f"v.blk.{i}.ls1.weight": (h,),
                             f"v.blk.{i}.ls2.weight": (h,),
                             f"v.blk.{i}.ffn_up.weight": (v.intermediate_size, h)})
        check_projector_shapes(specs, expected)

    def _tile_limits(self) -> tuple[int, int, list[float], list[float]]:
        """(min tiles, max tiles, mean, std) from the saved image processor."""
        data = image_processor_config(self.folder)
        lo = int(data.get("min_patches", DEFAULT_MIN_TILES))
        hi = int(data.get("max_patches", DEFAULT_MAX_TILES))
        if not 1 <= lo <= hi:
            raise ConversionError(f"preprocessor config: min_patches {lo} / max_patches {hi} "
                                  "are not 1 <= min <= max.")
        mean = [float(x) for x in data.get("image_mean", IMAGENET_MEAN)]
        std = [float(x) for x in data.get("image_std", IMAGENET_STD)]
        return lo, hi, mean, std

    def write_projector_metadata(self, writer: Any) -> None:
        """Write the ``clip.*`` keys of an ``internvl`` projector and edgevlm keys."""
        cfg, v = self.config, self.config.vision
        lo, hi, mean, std = self._tile_limits()
        writer.add_name(f"mmproj-{self.folder.name}")
        write_vision_hparams(
            writer, projector_type=PROJECTOR_TYPE, hidden_act=v.hidden_act,
            image_size=v.image_size, patch_size=v.patch_size, width=v.hidden_size,
            ffn=v.intermediate_size, n_layers=self.n_vision_layers,
            n_heads=v.num_attention_heads, eps=v.layer_norm_eps,
            projection_dim=cfg.text.hidden_size, image_mean=mean, image_std=std)
        writer.add_uint32("clip.vision.projector.scale_factor", cfg.scale_factor)
        writer.add_uint32("clip.vision.preproc_min_tiles", lo)
        writer.add_uint32("clip.vision.preproc_max_tiles", hi)
        self.write_edgevlm_keys(writer, cfg.architecture)
        writer.add_int32(constants.KEY_VISION_FEATURE_LAYER, cfg.vision_feature_layer)
        writer.add_string(constants.KEY_VISION_SELECT_STRATEGY,
                          cfg.vision_feature_select_strategy)
        writer.add_string(constants.KEY_VISION_ACTIVATION, v.hidden_act)
        writer.add_string(constants.KEY_PROJECTOR_ACTIVATION, cfg.projector_hidden_act)
        writer.add_string(constants.KEY_POSITION_LAYOUT, POSITION_LAYOUT)
