"""A small graph-building layer over ggml, and weights in backend buffers.

Conventions follow ggml: a tensor's shape is ``ne`` (fastest dimension
first), so a sequence of ``n`` vectors of width ``d`` is ``[d, n]`` and a
PyTorch ``nn.Linear`` weight of numpy shape ``(out, in)`` is ``[in, out]``.

:class:`Weights` holds named tensors in one backend buffer.
:class:`GraphBuilder` creates input tensors and ops (linear, layer norm,
multi-head attention, activations, MLPs, pre-/post-norm transformer layers).
:class:`CompiledGraph` allocates the graph once on its backend and is then run
any number of times: the allocation is reused across calls.
"""

from __future__ import annotations

import ctypes
import math
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from edgevlm.errors import ComputeCancelled, InvalidModelError, KernelsUnavailableError, RuntimeFailure

from . import ggml
from .backend import Backend, BufferType

_NUMPY_TYPES = {np.dtype(np.float32): ggml.GGML_TYPE_F32, np.dtype(np.float16): ggml.GGML_TYPE_F16}
ACTIVATIONS = ("relu", "gelu", "gelu_erf", "gelu_quick")
TENSOR_ALIGNMENT = 32  # ggml's: what a buffer over host memory must be aligned to


def _context(g: ggml.GgmlLibrary, n_tensors: int, *, graph_nodes: int = 0) -> int:
    size = g.ggml_tensor_overhead() * n_tensors
    if graph_nodes:
        size += g.ggml_graph_overhead_custom(graph_nodes, False)
    ctx = g.ggml_init(ggml.GgmlInitParams(size, None, True))
    if not ctx:
        raise KernelsUnavailableError("ggml_init failed (out of memory?)")
    return ctx


def shape(t: object) -> tuple[int, ...]:
    """The ``ne`` of a tensor, trailing 1s dropped (at least one entry)."""
    ne = list(t.contents.ne)
    while len(ne) > 1 and ne[-1] == 1:
        ne.pop()
    return tuple(ne)


def _described(t: object) -> str:
    name = t.contents.name.decode(errors="replace")
    return f"{name or 'a tensor'} of shape {list(shape(t))}"


def check_linear(x: object, w: object, b: object | None) -> None:
    """Raise :class:`InvalidModelError` where ``mul_mat(w, x) + b`` would fail a ggml assert.

    ggml_can_mul_mat: same ``ne[0]``, and ``x``'s outer dimensions multiples of ``w``'s;
    the bias must broadcast over the product (ggml_can_repeat).
    """
    wn, xn = list(w.contents.ne), list(x.contents.ne)
    if wn[0] != xn[0] or xn[2] % wn[2] or xn[3] % wn[3]:
        raise InvalidModelError(f"the model's matrix {_described(w)} cannot multiply {_described(x)}: "
                                f"its input width is {wn[0]}, the layer receives {xn[0]}; the file's "
                                "tensors do not match its metadata (a damaged or mislabelled projector?)")
    if b is not None:
        bn, out = list(b.contents.ne), [wn[1], xn[1], xn[2], xn[3]]
        if any(o % n for o, n in zip(out, bn)):
            raise InvalidModelError(f"the model's bias {_described(b)} does not fit the output of "
                                    f"{_described(w)} ({out[0]} wide)")


@dataclass(frozen=True)
class RawTensor:
    """Tensor bytes in ggml layout: ``ggml_type`` and ``ne`` (fastest first)."""

    ggml_type: int
    ne: tuple[int, ...]
    data: np.ndarray  # any dtype; its bytes are copied as they are
    convert: Callable[[np.ndarray], np.ndarray] | None = field(default=None, compare=False)
    """Turns ``data`` into the uploaded bytes just before the upload (one tensor at a time, so a
    converted model never holds a second full copy)."""

    def payload(self) -> np.ndarray:
        """The bytes to upload (``data``, converted if a conversion is pending)."""
        return np.ascontiguousarray(self.convert(self.data) if self.convert is not None else self.data)

    @property
    def nbytes(self) -> int:
        """Bytes of the uploaded tensor (after a pending conversion: ``ggml_type``'s size for ``ne``)."""
        if self.convert is None:
            return int(self.data.nbytes)
        block, type_size = GGML_QUANT_SIZES[GGMLQuantizationType(self.ggml_type)]
        return int(self.data.size) // block * type_size

    @classmethod
    def empty(cls, shape: tuple[int, ...], dtype: type = np.float32) -> "RawTensor":
        """A tensor of numpy ``shape`` described without its data (for ``Weights(..., upload=False)``)."""
        return cls(_NUMPY_TYPES[np.dtype(dtype)], tuple(reversed(shape)), np.broadcast_to(np.zeros((), dtype), shape))

    @classmethod
    def from_numpy(cls, array: np.ndarray) -> "RawTensor":
        """A float32/float16 numpy array (C order) as a ggml tensor of reversed shape."""
        array = np.ascontiguousarray(array)
        if array.dtype not in _NUMPY_TYPES:
            array = array.astype(np.float32)
        return cls(_NUMPY_TYPES[array.dtype], tuple(reversed(array.shape)) or (1,), array)


