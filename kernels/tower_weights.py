"""How a tower's weights are stored on the backend: matrix type and buffer placement.

Three CPU speed-ups, decided at load:

* **bf16 matrices.** Where ggml's CPU backend has AVX512-BF16 dot products,
  f16 matrices converted to bf16 at load run the tower's matrix products
  faster (measured numbers in the README "Vision engines" section). Only
  the matrices the graphs use as ``mul_mat`` weights change type; norms,
  biases, embeddings and the patch-embedding kernel keep the file's type.
* **Q8_0 matrices on AMX.** Where ggml's AMX buffer type is offered and
  usable (an Intel CPU with AMX and a build that runs it: see
  :mod:`edgevlm.amx_guard`), f16 matrices quantised to Q8_0 at load run on
  its int8 tile kernels, 2-3x faster than bf16 on AVX-512 (README "Fit the
  machine"); the per-token cosine against the f16 tower stays >= 0.999.
* **Repacked matrices.** Those same matrices go into the CPU device's extra
  buffer type (ggml's ``CPU_REPACK``, KleidiAI, AMX) when ggml accepts them
  there, as llama.cpp's loader does (:class:`edgevlm.kernels.graph.Weights`).
  Which types ggml repacks depends on the CPU: on x86 with AVX2 Q4_0, Q4_K,
  IQ4_NL, ... but not Q8_0; on ARM with dot-product instructions Q8_0 too.
"""

from __future__ import annotations

import logging
import math
import os
import re
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from edgevlm.errors import InvalidRequestError

from . import ggml
from .backend import Backend, BufferType
from .graph import RawTensor, Weights

LOG = logging.getLogger("edgevlm.kernels")

#: The tensors the tower graphs use only as ``mul_mat`` weights (source: kernels/vision.py
#: ``_layer_params`` / the LLaVA MLP ``mm.N`` / the OmniFusion adapter ``adapter.*``).
MATMUL_WEIGHT = re.compile(
    r"^(v\.blk\.\d+\.(attn_q|attn_k|attn_v|attn_out|ffn_up|ffn_down)"
    r"|mm\.\d+"
    r"|adapter\.(attn_q|attn_k|attn_v|attn_out|ffn_up|ffn_down|proj))\.weight$")

WEIGHT_TYPES = ("auto", "as-file", "bf16", "q8_0")
QK8_0, Q8_0_BLOCK_BYTES = 32, 34  # ggml's Q8_0: 32 int8 values and one f16 scale per block
_CONVERTIBLE = {ggml.GGML_TYPE_F32: "f32", ggml.GGML_TYPE_F16: "f16"}


def matmul_weights(tensors: Mapping[str, RawTensor]) -> set[str]:
    """Names of the 2-D matrices used only as ``mul_mat`` weights."""
    return {name for name, raw in tensors.items() if MATMUL_WEIGHT.match(name) and len(raw.ne) == 2}


@dataclass(frozen=True)
class WeightChoice:
    """The matrix type chosen for a tower, and why (logged at load)."""

    weight_type: str  # "as-file" | "bf16" | "q8_0"
    reason: str


def choose_weight_type(requested: str, tensors: Mapping[str, RawTensor], backend: Backend,
                       extra: Sequence[BufferType] = (), matrices: set[str] | None = None) -> WeightChoice:
    """Decide the tower's matrix type.

    ``"auto"`` changes only f16 matrices on the CPU (f32 files are kept exact:
    their owner asked for f32; quantised and bf16 files are kept as they are):
    to Q8_0 when ``extra`` holds ggml's AMX buffer type (its int8 tile kernels
    are the fastest CPU path there), else to bf16 when ggml's CPU backend has
    AVX512-BF16.

    Args:
        requested: "auto", "as-file", "bf16" or "q8_0" (the last two convert f32/f16 matrices on any device).
        tensors: the tower's device tensors.
        backend: where the tower runs.
        extra: the extra buffer types the weights may use (``Backend.extra_buffer_types``).
        matrices: the names of the ``mul_mat`` matrices (default: :func:`matmul_weights`).

    Returns:
        The choice with its reason.

    Raises:
        InvalidRequestError: an unknown ``requested`` value.
    """
    if requested not in WEIGHT_TYPES:
        raise InvalidRequestError(f"weight_type must be one of {', '.join(WEIGHT_TYPES)}, not {requested!r}")
    types = {tensors[name].ggml_type for name in (matmul_weights(tensors) if matrices is None else matrices)}
    file_types = _type_names(types)
    if requested == "as-file":
        return WeightChoice("as-file", f"as requested (file matrices {file_types})")
    if requested in ("bf16", "q8_0"):
        if not types <= set(_CONVERTIBLE):
            return WeightChoice("as-file", f"{requested} requested, but the file's matrices are {file_types} "
                                           "(only f32/f16 are converted)")
        return WeightChoice(requested, f"as requested (file matrices {file_types})")
    if not backend.is_cpu:
        return WeightChoice("as-file", f"{backend.name} is not the CPU")
    return auto_weight_type(types, amx=any(b.name == "AMX" for b in extra),
                            avx512_bf16=bool(backend.g.ggml_cpu_has_avx512_bf16()))


