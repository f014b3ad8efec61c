"""Llama-3.2-Vision (transformers ``MllamaForConditionalGeneration``) converter.

Neither llama.cpp nor libmtmd can run this model (no graph for its
cross-attention layers), so both files are edgevlm's own and only edgevlm
loads them (``edgevlm inspect`` says so):

* LLM: ``general.architecture = "mllama"`` with the usual ``mllama.*`` Llama
  hyper-parameters, the Llama 3 byte-level BPE vocabulary and chat template.
  Self-attention layers use llama.cpp's Llama tensor names; Q/K rows keep HF's
  rotate-half layout (NEOX-style RoPE). Cross-attention layers (at
  ``text_config.cross_attention_layers``) hold ``blk.N.cross_attn_*`` tensors
  (:data:`_CROSS_PARTS`); their ``attn_norm`` / ``ffn_*`` tensors are named as
  in self-attention layers. llama3 RoPE scaling is stored as the per-frequency
  divisors ggml's ``rope_ext`` takes (:data:`edgevlm.constants.KEY_ROPE_FREQ_FACTORS`).
  ``token_embd`` has ``vocab_size + 8`` rows (``<|image|>`` is id ``vocab_size``),
  ``output`` ``vocab_size`` rows, as in the checkpoint.
* Projector: ``general.architecture = "clip"``, ``clip.projector_type =
  "edgevlm-mllama"``: the vision encoder (:data:`_VISION_STATIC`, local layers
  ``v.blk.N``, gated global layers ``v.global.blk.N``) and the one-linear
  projector ``mm.0``; gates are stored as in the checkpoint (before tanh).

LLM quantisation is written here, as llama.cpp's quantiser cannot load the
architecture: f32/f16/bf16; q8_0 and q4_0 with gguf's quantisers; q4_k_m,
q5_k_m and q6_k with ggml's own (``ggml_quantize_chunk``), each tensor's type
chosen as llama.cpp's ``llama_tensor_get_type`` does for a Llama (:mod:`.kquant`;
the cross-attention layers: :data:`_V_PARTS`).
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from edgevlm import constants as C
from edgevlm.errors import ConversionError, UnsupportedModelError

from . import kquant
from .base import Converter, register
from .config import (TextConfig, check_sections, check_tower_geometry, config_field,
                     square_field)
from .llm_writer import write_llama_hparams
from .projector_writer import check_projector_shapes, image_processor_config
from .tensors import TensorSpec, check_shape
from .tokenizer import write_vocab

LLM_QUANTS = ("f32", "f16", "bf16", "q8_0", "q6_k", "q5_k_m", "q4_k_m", "q4_0")
KEEP_Q8_0 = ("token_embd.weight", "output.weight")  # at q4_0, as llama.cpp keeps these finer
GELU_ACTS = ("gelu",)  # HF "gelu" is the erf form (transformers ACT2FN)
_TEXT_DEFAULTS: dict[str, Any] = {  # transformers' MllamaTextConfig defaults
    "vocab_size": 128256, "hidden_size": 4096, "intermediate_size": 14336,
    "num_hidden_layers": 40, "num_attention_heads": 32, "num_key_value_heads": 8,
    "max_position_embeddings": 131072, "rms_norm_eps": 1e-5, "rope_theta": 500000.0,
    "hidden_act": "silu", "tie_word_embeddings": False,
}
_VISION_DEFAULTS: dict[str, Any] = {  # transformers' MllamaVisionConfig defaults
    "hidden_size": 1280, "intermediate_size": 5120, "num_hidden_layers": 32,
    "num_global_layers": 8, "attention_heads": 16, "num_channels": 3, "image_size": 448,
    "patch_size": 14, "hidden_act": "gelu", "norm_eps": 1e-5, "max_num_tiles": 4,
    "vision_output_dim": 7680,
}
DEFAULT_INTERMEDIATE = (3, 7, 15, 23, 30)
DEFAULT_ASPECT_RATIOS = ((1, 1), (1, 2), (1, 3), (1, 4), (2, 1), (2, 2), (3, 1), (4, 1))
IMAGENET_STANDARD = (0.5, 0.5, 0.5)   # MllamaImageProcessor's default mean and std
_RESAMPLE_NAMES = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic"}  # PIL enum values

# Checkpoint (after the vision_model. prefix) -> GGUF. Source: transformers
# modeling_mllama.py MllamaVisionModel attribute names; GGUF names after the
# clip.cpp conventions (v.patch_embd, v.class_embd, v.pre_ln...) and Ollama's mllama files.
_VISION_STATIC = {
    "patch_embedding.weight": "v.patch_embd.weight",
    "class_embedding": "v.class_embd",
    "gated_positional_embedding.embedding": "v.position_embd.weight",
    "gated_positional_embedding.gate": "v.position_embd.gate",
    "gated_positional_embedding.tile_embedding.weight": "v.tile_position_embd.weight",
    "pre_tile_positional_embedding.embedding.weight": "v.pre_tile_position_embd.weight",
    "pre_tile_positional_embedding.gate": "v.pre_tile_position_embd.gate",
    "post_tile_positional_embedding.embedding.weight": "v.post_tile_position_embd.weight",
    "post_tile_positional_embedding.gate": "v.post_tile_position_embd.gate",
    "layernorm_pre.weight": "v.pre_ln.weight", "layernorm_pre.bias": "v.pre_ln.bias",
    "layernorm_post.weight": "v.post_ln.weight", "layernorm_post.bias": "v.post_ln.bias",
}
_VISION_LAYER_RE = re.compile(r"(transformer|global_transformer)\.layers\.(\d+)\.(.+?)(?:\.(weight|bias))?$")
_VISION_LAYER_PARTS = {  # MllamaVisionEncoderLayer -> clip.cpp block names
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_out", "input_layernorm": "ln1", "post_attention_layernorm": "ln2",
    "mlp.fc1": "ffn_up", "mlp.fc2": "ffn_down", "gate_attn": "attn_gate", "gate_ffn": "ffn_gate",
}
# MllamaCrossAttentionDecoderLayer -> GGUF (source: transformers modeling_mllama.py; the
# names are Ollama's mllama GGUF names). Its norms and MLP use the llama names.
_TEXT_LAYER_RE = re.compile(r"model\.layers\.(\d+)\.(.+?)(?:\.weight)?$")
_CROSS_PARTS = {
    "cross_attn.q_proj": "cross_attn_q_proj", "cross_attn.k_proj": "cross_attn_k_proj",
    "cross_attn.v_proj": "cross_attn_v_proj", "cross_attn.o_proj": "cross_attn_o_proj",
    "cross_attn.q_norm": "cross_attn_q_norm", "cross_attn.k_norm": "cross_attn_k_norm",
    "cross_attn_attn_gate": "cross_attn_attn_gate", "cross_attn_mlp_gate": "cross_attn_mlp_gate",
}
_LLAMA_PARTS = {  # llama.cpp's Llama names (gguf-py tensor_mapping.py)
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}
# The V projections of the K-quant mixes (llama.cpp's category_is_attn_v, given Q6_K on the layers
# use_more_bits picks). llama.cpp's tensor_get_category matches the substring "attn_v.weight", which
# "cross_attn_v_proj.weight" does not contain, so its quantiser (and Ollama's, which matches names the
# same way) would leave the cross-attention V at the base type. edgevlm counts it as the V projection
# it is: every layer then has one V, and use_more_bits picks by layer index over all layers, as for a
# plain Llama of the same depth. cross_attn_q/k/o_proj take the base type, as attn_q, attn_k and
# attn_output do in these mixes.
_V_PARTS = ("attn_v", "cross_attn_v_proj")
_TEXT_STATIC = {"model.embed_tokens.weight": "token_embd.weight",
                "model.norm.weight": "output_norm.weight", "lm_head.weight": "output.weight"}


def _int_list(data: Mapping[str, Any], key: str, where: str,
              default: Sequence[int] | None = None) -> tuple[int, ...]:
    value = data.get(key)
    if value is None and default is not None:
        return tuple(default)
    if value is None:
        raise ConversionError(f"config.json: {where}{key} is missing; an mllama config must "
                              "list it.")
    if not isinstance(value, list) or not value or not all(
            isinstance(v, int) and not isinstance(v, bool) for v in value):
        raise ConversionError(f"config.json: {where}{key} must be a non-empty list of ints, "
                              f"got {value!r}.")
    return tuple(value)


@dataclass(frozen=True)
class MllamaVisionConfig:
    """``vision_config`` of an mllama checkpoint."""

    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_global_layers: int
    num_attention_heads: int
    num_channels: int
    image_size: int
    patch_size: int
    hidden_act: str
    norm_eps: float
    max_num_tiles: int
    vision_output_dim: int
    intermediate_layers: tuple[int, ...]
    aspect_ratios: tuple[tuple[int, int], ...]

    def __post_init__(self) -> None:
        check_tower_geometry(self)

    @property
    def n_positions(self) -> int:
        """Tokens per tile: patches + the class embedding."""
        return (self.image_size // self.patch_size) ** 2 + 1

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> MllamaVisionConfig:
        """Parse ``vision_config``.

        Raises:
            ConversionError: a missing or malformed key, named.
        """
        data = dict(data)
        square_field(data, "image_size")
        square_field(data, "patch_size")
        if "attention_heads" not in data and "num_attention_heads" in data:
            data["attention_heads"] = data["num_attention_heads"]
        d, w = _VISION_DEFAULTS, "vision_config."
        values = {k: config_field(data, k, d, w, type(d[k])) for k in d}
        ratios = data.get("supported_aspect_ratios") or DEFAULT_ASPECT_RATIOS
        if not all(isinstance(r, (list, tuple)) and len(r) == 2 for r in ratios):
            raise ConversionError("config.json: vision_config.supported_aspect_ratios must be "
                                  f"a list of [tiles high, tiles wide] pairs, got {ratios!r}.")
        values["num_attention_heads"] = values.pop("attention_heads")
        return cls(**values, intermediate_layers=_int_list(
            data, "intermediate_layers_indices", w, DEFAULT_INTERMEDIATE),
            aspect_ratios=tuple((int(h), int(w_)) for h, w_ in ratios))


@dataclass(frozen=True)
class MllamaConfig:
    """The whole ``config.json`` of ``MllamaForConditionalGeneration``."""

    architecture: str
    text: TextConfig
    vision: MllamaVisionConfig
    cross_attention_layers: tuple[int, ...]
    image_token_id: int
    raw: Mapping[str, Any] = field(repr=False, compare=False, default_factory=dict)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> MllamaConfig:
        """Parse the top level.

        Raises:
            ConversionError: a section or key is missing or malformed (named).
        """
        check_sections(data)
        text = data.get("text_config", {})
        archs = data.get("architectures") or ["?"]
        return cls(
            architecture=str(archs[0]),
            text=TextConfig.from_dict(text, False, _TEXT_DEFAULTS, "mllama_text_model"),
            vision=MllamaVisionConfig.from_dict(data.get("vision_config", {})),
            cross_attention_layers=_int_list(text, "cross_attention_layers", "text_config."),
            image_token_id=config_field(data, "image_token_index",
                                        {"image_token_index": data.get("image_token_id", 128256)},
                                        "", int),
            raw=data)


def llama3_freq_factors(scaling: Mapping[str, Any], theta: float, head_dim: int) -> np.ndarray:
    """Divisors of the ``head_dim / 2`` RoPE frequencies for llama3 scaling (ggml's freq_factors).

    transformers' ``_compute_llama3_parameters`` divides a frequency by ``factor`` when its
    wavelength exceeds ``original_max_position_embeddings / low_freq_factor``, keeps it
    below ``original / high_freq_factor`` and interpolates smoothly between.
    """
    factor = float(scaling["factor"])
    low, high = float(scaling.get("low_freq_factor", 1.0)), float(scaling.get("high_freq_factor", 4.0))
    old = float(scaling.get("original_max_position_embeddings", 8192))
    inv_freq = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    out = []
    for freq in inv_freq:
        wavelen = 2 * math.pi / freq
        if wavelen < old / high:
            out.append(1.0)
        elif wavelen > old / low:
            out.append(factor)
        else:
            smooth = (old / wavelen - low) / (high - low)
            out.append(1.0 / ((1 - smooth) / factor + smooth))
    return np.asarray(out, dtype=np.float32)


def _vision_type(name: str, shape: tuple[int, ...], vision_type: str) -> str:
    """GGUF type of one projector tensor for ``--vision-type`` ``vision_type``.

    1-D tensors, gates and the (small) position table stay F32; the patch kernel
    and the aspect-ratio tables (ggml ``get_rows`` sources) are F16 unless f32;
    matrices follow ``vision_type`` (Q8_0 only where rows are whole blocks of 32).
    """
    if len(shape) == 1 or name == "v.position_embd.weight":
        return "F32"
    if vision_type == "f32":
        return "F32"
    if name == "v.patch_embd.weight" or "position_embd" in name:
        return "F16"
    if vision_type == "q8_0":
        return "Q8_0" if shape[-1] % 32 == 0 else "F16"
    return vision_type.upper()


@register("MllamaForConditionalGeneration")
class MllamaConverter(Converter):
    """Llama-3.2-Vision: Llama 3.1 text model with cross-attention layers, gated ViT-H encoder."""

    prompt_family = "llama3"
    llm_arch = C.LLM_ARCH_MLLAMA
    text_prefixes = (("model.language_model.", "model."), ("language_model.model.", "model."),
                     ("language_model.lm_head.", "lm_head."), ("lm_head.", "lm_head."))
    vision_prefixes = (("model.vision_model.", ""), ("vision_model.", ""))
    projector_prefixes = (("model.multi_modal_projector.", ""), ("multi_modal_projector.", ""))
    direct_llm_quants = frozenset({"q8_0", "q4_0", "q6_k", "q5_k_m", "q4_k_m"})
    config_class = MllamaConfig
    config: MllamaConfig

    def validate(self) -> None:
        """Reject variants edgevlm's mllama graphs do not run.

        Raises:
            UnsupportedModelError / ConversionError: naming the config key.
        """
        cfg, text, v = self.config, self.config.text, self.config.vision
        n = text.num_hidden_layers
        bad = [i for i in cfg.cross_attention_layers if not 0 <= i < n]
        if bad or len(set(cfg.cross_attention_layers)) != len(cfg.cross_attention_layers):
            raise ConversionError(
                f"config.json: text_config.cross_attention_layers {list(cfg.cross_attention_layers)} "
                f"must be distinct layer indices below num_hidden_layers ({n}).")
        bad = [i for i in v.intermediate_layers if not 0 <= i < v.num_hidden_layers]
        if bad:
            raise ConversionError(
                f"config.json: vision_config.intermediate_layers_indices {list(v.intermediate_layers)} "
                f"must be below num_hidden_layers ({v.num_hidden_layers}).")
        if v.vision_output_dim != v.hidden_size * (1 + len(v.intermediate_layers)):
            raise ConversionError(
                f"config.json: vision_config.vision_output_dim {v.vision_output_dim} is not "
                f"hidden_size x (1 + len(intermediate_layers_indices)) = "
                f"{v.hidden_size * (1 + len(v.intermediate_layers))}.")
        too_many = [r for r in v.aspect_ratios if r[0] * r[1] > v.max_num_tiles or min(r) < 1]
        if too_many:
            raise ConversionError(f"config.json: vision_config.supported_aspect_ratios {too_many[0]} "
                                  f"needs more than max_num_tiles ({v.max_num_tiles}) tiles.")
        checks = (
            (text.hidden_act == "silu", f"text_config.hidden_act {text.hidden_act!r} (silu only)"),
            (v.hidden_act in GELU_ACTS, f"vision_config.hidden_act {v.hidden_act!r} (gelu only)"),
            (v.num_channels == 3, f"vision_config.num_channels {v.num_channels} (RGB only)"),
            (text.head_dim * text.num_attention_heads == text.hidden_size,
             "text_config.head_dim other than hidden_size / num_attention_heads"),
            (_rope_kind(text.rope_scaling) in ("default", "llama3"),
             f"rope_scaling type {_rope_kind(text.rope_scaling)!r} (default and llama3 only)"),
        )
        for ok, what in checks:
            if not ok:
                raise UnsupportedModelError(f"this mllama checkpoint has {what}; edgevlm cannot "
                                            "convert it.")

    def check_llm_quant(self, quant: str) -> None:
        """Only the types this converter writes itself (llama.cpp's quantiser cannot load mllama).

        Raises:
            UnsupportedModelError: naming the supported types.
        """
        if quant not in LLM_QUANTS:
            raise UnsupportedModelError(
                f"quant {quant!r} is not available for mllama yet: llama.cpp's quantiser cannot "
                f"load the mllama architecture; choose one of {', '.join(LLM_QUANTS)}.")

    # --- LLM ---------------------------------------------------------------
    def _text_name(self, local: str) -> str:
        """GGUF name of text tensor ``local`` (``model.layers.3.cross_attn.q_proj.weight``...).

        Raises:
            ConversionError: an unknown tensor, or a layer whose kind disagrees with
                ``text_config.cross_attention_layers``.
        """
        if local in _TEXT_STATIC:
            return _TEXT_STATIC[local]
        match = _TEXT_LAYER_RE.match(local)
        part = match.group(2) if match else ""
        if match and (part in _CROSS_PARTS or part in _LLAMA_PARTS):
            il = int(match.group(1))
            cross = il in self.config.cross_attention_layers
            if (part in _CROSS_PARTS) != cross and (part in _CROSS_PARTS or part.startswith("self_attn")):
                raise ConversionError(
                    f"tensor {local!r}: layer {il} is {'a cross' if cross else 'a self'}-attention "
                    "layer per text_config.cross_attention_layers; config.json and the weights do "
                    "not match.")
            if part in _CROSS_PARTS:
                return f"blk.{il}.{_CROSS_PARTS[part]}" + ("" if part.endswith("_gate") else ".weight")
            return f"blk.{il}.{_LLAMA_PARTS[part]}.weight"
        raise ConversionError(f"text tensor {local!r} is not understood; this mllama variant is "
                              "not supported.")

    def llm_tensors(self, ggml_type: str) -> list[TensorSpec]:
        """Plan the text model's tensors (matrices in ``ggml_type``; Q8_0/Q4_0 rows that are not
        whole blocks of 32 fall back to F16; at Q4_0 the embeddings and output stay Q8_0; a
        K-quant mix label (``"Q4_K_M"``) picks each matrix's type, :meth:`_mix_type`)."""
        specs = []
        for local, source in self.text_names.items():
            if local.endswith("rotary_emb.inv_freq"):
                continue
            shape, name = tuple(self.reader.shape(source)), self._text_name(local)
            kind = "F32" if len(shape) == 1 else ggml_type
            if kind in kquant.K_MIXES:
                kind = self._mix_type(kind, name, shape[-1])
            if kind == "Q4_0" and name in KEEP_Q8_0:
                kind = "Q8_0"
            if kind in ("Q8_0", "Q4_0") and shape[-1] % 32:
                kind = "F16"
            specs.append(TensorSpec(name, source, shape, kind))
        self._check_text_shapes({s.name: s for s in specs})
        return specs

    def _mix_type(self, mix: str, name: str, n_per_row: int) -> str:
        """Type of matrix ``name`` in K-quant ``mix`` (llama.cpp's rules, :mod:`.kquant`; the
        cross-attention V counts as a V projection, :data:`_V_PARTS`)."""
        if name == "output.weight":
            return kquant.mix_type(mix, "output", n_per_row)
        if not name.startswith("blk."):  # token_embd: untied from output.weight, the base type
            return kquant.mix_type(mix, "other", n_per_row)
        _, layer, part, _ = name.split(".", 3)
        role = "attn_v" if part in _V_PARTS else "ffn_down" if part == "ffn_down" else "other"
        return kquant.mix_type(mix, role, n_per_row, int(layer), self.config.text.num_hidden_layers)

    def _check_text_shapes(self, specs: Mapping[str, TensorSpec]) -> None:
        t = self.config.text
        q, kv, d = t.num_attention_heads * t.head_dim, t.num_key_value_heads * t.head_dim, t.hidden_size
        expected: dict[str, tuple[int, ...]] = {
            "token_embd.weight": (t.vocab_size + 8, d), "output_norm.weight": (d,),
            "output.weight": (t.vocab_size, d)}
        for il in range(t.num_hidden_layers):
            p = f"blk.{il}."
            expected.update({p + "attn_norm.weight": (d,), p + "ffn_up.weight": (t.intermediate_size, d)})
            if il in self.config.cross_attention_layers:
                expected.update({p + "cross_attn_q_proj.weight": (q, d), p + "cross_attn_k_proj.weight": (kv, d),
                                 p + "cross_attn_v_proj.weight": (kv, d), p + "cross_attn_o_proj.weight": (d, q),
                                 p + "cross_attn_q_norm.weight": (t.head_dim,),
                                 p + "cross_attn_k_norm.weight": (t.head_dim,),
                                 p + "cross_attn_attn_gate": (1,), p + "cross_attn_mlp_gate": (1,)})
            else:
                expected.update({p + "attn_q.weight": (q, d), p + "attn_k.weight": (kv, d),
                                 p + "attn_v.weight": (kv, d), p + "attn_output.weight": (d, q)})
        for name, shape in expected.items():
            if name not in specs:
                raise ConversionError(f"tensor for {name!r} is missing from the checkpoint; the "
                                      "download may be incomplete.")
            check_shape(self.reader, specs[name], shape)

    def write_llm_metadata(self, writer: Any) -> None:
        """Write the Llama hparams, RoPE factors, cross-attention layers, vocabulary, edgevlm keys."""
        cfg, text = self.config, self.config.text
        writer.add_name(self.folder.name)
        write_llama_hparams(writer, dataclasses.replace(text, rope_scaling=None), self.vocab_rows())
        if _rope_kind(text.rope_scaling) == "llama3":
            factors = llama3_freq_factors(text.rope_scaling or {}, text.rope_theta, text.head_dim)
            writer.add_array(C.KEY_ROPE_FREQ_FACTORS, [float(x) for x in factors])
        writer.add_array(C.KEY_MLLAMA_CROSS_ATTENTION_LAYERS, list(cfg.cross_attention_layers))
        writer.add_uint32(C.KEY_MLLAMA_IMAGE_TOKEN_ID, cfg.image_token_id)
        write_vocab(writer, self.folder, self.vocab_rows(), self.log)
        self.write_edgevlm_keys(writer, cfg.architecture)

    # --- projector -----------------------------------------------------------
    def projector_tensors(self, vision_type: str) -> list[TensorSpec]:
        """Plan the vision encoder and projector tensors."""
        specs = [self._vision_spec(local, source) for local, source in self.vision_names.items()]
        for local, source in self.projector_names.items():
            if local not in ("weight", "bias"):
                raise ConversionError(f"projector tensor {source!r} is not understood; mllama's "
                                      "projector is one linear layer.")
            specs.append(TensorSpec(f"mm.0.{local}", source, tuple(self.reader.shape(source)), ""))
        specs = [dataclasses.replace(s, ggml_type=_vision_type(s.name, s.shape, vision_type))
                 for s in specs]
        self._check_vision_shapes({s.name: s for s in specs})
        return specs

    def _vision_spec(self, local: str, source: str) -> TensorSpec:
        shape = tuple(self.reader.shape(source))
        if local in _VISION_STATIC:
            return TensorSpec(_VISION_STATIC[local], source, shape, "")
        match = _VISION_LAYER_RE.match(local)
        if match and match.group(3) in _VISION_LAYER_PARTS:
            stack = "v.global.blk" if match.group(1) == "global_transformer" else "v.blk"
            suffix = f".{match.group(4)}" if match.group(4) else ""  # gates have none
            name = f"{stack}.{match.group(2)}.{_VISION_LAYER_PARTS[match.group(3)]}{suffix}"
            return TensorSpec(name, source, shape, "")
        raise ConversionError(f"vision tensor {source!r} is not understood; this mllama vision "
                              "encoder variant is not supported.")

    def _check_vision_shapes(self, specs: Mapping[str, TensorSpec]) -> None:
        v, d = self.config.vision, self.config.vision.hidden_size
        rows, tiles, p = len(v.aspect_ratios) + 1, v.max_num_tiles, v.n_positions
        expected: dict[str, tuple[int, ...]] = {
            "v.patch_embd.weight": (d, v.num_channels, v.patch_size, v.patch_size),
            "v.class_embd": (d,), "v.position_embd.weight": (p, d), "v.position_embd.gate": (1,),
            "v.tile_position_embd.weight": (rows, tiles * p * d),
            "v.pre_tile_position_embd.weight": (rows, tiles * d),
            "v.post_tile_position_embd.weight": (rows, tiles * d),
            "v.pre_ln.weight": (d,), "v.post_ln.weight": (d,),
            "mm.0.weight": (self.config.text.hidden_size, v.vision_output_dim)}
        for stack, count in (("v.blk", v.num_hidden_layers), ("v.global.blk", v.num_global_layers)):
            for il in range(count):
                expected[f"{stack}.{il}.attn_q.weight"] = (d, d)
                expected[f"{stack}.{il}.ffn_up.weight"] = (v.intermediate_size, d)
                if stack == "v.global.blk":
                    expected[f"{stack}.{il}.attn_gate"] = expected[f"{stack}.{il}.ffn_gate"] = (1,)
        check_projector_shapes(specs, expected)

    def write_projector_metadata(self, writer: Any) -> None:
        """Write ``clip.vision.*`` keys, the mllama encoder keys and the image processor's settings."""
        cfg, v = self.config, self.config.vision
        proc = image_processor_config(self.folder)
        writer.add_name(f"mmproj-{self.folder.name}")
        writer.add_bool("clip.has_vision_encoder", True)
        writer.add_string("clip.projector_type", C.CLIP_PROJECTOR_TYPE_MLLAMA)
        p = "clip.vision."
        for key, value in (("image_size", v.image_size), ("patch_size", v.patch_size),
                           ("embedding_length", v.hidden_size),
                           ("feed_forward_length", v.intermediate_size),
                           ("projection_dim", cfg.text.hidden_size),
                           ("block_count", v.num_hidden_layers),
                           ("attention.head_count", v.num_attention_heads)):
            writer.add_uint32(p + key, value)
        writer.add_float32(p + "attention.layer_norm_epsilon", v.norm_eps)
        writer.add_array(p + "image_mean", [float(x) for x in proc.get("image_mean", IMAGENET_STANDARD)])
        writer.add_array(p + "image_std", [float(x) for x in proc.get("image_std", IMAGENET_STANDARD)])
        self.write_edgevlm_keys(writer, cfg.architecture)
        writer.add_string(C.KEY_PROJECTOR_KIND, C.PROJECTOR_KIND_MLLAMA)
        writer.add_string(C.KEY_VISION_ACTIVATION, v.hidden_act)
        writer.add_uint32(C.KEY_MLLAMA_GLOBAL_BLOCK_COUNT, v.num_global_layers)
        writer.add_array(C.KEY_MLLAMA_INTERMEDIATE_LAYERS, list(v.intermediate_layers))
        writer.add_uint32(C.KEY_MLLAMA_MAX_NUM_TILES, v.max_num_tiles)
        writer.add_array(C.KEY_MLLAMA_ASPECT_RATIOS, [x for r in v.aspect_ratios for x in r])
        writer.add_uint32(C.KEY_MLLAMA_MAX_IMAGE_TILES, self._max_image_tiles(proc))
        writer.add_string(C.KEY_IMAGE_RESAMPLE, self._resample(proc))

    def _max_image_tiles(self, proc: Mapping[str, Any]) -> int:
        tiles = proc.get("max_image_tiles", self.config.vision.max_num_tiles)
        if not isinstance(tiles, int) or not 1 <= tiles <= self.config.vision.max_num_tiles:
            raise ConversionError(f"preprocessor_config.json: max_image_tiles {tiles!r} must be "
                                  f"1..max_num_tiles ({self.config.vision.max_num_tiles}).")
        size = proc.get("size", {})
        if size and (size.get("height"), size.get("width")) != (self.config.vision.image_size,) * 2:
            raise ConversionError(f"preprocessor_config.json: size {size} differs from "
                                  f"vision_config.image_size ({self.config.vision.image_size}).")
        return tiles

    @staticmethod
    def _resample(proc: Mapping[str, Any]) -> str:
        value = proc.get("resample", 2)
        if value not in (1, 2, 3, 0):
            raise UnsupportedModelError(f"preprocessor_config.json: resample {value!r} is not "
                                        "supported (PIL nearest, bilinear, bicubic, lanczos are).")
        return _RESAMPLE_NAMES[int(value)]


def _rope_kind(scaling: Mapping[str, Any] | None) -> str:
    if not scaling:
        return "default"
    return str(scaling.get("rope_type", scaling.get("type", "default")))
