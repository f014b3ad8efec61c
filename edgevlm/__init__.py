"""edgevlm: vision-language models on laptops, desktops, Jetson boards and Macs.

Public API::

    import edgevlm
    vlm = edgevlm.load("out/llava")
    vlm.chat(messages)
    for piece in vlm.stream(messages): ...
    edgevlm.convert.convert("path/to/llava-1.5-7b-hf", "out/llava", quant="q4_k_m")

Importing edgevlm is cheap and has no side effects: llama.cpp is loaded on
first use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from edgevlm.errors import EdgeVLMError

__version__ = "0.1.0"

__all__ = ["EdgeVLMError", "VLM", "load", "convert", "__version__"]

if TYPE_CHECKING:  # pragma: no cover
    from edgevlm import convert
    from edgevlm.api import VLM, load


def __getattr__(name: str) -> Any:
    if name in ("VLM", "load"):
        from edgevlm import api

        return getattr(api, name)
    if name == "convert":
        import importlib

        return importlib.import_module("edgevlm.convert")
    raise AttributeError(f"module 'edgevlm' has no attribute {name!r}")