def _type_names(types: set[int]) -> str:
    """``"f16"``, ``"f16/q8_0"``, ... (``"none"`` for no types)."""
    return "/".join(sorted(ggml.lib().ggml_type_name(t).decode() for t in types)) or "none"


def auto_weight_type(file_types: set[int], *, amx: bool, avx512_bf16: bool) -> WeightChoice:
    """``"auto"``'s rule on the CPU (also what the memory planner prices).

    Args:
        file_types: the ggml types of the file's ``mul_mat`` matrices.
        amx: ggml's AMX buffer type is offered for the weights (and usable: the AMX guard is off).
        avx512_bf16: ggml's CPU backend has AVX512-BF16 dot products.
    """
    if file_types != {ggml.GGML_TYPE_F16}:  # (naming the types loads ggml: only where they are shown)
        names = _type_names(file_types)
        return WeightChoice("as-file", f"the file's matrices are {names} (auto converts f16 only)")
    if amx:
        return WeightChoice("q8_0", "f16 matrices and ggml's AMX int8 tile kernels (quantised to Q8_0 at load)")
    if not avx512_bf16:
        return WeightChoice("as-file", "ggml's CPU backend has no AVX512-BF16 here")
    return WeightChoice("bf16", "f16 matrices and a CPU with AVX512-BF16 dot products")


