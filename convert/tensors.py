"""Tensor plans and the two-pass streaming GGUF writer shared by both outputs.

A converter first *plans* every output tensor (:class:`TensorSpec`: GGUF name,
source name, shape, target type, optional transform) from checkpoint
metadata alone, then :func:`write_gguf` registers all tensor infos, writes the
header and streams the tensors one by one (load -> transform -> encode ->
write), so peak memory is about one tensor.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgevlm.errors import ConversionError

from .checkpoint import TensorSource
from .quantize import quantize_rows

Transform = Callable[[np.ndarray], np.ndarray]
#: Types :func:`encode` writes with ggml's quantiser: the K-quants and their 32-block fallbacks.
GGML_QUANTISED = ("Q4_K", "Q5_K", "Q6_K", "Q5_0", "Q5_1")


@dataclass(frozen=True)
class TensorSpec:
    """One output tensor.

    Attributes:
        name: GGUF tensor name (``blk.0.attn_q.weight``).
        source: Checkpoint tensor name.
        shape: Output shape in numpy (row-major) order.
        ggml_type: Target ``gguf.GGMLQuantizationType`` name (``"F16"``...).
        transform: Applied to the float32 array before encoding (e.g. RoPE permutation).
    """

    name: str
    source: str
    shape: tuple[int, ...]
    ggml_type: str
    transform: Transform | None = None


def permute_rotary(weight: np.ndarray, n_head: int) -> np.ndarray:
    """Reorder Q/K projection rows from HF's rotate-half to llama.cpp's interleaved RoPE.

    Args:
        weight: ``(n_head * head_dim, n_in)`` projection weight (or bias, 1-D).
        n_head: Query heads for Q, KV heads for K.

    Returns:
        The permuted array, same shape.
    """
    shape = weight.shape
    head_dim = shape[0] // n_head
    return (weight.reshape(n_head, 2, head_dim // 2, *shape[1:])
            .swapaxes(1, 2).reshape(shape))


def unpermute_rotary(weight: np.ndarray, n_head: int) -> np.ndarray:
    """Inverse of :func:`permute_rotary` (for tests and debugging)."""
    shape = weight.shape
    head_dim = shape[0] // n_head
    return (weight.reshape(n_head, head_dim // 2, 2, *shape[1:])
            .swapaxes(1, 2).reshape(shape))


def tensor_nbytes(shape: Sequence[int], ggml_type: str) -> int:
    """Bytes a tensor of ``shape`` takes in ``ggml_type``."""
    import gguf

    qtype = gguf.GGMLQuantizationType[ggml_type]
    block, type_size = gguf.GGML_QUANT_SIZES[qtype]
    rows = int(np.prod(shape[:-1], dtype=np.int64)) if len(shape) > 1 else 1
    return rows * (shape[-1] // block) * type_size


def encode(array: np.ndarray, ggml_type: str) -> np.ndarray:
    """Encode a float32 array into the bytes (or float array) GGUF stores.

    Args:
        array: float32 data.
        ggml_type: ``F32``, ``F16``, ``BF16``, ``Q8_0`` or ``Q4_0`` (gguf's quantisers, which
            follow ggml's reference ones), or one of :data:`GGML_QUANTISED` (ggml's own
            quantiser, in row chunks: :func:`.quantize.quantize_rows`).

    Returns:
        An array whose ``tobytes()`` is the GGUF payload.

    Raises:
        ConversionError: unsupported type, or rows do not fit a block type.
    """
    import gguf

    if ggml_type == "F32":
        return np.ascontiguousarray(array, dtype=np.float32)
    if ggml_type == "F16":
        return np.ascontiguousarray(array, dtype=np.float16)
    if ggml_type in ("BF16", "Q8_0", "Q4_0"):
        qtype = gguf.GGMLQuantizationType[ggml_type]
        if array.shape[-1] % gguf.GGML_QUANT_SIZES[qtype][0]:
            raise ConversionError(f"rows of length {array.shape[-1]} cannot be stored as "
                                  f"{ggml_type}.")
        return gguf.quants.quantize(np.ascontiguousarray(array, dtype=np.float32), qtype)
    if ggml_type in GGML_QUANTISED:
        return quantize_rows(array, ggml_type)
    raise ConversionError(f"the converter cannot write {ggml_type} tensors directly.")


def check_shape(reader: TensorSource, spec: TensorSpec,
                expected: tuple[int, ...] | None = None) -> None:
    """Fail clearly when a checkpoint tensor does not have the shape the config implies.

    Raises:
        ConversionError: naming the tensor and both shapes.
    """
    actual = reader.shape(spec.source)
    want = spec.shape if expected is None else expected
    if tuple(actual) != tuple(want):
        raise ConversionError(
            f"tensor {spec.source!r} has shape {list(actual)} but config.json implies "
            f"{list(want)}; config.json and the weights do not match.")


def write_gguf(path: Path, writer: object, reader: TensorSource,
               specs: Iterable[TensorSpec],
               on_tensor: Callable[[TensorSpec], None] | None = None) -> int:
    """Write ``writer``'s metadata plus all ``specs`` tensors to ``path``.

    Args:
        path: Output file (created or truncated).
        writer: A ``gguf.GGUFWriter`` created with ``path=None`` and metadata filled in.
        reader: Where tensor data comes from.
        specs: Planned tensors, written in this order.
        on_tensor: Called with each tensor once it is written.

    Returns:
        The number of tensors written.

    Raises:
        ConversionError: a tensor is missing or its transformed shape is wrong.
    """
    import gguf

    plan = list(specs)
    for spec in plan:
        writer.add_tensor_info(spec.name, spec.shape, np.dtype(np.float32),
                               tensor_nbytes(spec.shape, spec.ggml_type),
                               raw_dtype=gguf.GGMLQuantizationType[spec.ggml_type])
    writer.write_header_to_file(path=path)
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for spec in plan:
        data = reader.load(spec.source, np.float32)
        if spec.transform is not None:
            data = spec.transform(data)
        if tuple(data.shape) != spec.shape:
            raise ConversionError(f"tensor {spec.source!r} became shape {list(data.shape)}, "
                                  f"expected {list(spec.shape)}.")
        writer.write_tensor_data(encode(data, spec.ggml_type))
        del data
        if on_tensor is not None:
            on_tensor(spec)
    writer.close()
    return len(plan)
