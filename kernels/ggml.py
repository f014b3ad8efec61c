"""ctypes bindings to the ggml libraries that llama-cpp-python ships.

Only what :mod:`edgevlm.kernels` uses is bound. The libraries are the very
files llama-cpp-python loaded (``llama_cpp/lib``), opened by
:func:`edgevlm.native.ggml_library` (the converter binds ggml's quantiser from
the same handle), so ggml's backend registry (CPU always; CUDA/Metal/Vulkan
when that build has them) is shared with the LLM.

The layouts of ``struct ggml_tensor`` and ``struct ggml_init_params`` are
pinned to ggml as vendored by llama-cpp-python 0.3.36 (``ggml/include/ggml.h``).
:func:`lib` checks them against the loaded library on first use and raises
:class:`KernelsUnavailableError` on any mismatch, before a single graph is
built, so a different llama-cpp-python fails loudly instead of corrupting
memory.
"""

from __future__ import annotations

import ctypes
import threading
from ctypes import POINTER, c_bool, c_char, c_char_p, c_float, c_int, c_int32, c_int64, c_size_t, c_void_p

from edgevlm import native
from edgevlm.errors import KernelsUnavailableError, RuntimeFailure

GGML_MAX_DIMS = 4
GGML_MAX_SRC = 10
GGML_MAX_OP_PARAMS = 64
GGML_MAX_NAME = 64
GGML_OBJECT_SIZE = 32  # struct ggml_object: offs, size, next, type, padding[4]

# enum ggml_type (ggml.h)
GGML_TYPE_F32 = 0
GGML_TYPE_F16 = 1
GGML_TYPE_Q4_0 = 2
GGML_TYPE_Q8_0 = 8
GGML_TYPE_I32 = 26
GGML_TYPE_BF16 = 30

# enum ggml_backend_dev_type (ggml-backend.h)
DEV_TYPE_CPU, DEV_TYPE_GPU, DEV_TYPE_IGPU, DEV_TYPE_ACCEL = 0, 1, 2, 3

GGML_ROPE_TYPE_NEOX = 2  # rotate-half pairs (i, i + d/2), as HF's rotate_half

GGML_STATUS_SUCCESS = 0
GGML_STATUS_ABORTED = 1  # enum ggml_status (ggml.h)
GGML_PREC_F32 = 10  # enum ggml_prec


class GgmlInitParams(ctypes.Structure):
    _fields_ = [("mem_size", c_size_t), ("mem_buffer", c_void_p), ("no_alloc", c_bool)]


