"""LLaVA-1.5 (llava-hf ``LlavaForConditionalGeneration``) converter.

Text model: Llama / Vicuna / Mistral-style Llama weights -> llama GGUF.
Vision: CLIP (CLS token, ``vision_feature_select_strategy="default"``) or
SigLIP (no CLS, ``"full"``) tower plus the 2-layer GELU MLP projector -> clip
GGUF with ``clip.projector_type = "mlp"``. Both transformers 4 and 5 tensor
names are accepted.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from edgevlm import constants
from edgevlm.errors import ConversionError, UnsupportedModelError

from .base import Converter, register
from .config import LlavaConfig
from .llm_writer import llama_tensor_specs, write_llama_hparams
from .projector_writer import (feature_layer_count, mlp_projector_specs, vision_tower_specs,
                               write_clip_hparams)
from .tensors import TensorSpec
from .tokenizer import write_vocab

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
SIGLIP_MEAN = SIGLIP_STD = (0.5, 0.5, 0.5)
_SUPPORTED_TEXT = ("llama", "mistral")


def _edgevlm_version() -> str:
    try:
        from importlib.metadata import version
        return version("edgevlm")
    except Exception:  # noqa: BLE001 - metadata missing in odd installs
        return "0+unknown"


@register("LlavaForConditionalGeneration")
class LlavaConverter(Converter):
    """LLaVA-1.5: Llama text model, CLIP/SigLIP tower, 2-layer MLP projector."""

    prompt_family = "llava-1.5"
    text_prefixes = (("model.language_model.", "model."), ("language_model.model.", "model."),
                     ("language_model.lm_head.", "lm_head."), ("lm_head.", "lm_head."))
    vision_prefixes = (("model.vision_tower.vision_model.", ""), ("model.vision_tower.", ""),
                       ("vision_tower.vision_model.", ""), ("vision_tower.", ""))
    projector_prefixes = (("model.multi_modal_projector.", ""), ("multi_modal_projector.", ""))
    config: LlavaConfig

    def load_config(self, data: Mapping[str, Any]) -> LlavaConfig:
        """Parse ``config.json`` as a :class:`LlavaConfig`."""
        return LlavaConfig.from_dict(data)

    def validate(self) -> None:
        """Reject variants the llava MLP graph of llama.cpp cannot run.

        Raises:
            UnsupportedModelError: list feature layers, unsupported text model,
                ``default`` strategy without a CLS token.
        """
        cfg = self.config
        if not isinstance(cfg.vision_feature_layer, int):
            raise UnsupportedModelError(
                f"vision_feature_layer={list(cfg.vision_feature_layer)} (several feature layers) "
                "is not supported yet; only a single int is.")
        if cfg.text.model_type not in _SUPPORTED_TEXT:
            raise UnsupportedModelError(
                f"text_config.model_type {cfg.text.model_type!r} is not supported; "
                f"supported: {', '.join(_SUPPORTED_TEXT)}.")
        if cfg.vision_feature_select_strategy == "default" and not cfg.vision.has_cls_token:
            raise UnsupportedModelError(
                "vision_feature_select_strategy 'default' drops a CLS token, but the "
                f"{cfg.vision.model_type} tower has none; use 'full'.")
        if cfg.vision_feature_select_strategy == "full" and cfg.vision.has_cls_token:
            raise UnsupportedModelError(
                "vision_feature_select_strategy 'full' keeps the CLS token, which llama.cpp's "
                "llava graph always drops.")
        self.n_vision_layers = feature_layer_count(cfg.vision, cfg.vision_feature_layer)
        if cfg.projector_hidden_act != "gelu":
            raise UnsupportedModelError(f"projector_hidden_act {cfg.projector_hidden_act!r} "
                                        "is not supported (llama.cpp's mlp projector uses gelu).")

    # --- LLM ---------------------------------------------------------------
    def vocab_rows(self) -> int:
        """Rows of the token embedding matrix."""
        return self.reader.shape(self.source(self.text_names, "model.embed_tokens.weight"))[0]

    def llm_tensors(self, ggml_type: str) -> list[TensorSpec]:
        """Plan the llama tensors (tied embeddings: no ``output.weight``)."""
        return llama_tensor_specs(self.text_names, self.reader, self.config.text, ggml_type)

    def write_llm_metadata(self, writer: Any) -> None:
        """Write llama hparams, vocabulary and edgevlm keys."""
        name = self.folder.name
        writer.add_name(name)
        write_llama_hparams(writer, self.config.text, self.vocab_rows())
        write_vocab(writer, self.folder, self.vocab_rows(), self.log)
        self._write_edgevlm_keys(writer)

    def _write_edgevlm_keys(self, writer: Any) -> None:
        writer.add_string(constants.KEY_EDGEVLM_VERSION, _edgevlm_version())
        writer.add_string(constants.KEY_SOURCE_ARCHITECTURE, self.config.architecture)
        writer.add_string(constants.KEY_PROMPT_FAMILY, self.prompt_family)

    # --- projector -----------------------------------------------------------
    def projector_tensors(self, vision_type: str) -> list[TensorSpec]:
        """Plan tower (first ``n_vision_layers`` blocks) + MLP projector tensors."""
        specs = vision_tower_specs(self.vision_names, self.reader, self.n_vision_layers,
                                   vision_type)
        specs += mlp_projector_specs(self.projector_names, self.reader, vision_type)
        self._check_projector_shapes({s.name: s for s in specs})
        return specs

    def _check_projector_shapes(self, specs: Mapping[str, TensorSpec]) -> None:
        v, width = self.config.vision, self.config.text.hidden_size
        n_pos = v.n_patches + (1 if v.has_cls_token else 0)
        expected = {
            "v.patch_embd.weight": (v.hidden_size, v.num_channels, v.patch_size, v.patch_size),
            "v.position_embd.weight": (n_pos, v.hidden_size),
            "mm.0.weight": (width, v.hidden_size),
            "mm.2.weight": (width, width),
        }
        if v.has_cls_token:
            expected["v.class_embd"] = (v.hidden_size,)
        for i in range(self.n_vision_layers):
            expected[f"v.blk.{i}.attn_q.weight"] = (v.hidden_size, v.hidden_size)
            expected[f"v.blk.{i}.ffn_up.weight"] = (v.intermediate_size, v.hidden_size)
        for name, shape in expected.items():
            if name not in specs:
                raise ConversionError(f"vision tensor for {name!r} is missing from the "
                                      "checkpoint; the download may be incomplete.")
            if specs[name].shape != shape:
                raise ConversionError(
                    f"tensor {specs[name].source!r} has shape {list(specs[name].shape)} but "
                    f"config.json implies {list(shape)}.")

    def image_normalisation(self) -> tuple[list[float], list[float]]:
        """Return (mean, std) from the processor config, or the tower's defaults."""
        for file, key in (("preprocessor_config.json", None),
                          ("processor_config.json", "image_processor")):
            path = self.folder / file
            if path.is_file():
                data = json.loads(path.read_text(encoding="utf-8"))
                data = data.get(key, {}) if key else data
                if "image_mean" in data and "image_std" in data:
                    return list(data["image_mean"]), list(data["image_std"])
        if self.config.vision.has_cls_token:
            return list(CLIP_MEAN), list(CLIP_STD)
        return list(SIGLIP_MEAN), list(SIGLIP_STD)

    def write_projector_metadata(self, writer: Any) -> None:
        """Write ``clip.*`` keys and edgevlm vision keys."""
        cfg = self.config
        mean, std = self.image_normalisation()
        writer.add_name(f"mmproj-{self.folder.name}")
        write_clip_hparams(writer, cfg.vision, n_layers=self.n_vision_layers,
                           projection_dim=cfg.text.hidden_size, image_mean=mean, image_std=std)
        self._write_edgevlm_keys(writer)
        writer.add_int32(constants.KEY_VISION_FEATURE_LAYER, int(cfg.vision_feature_layer))
        writer.add_string(constants.KEY_VISION_SELECT_STRATEGY,
                          cfg.vision_feature_select_strategy)
        writer.add_string(constants.KEY_VISION_ACTIVATION, cfg.vision.hidden_act)
        writer.add_string(constants.KEY_PROJECTOR_ACTIVATION, cfg.projector_hidden_act)
