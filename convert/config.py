"""Typed, validated views of a model's ``config.json`` (llava, Qwen2-VL).

Both transformers 4.x and 5.x layouts are read: nested ``text_config`` /
``vision_config`` (or Qwen2-VL's flat 4.x layout), ``rope_theta`` or
``rope_parameters``, ``rope_scaling``. Fields missing from ``config.json``
take the defaults transformers uses (llava-hf's 7B config omits most
LlamaConfig fields, for instance).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgevlm.errors import ConversionError

CONFIG_FILE = "config.json"

# transformers' LlamaConfig defaults (used when text_config omits a field).
_LLAMA_DEFAULTS: dict[str, Any] = {
    "vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 11008,
    "num_hidden_layers": 32, "num_attention_heads": 32, "max_position_embeddings": 2048,
    "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "hidden_act": "silu",
    "tie_word_embeddings": False, "attention_bias": False, "mlp_bias": False,
}
# transformers' CLIPVisionConfig defaults (ViT-B/32); llava-hf configs spell most out.
_CLIP_DEFAULTS: dict[str, Any] = {
    "hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
    "num_attention_heads": 12, "num_channels": 3, "image_size": 224, "patch_size": 32,
    "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5,
}
_SIGLIP_DEFAULTS: dict[str, Any] = {
    **_CLIP_DEFAULTS, "image_size": 224, "patch_size": 16, "hidden_act": "gelu_pytorch_tanh",
    "layer_norm_eps": 1e-6,
}
_VISION_DEFAULTS = {"clip_vision_model": _CLIP_DEFAULTS, "siglip_vision_model": _SIGLIP_DEFAULTS}
_LLAVA_DEFAULTS: dict[str, Any] = {
    "image_token_index": 32000, "projector_hidden_act": "gelu",
    "vision_feature_select_strategy": "default", "vision_feature_layer": -2,
    "multimodal_projector_bias": True,
}


def config_field(data: Mapping[str, Any], key: str, defaults: Mapping[str, Any], where: str,
         kind: type | tuple[type, ...]) -> Any:
    """Fetch ``key`` (or its default) and check its type; name the key on failure."""
    if key in data and data[key] is not None:
        value = data[key]
    elif key in defaults:
        value = defaults[key]
    else:
        raise ConversionError(f"config.json: {where}{key} is missing; the checkpoint "
                              "config is incomplete.")
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ConversionError(f"config.json: {where}{key} must be {_kind_name(kind)}, "
                              f"got {value!r}.")
    return value


def _kind_name(kind: type | tuple[type, ...]) -> str:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    return " or ".join(k.__name__ for k in kinds)


def _positive(value: int, key: str) -> int:
    if value <= 0:
        raise ConversionError(f"config.json: {key} must be positive, got {value}.")
    return value


def _multiple(config: Any, section: str, key: str, divisor_key: str) -> None:
    """Require ``config.key`` to be a multiple of ``config.divisor_key``."""
    value, divisor = getattr(config, key), getattr(config, divisor_key)
    if value % divisor:
        raise ConversionError(f"config.json: {section}.{key} ({value}) is not a multiple of "
                              f"{divisor_key} ({divisor}).")


@dataclass(frozen=True)
class TextConfig:
    """Hyper-parameters of the Llama-family text model."""

    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    max_position_embeddings: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: Mapping[str, Any] | None
    tie_word_embeddings: bool
    hidden_act: str

    def __post_init__(self) -> None:
        for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                    "num_attention_heads", "num_key_value_heads", "head_dim"):
            _positive(getattr(self, key), f"text_config.{key}")
        _multiple(self, "text_config", "num_attention_heads", "num_key_value_heads")
        if self.head_dim % 2:
            raise ConversionError(f"config.json: text_config.head_dim ({self.head_dim}) "
                                  "must be even for rotary embeddings.")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], tie_default: bool = False,
                  defaults: Mapping[str, Any] = _LLAMA_DEFAULTS,
                  model_type: str = "llama") -> TextConfig:
        """Parse a ``text_config`` mapping (``defaults`` for missing keys).

        Args:
            data: The ``text_config`` dict of ``config.json``.
            tie_default: ``tie_word_embeddings`` of the outer config.
            defaults: transformers' defaults of the text model's config class
                (LlamaConfig's unless told).
            model_type: ``model_type`` when ``data`` names none.

        Returns:
            The validated config.

        Raises:
            ConversionError: a field has the wrong type or an impossible value.
        """
        w = "text_config."
        d = {**defaults, "tie_word_embeddings": tie_default}
        heads = config_field(data, "num_attention_heads", d, w, int)
        hidden = config_field(data, "hidden_size", d, w, int)
        rope = data.get("rope_parameters") or {}
        scaling = data.get("rope_scaling") or (rope if rope.get("rope_type", "default")
                                               not in ("default", None) else None)
        theta = rope.get("rope_theta", data.get("rope_theta", d["rope_theta"]))
        return cls(
            model_type=str(data.get("model_type", model_type)),
            vocab_size=config_field(data, "vocab_size", d, w, int),
            hidden_size=hidden,
            intermediate_size=config_field(data, "intermediate_size", d, w, int),
            num_hidden_layers=config_field(data, "num_hidden_layers", d, w, int),
            num_attention_heads=heads,
            num_key_value_heads=config_field(data, "num_key_value_heads", {"num_key_value_heads": heads},
                                     w, int),
            head_dim=config_field(data, "head_dim", {"head_dim": hidden // max(heads, 1)}, w, int),
            max_position_embeddings=config_field(data, "max_position_embeddings", d, w, int),
            rms_norm_eps=config_field(data, "rms_norm_eps", d, w, float),
            rope_theta=float(theta),
            rope_scaling=scaling,
            tie_word_embeddings=config_field(data, "tie_word_embeddings", d, w, bool),
            hidden_act=config_field(data, "hidden_act", d, w, str),
        )


def check_sections(data: Mapping[str, Any], sections: tuple[str, ...] = ("text_config", "vision_config")) -> None:
    """Refuse a ``config.json`` whose sub-configs are not objects.

    Raises:
        ConversionError: naming the section.
    """
    for section in sections:
        if not isinstance(data.get(section, {}), Mapping):
            raise ConversionError(f"config.json: {section} must be an object.")


def square_field(data: dict[str, Any], key: str) -> None:
    """Replace a ``vision_config`` ``[h, w]`` list at ``key`` by its one side, in place.

    Raises:
        ConversionError: the pair is not square.
    """
    value = data.get(key)
    if isinstance(value, (list, tuple)):
        if len(value) != 2 or value[0] != value[1]:
            raise ConversionError(f"config.json: vision_config.{key} {list(value)} is "
                                  "not square; only square tiles are supported.")
        data[key] = value[0]


def check_tower_geometry(cfg: Any) -> None:
    """Positive sizes, whole patches per side, whole heads: the checks every ViT config shares.

    Raises:
        ConversionError: naming the ``vision_config`` key.
    """
    for key in ("hidden_size", "intermediate_size", "num_hidden_layers",
                "num_attention_heads", "image_size", "patch_size"):
        _positive(getattr(cfg, key), f"vision_config.{key}")
    _multiple(cfg, "vision_config", "image_size", "patch_size")
    _multiple(cfg, "vision_config", "hidden_size", "num_attention_heads")


@dataclass(frozen=True)
class VisionConfig:
    """Hyper-parameters of a CLIP / SigLIP vision tower."""

    model_type: str
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_channels: int
    image_size: int
    patch_size: int
    hidden_act: str
    layer_norm_eps: float

    def __post_init__(self) -> None:
        check_tower_geometry(self)

    @property
    def has_cls_token(self) -> bool:
        """Whether the tower prepends a class embedding (CLIP does, SigLIP does not)."""
        return self.model_type == "clip_vision_model"

    @property
    def n_patches(self) -> int:
        """Patch tokens per image (without CLS)."""
        return (self.image_size // self.patch_size) ** 2

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> VisionConfig:
        """Parse a ``vision_config`` mapping.

        Args:
            data: The ``vision_config`` dict of ``config.json``.

        Returns:
            The validated config.

        Raises:
            ConversionError: unknown tower type or a bad field.
        """
        w = "vision_config."
        model_type = data.get("model_type", "clip_vision_model")
        if model_type not in _VISION_DEFAULTS:
            raise ConversionError(
                f"config.json: vision_config.model_type {model_type!r} is not supported; "
                f"supported: {', '.join(sorted(_VISION_DEFAULTS))}.")
        d = _VISION_DEFAULTS[model_type]
        return cls(model_type=model_type,
                   **{k: config_field(data, k, d, w, type(d[k])) for k in (
                       "hidden_size", "intermediate_size", "num_hidden_layers",
                       "num_attention_heads", "num_channels", "image_size", "patch_size",
                       "hidden_act", "layer_norm_eps")})


@dataclass(frozen=True)
class LlavaConfig:
    """The whole llava ``config.json``: text model, tower and projector settings."""

    architecture: str
    text: TextConfig
    vision: VisionConfig
    image_token_index: int
    projector_hidden_act: str
    vision_feature_layer: int | tuple[int, ...]
    vision_feature_select_strategy: str
    projector_bias: bool
    raw: Mapping[str, Any] = field(repr=False, compare=False, default_factory=dict)

    def __post_init__(self) -> None:
        if self.vision_feature_select_strategy not in ("default", "full"):
            raise ConversionError(
                "config.json: vision_feature_select_strategy must be 'default' or 'full', "
                f"got {self.vision_feature_select_strategy!r}.")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> LlavaConfig:
        """Parse the top level of a llava ``config.json``.

        Args:
            data: The decoded ``config.json``.

        Returns:
            The validated config.

        Raises:
            ConversionError: a section or field is missing or malformed.
        """
        check_sections(data)
        d = _LLAVA_DEFAULTS
        layer = data.get("vision_feature_layer", d["vision_feature_layer"])
        if isinstance(layer, list):
            layer = tuple(layer)
        elif not isinstance(layer, int) or isinstance(layer, bool):
            raise ConversionError("config.json: vision_feature_layer must be an int or a list "
                                  f"of ints, got {layer!r}.")
        archs = data.get("architectures") or ["?"]
        return cls(
            architecture=str(archs[0]),
            text=TextConfig.from_dict(data.get("text_config", {}),
                                      bool(data.get("tie_word_embeddings", False))),
            vision=VisionConfig.from_dict(data.get("vision_config", {})),
            image_token_index=config_field(data, "image_token_index", d, "", int),
            projector_hidden_act=config_field(data, "projector_hidden_act", d, "", str),
            vision_feature_layer=layer,
            vision_feature_select_strategy=config_field(data, "vision_feature_select_strategy", d, "",
                                                str),
            projector_bias=config_field(data, "multimodal_projector_bias", d, "", bool),
            raw=data,
        )


# transformers' Qwen2VLTextConfig / Qwen2VLVisionConfig defaults (Qwen2-VL-72B sizes).
_QWEN2VL_TEXT_DEFAULTS: dict[str, Any] = {
    "vocab_size": 152064, "hidden_size": 8192, "intermediate_size": 29568,
    "num_hidden_layers": 80, "num_attention_heads": 64, "num_key_value_heads": 8,
    "max_position_embeddings": 32768, "rms_norm_eps": 1e-5, "rope_theta": 1000000.0,
    "hidden_act": "silu", "tie_word_embeddings": False,
}
_QWEN2VL_VISION_DEFAULTS: dict[str, Any] = {
    "depth": 32, "embed_dim": 1280, "hidden_size": 3584, "hidden_act": "quick_gelu",
    "mlp_ratio": 4.0, "num_heads": 16, "in_channels": 3, "patch_size": 14,
    "spatial_merge_size": 2, "temporal_patch_size": 2,
}
_QWEN2VL_DEFAULTS: dict[str, Any] = {
    "image_token_id": 151655, "vision_start_token_id": 151652, "vision_end_token_id": 151653,
}
QWEN2VL_MROPE_DEFAULT = (16, 24, 24)
"""transformers' M-RoPE (t, h, w) sections when the config names none."""


@dataclass(frozen=True)
class Qwen2VLVisionConfig:
    """Hyper-parameters of the Qwen2-VL vision tower and its patch merger.

    Attributes:
        hidden_size: Output width of the merger (the LLM's width).
        embed_dim: Width of the tower itself.
        mlp_ratio: Tower MLP width over ``embed_dim``.
    """

    depth: int
    embed_dim: int
    hidden_size: int
    num_heads: int
    mlp_ratio: float
    in_channels: int
    patch_size: int
    spatial_merge_size: int
    temporal_patch_size: int
    hidden_act: str

    def __post_init__(self) -> None:
        for key in ("depth", "embed_dim", "hidden_size", "num_heads", "in_channels",
                    "patch_size", "spatial_merge_size", "temporal_patch_size"):
            _positive(getattr(self, key), f"vision_config.{key}")
        _multiple(self, "vision_config", "embed_dim", "num_heads")
        if self.mlp_ratio <= 0:
            raise ConversionError(f"config.json: vision_config.mlp_ratio must be positive, "
                                  f"got {self.mlp_ratio}.")

    @property
    def head_dim(self) -> int:
        """Width of one attention head of the tower."""
        return self.embed_dim // self.num_heads

    @property
    def intermediate_size(self) -> int:
        """Width of the tower MLP (``int(embed_dim * mlp_ratio)``, as transformers)."""
        return int(self.embed_dim * self.mlp_ratio)

    @property
    def merged_size(self) -> int:
        """Width of one merged token before the merger MLP."""
        return self.embed_dim * self.spatial_merge_size ** 2

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Qwen2VLVisionConfig:
        """Parse a Qwen2-VL ``vision_config`` mapping.

        Raises:
            ConversionError: a field has the wrong type or an impossible value.
        """
        w, d = "vision_config.", _QWEN2VL_VISION_DEFAULTS
        if "in_channels" not in data and "in_chans" in data:  # transformers 4 spelling
            data = {**data, "in_channels": data["in_chans"]}
        return cls(**{k: config_field(data, k, d, w, type(d[k])) for k in d})


@dataclass(frozen=True)
class Qwen2VLConfig:
    """The whole Qwen2-VL ``config.json``: text model, M-RoPE sections, vision tower."""

    architecture: str
    model_type: str
    text: TextConfig
    vision: Qwen2VLVisionConfig
    mrope_section: tuple[int, ...]
    use_sliding_window: bool
    image_token_id: int
    vision_start_token_id: int
    vision_end_token_id: int
    raw: Mapping[str, Any] = field(repr=False, compare=False, default_factory=dict)

    def __post_init__(self) -> None:
        if len(self.mrope_section) != 3 or min(self.mrope_section) < 0:
            raise ConversionError("config.json: mrope_section must be three non-negative "
                                  f"(t, h, w) counts, got {list(self.mrope_section)}.")
        if 2 * sum(self.mrope_section) != self.text.head_dim:
            raise ConversionError(
                f"config.json: mrope_section {list(self.mrope_section)} covers "
                f"{2 * sum(self.mrope_section)} rotary dims but the text head_dim is "
                f"{self.text.head_dim}.")
        if self.vision.hidden_size != self.text.hidden_size:
            raise ConversionError(
                f"config.json: vision_config.hidden_size ({self.vision.hidden_size}, the "
                f"merger output) differs from the text hidden_size ({self.text.hidden_size}).")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Qwen2VLConfig:
        """Parse a Qwen2-VL ``config.json`` (nested 5.x or flat 4.x layout).

        Raises:
            ConversionError: a section or field is missing or malformed.
        """
        check_sections(data)
        text = data.get("text_config") or {k: v for k, v in data.items() if k != "vision_config"}
        text, section = _split_mrope(text, data)
        archs = data.get("architectures") or ["?"]
        d = _QWEN2VL_DEFAULTS
        return cls(
            architecture=str(archs[0]),
            model_type=str(data.get("model_type", "qwen2_vl")),
            text=TextConfig.from_dict(text, bool(data.get("tie_word_embeddings", False)),
                                      _QWEN2VL_TEXT_DEFAULTS, "qwen2_vl_text"),
            vision=Qwen2VLVisionConfig.from_dict(data.get("vision_config", {})),
            mrope_section=section,
            use_sliding_window=bool(text.get("use_sliding_window", False)),
            **{k: config_field(data, k, d, "", int) for k in d},
            raw=data,
        )


def _split_mrope(text: Mapping[str, Any],
                 outer: Mapping[str, Any]) -> tuple[dict[str, Any], tuple[int, ...]]:
    """Take the M-RoPE sections out of the rope settings.

    Qwen2-VL spells them ``rope_scaling = {"type": "mrope", "mrope_section": ...}``
    (transformers 4, possibly at the top level) or
    ``rope_parameters = {"rope_type": "default", "mrope_section": ...}``
    (transformers 5). What is left is plain RoPE for :class:`TextConfig`.

    Returns:
        The text mapping with plain rope settings, and the (t, h, w) sections.
    """
    rope = dict(text.get("rope_parameters") or text.get("rope_scaling")
                or outer.get("rope_scaling") or {})
    section = rope.pop("mrope_section", QWEN2VL_MROPE_DEFAULT)
    if not isinstance(section, (list, tuple)) or not all(
            isinstance(x, int) and not isinstance(x, bool) for x in section):
        raise ConversionError(f"config.json: mrope_section must be a list of ints, got "
                              f"{section!r}.")
    section = tuple(section)
    if len(section) == 4 and section[3] == 0:
        section = section[:3]
    kind = rope.pop("rope_type", rope.pop("type", "default"))
    theta = rope.pop("rope_theta", text.get("rope_theta", outer.get("rope_theta")))
    plain = {"rope_type": "default" if kind in ("mrope", None) else kind, **rope}
    if theta is not None:
        plain["rope_theta"] = theta
    return {**text, "rope_parameters": plain, "rope_scaling": None}, section


def read_config_json(folder: Path) -> dict[str, Any]:
    """Load ``folder/config.json``.

    Args:
        folder: Checkpoint folder.

    Returns:
        The decoded JSON object.

    Raises:
        ConversionError: the file is missing or not a JSON object.
    """
    path = Path(folder) / CONFIG_FILE
    if not path.is_file():
        raise ConversionError(f"{folder} has no {CONFIG_FILE}; point the converter at a "
                              "Hugging Face model folder (the one holding config.json).")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ConversionError(f"{path} is not valid JSON ({exc}).") from exc
    if not isinstance(data, dict):
        raise ConversionError(f"{path} must contain a JSON object.")
    return data