def loaded_matrix_bytes(ne: tuple[int, ...], file_type: int, choice: WeightChoice) -> int:
    """Bytes a ``mul_mat`` matrix of shape ``ne`` takes once loaded under ``choice`` (see :func:`apply_weight_type`)."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    target = file_type
    if file_type in _CONVERTIBLE and choice.weight_type == "bf16":
        target = ggml.GGML_TYPE_BF16
    elif file_type in _CONVERTIBLE and choice.weight_type == "q8_0" and ne[0] % QK8_0 == 0:
        target = ggml.GGML_TYPE_Q8_0
    block, size = GGML_QUANT_SIZES[GGMLQuantizationType(target)]
    return math.prod(ne) // block * size


_CHUNK = 1 << 20  # elements per f16 -> f32 step: a small reused scratch instead of an f32 copy


def to_bf16(raw: RawTensor) -> RawTensor:
    """An f32/f16 tensor as bf16 (ggml-cpu's vectorised conversions; round to nearest even)."""
    return RawTensor(ggml.GGML_TYPE_BF16, raw.ne, bf16_bytes(raw.data))


def lazy_bf16(raw: RawTensor) -> RawTensor:
    """:func:`to_bf16`, converted only when it is uploaded (see ``RawTensor.convert``)."""
    return RawTensor(ggml.GGML_TYPE_BF16, raw.ne, raw.data, convert=bf16_bytes)


def bf16_bytes(data: np.ndarray) -> np.ndarray:
    """f32 or f16 values as bf16 bit patterns (uint16), in chunks."""
    g = ggml.lib()
    src = np.ascontiguousarray(np.asarray(data).reshape(-1))
    out = np.empty(src.shape, dtype=np.uint16)
    if src.dtype == np.float16:
        scratch = np.empty(min(src.size, _CHUNK), dtype=np.float32)
        for start in range(0, src.size, _CHUNK):
            n = min(_CHUNK, src.size - start)
            g.ggml_cpu_fp16_to_fp32(src[start:].ctypes.data, scratch.ctypes.data, n)
            g.ggml_cpu_fp32_to_bf16(scratch.ctypes.data, out[start:].ctypes.data, n)
    else:
        src = np.ascontiguousarray(src, dtype=np.float32)
        g.ggml_cpu_fp32_to_bf16(src.ctypes.data, out.ctypes.data, src.size)
    return out


def lazy_q8_0(raw: RawTensor) -> RawTensor:
    """An f32/f16 matrix as Q8_0, quantised (by ggml) only when it is uploaded."""
    return RawTensor(ggml.GGML_TYPE_Q8_0, raw.ne, raw.data, convert=lambda data: q8_0_bytes(data, raw.ne[0]))


def q8_0_bytes(data: np.ndarray, row_length: int) -> np.ndarray:
    """f32 or f16 rows of ``row_length`` values as Q8_0 blocks (ggml-cpu's SIMD quantize_row_q8_0), on all cores."""
    g = ggml.lib()
    src = np.ascontiguousarray(np.asarray(data).reshape(-1))
    if src.size % row_length or row_length % QK8_0:
        raise ValueError(f"{src.size} values are not whole rows of {row_length} in 32-value blocks")
    out = np.empty(src.size // QK8_0 * Q8_0_BLOCK_BYTES, dtype=np.uint8)

    def quantise(start: int) -> None:  # Q8_0 blocks are independent: any 32-aligned chunk is a "row"
        n = min(_CHUNK, src.size - start)
        if src.dtype == np.float16:
            values = np.empty(n, dtype=np.float32)
            g.ggml_cpu_fp16_to_fp32(src[start:].ctypes.data, values.ctypes.data, n)
        else:
            values = np.ascontiguousarray(src[start:start + n], dtype=np.float32)
        g.quantize_row_q8_0(values.ctypes.data, out[start // QK8_0 * Q8_0_BLOCK_BYTES:].ctypes.data, n)

    # ctypes releases the GIL during each call: the chunks are quantised on all cores
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        list(pool.map(quantise, range(0, src.size, _CHUNK)))
    return out


_LAZY = {"bf16": lazy_bf16, "q8_0": lazy_q8_0}


def upload_tower(device: str, n_threads: int, tensors: Mapping[str, RawTensor], requested: str,
                 matrices: set[str] | None = None, *, allow_extra: bool | None = None,
                 progress: Callable[[float], None] | None = None) -> tuple[Weights, WeightChoice]:
    """A tower's device tensors on a new backend (``weights.backend``; closed again on failure),
    their matrices in the type :func:`choose_weight_type` picks.

    Args:
        device, n_threads: the backend to start (as :class:`~edgevlm.kernels.backend.Backend`).
        tensors: the device tensors as in the file.
        requested: the ``weight_type`` asked for ("auto", "as-file", "bf16", "q8_0").
        matrices: the ``mul_mat`` weights (default: :func:`matmul_weights`).
        allow_extra: the CPU's repacking buffer types for the matrices (as
            :meth:`~edgevlm.kernels.backend.Backend.extra_buffer_types`; None: unless the AMX guard is on).
        progress: as in :class:`~edgevlm.kernels.graph.Weights` (raising stops the upload).

    Returns:
        The uploaded weights and the choice, with its reason.

    Raises:
        InvalidRequestError: an unknown ``requested`` value.
        KernelsUnavailableError: no such device, or a buffer could not be allocated.
    """
    backend = Backend(device, n_threads=n_threads)
    try:
        extra = backend.extra_buffer_types(allow_extra)
        choice = choose_weight_type(requested, tensors, backend, extra, matrices)
        converted = apply_weight_type(tensors, choice, matrices)
        names = matmul_weights(converted) if matrices is None else matrices
        return Weights(backend, converted, matmul=names, extra=extra, progress=progress), choice
    except BaseException:
        backend.close()
        raise


def apply_weight_type(tensors: Mapping[str, RawTensor], choice: WeightChoice,
                      matrices: set[str] | None = None) -> dict[str, RawTensor]:
    """``tensors`` with the matrices converted as ``choice`` says (others unchanged).

    ``matrices``: the names that may change (default: :func:`matmul_weights`). Q8_0 converts only
    matrices whose rows are whole 32-value blocks; the others keep the file's type.
    """
    lazy = _LAZY.get(choice.weight_type)
    if lazy is None:
        return dict(tensors)
    names = matmul_weights(tensors) if matrices is None else matrices
    convert = {name for name in names if tensors[name].ggml_type in _CONVERTIBLE
               and (choice.weight_type != "q8_0" or tensors[name].ne[0] % QK8_0 == 0)}
    return {name: lazy(raw) if name in convert else raw for name, raw in tensors.items()}
