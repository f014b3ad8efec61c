"""GGUF keys, enums and file-naming conventions edgevlm adds.

Keys llama.cpp already defines are used through the ``gguf`` package's
``Keys`` tables; what edgevlm invents lives here, namespaced ``edgevlm.*``.
"""

from __future__ import annotations

# --- keys edgevlm writes into the files it produces ------------------------
KEY_EDGEVLM_VERSION = "edgevlm.version"            # str: edgevlm version that wrote the file
KEY_SOURCE_ARCHITECTURE = "edgevlm.source.architecture"  # str: config.json architectures[0]
KEY_PROMPT_FAMILY = "edgevlm.prompt.family"         # str: a key of edgevlm.prompt.FAMILIES
KEY_VISION_FEATURE_LAYER = "edgevlm.vision.feature_layer"  # int: HF vision_feature_layer (as given)
KEY_VISION_SELECT_STRATEGY = "edgevlm.vision.select_strategy"  # str: "default" (drop CLS) | "full"
KEY_VISION_ACTIVATION = "edgevlm.vision.activation"  # str: HF hidden_act of the tower
KEY_PROJECTOR_ACTIVATION = "edgevlm.projector.activation"  # str: HF projector_hidden_act

# --- file naming inside a converted model folder -----------------------------
MMPROJ_PREFIX = "mmproj-"          # projector files start with this (llama.cpp convention)
GGUF_SUFFIX = ".gguf"

# --- quantisation names accepted by `edgevlm convert` -----------------------
LLM_QUANT_TYPES = ("f32", "f16", "bf16", "q8_0", "q6_k", "q5_k_m", "q4_k_m", "q4_0")
VISION_QUANT_TYPES = ("f32", "f16", "q8_0")
