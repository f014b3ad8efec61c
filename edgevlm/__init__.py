"""edgevlm: vision-language models on laptops, desktops, Jetson boards and Macs.

Public API::

    import edgevlm
    vlm = edgevlm.load("out/llava")   # edgevlm.load(): EDGEVLM_MODEL, `edgevlm config`, else the default
    vlm.chat(messages)
    for piece in vlm.stream(messages, cancel=event): ...   # event.set() stops it
    edgevlm.load("out/llava", progress=print)   # LoadProgress events
    edgevlm.convert.convert("path/to/llava-1.5-7b-hf", "out/llava", quant="q4_k_m")
    edgevlm.doctor().problems   # is this install healthy? (no model is loaded)

Importing edgevlm is cheap and has no side effects: llama.cpp is loaded on
first use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from edgevlm.errors import EdgeVLMError

#: The package version; pyproject.toml reads it from here (``[tool.setuptools.dynamic]``).
__version__ = "0.1.0"

__all__ = ["ChoiceScores", "DiskCache", "EdgeVLMError", "LoadProgress", "LoadStage", "Reply", "TextStream",
           "UserConfig", "VLM", "image_size", "load", "load_image", "plan", "convert", "doctor", "json_grammar", "resolve_model_name",
           "__version__"]

_LAZY = {"VLM": "edgevlm.api", "load": "edgevlm.api", "plan": "edgevlm.api", "DiskCache": "edgevlm.disk_cache",
         "Reply": "edgevlm.stats", "ChoiceScores": "edgevlm.scoring", "TextStream": "edgevlm.generation",
         "load_image": "edgevlm.vision.images", "image_size": "edgevlm.vision.images", "doctor": "edgevlm.health",
         "UserConfig": "edgevlm.user_config", "resolve_model_name": "edgevlm.user_config",
         "LoadProgress": "edgevlm.progress", "LoadStage": "edgevlm.progress", "json_grammar": "edgevlm.grammars"}

if TYPE_CHECKING:  # pragma: no cover
    from edgevlm import convert
    from edgevlm.api import VLM, load, plan
    from edgevlm.disk_cache import DiskCache
    from edgevlm.generation import TextStream
    from edgevlm.grammars import json_grammar
    from edgevlm.health import doctor
    from edgevlm.progress import LoadProgress, LoadStage
    from edgevlm.scoring import ChoiceScores
    from edgevlm.stats import Reply
    from edgevlm.user_config import UserConfig, resolve_model_name
    from edgevlm.vision.images import image_size, load_image


def __getattr__(name: str) -> Any:
    import importlib

    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    if name == "convert":
        return importlib.import_module("edgevlm.convert")
    raise AttributeError(f"module 'edgevlm' has no attribute {name!r}")
