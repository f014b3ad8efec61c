"""Lazy, memory-bounded reading of (sharded) safetensors checkpoints.

The safetensors format is an 8-byte little-endian header length, a JSON
header (``name -> {dtype, shape, data_offsets}``) and the raw tensor bytes.
Tensors are memory-mapped one at a time, so converting a 7B model never
holds more than one tensor (plus its converted copy) in memory, and bf16 is
decoded with numpy alone (no torch needed at conversion time).
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

from edgevlm.errors import ConversionError, InvalidModelError

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"

_NUMPY_DTYPES: dict[str, str] = {
    "F64": "<f8", "F32": "<f4", "F16": "<f2", "I64": "<i8", "I32": "<i4",
    "I16": "<i2", "I8": "i1", "U8": "u1", "BOOL": "?",
}


@dataclass(frozen=True)
class TensorEntry:
    """Where one tensor lives: file, dtype tag, shape and byte range."""

    name: str
    file: Path
    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int


def _read_header(path: Path) -> tuple[dict[str, dict], int]:
    """Return (header dict, byte offset of the data section) of one file."""
    try:
        with open(path, "rb") as fh:
            (length,) = struct.unpack("<Q", fh.read(8))
            header = json.loads(fh.read(length))
    except (OSError, struct.error, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InvalidModelError(
            f"{path} is not a readable safetensors file ({exc}); re-download it.") from exc
    header.pop("__metadata__", None)
    return header, 8 + length


class CheckpointReader:
    """Read tensors of a Hugging Face folder lazily, one at a time.

    Args:
        folder: Checkpoint folder with ``model.safetensors`` or
            ``model.safetensors.index.json`` plus its shards.

    Raises:
        ConversionError: no safetensors weights in the folder (e.g. only
            ``pytorch_model.bin``), or a shard named by the index is missing.
    """

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)
        self._entries: dict[str, TensorEntry] = {}
        for shard in self._shard_files():
            header, data_start = _read_header(shard)
            for name, info in header.items():
                begin, end = info["data_offsets"]
                self._entries[name] = TensorEntry(name, shard, info["dtype"],
                                                  tuple(info["shape"]),
                                                  data_start + begin, data_start + end)

    def _shard_files(self) -> list[Path]:
        index = self.folder / INDEX_FILE
        if index.is_file():
            weight_map = json.loads(index.read_text(encoding="utf-8")).get("weight_map", {})
            shards = [self.folder / name for name in dict.fromkeys(weight_map.values())]
            missing = [s.name for s in shards if not s.is_file()]
            if missing:
                raise ConversionError(
                    f"{index.name} names shards that are missing: {', '.join(missing)}; "
                    "download the complete checkpoint.")
            return shards
        single = self.folder / SINGLE_FILE
        if single.is_file():
            return [single]
        others = sorted(p.name for p in self.folder.glob("*.safetensors"))
        if len(others) == 1:
            return [self.folder / others[0]]
        raise ConversionError(
            f"no safetensors weights in {self.folder} (expected {SINGLE_FILE} or {INDEX_FILE}); "
            "convert .bin checkpoints to safetensors first or download the safetensors version.")

    def names(self) -> list[str]:
        """Return all tensor names, in file order."""
        return list(self._entries)

    def __contains__(self, name: str) -> bool:
        return name in self._entries

    def entry(self, name: str) -> TensorEntry:
        """Return the index entry of ``name``.

        Raises:
            ConversionError: the tensor is not in the checkpoint.
        """
        try:
            return self._entries[name]
        except KeyError:
            raise ConversionError(
                f"tensor {name!r} is missing from the checkpoint in {self.folder}; "
                "the download may be incomplete or the model is not a supported variant.") from None

    def shape(self, name: str) -> tuple[int, ...]:
        """Return the shape of ``name`` without reading its data."""
        return self.entry(name).shape

    def dtype(self, name: str) -> str:
        """Return the safetensors dtype tag of ``name`` (``"BF16"``, ``"F16"``...)."""
        return self.entry(name).dtype

    def load(self, name: str, dtype: np.dtype | type = np.float32) -> np.ndarray:
        """Read one tensor and convert it to ``dtype`` (a fresh array).

        Args:
            name: Tensor name in the checkpoint.
            dtype: numpy dtype of the result; bf16 data is decoded exactly.

        Returns:
            The tensor as a C-contiguous numpy array of its checkpoint shape.

        Raises:
            ConversionError: missing tensor or unsupported dtype.
        """
        entry = self.entry(name)
        count = int(np.prod(entry.shape, dtype=np.int64))
        if count == 0:
            return np.zeros(entry.shape, dtype=dtype)
        if entry.dtype == "BF16":
            raw = np.memmap(entry.file, dtype="<u2", mode="r", offset=entry.start, shape=(count,))
            data = (raw.astype(np.uint32) << 16).view(np.float32)
        elif entry.dtype in _NUMPY_DTYPES:
            data = np.memmap(entry.file, dtype=_NUMPY_DTYPES[entry.dtype], mode="r",
                             offset=entry.start, shape=(count,))
        else:
            raise ConversionError(f"tensor {name!r} has unsupported dtype {entry.dtype}.")
        return np.ascontiguousarray(data, dtype=dtype).reshape(entry.shape)

    def iter_names(self, prefix: str = "") -> Iterator[str]:
        """Yield tensor names starting with ``prefix``."""
        return (n for n in self._entries if n.startswith(prefix))

    def widest_float(self) -> str:
        """Return ``"F32"``, ``"BF16"`` or ``"F16"``: the dtype that holds all weights exactly."""
        tags = {e.dtype for e in self._entries.values()}
        if "F32" in tags or "F64" in tags or ("BF16" in tags and "F16" in tags):
            return "F32"
        return "BF16" if "BF16" in tags else "F16"


class TensorSource(Protocol):
    """What the GGUF writers read tensors from (a checkpoint, arrays, or both)."""

    def names(self) -> list[str]:
        """All tensor names."""

    def __contains__(self, name: object) -> bool:
        """Whether ``name`` is present."""

    def shape(self, name: str) -> tuple[int, ...]:
        """Shape of ``name`` without reading its data."""

    def load(self, name: str, dtype: np.dtype | type = np.float32) -> np.ndarray:
        """Read ``name`` converted to ``dtype``."""


class ArrayReader:
    """A :class:`TensorSource` over in-memory arrays (tensors read from ``.pt`` files).

    Args:
        arrays: ``name -> array``; integer and bool arrays are refused on load.
        origin: Where the arrays came from, for error messages.
    """

    def __init__(self, arrays: Mapping[str, np.ndarray], origin: str) -> None:
        self._arrays = dict(arrays)
        self.origin = origin

    def names(self) -> list[str]:
        """Return all tensor names, in insertion order."""
        return list(self._arrays)

    def __contains__(self, name: object) -> bool:
        return name in self._arrays

    def shape(self, name: str) -> tuple[int, ...]:
        """Return the shape of ``name``.

        Raises:
            ConversionError: the tensor is missing.
        """
        if name not in self._arrays:
            raise ConversionError(f"tensor {name!r} is missing from {self.origin}.")
        return tuple(self._arrays[name].shape)

    def load(self, name: str, dtype: np.dtype | type = np.float32) -> np.ndarray:
        """Return a C-contiguous copy of ``name`` as ``dtype``.

        Raises:
            ConversionError: missing tensor, or not a float tensor.
        """
        self.shape(name)
        array = self._arrays[name]
        if array.dtype.kind != "f":
            raise ConversionError(f"tensor {name!r} in {self.origin} has dtype {array.dtype}, "
                                  "expected floating point.")
        return np.array(array, dtype=dtype, order="C", copy=True)


class ReaderChain:
    """A :class:`TensorSource` joining several sources whose names do not overlap.

    Args:
        sources: The sources, looked up in order.

    Raises:
        ConversionError: two sources hold the same name.
    """

    def __init__(self, sources: Sequence[TensorSource]) -> None:
        self._sources = list(sources)
        self._owner: dict[str, TensorSource] = {}
        for source in self._sources:
            for name in source.names():
                if name in self._owner:
                    raise ConversionError(f"tensor name {name!r} occurs in two inputs.")
                self._owner[name] = source

    def _find(self, name: str) -> TensorSource:
        if name not in self._owner:
            raise ConversionError(f"tensor {name!r} is missing from the inputs.")
        return self._owner[name]

    def names(self) -> list[str]:
        """Return all names, source by source."""
        return list(self._owner)

    def __contains__(self, name: object) -> bool:
        return name in self._owner

    def shape(self, name: str) -> tuple[int, ...]:
        """Return the shape of ``name`` from the source holding it."""
        return self._find(name).shape(name)

    def load(self, name: str, dtype: np.dtype | type = np.float32) -> np.ndarray:
        """Read ``name`` from the source holding it."""
        return self._find(name).load(name, dtype)
