"""edgevlm.convert: Hugging Face checkpoints -> GGUF (LLM + vision projector).

Importing this package is cheap: numpy, gguf, sentencepiece and llama_cpp are
imported only when a conversion runs.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__all__ = ["ARCHITECTURES", "ConversionResult", "Converter", "ConverterOption", "convert",
           "detect_architecture", "family_options", "register", "supported_architectures"]

_LAZY = {
    "ConversionResult": "api", "convert": "api", "ARCHITECTURES": "base", "Converter": "base",
    "detect_architecture": "base", "register": "base", "supported_architectures": "base",
    "ConverterOption": "base", "family_options": "base",
}

if TYPE_CHECKING:
    from .api import ConversionResult, convert
    from .base import (ARCHITECTURES, Converter, ConverterOption, detect_architecture,
                       family_options, register, supported_architectures)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        module = importlib.import_module(f"{__name__}.{_LAZY[name]}")
        return getattr(module, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
