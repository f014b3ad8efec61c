"""Quantisation type table, a wrapper around llama.cpp's own quantiser, and ggml's row quantiser.

F32/F16/BF16 are written directly by the converter; the integer types go
through ``llama_model_quantize`` (so files match what llama.cpp's
``llama-quantize`` would produce) from a lossless intermediate GGUF. A family
whose architecture llama.cpp cannot load (mllama) writes them itself, the
K-quant types with ggml's own row quantiser (:func:`quantize_rows`).
"""

from __future__ import annotations

import ctypes
import functools
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from ctypes import c_bool, c_int, c_int64, c_size_t, c_void_p
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

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


#: ggml's quantiser (ggml.h of the pinned llama.cpp): name -> (restype, argtypes).
_QUANTISER_SIGNATURES: dict[str, tuple[Any, list[Any]]] = {
    # (type, const float * src, void * dst, int64 start, int64 nrows, int64 n_per_row, const float * imatrix)
    "ggml_quantize_chunk": (c_size_t, [c_int, c_void_p, c_void_p, c_int64, c_int64, c_int64, c_void_p]),
    "ggml_row_size": (c_size_t, [c_int, c_int64]),
    "ggml_blck_size": (c_int64, [c_int]),
    "ggml_quantize_requires_imatrix": (c_bool, [c_int]),
}
#: f32 input per quantiser call: a big matrix is quantised in row chunks of about this size.
CHUNK_BYTES = 8 << 20


@functools.lru_cache(maxsize=1)
def _quantiser() -> dict[str, Any]:
    """ggml's quantiser functions, bound on the libggml-base handle :func:`edgevlm.native.ggml_library` opened.

    ``handle[name]`` makes function objects of their own, so these signatures never touch
    the ones :mod:`edgevlm.kernels.ggml` sets on the same library.
    """
    handle = native.ggml_library("base")
    bound = {}
    for name, (restype, argtypes) in _QUANTISER_SIGNATURES.items():
        try:
            fn = handle[name]
        except AttributeError as exc:
            raise RuntimeFailure(f"{name} is missing from libggml-base; the converter needs the ggml "
                                 "shipped with llama-cpp-python 0.3.36 (reinstall it).") from exc
        fn.restype, fn.argtypes = restype, argtypes
        bound[name] = fn
    return bound


def quantize_rows(array: np.ndarray, ggml_type: str, nthread: int | None = None) -> np.ndarray:
    """Quantise the rows (last axis) of ``array`` with ggml's own quantiser (``ggml_quantize_chunk``).

    The rows go through in chunks of about :data:`CHUNK_BYTES` (in ``nthread`` threads; ctypes
    releases the GIL), each converted to float32 on its own, so a large matrix never
    needs a second full float32 copy. No importance matrix is used, as llama.cpp without one.

    Args:
        array: float data, any shape; rows are its last axis (ggml's ``ne[0]``).
        ggml_type: a ``gguf.GGMLQuantizationType`` name ggml quantises without an
            importance matrix (``"Q4_K"``, ``"Q6_K"``, ``"Q5_0"``...).
        nthread: worker threads; defaults to ``os.cpu_count()``.

    Returns:
        ``uint8`` array of shape ``array.shape[:-1] + (row bytes,)``: the GGUF payload.

    Raises:
        ConversionError: rows are not whole blocks of the type, or the type needs an imatrix.
        RuntimeFailure: ggml's quantiser cannot be loaded or wrote an unexpected size.
    """
    import gguf

    q = _quantiser()
    qtype = int(gguf.GGMLQuantizationType[ggml_type])
    n_per_row = int(array.shape[-1])
    if n_per_row % q["ggml_blck_size"](qtype) or q["ggml_quantize_requires_imatrix"](qtype):
        raise ConversionError(f"rows of length {n_per_row} cannot be stored as {ggml_type} without an "
                              "importance matrix; choose another type.")
    rows = array.reshape(-1, n_per_row)
    row_size = q["ggml_row_size"](qtype, n_per_row)
    out = np.empty((rows.shape[0], row_size), dtype=np.uint8)
    step = max(1, CHUNK_BYTES // (4 * n_per_row))

    def run(start: int) -> None:
        chunk = np.ascontiguousarray(rows[start:start + step], dtype=np.float32)
        written = q["ggml_quantize_chunk"](qtype, chunk.ctypes.data, out[start:].ctypes.data, 0,
                                           chunk.shape[0], n_per_row, None)
        if written != chunk.shape[0] * row_size:
            raise RuntimeFailure(f"ggml's {ggml_type} quantiser wrote {written} bytes for "
                                 f"{chunk.shape[0]} rows of {n_per_row}, not {chunk.shape[0] * row_size}.")

    starts = range(0, rows.shape[0], step)
    workers = max(1, min(nthread or os.cpu_count() or 1, len(starts)))
    with ThreadPoolExecutor(max_workers=workers) as pool:
        list(pool.map(run, starts))
    return out.reshape(*array.shape[:-1], row_size)