class GgmlTensor(ctypes.Structure):
    """``struct ggml_tensor`` (ggml.h of the pinned llama.cpp)."""

    _fields_ = [
        ("type", c_int),
        ("buffer", c_void_p),
        ("ne", c_int64 * GGML_MAX_DIMS),
        ("nb", c_size_t * GGML_MAX_DIMS),
        ("op", c_int),
        ("op_params", c_int32 * (GGML_MAX_OP_PARAMS // 4)),
        ("flags", c_int32),
        ("src", c_void_p * GGML_MAX_SRC),
        ("view_src", c_void_p),
        ("view_offs", c_size_t),
        ("data", c_void_p),
        ("name", c_char * GGML_MAX_NAME),
        ("extra", c_void_p),
        ("padding", c_char * 8),
    ]


T = POINTER(GgmlTensor)  # every ggml_tensor * in the signatures below
P = c_void_p             # opaque pointers: contexts, graphs, backends, buffers

_SIGNATURES: dict[str, tuple[str, object, list[object]]] = {
    # name: (library, restype, argtypes)
    "ggml_init": ("base", P, [GgmlInitParams]),
    "ggml_free": ("base", None, [P]),
    "ggml_tensor_overhead": ("base", c_size_t, []),
    "ggml_graph_overhead_custom": ("base", c_size_t, [c_size_t, c_bool]),
    "ggml_new_tensor_4d": ("base", T, [P, c_int, c_int64, c_int64, c_int64, c_int64]),
    "ggml_set_name": ("base", T, [T, c_char_p]),
    "ggml_get_name": ("base", c_char_p, [T]),
    "ggml_set_input": ("base", None, [T]),
    "ggml_set_output": ("base", None, [T]),
    "ggml_nbytes": ("base", c_size_t, [T]),
    "ggml_type_name": ("base", c_char_p, [c_int]),
    "ggml_add": ("base", T, [P, T, T]),
    "ggml_mul": ("base", T, [P, T, T]),
    "ggml_scale": ("base", T, [P, T, c_float]),
    "ggml_mul_mat": ("base", T, [P, T, T]),
    "ggml_norm": ("base", T, [P, T, c_float]),
    "ggml_relu": ("base", T, [P, T]),
    "ggml_gelu": ("base", T, [P, T]),
    "ggml_gelu_erf": ("base", T, [P, T]),
    "ggml_gelu_quick": ("base", T, [P, T]),
    "ggml_soft_max_ext": ("base", T, [P, T, T, c_float, c_float]),
    "ggml_flash_attn_ext": ("base", T, [P, T, T, T, T, c_float, c_float, c_float]),
    "ggml_prec_set_acc": ("base", c_bool, [T, c_int]),
    "ggml_concat": ("base", T, [P, T, T, c_int]),
    "ggml_cont": ("base", T, [P, T]),
    "ggml_is_contiguous": ("base", c_bool, [T]),
    "ggml_cast": ("base", T, [P, T, c_int]),
    "ggml_reshape_2d": ("base", T, [P, T, c_int64, c_int64]),
    "ggml_reshape_3d": ("base", T, [P, T, c_int64, c_int64, c_int64]),
    "ggml_permute": ("base", T, [P, T, c_int, c_int, c_int, c_int]),
    "ggml_view_2d": ("base", T, [P, T, c_int64, c_int64, c_size_t, c_size_t]),
    # batched (several images per graph) tower ops
    "ggml_reshape_4d": ("base", T, [P, T, c_int64, c_int64, c_int64, c_int64]),
    "ggml_view_3d": ("base", T, [P, T, c_int64, c_int64, c_int64, c_size_t, c_size_t, c_size_t]),
    "ggml_repeat": ("base", T, [P, T, T]),
    # mllama vision encoder: aspect-ratio table rows, token padding
    "ggml_get_rows": ("base", T, [P, T, T]),
    "ggml_pad": ("base", T, [P, T, c_int, c_int, c_int, c_int]),
    # mllama text decoder: RMS norm, SwiGLU, RoPE, KV-cache writes
    "ggml_rms_norm": ("base", T, [P, T, c_float]),
    "ggml_silu": ("base", T, [P, T]),
    "ggml_rope_ext": ("base", T, [P, T, T, T, c_int, c_int, c_int, c_float, c_float, c_float, c_float,
                                  c_float, c_float]),
    "ggml_cpy": ("base", T, [P, T, T]),
    "ggml_new_graph_custom": ("base", P, [P, c_size_t, c_bool]),
    "ggml_build_forward_expand": ("base", None, [P, T]),
    "ggml_graph_n_nodes": ("base", c_int, [P]),
    "ggml_gallocr_new": ("base", P, [P]),
    "ggml_gallocr_free": ("base", None, [P]),
    "ggml_gallocr_alloc_graph": ("base", c_bool, [P, P]),
    "ggml_gallocr_get_buffer_size": ("base", c_size_t, [P, c_int]),
    "ggml_backend_alloc_ctx_tensors": ("base", P, [P, P]),
    "ggml_backend_buffer_free": ("base", None, [P]),
    "ggml_backend_buffer_get_size": ("base", c_size_t, [P]),
    "ggml_backend_buffer_clear": ("base", None, [P, ctypes.c_uint8]),
    "ggml_backend_tensor_set": ("base", None, [T, c_void_p, c_size_t, c_size_t]),
    "ggml_backend_tensor_get": ("base", None, [T, c_void_p, c_size_t, c_size_t]),
    "ggml_backend_get_default_buffer_type": ("base", P, [P]),
    "ggml_backend_free": ("base", None, [P]),
    "ggml_backend_graph_compute": ("base", c_int, [P, P]),
    "ggml_backend_dev_count": ("ggml", c_size_t, []),
    "ggml_backend_dev_get": ("ggml", P, [c_size_t]),
    "ggml_backend_dev_name": ("base", c_char_p, [P]),
    "ggml_backend_dev_description": ("base", c_char_p, [P]),
    "ggml_backend_dev_type": ("base", c_int, [P]),
    "ggml_backend_dev_memory": ("base", None, [P, POINTER(c_size_t), POINTER(c_size_t)]),
    "ggml_backend_dev_init": ("base", P, [P, c_char_p]),
    # build information (edgevlm doctor)
    "ggml_version": ("base", c_char_p, []),
    "ggml_commit": ("base", c_char_p, []),
    "ggml_backend_reg_count": ("ggml", c_size_t, []),
    "ggml_backend_reg_get": ("ggml", P, [c_size_t]),
    "ggml_backend_reg_name": ("base", c_char_p, [P]),
    "ggml_backend_reg_dev_count": ("base", c_size_t, [P]),
    "ggml_backend_cpu_init": ("cpu", P, []),
    "ggml_backend_is_cpu": ("cpu", c_bool, [P]),
    "ggml_backend_cpu_set_n_threads": ("cpu", None, [P, c_int]),
    # weight placement: the CPU device's extra (repacking) buffer types, as llama.cpp's loader
    "ggml_backend_get_device": ("base", P, [P]),
    "ggml_backend_dev_backend_reg": ("base", P, [P]),
    "ggml_backend_reg_get_proc_address": ("base", c_void_p, [P, c_char_p]),
    "ggml_backend_dev_supports_op": ("base", c_bool, [P, T]),
    "ggml_backend_buft_name": ("base", c_char_p, [P]),
    "ggml_backend_buffer_get_type": ("base", P, [P]),
    "ggml_backend_buft_alloc_buffer": ("base", P, [P, c_size_t]),
    "ggml_backend_alloc_ctx_tensors_from_buft": ("base", P, [P, P]),
    # mllama token embeddings read in place from the mapped file
    "ggml_backend_cpu_buffer_from_ptr": ("base", P, [c_void_p, c_size_t]),
    "ggml_backend_tensor_alloc": ("base", c_int, [P, T, c_void_p]),
    # tower weight type: bf16 matrices where the CPU has AVX512-BF16 dot products
    "ggml_cpu_fp16_to_fp32": ("cpu", None, [c_void_p, c_void_p, c_int64]),   # SIMD, as the CPU backend
    "ggml_cpu_fp32_to_bf16": ("cpu", None, [c_void_p, c_void_p, c_int64]),   # round to nearest even
    "ggml_cpu_has_avx512_bf16": ("cpu", c_int, []),
    # tower weight type: Q8_0 matrices for ggml's AMX int8 tile kernels; the CPU backend's SIMD
    # quantiser (the one it uses for activations): (src f32, dst blocks, values, a multiple of 32)
    "quantize_row_q8_0": ("cpu", None, [c_void_p, c_void_p, c_int64]),
}

#: ``ggml_backend_dev_get_extra_bufts_t`` (ggml-backend.h): device -> NULL-terminated buffer types.
GET_EXTRA_BUFTS = ctypes.CFUNCTYPE(POINTER(c_void_p), c_void_p)

#: ``ggml_backend_set_abort_callback_t`` (ggml-backend.h): (backend, ``bool (*)(void *)`` or NULL, data),
#: looked up by name; the callback is asked after each graph node (see :mod:`edgevlm.kernels.abort`).
SET_ABORT_CALLBACK = ctypes.CFUNCTYPE(None, c_void_p, c_void_p, c_void_p)

_LIBRARY_FILES = native.GGML_LIBRARY_FILES


class GgmlLibrary:
    """The bound functions, as attributes (``lib.ggml_add(...)``)."""

    def __init__(self, handles: dict[str, ctypes.CDLL]) -> None:
        self.handles = handles
        for name, (which, restype, argtypes) in _SIGNATURES.items():
            fn = getattr(handles[which], name, None)
            if fn is None:
                raise KernelsUnavailableError(
                    f"{name} is missing from {_LIBRARY_FILES[which]}; edgevlm.kernels needs the ggml "
                    "shipped with llama-cpp-python 0.3.36 (reinstall it, or use vision_engine='mtmd')")
            fn.restype = restype
            fn.argtypes = argtypes
            setattr(self, name, fn)


_LOCK = threading.Lock()
_LIB: GgmlLibrary | None = None


def _open(stem_key: str) -> ctypes.CDLL:
    try:
        return native.ggml_library(stem_key)
    except RuntimeFailure as exc:
        raise KernelsUnavailableError(f"{exc}, or use vision_engine='mtmd'") from exc


def lib() -> GgmlLibrary:
    """Load and check the ggml libraries once.

    Raises:
        KernelsUnavailableError: a library or symbol is missing, or the struct
            layouts do not match the loaded ggml.
    """
    global _LIB
    with _LOCK:
        if _LIB is None:
            handles = {key: _open(key) for key in _LIBRARY_FILES}
            candidate = GgmlLibrary(handles)
            check_layouts(candidate)
            _LIB = candidate
        return _LIB


def check_layouts(g: GgmlLibrary) -> None:
    """Compare the pinned struct layouts with what the loaded ggml writes.

    Builds a probe tensor and an op in a tiny context and reads them back
    through :class:`GgmlTensor`; any disagreement with ggml's own accessors
    means the layout changed.

    Raises:
        KernelsUnavailableError: naming the first field that disagrees.
    """
    expected_size = g.ggml_tensor_overhead() - GGML_OBJECT_SIZE
    if ctypes.sizeof(GgmlTensor) != expected_size:
        _layout_error(f"sizeof(ggml_tensor) is {expected_size}, edgevlm expects {ctypes.sizeof(GgmlTensor)}")
    ctx = g.ggml_init(GgmlInitParams(1 << 16, None, False))
    if not ctx:
        _layout_error("ggml_init failed for a 64 KiB probe context")
    try:
        a = g.ggml_new_tensor_4d(ctx, GGML_TYPE_F32, 2, 3, 5, 7)
        b = g.ggml_new_tensor_4d(ctx, GGML_TYPE_F32, 2, 3, 5, 7)
        g.ggml_set_name(a, b"edgevlm-probe")
        s = g.ggml_scale(ctx, g.ggml_add(ctx, a, b), 0.25)
        ta, ts = a.contents, s.contents
        checks = [
            ("type", ta.type == GGML_TYPE_F32),
            ("ne", tuple(ta.ne) == (2, 3, 5, 7)),
            ("nb", tuple(ta.nb) == (4, 8, 24, 120) and ta.nb[3] * 7 == g.ggml_nbytes(a)),
            ("name", ta.name == g.ggml_get_name(a) == b"edgevlm-probe"),
            ("data", ta.data is not None and ta.buffer is None),
            ("src", ts.src[0] is not None and ctypes.cast(ts.src[0], T).contents.src[0]
             == ctypes.addressof(ta) and ctypes.cast(ts.src[0], T).contents.src[1] == ctypes.addressof(b.contents)),
            ("op_params", ctypes.cast(ts.op_params, POINTER(c_float))[0] == 0.25),
            ("op", ts.op != 0 and ta.op == 0),
        ]
        for field, ok in checks:
            if not ok:
                _layout_error(f"field {field!r} of struct ggml_tensor does not read back")
    finally:
        g.ggml_free(ctx)


def _layout_error(what: str) -> None:
    raise KernelsUnavailableError(
        f"ggml struct layout mismatch: {what}. edgevlm.kernels is pinned to llama-cpp-python 0.3.36; "
        "install that version or use vision_engine='mtmd'.")


__all__ = ["GgmlLibrary", "GgmlTensor", "GgmlInitParams", "KernelsUnavailableError", "lib",
           "check_layouts"]
