"""How a tower's weights are stored on the backend: matrix type and buffer placement.

Two CPU speed-ups, both decided at load:

* **bf16 matrices.** Where ggml's CPU backend has AVX512-BF16 dot products,
  f16 matrices converted to bf16 at load run the tower's matrix products
  faster (measured numbers in the README "Vision engines" section). Only
  the matrices the graphs use as ``mul_mat`` weights change type; norms,
  biases, embeddings and the patch-embedding kernel keep the file's type.
* **Repacked matrices.** Those same matrices go into the CPU device's extra
  buffer type (ggml's ``CPU_REPACK``, KleidiAI, AMX) when ggml accepts them
  there, as llama.cpp's loader does (:class:`edgevlm.kernels.graph.Weights`).
  Which types ggml repacks depends on the CPU: on x86 with AVX2 Q4_0, Q4_K,
  IQ4_NL, ... but not Q8_0; on ARM with dot-product instructions Q8_0 too.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from edgevlm.errors import InvalidRequestError

from . import ggml
from .backend import Backend
from .graph import RawTensor

LOG = logging.getLogger("edgevlm.kernels")

#: The tensors the tower graphs use only as ``mul_mat`` weights (source: kernels/vision.py
#: ``_layer_params`` / the LLaVA MLP ``mm.N`` / the OmniFusion adapter ``adapter.*``).
MATMUL_WEIGHT = re.compile(
    r"^(v\.blk\.\d+\.(attn_q|attn_k|attn_v|attn_out|ffn_up|ffn_down)"
    r"|mm\.\d+"
    r"|adapter\.(attn_q|attn_k|attn_v|attn_out|ffn_up|ffn_down|proj))\.weight$")

WEIGHT_TYPES = ("auto", "as-file", "bf16")
_CONVERTIBLE = {ggml.GGML_TYPE_F32: "f32", ggml.GGML_TYPE_F16: "f16"}


def matmul_weights(tensors: Mapping[str, RawTensor]) -> set[str]:
    """Names of the 2-D matrices used only as ``mul_mat`` weights."""
    return {name for name, raw in tensors.items() if MATMUL_WEIGHT.match(name) and len(raw.ne) == 2}


@dataclass(frozen=True)
class WeightChoice:
    """The matrix type chosen for a tower, and why (logged at load)."""

    weight_type: str  # "as-file" | "bf16"
    reason: str


def choose_weight_type(requested: str, tensors: Mapping[str, RawTensor], backend: Backend) -> WeightChoice:
    """Decide the tower's matrix type.

    ``"auto"`` converts to bf16 only when all of these hold: the tower runs on
    the CPU, ggml's CPU backend has AVX512-BF16, and the file's matrices are
    f16 (f32 files are kept exact: their owner asked for f32; quantised and
    bf16 files are kept as they are).

    Args:
        requested: "auto", "as-file" or "bf16" ("bf16" converts f32/f16 matrices on any device).
        tensors: the tower's device tensors.
        backend: where the tower runs.

    Returns:
        The choice with its reason.

    Raises:
        InvalidRequestError: an unknown ``requested`` value.
    """
    if requested not in WEIGHT_TYPES:
        raise InvalidRequestError(f"weight_type must be one of {', '.join(WEIGHT_TYPES)}, not {requested!r}")
    types = {tensors[name].ggml_type for name in matmul_weights(tensors)}
    names = sorted(ggml.lib().ggml_type_name(t).decode() for t in types)
    file_types = "/".join(names) or "none"
    if requested == "as-file":
        return WeightChoice("as-file", f"as requested (file matrices {file_types})")
    if requested == "bf16":
        if not types <= set(_CONVERTIBLE):
            return WeightChoice("as-file", f"bf16 requested, but the file's matrices are {file_types} "
                                           "(only f32/f16 are converted)")
        return WeightChoice("bf16", f"as requested (file matrices {file_types})")
    if not backend.is_cpu:
        return WeightChoice("as-file", f"{backend.name} is not the CPU")
    if not backend.g.ggml_cpu_has_avx512_bf16():
        return WeightChoice("as-file", "ggml's CPU backend has no AVX512-BF16 here")
    if types != {ggml.GGML_TYPE_F16}:
        return WeightChoice("as-file", f"the file's matrices are {file_types} (auto converts f16 only)")
    return WeightChoice("bf16", "f16 matrices and a CPU with AVX512-BF16 dot products")


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


def apply_weight_type(tensors: Mapping[str, RawTensor], choice: WeightChoice) -> dict[str, RawTensor]:
    """``tensors`` with the matrices converted as ``choice`` says (others unchanged)."""
    if choice.weight_type != "bf16":
        return dict(tensors)
    convert = {name for name in matmul_weights(tensors) if tensors[name].ggml_type in _CONVERTIBLE}
    return {name: lazy_bf16(raw) if name in convert else raw for name, raw in tensors.items()}