def release_mapped_pages(array: np.ndarray) -> None:
    """Drop a memory-mapped array's pages from this process's resident set once they are copied.

    The file's pages stay in the OS page cache; without this, a projector
    uploaded from a memory-mapped GGUF would count twice in the peak RSS (the
    mapped file and the backend buffer). A no-op for arrays that are not
    file-mapped or on systems without ``madvise``.
    """
    import mmap

    base = _memmap_of(array)
    mapping = getattr(base, "_mmap", None) if base is not None else None
    if mapping is None or not hasattr(mapping, "madvise") or array.nbytes == 0:
        return
    start = array.ctypes.data - np.frombuffer(mapping, dtype=np.uint8, count=1).ctypes.data
    page = mmap.PAGESIZE
    first, last = (start // page) * page, start + array.nbytes
    try:
        mapping.madvise(mmap.MADV_DONTNEED, first, last - first)
    except (OSError, ValueError):
        pass


class Weights:
    """Named tensors uploaded into backend buffers.

    Every tensor goes into the backend's plain buffer, except the names in
    ``matmul`` (matrices the graphs use only as ``mul_mat`` weights): each of
    those goes into the first of ``extra`` (the CPU's repacking buffer types)
    where ggml accepts a ``mul_mat`` of it against an f32 batch — the test
    llama.cpp's loader makes (``weight_buft_supported``) — and into the plain
    buffer otherwise. A repacked tensor's bytes cannot be read back.

    Args:
        backend: where the tensors live.
        tensors: name -> :class:`RawTensor`.
        matmul: names that may be placed in an extra buffer type.
        extra: buffer types to try, best first (``Backend.extra_buffer_types()``).
        upload: copy the tensors' data in; False: only allocate (fill them with :meth:`set`;
            :meth:`RawTensor.empty` describes a tensor without data).
        progress: called with the fraction of bytes copied in after each tensor; whatever it
            raises stops the upload (the buffers are freed again) and propagates.

    Raises:
        InvalidModelError: a tensor's byte size disagrees with its type and shape.
        KernelsUnavailableError: a buffer could not be allocated.
    """

    def __init__(self, backend: Backend, tensors: Mapping[str, RawTensor], *,
                 matmul: Collection[str] = (), extra: Sequence[BufferType] = (), upload: bool = True,
                 progress: Callable[[float], None] | None = None) -> None:
        g = self.g = backend.g
        self.backend = backend
        self._tensors: dict[str, object] = {}
        self.placement: dict[str, str] = {}   # name -> buffer type name
        self._groups: dict[str, tuple[BufferType, int]] = {}  # buffer type name -> (type, ggml context)
        self.buffers: dict[str, int] = {}
        plain = BufferType(int(backend.buffer_type), g.ggml_backend_buft_name(backend.buffer_type).decode())
        try:
            for name, raw in tensors.items():
                buft = _weight_buffer_type(backend, raw, extra) if name in matmul else None
                self._add(name, raw, buft or plain, len(tensors) + 1)
            for key, (buft, ctx) in self._groups.items():
                buffer = g.ggml_backend_alloc_ctx_tensors_from_buft(ctx, buft.ptr)
                if not buffer:
                    raise KernelsUnavailableError(f"could not allocate the {key} weight buffer on {backend.name}")
                self.buffers[key] = buffer
            if upload:
                self._upload(tensors, progress)
        except BaseException:
            self.close()
            raise

    def _upload(self, tensors: Mapping[str, RawTensor], progress: Callable[[float], None] | None) -> None:
        """Copy each tensor's data into its buffer, reporting the bytes done to ``progress``."""
        total, done = sum(raw.nbytes for raw in tensors.values()) or 1, 0
        for name, raw in tensors.items():
            data = raw.payload()
            self.g.ggml_backend_tensor_set(self._tensors[name], data.ctypes.data, 0, data.nbytes)
            del data
            release_mapped_pages(raw.data)
            done += raw.nbytes
            if progress is not None:
                progress(done / total)

    def _add(self, name: str, raw: RawTensor, buft: BufferType, capacity: int) -> None:
        g = self.g
        if buft.name not in self._groups:
            self._groups[buft.name] = (buft, _context(g, capacity))
        ctx = self._groups[buft.name][1]
        ne = list(raw.ne) + [1] * (4 - len(raw.ne))
        t = g.ggml_new_tensor_4d(ctx, raw.ggml_type, *ne)
        g.ggml_set_name(t, name.encode()[:63])
        if g.ggml_nbytes(t) != raw.nbytes:
            raise InvalidModelError(f"tensor {name}: {raw.nbytes} bytes, but type "
                                    f"{g.ggml_type_name(raw.ggml_type).decode()} {raw.ne} needs {g.ggml_nbytes(t)}")
        self._tensors[name] = t
        self.placement[name] = buft.name

    def __contains__(self, name: str) -> bool:
        return name in self._tensors

    def set(self, name: str, data: np.ndarray, offset: int = 0) -> None:
        """Copy ``data``'s bytes into tensor ``name`` from byte ``offset`` on."""
        data = np.ascontiguousarray(data)
        tensor = self[name]
        if offset + data.nbytes > self.g.ggml_nbytes(tensor):
            raise RuntimeFailure(f"{data.nbytes} bytes at {offset} overflow tensor {name}")
        self.g.ggml_backend_tensor_set(tensor, data.ctypes.data, offset, data.nbytes)

    def __getitem__(self, name: str) -> object:
        try:
            return self._tensors[name]
        except KeyError:
            raise InvalidModelError(f"the projector file has no tensor {name!r}") from None

    def get(self, name: str) -> object | None:
        return self._tensors.get(name)

    @property
    def nbytes(self) -> int:
        return sum(self.buffer_bytes().values())

    def buffer_bytes(self) -> dict[str, int]:
        """Bytes per buffer type name (``{"CPU": ..., "CPU_REPACK": ...}``)."""
        return {key: int(self.g.ggml_backend_buffer_get_size(buf)) for key, buf in self.buffers.items()}

    def close(self) -> None:
        for buffer in getattr(self, "buffers", {}).values():
            self.g.ggml_backend_buffer_free(buffer)
        self.buffers = {}
        for _, ctx in getattr(self, "_groups", {}).values():
            self.g.ggml_free(ctx)
        self._groups = {}


def _memmap_of(array: np.ndarray) -> np.memmap | None:
    """The memory-mapped file array ``array`` is a view of, if any."""
    base = array
    while isinstance(base, np.ndarray) and base.base is not None and not isinstance(base, np.memmap):
        base = base.base
    return base if isinstance(base, np.memmap) else None


def mapped_file(array: np.ndarray) -> bool:
    """Whether ``array``'s bytes are a memory-mapped file's (what :class:`MappedTensor` can use)."""
    return _memmap_of(array) is not None and array.flags.c_contiguous


class MappedTensor:
    """One tensor read in place from its memory-mapped file on the CPU: a ggml CPU buffer over the
    mapping's bytes (llama.cpp's mmap, for one tensor), so only the pages graphs read are resident
    (a table of token embeddings: the rows of the tokens seen).

    Raises:
        InvalidModelError: the bytes disagree with the type and shape.
        KernelsUnavailableError: not a CPU backend, or ggml refused the buffer.
    """

    def __init__(self, backend: Backend, name: str, raw: RawTensor) -> None:
        g = self.g = backend.g
        if not backend.is_cpu or raw.convert is not None or not mapped_file(raw.data):
            raise KernelsUnavailableError(f"{name} cannot be read in place on {backend.name}")
        self.data, self.buffer = raw.data, None  # the mapping stays open while the tensor lives
        self.ctx = _context(g, 1)
        ne = list(raw.ne) + [1] * (4 - len(raw.ne))
        self.tensor = g.ggml_new_tensor_4d(self.ctx, raw.ggml_type, *ne)
        g.ggml_set_name(self.tensor, name.encode()[:63])
        size, ptr = int(g.ggml_nbytes(self.tensor)), int(raw.data.ctypes.data)
        try:
            if size != raw.data.nbytes:
                raise InvalidModelError(f"tensor {name}: {raw.data.nbytes} bytes, its type and shape need {size}")
            if ptr % TENSOR_ALIGNMENT:  # ggml asserts it (GGUF aligns tensors to 32 bytes by default)
                raise KernelsUnavailableError(f"{name} is not aligned in its file for ggml")
            self.buffer = g.ggml_backend_cpu_buffer_from_ptr(ptr, size)
            if not self.buffer or g.ggml_backend_tensor_alloc(self.buffer, self.tensor, ptr) != ggml.GGML_STATUS_SUCCESS:
                raise KernelsUnavailableError(f"ggml refused a buffer over {name}'s mapped bytes")
        except Exception:
            self.close()
            raise

    def close(self) -> None:
        if self.buffer:
            self.g.ggml_backend_buffer_free(self.buffer)
            self.buffer = None
        if self.ctx:
            self.g.ggml_free(self.ctx)
            self.ctx = None


def linear_once(backend: Backend, w: object, x: np.ndarray) -> np.ndarray:
    """``x @ W.T`` for a float32 ``x`` [n, in] and a weight already on ``backend``, through a one-off graph."""
    builder = GraphBuilder()
    graph = CompiledGraph(backend, builder, builder.linear(builder.input("x", tuple(reversed(x.shape))), w))
    try:
        return graph.run({"x": x})
    finally:
        graph.close()


def upload_weights(device: str, n_threads: int, tensors: Mapping[str, RawTensor], *,
                   matmul: Collection[str] = (), allow_extra: bool | None = None,
                   progress: Callable[[float], None] | None = None) -> Weights:
    """A new :class:`Backend` on ``device`` holding ``tensors`` (``weights.backend``; closed again on failure).

    ``matmul`` names go to the CPU's repacking buffer types where ggml takes them
    (``allow_extra``: as :meth:`Backend.extra_buffer_types`; None: unless the AMX guard is on);
    ``progress`` as in :class:`Weights`.
    """
    backend = Backend(device, n_threads=n_threads)
    try:
        return Weights(backend, tensors, matmul=matmul, extra=backend.extra_buffer_types(allow_extra),
                       progress=progress)
    except BaseException:
        backend.close()
        raise


#: Weight types with ggml's AMX tile kernels (ggml-cpu/amx/common.h ``qtype_has_amx_kernels``); its AMX
#: buffer type also takes F16, for an AVX-512 product that gains nothing and reads x as f32 regardless.
AMX_TILE_TYPES = frozenset(int(t) for t in (GGMLQuantizationType.Q4_0, GGMLQuantizationType.Q4_1,
                                             GGMLQuantizationType.Q8_0, GGMLQuantizationType.Q4_K,
                                             GGMLQuantizationType.Q5_K, GGMLQuantizationType.Q6_K,
                                             GGMLQuantizationType.IQ4_XS))


def _in_amx_buffer(g: ggml.GgmlLibrary, w: object) -> bool:
    """Whether weight ``w`` lives in ggml's AMX buffer type."""
    buffer = w.contents.buffer
    return bool(buffer) and g.ggml_backend_buft_name(g.ggml_backend_buffer_get_type(buffer)) == b"AMX"


def _amx_takes(raw: RawTensor) -> bool:
    """Whether a matrix may go into ggml's AMX buffer type: a type with tile kernels, rows of two blocks
    or more (rows of one Q8_0 block gave NaN or 1e38 for 32-256 outputs; 64 values and more were right)."""
    return (raw.ggml_type in AMX_TILE_TYPES
            and raw.ne[0] >= 2 * GGML_QUANT_SIZES[GGMLQuantizationType(raw.ggml_type)][0])


def _weight_buffer_type(backend: Backend, raw: RawTensor, extra: Sequence[BufferType]) -> BufferType | None:
    """The first of ``extra`` where ggml runs ``mul_mat(w, x)`` for ``w`` like ``raw``, x f32 [in, 512].

    As llama.cpp's ``weight_buft_supported``: a metadata-only copy of the
    weight gets an empty buffer of the candidate type, and the CPU device is
    asked whether it supports the op (the repack type checks the weight's
    type and shape for a kernel of this CPU). ggml's AMX type gets only what
    its tile kernels run right (:func:`_amx_takes`).
    """
    if len(raw.ne) != 2 or not extra:
        return None
    g = backend.g
    ctx = _context(g, 4)
    try:
        w = g.ggml_new_tensor_4d(ctx, raw.ggml_type, raw.ne[0], raw.ne[1], 1, 1)
        x = g.ggml_new_tensor_4d(ctx, ggml.GGML_TYPE_F32, raw.ne[0], 512, 1, 1)
        op = g.ggml_mul_mat(ctx, w, x)
        for buft in extra:
            if buft.name == "AMX" and not _amx_takes(raw):
                continue
            probe = g.ggml_backend_buft_alloc_buffer(buft.ptr, 0)
            if not probe:
                continue
            w.contents.buffer = probe
            try:
                ok = bool(g.ggml_backend_dev_supports_op(backend.dev, op))
            finally:
                w.contents.buffer = None
                g.ggml_backend_buffer_free(probe)
            if ok:
                return buft
        return None
    finally:
        g.ggml_free(ctx)


class GraphBuilder:
    """Creates inputs and ops in a metadata-only ggml context.

    Args:
        max_nodes: upper bound on tensors + graph nodes.
    """

    def __init__(self, max_nodes: int = 16384) -> None:
        self.g = ggml.lib()
        self.max_nodes = max_nodes
        self.ctx = _context(self.g, max_nodes, graph_nodes=max_nodes)
        self.inputs: dict[str, object] = {}

    # ---------------------------------------------------------------- tensors
    def input(self, name: str, ne: tuple[int, ...], ggml_type: int = ggml.GGML_TYPE_F32) -> object:
        """A named input tensor of shape ``ne`` (fastest dimension first)."""
        dims = list(ne) + [1] * (4 - len(ne))
        t = self.g.ggml_new_tensor_4d(self.ctx, ggml_type, *dims)
        self.g.ggml_set_name(t, name.encode())
        self.g.ggml_set_input(t)
        self.inputs[name] = t
        return t

    # ---------------------------------------------------------------- elementwise
    def add(self, a: object, b: object | None) -> object:
        return a if b is None else self.g.ggml_add(self.ctx, a, b)

    def mul(self, a: object, b: object) -> object:
        return self.g.ggml_mul(self.ctx, a, b)

    def scale(self, a: object, s: float) -> object:
        return self.g.ggml_scale(self.ctx, a, s)

    def activation(self, x: object, kind: str) -> object:
        """``relu``, ``gelu`` (tanh approximation), ``gelu_erf`` (exact) or ``gelu_quick``."""
        fn = {"relu": self.g.ggml_relu, "gelu": self.g.ggml_gelu, "gelu_erf": self.g.ggml_gelu_erf,
              "gelu_quick": self.g.ggml_gelu_quick}.get(kind)
        if fn is None:
            raise InvalidModelError(f"unknown activation {kind!r}; supported: {', '.join(ACTIVATIONS)}")
        return fn(self.ctx, x)

    def softmax(self, x: object, scale: float = 1.0, mask: object | None = None) -> object:
        """``softmax(scale * x + mask)`` over the fastest dimension (``mask`` [n_kv, n_q], f32/f16,
        broadcast over heads; -inf where a key is hidden)."""
        return self.g.ggml_soft_max_ext(self.ctx, x, mask, scale, 0.0)

    # ---------------------------------------------------------------- layers
    def linear(self, x: object, w: object, b: object | None = None) -> object:
        """``x @ W.T + b`` for ``x`` [in, n] and ``w`` [in, out] -> [out, n].

        Raises:
            InvalidModelError: the shapes do not fit (checked here, where ggml would abort
                the process with ``GGML_ASSERT(ggml_can_mul_mat)``).
        """
        check_linear(x, w, b)
        g, ne = self.g, list(x.contents.ne)
        if not _in_amx_buffer(g, w) or (ne[2] * ne[3] == 1 and x.contents.type == ggml.GGML_TYPE_F32
                                        and g.ggml_is_contiguous(x)):
            return self.add(g.ggml_mul_mat(self.ctx, w, x), b)
        # The CPU backend runs every mul_mat of an AMX-buffer weight with ggml's AMX kernels (their
        # supports_op is not asked), which read ``x`` as one contiguous f32 batch (a batch of tiles
        # gave max-abs 4.76, an f16 x 7e20): hand them that, as one [in, n * batch] product.
        x = g.ggml_cast(self.ctx, x, ggml.GGML_TYPE_F32) if x.contents.type != ggml.GGML_TYPE_F32 else x
        flat = g.ggml_reshape_2d(self.ctx, g.ggml_cont(self.ctx, x), ne[0], ne[1] * ne[2] * ne[3])
        out = g.ggml_mul_mat(self.ctx, w, flat)
        out = g.ggml_reshape_4d(self.ctx, out, out.contents.ne[0], ne[1], ne[2], ne[3])
        return self.add(out, b)

    def layer_norm(self, x: object, w: object | None, b: object | None, eps: float) -> object:
        """LayerNorm over the fastest dimension, with optional affine weight/bias."""
        y = self.g.ggml_norm(self.ctx, x, eps)
        if w is not None:
            y = self.mul(y, w)
        return self.add(y, b)

    def rms_norm(self, x: object, w: object | None, eps: float) -> object:
        """RMSNorm over the fastest dimension, times ``w`` when given."""
        y = self.g.ggml_rms_norm(self.ctx, x, eps)
        return y if w is None else self.mul(y, w)

    def mlp(self, x: object, up: tuple[object, object | None], down: tuple[object, object | None],
            act: str) -> object:
        """``down(act(up(x)))``."""
        return self.linear(self.activation(self.linear(x, *up), act), *down)

    def attention(self, x: object, q: tuple, k: tuple, v: tuple, out: tuple, n_head: int, *,
                  flash: bool = False, mask: object | None = None) -> object:
        """Multi-head self-attention without a mask over ``x`` [d, n] -> [d, n].

        ``x`` may also be a batch [d, n, B] of ``B`` independent sequences
        (several images in one graph): each attends only within itself.
        ``q``, ``k``, ``v``, ``out`` are (weight, bias) pairs of the projections.
        ``flash`` uses ggml's fused flash-attention kernel with f16 K/V and f32
        accumulation (what libmtmd does by default); otherwise softmax(QK^T)V
        in f32. ``mask`` ([n, n], -inf where query row i may not see key
        column j; one sequence only; f16 for the flash path, f16 or f32
        otherwise) is added to the scores.
        """
        g, ctx = self.g, self.ctx
        dims = shape(x) + (1, 1)
        d, n, batch = dims[0], dims[1], dims[2]
        if d % n_head:
            raise InvalidModelError(f"attention width {d} is not divisible by {n_head} heads")
        dh = d // n_head
        heads = [g.ggml_reshape_4d(ctx, self.linear(x, *p), dh, n_head, n, batch) for p in (q, k, v)]
        qh, kh = (g.ggml_permute(ctx, t, 0, 2, 1, 3) for t in heads[:2])  # [dh, n, heads, B]
        if mask is not None and batch != 1:
            raise InvalidModelError("a masked attention runs one sequence")
        if flash:
            vh = g.ggml_permute(ctx, heads[2], 0, 2, 1, 3)
            kh, vh = g.ggml_cast(ctx, kh, ggml.GGML_TYPE_F16), g.ggml_cast(ctx, vh, ggml.GGML_TYPE_F16)
            fused = g.ggml_flash_attn_ext(ctx, qh, kh, vh, mask, 1.0 / math.sqrt(dh), 0.0, 0.0)
            g.ggml_prec_set_acc(fused, ggml.GGML_PREC_F32)   # result: [dh, heads, n, B]
            return self.linear(self._merge_heads(fused, d, n, batch), *out)
        vh = g.ggml_cont(ctx, g.ggml_permute(ctx, heads[2], 1, 2, 0, 3))  # [n, dh, heads, B]
        scores = self.softmax(g.ggml_mul_mat(ctx, kh, qh), 1.0 / math.sqrt(dh), mask)
        ctxv = g.ggml_mul_mat(ctx, vh, scores)                # [dh, n, heads, B]
        merged = g.ggml_cont(ctx, g.ggml_permute(ctx, ctxv, 0, 2, 1, 3))  # [dh, heads, n, B]
        return self.linear(self._merge_heads(merged, d, n, batch), *out)

    def _merge_heads(self, t: object, d: int, n: int, batch: int) -> object:
        """[dh, heads, n, B] -> [d, n] (B == 1) or [d, n, B]."""
        if batch == 1:
            return self.g.ggml_reshape_2d(self.ctx, t, d, n)
        return self.g.ggml_reshape_3d(self.ctx, t, d, n, batch)

    def transformer_layer(self, x: object, p: Mapping[str, object], *, n_head: int, eps: float,
                          act: str, norm_first: bool, flash: bool = False) -> object:
        """A transformer encoder layer; ``p`` holds ``attn_{q,k,v,out}``, ``ln1``, ``ln2``,
        ``ffn_up``, ``ffn_down`` as ``(weight, bias)`` pairs.

        Pre-norm (CLIP/SigLIP): ``x + attn(ln1(x))`` then ``h + ffn(ln2(h))``.
        Post-norm (PyTorch default): ``ln1(x + attn(x))`` then ``ln2(h + ffn(h))``.
        """
        attn = (p["attn_q"], p["attn_k"], p["attn_v"], p["attn_out"])
        if norm_first:
            h = self.add(x, self.attention(self.layer_norm(x, *p["ln1"], eps), *attn, n_head=n_head, flash=flash))
            return self.add(h, self.mlp(self.layer_norm(h, *p["ln2"], eps), p["ffn_up"], p["ffn_down"], act))
        h = self.layer_norm(self.add(x, self.attention(x, *attn, n_head=n_head, flash=flash)), *p["ln1"], eps)
        return self.layer_norm(self.add(h, self.mlp(h, p["ffn_up"], p["ffn_down"], act)), *p["ln2"], eps)

    # ---------------------------------------------------------------- shape ops
    def concat(self, a: object, b: object, dim: int) -> object:
        return self.g.ggml_concat(self.ctx, a, b, dim)

    def rows(self, x: object, start: int, count: int) -> object:
        """Columns ``start .. start+count`` of ``x`` [d, n] or [d, n, B] (a contiguous copy)."""
        t = x.contents
        if shape(x)[2:]:
            view = self.g.ggml_view_3d(self.ctx, x, t.ne[0], count, t.ne[2], t.nb[1], t.nb[2],
                                       start * t.nb[1])
        else:
            view = self.g.ggml_view_2d(self.ctx, x, t.ne[0], count, t.nb[1], start * t.nb[1])
        return self.g.ggml_cont(self.ctx, view)

    def get_rows(self, table: object, ids: object) -> object:
        """Rows ``ids`` (an I32 tensor [n]) of ``table`` [width, rows] -> [width, n]."""
        return self.g.ggml_get_rows(self.ctx, table, ids)

    def pad(self, x: object, *pads: int) -> object:
        """``x`` with zeros appended along each dimension (``pads`` per ne dimension, up to 4)."""
        p = list(pads) + [0] * (4 - len(pads))
        return self.g.ggml_pad(self.ctx, x, *p)

    def reshape_3d(self, x: object, ne0: int, ne1: int, ne2: int) -> object:
        return self.g.ggml_reshape_3d(self.ctx, x, ne0, ne1, ne2)

    def repeat(self, x: object, like: object) -> object:
        """``x`` tiled to the shape of ``like`` (ggml broadcasting rules)."""
        return self.g.ggml_repeat(self.ctx, x, like)

    def reshape_2d(self, x: object, ne0: int, ne1: int) -> object:
        return self.g.ggml_reshape_2d(self.ctx, x, ne0, ne1)

    def close(self) -> None:
        if self.ctx:
            self.g.ggml_free(self.ctx)
            self.ctx = None


class CompiledGraph:
    """A graph with its compute buffer allocated on ``backend``; run it many times.

    Args:
        backend: where it runs (the weights must live there too).
        builder: the builder holding the graph's tensors; owned from now on.
        output: the tensor to compute.
        before: nodes computed first, in this order, whether or not ``output`` depends on
            them (writes into tensors that live outside the graph, such as a KV cache).
        allocator: a ``ggml_gallocr`` to allocate from (its buffer is reused, grown if the graph
            needs more, and kept after :meth:`close`: the caller frees it); None: a new one.
    """

    def __init__(self, backend: Backend, builder: GraphBuilder, output: object,
                 before: Sequence[object] = (), *, allocator: int | None = None) -> None:
        g = self.g = backend.g
        self.backend, self.builder, self.output = backend, builder, output
        g.ggml_set_output(output)
        self.graph = g.ggml_new_graph_custom(builder.ctx, builder.max_nodes, False)
        for node in before:
            g.ggml_build_forward_expand(self.graph, node)
        g.ggml_build_forward_expand(self.graph, output)
        self.owns_allocator = allocator is None
        self.allocator = g.ggml_gallocr_new(backend.buffer_type) if allocator is None else allocator
        if not g.ggml_gallocr_alloc_graph(self.allocator, self.graph):
            self.close()
            raise KernelsUnavailableError(f"could not allocate the compute buffer on {backend.name}")
        self.n_nodes = int(g.ggml_graph_n_nodes(self.graph))
        dims = shape(output)
        self.output_shape = dims if len(dims) >= 2 else dims + (1,)

    @property
    def compute_bytes(self) -> int:
        return int(self.g.ggml_gallocr_get_buffer_size(self.allocator, 0))

    def touch(self) -> None:
        """Write the compute buffer once (zeros), so that the first run does not page-fault it in."""
        buffer = self.output.contents.buffer
        if buffer:
            self.g.ggml_backend_buffer_clear(buffer, 0)

    def run(self, inputs: Mapping[str, np.ndarray], cancelled: Callable[[], bool] | None = None) -> np.ndarray:
        """Set the inputs, compute (``cancelled``: as in :meth:`compute`), return the output as float32
        numpy (C order, reversed ne)."""
        self.set_inputs(inputs)
        self.compute(cancelled)
        return self.output_array()

    def set_inputs(self, inputs: Mapping[str, np.ndarray]) -> None:
        """Copy every graph input in (the host arrays may be dropped before :meth:`compute`)."""
        g = self.g
        for name, tensor in self.builder.inputs.items():
            if name not in inputs:
                raise RuntimeFailure(f"graph input {name!r} was not given")
            data = np.ascontiguousarray(inputs[name])
            if data.nbytes != g.ggml_nbytes(tensor):
                raise RuntimeFailure(f"graph input {name!r}: {data.nbytes} bytes for a "
                                     f"{shape(tensor)} tensor of {g.ggml_nbytes(tensor)} bytes")
            g.ggml_backend_tensor_set(tensor, data.ctypes.data, 0, data.nbytes)

    def output_array(self) -> np.ndarray:
        """The computed output as float32 numpy (C order, reversed ne)."""
        g = self.g
        if self.output.contents.type != ggml.GGML_TYPE_F32:
            raise RuntimeFailure("graph output is not float32")
        out = np.empty(tuple(reversed(self.output_shape)), dtype=np.float32)
        g.ggml_backend_tensor_get(self.output, out.ctypes.data_as(ctypes.c_void_p), 0, out.nbytes)
        return out

    def compute(self, cancelled: Callable[[], bool] | None = None) -> None:
        """Compute the graph on the inputs already set (by :meth:`run`), leaving the output on the backend.

        Args:
            cancelled: asked between the graph's nodes where the backend allows it
                (:meth:`Backend.abort_when`); True stops the compute.

        Raises:
            ComputeCancelled: ``cancelled`` stopped it (the output is not complete).
            RuntimeFailure: the backend reported a failure.
        """
        with self.backend.abort_when(cancelled):
            status = self.g.ggml_backend_graph_compute(self.backend.ptr, self.graph)
        if status == ggml.GGML_STATUS_ABORTED:
            raise ComputeCancelled(f"the graph computation on {self.backend.name} was cancelled")
        if status != ggml.GGML_STATUS_SUCCESS:
            raise RuntimeFailure(f"ggml graph compute failed on {self.backend.name} (status {status})")

    def close(self) -> None:
        if getattr(self, "allocator", None):
            if self.owns_allocator:
                self.g.ggml_gallocr_free(self.allocator)
            self.allocator = None
        self.builder.close()
