"""Quantisation type table and a wrapper around llama.cpp's own quantiser.

F32/F16/BF16 are written directly by the converter; the integer types go
through ``llama_model_quantize`` (so files match what llama.cpp's
``llama-quantize`` would produce) from a lossless intermediate GGUF.
"""

from __future__ import annotations

import ctypes
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from edgevlm import native

from edgevlm.constants import LLM_QUANT_TYPES, VISION_QUANT_TYPES
from edgevlm.errors import ConversionError, RuntimeFailure


@dataclass(frozen=True)
class QuantType:
    """One ``--quant`` choice.

    Attributes:
        name: The user-facing name (``"q4_k_m"``).
        label: Upper-case label used in file names (``"Q4_K_M"``).
        ftype_attr: ``llama_cpp.LLAMA_FTYPE_*`` constant name.
        direct: Written by the converter itself (no llama.cpp quantisation pass).
        block: Row-length multiple the main ggml type needs (1 for float types).
        fallback: What llama.cpp uses instead when a row does not fit ``block``.
    """

    name: str
    label: str
    ftype_attr: str
    direct: bool
    block: int
    fallback: str


QUANT_TYPES: dict[str, QuantType] = {q.name: q for q in (
    QuantType("f32", "F32", "LLAMA_FTYPE_ALL_F32", True, 1, ""),
    QuantType("f16", "F16", "LLAMA_FTYPE_MOSTLY_F16", True, 1, ""),
    QuantType("bf16", "BF16", "LLAMA_FTYPE_MOSTLY_BF16", True, 1, ""),
    QuantType("q8_0", "Q8_0", "LLAMA_FTYPE_MOSTLY_Q8_0", False, 32, "F16"),
    QuantType("q6_k", "Q6_K", "LLAMA_FTYPE_MOSTLY_Q6_K", False, 256, "Q8_0"),
    QuantType("q5_k_m", "Q5_K_M", "LLAMA_FTYPE_MOSTLY_Q5_K_M", False, 256, "Q5_1/Q8_0"),
    QuantType("q4_k_m", "Q4_K_M", "LLAMA_FTYPE_MOSTLY_Q4_K_M", False, 256, "Q5_0/Q8_0"),
    QuantType("q4_0", "Q4_0", "LLAMA_FTYPE_MOSTLY_Q4_0", False, 32, "F16"),
)}
assert tuple(QUANT_TYPES) == LLM_QUANT_TYPES  # keep the table in sync with constants


def quant_type(name: str) -> QuantType:
    """Look up an LLM quantisation name (case-insensitive).

    Args:
        name: e.g. ``"q4_k_m"`` or ``"Q8_0"``.

    Returns:
        The table entry.

    Raises:
        ConversionError: unknown name; the message lists the valid ones.
    """
    entry = QUANT_TYPES.get(str(name).lower())
    if entry is None:
        raise ConversionError(f"unknown quantisation {name!r}; choose one of: "
                              f"{', '.join(LLM_QUANT_TYPES)}.")
    return entry


def vision_type(name: str) -> str:
    """Validate a ``--vision-type`` name and return it lower-cased.

    Raises:
        ConversionError: not one of ``VISION_QUANT_TYPES``.
    """
    lowered = str(name).lower()
    if lowered not in VISION_QUANT_TYPES:
        raise ConversionError(f"unknown vision type {name!r}; choose one of: "
                              f"{', '.join(VISION_QUANT_TYPES)}.")
    return lowered


def llama_quantize(src: Path, dst: Path, quant: QuantType, nthread: int | None = None,
                   on_line: Callable[[str], None] | None = None) -> None:
    """Quantise the GGUF ``src`` into ``dst`` with llama.cpp.

    The quantiser's log (a line per tensor) goes where all of llama.cpp's logs
    go (:mod:`edgevlm.native`: the ``edgevlm.llama`` logger), not to stderr.

    Args:
        src: A float GGUF written by the converter.
        dst: Output path (overwritten).
        quant: A non-direct entry of :data:`QUANT_TYPES`.
        nthread: Worker threads; defaults to ``os.cpu_count()``.
        on_line: Also receives each line llama.cpp logs meanwhile.

    Raises:
        ConversionError: ``quant`` is a float type.
        RuntimeFailure: llama.cpp reported an error, or llama-cpp-python cannot be loaded.
    """
    if quant.direct:
        raise ConversionError(f"{quant.name} is written directly, not quantised.")
    lib = native.llama()  # installs the log routing first
    params = lib.llama_model_quantize_default_params()
    params.ftype = getattr(lib, quant.ftype_attr)
    params.nthread = nthread or os.cpu_count() or 1
    with native.log_lines(on_line or (lambda _line: None)):
        status = lib.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))
    if status != 0:
        raise RuntimeFailure(f"llama.cpp failed to quantise {src.name} to {quant.label} "
                             f"(status {status}); llama.cpp's log says why "
                             "(`edgevlm --verbose convert ...`, or the edgevlm.llama logger).")
