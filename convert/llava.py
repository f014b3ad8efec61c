"""LLaVA-1.5 (llava-hf ``LlavaForConditionalGeneration``) converter.

Text model: Llama / Vicuna / Mistral-style Llama weights -> llama GGUF.
Vision: CLIP (CLS token, ``vision_feature_select_strategy="default"``) or
SigLIP (no CLS, ``"full"``) tower plus the 2-layer GELU MLP projector -> clip
GGUF with ``clip.projector_type = "mlp"``. Both transformers 4 and 5 tensor
names are accepted.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from edgevlm import constants
from edgevlm.errors import UnsupportedModelError

from .base import Converter, register
from .config import LlavaConfig
from .llm_writer import llama_tensor_specs, write_llama_hparams
from .projector_writer import (CLIP_MEAN, CLIP_STD, check_projector_shapes, feature_layer_count,
                               mlp_projector_specs, vision_tower_specs, write_clip_hparams)
from .tensors import TensorSpec
from .tokenizer import write_vocab

SIGLIP_MEAN = SIGLIP_STD = (0.5, 0.5, 0.5)
_SUPPORTED_TEXT = ("llama", "mistral")


@register("LlavaForConditionalGeneration")
class LlavaConverter(Converter):
    """LLaVA-1.5: Llama text model, CLIP/SigLIP tower, 2-layer MLP projector."""

    prompt_family = "llava-1.5"
    text_prefixes = (("model.language_model.", "model."), ("language_model.model.", "model."),
                     ("language_model.lm_head.", "lm_head."), ("lm_head.", "lm_head."))
    vision_prefixes = (("model.vision_tower.vision_model.", ""), ("model.vision_tower.", ""),
                       ("vision_tower.vision_model.", ""), ("vision_tower.", ""))
    projector_prefixes = (("model.multi_modal_projector.", ""), ("multi_modal_projector.", ""))
    config_class = LlavaConfig
    config: LlavaConfig

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
    def llm_tensors(self, ggml_type: str) -> list[TensorSpec]:
        """Plan the llama tensors (tied embeddings: no ``output.weight``)."""
        return llama_tensor_specs(self.text_names, self.reader, self.config.text, ggml_type)

    def write_llm_metadata(self, writer: Any) -> None:
        """Write llama hparams, vocabulary and edgevlm keys."""
        name = self.folder.name
        writer.add_name(name)
        write_llama_hparams(writer, self.config.text, self.vocab_rows())
        write_vocab(writer, self.folder, self.vocab_rows(), self.log)
        self.write_edgevlm_keys(writer)

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
        check_projector_shapes(specs, expected)

    def image_normalisation(self) -> tuple[list[float], list[float]]:
        """Return (mean, std) from the processor config, or the tower's defaults."""
        found = self.processor_normalisation()
        if found is not None:
            return found
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
        self.write_edgevlm_keys(writer)
        writer.add_int32(constants.KEY_VISION_FEATURE_LAYER, int(cfg.vision_feature_layer))
        writer.add_string(constants.KEY_VISION_SELECT_STRATEGY,
                          cfg.vision_feature_select_strategy)
        writer.add_string(constants.KEY_VISION_ACTIVATION, cfg.vision.hidden_act)
        writer.add_string(constants.KEY_PROJECTOR_ACTIVATION, cfg.projector_hidden_act)
