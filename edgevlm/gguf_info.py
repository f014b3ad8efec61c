"""Fast GGUF header reading and the ``edgevlm inspect`` report.

Reads only the header (key/values and tensor infos), never tensor data, and
summarises long arrays (vocabularies) by their length, so that classifying
the files of a model folder is instant even for 7B models.
"""

from __future__ import annotations

import dataclasses
import struct
import threading
from collections import Counter, OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from collections.abc import Callable
from typing import Any, BinaryIO

from edgevlm.constants import EDGEVLM_ONLY_LLM_ARCHS
from edgevlm.errors import InvalidModelError, ModelNotFoundError

_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q",
            11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9
#: Arrays longer than this are summarised as ArraySummary instead of read.
MAX_ARRAY = 64


@dataclass(frozen=True)
class ArraySummary:
    """A long GGUF array, reduced to its element type and length."""

    type_id: int
    length: int

    def __str__(self) -> str:
        return f"[{self.length} items]"


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]
    ggml_type: int
    offset: int = 0
    """Byte offset of the tensor's data from :attr:`GGUFHeader.data_offset`."""


@dataclass(frozen=True)
class GGUFHeader:
    """A GGUF file's header; shared by every reader of the file (see :func:`read_header`): do not mutate."""

    path: Path
    version: int
    metadata: dict[str, Any]
    tensors: tuple[TensorInfo, ...] = field(repr=False)
    data_offset: int = 0
    """Absolute file offset where the tensor data starts (aligned to ``general.alignment``)."""

    @property
    def architecture(self) -> str | None:
        return self.metadata.get("general.architecture")


#: Headers already parsed, by (path, size, mtime, inode): a model folder's files are classified,
#: described and loaded from one parse each. Small: only the last few files are kept.
_CACHE: OrderedDict[tuple[str, int, int, int], tuple[GGUFHeader, bool]] = OrderedDict()
_CACHE_SIZE = 16
_CACHE_LOCK = threading.Lock()


def read_header(path: str | Path, *, with_tensors: bool = True) -> GGUFHeader:
    """Read a GGUF file's header, or return the one already read from the unchanged file.

    The header is parsed once per file version (path, size, modification
    time): the model resolution, the descriptor and the kernels engine all
    read the same object. A header read ``with_tensors=False`` is parsed
    again when the tensor infos are asked for.

    Raises:
        ModelNotFoundError: the file does not exist.
        InvalidModelError: it is not a GGUF file or is truncated.
    """
    path = Path(path)
    if not path.is_file():
        raise ModelNotFoundError(f"model file not found: {path}")
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns, st.st_ino)
    with _CACHE_LOCK:
        hit = _CACHE.get(key)
        if hit is not None and (hit[1] or not with_tensors):
            _CACHE.move_to_end(key)
            # The same file named another way keeps the caller's name (metadata and tensors are shared).
            return hit[0] if hit[0].path == path else dataclasses.replace(hit[0], path=path)
    try:
        with path.open("rb") as fh:
            header = _parse(path, fh, with_tensors)
    except (struct.error, UnicodeDecodeError, OverflowError, MemoryError) as exc:
        raise InvalidModelError(f"{path} is truncated or corrupt ({exc}); convert or download it again") from exc
    with _CACHE_LOCK:
        _CACHE[key] = (header, with_tensors)
        _CACHE.move_to_end(key)
        while len(_CACHE) > _CACHE_SIZE:
            _CACHE.popitem(last=False)
    return header


def clear_header_cache() -> None:
    """Forget the headers :func:`read_header` keeps (tests count parses from a clean state)."""
    with _CACHE_LOCK:
        _CACHE.clear()


def read_metadata(path: str | Path) -> dict[str, Any]:
    """Only the key/value metadata of a GGUF file (see :func:`read_header`)."""
    return read_header(path, with_tensors=False).metadata


def _parse(path: Path, fh: BinaryIO, with_tensors: bool) -> GGUFHeader:
    magic = fh.read(4)
    if magic != b"GGUF":
        raise InvalidModelError(f"{path} is not a GGUF file (starts with {magic!r}); "
                                "convert checkpoints with `edgevlm convert`")
    version, n_tensors, n_kv = struct.unpack("<IQQ", fh.read(20))
    if version < 2 or n_kv > 1_000_000 or n_tensors > 10_000_000:
        raise InvalidModelError(f"{path}: unsupported or corrupt GGUF header (version {version})")
    meta: dict[str, Any] = {}
    for _ in range(n_kv):
        key = _read_str(fh)
        (type_id,) = struct.unpack("<I", fh.read(4))
        meta[key] = _read_value(fh, type_id)
    tensors: list[TensorInfo] = []
    if with_tensors:
        for _ in range(n_tensors):
            name = _read_str(fh)
            (n_dims,) = struct.unpack("<I", fh.read(4))
            shape = struct.unpack(f"<{n_dims}Q", fh.read(8 * n_dims))
            ggml_type, offset = struct.unpack("<IQ", fh.read(12))
            tensors.append(TensorInfo(name, tuple(shape), ggml_type, offset))
    align = meta.get("general.alignment", 32)
    align = int(align) if isinstance(align, int) and align > 0 else 32
    data_offset = -(-fh.tell() // align) * align if with_tensors else 0
    return GGUFHeader(path, version, meta, tuple(tensors), data_offset)


def raw_metadata(path: str | Path, keep: Callable[[str], bool]) -> list[tuple[str, int, bytes]]:
    """The key/value entries of a GGUF file that ``keep`` accepts, as ``(key, type id, value bytes)``
    (the value's encoded bytes, long arrays included, for copying into another file unparsed).

    Raises:
        InvalidModelError: not a GGUF file, or truncated.
    """
    path = Path(path)
    try:
        with path.open("rb") as fh:
            if fh.read(4) != b"GGUF":
                raise InvalidModelError(f"{path} is not a GGUF file")
            _version, _n_tensors, n_kv = struct.unpack("<IQQ", fh.read(20))
            out = []
            for _ in range(n_kv):
                key = _read_str(fh)
                (type_id,) = struct.unpack("<I", fh.read(4))
                start = fh.tell()
                _skip_value(fh, type_id)
                if keep(key):
                    end = fh.tell()
                    fh.seek(start)
                    out.append((key, type_id, fh.read(end - start)))
            return out
    except (OSError, struct.error, UnicodeDecodeError) as exc:
        raise InvalidModelError(f"{path} is not a readable GGUF file ({exc})") from exc


def write_raw_metadata(path: str | Path, entries: list[tuple[str, int, bytes]]) -> Path:
    """A GGUF (version 3) of ``entries`` (as :func:`raw_metadata` gives them) and no tensors."""
    path = Path(path)
    with path.open("wb") as fh:
        fh.write(b"GGUF" + struct.pack("<IQQ", 3, 0, len(entries)))
        for key, type_id, value in entries:
            name = key.encode("utf-8")
            fh.write(struct.pack("<Q", len(name)) + name + struct.pack("<I", type_id) + value)
        fh.write(b"\0" * (-fh.tell() % 32))  # the (empty) data section starts aligned
    return path


def _read_str(fh: BinaryIO) -> str:
    (n,) = struct.unpack("<Q", fh.read(8))
    if n > 1 << 26:
        raise struct.error(f"string of {n} bytes")
    data = fh.read(n)
    if len(data) != n:
        raise struct.error("unexpected end of file")
    return data.decode("utf-8")


def _read_value(fh: BinaryIO, type_id: int) -> Any:
    if type_id in _SCALARS:
        fmt = _SCALARS[type_id]
        return struct.unpack(fmt, fh.read(struct.calcsize(fmt)))[0]
    if type_id == _STRING:
        return _read_str(fh)
    if type_id == _ARRAY:
        item_type, n = struct.unpack("<IQ", fh.read(12))
        if n <= MAX_ARRAY:
            return [_read_value(fh, item_type) for _ in range(n)]
        if item_type in _SCALARS:
            fh.seek(n * struct.calcsize(_SCALARS[item_type]), 1)
        else:
            for _ in range(n):
                _skip_value(fh, item_type)
        return ArraySummary(item_type, n)
    raise struct.error(f"unknown GGUF value type {type_id}")


def _skip_value(fh: BinaryIO, type_id: int) -> None:
    if type_id == _STRING:
        (n,) = struct.unpack("<Q", fh.read(8))
        fh.seek(n, 1)
    else:
        _read_value(fh, type_id)


# --------------------------------------------------------------------------
# `edgevlm inspect`

_LLM_KEYS = ("context_length", "embedding_length", "block_count", "feed_forward_length",
             "attention.head_count", "attention.head_count_kv", "rope.freq_base")
_CLIP_KEYS = ("clip.projector_type", "clip.vision.image_size", "clip.vision.patch_size",
              "clip.vision.embedding_length", "clip.vision.block_count",
              "clip.vision.feature_layer", "clip.vision.projection_dim", "clip.use_gelu")


def type_name(ggml_type: int) -> str:
    try:
        from gguf import GGMLQuantizationType

        return GGMLQuantizationType(ggml_type).name
    except (ImportError, ValueError):
        return f"type{ggml_type}"


def describe(path: str | Path) -> dict[str, Any]:
    """A JSON-able summary of a GGUF file for ``edgevlm inspect``."""
    header = read_header(path)
    meta = header.metadata
    arch = header.architecture or "unknown"
    info: dict[str, Any] = {
        "file": str(header.path), "size_bytes": header.path.stat().st_size,
        "gguf_version": header.version, "architecture": arch,
        "name": meta.get("general.name"), "tensor_count": len(header.tensors),
        "tensor_types": dict(Counter(type_name(t.ggml_type) for t in header.tensors).most_common()),
    }
    if arch == "clip":
        info["role"] = "vision projector"
        info["hyperparameters"] = {k: meta[k] for k in _CLIP_KEYS if k in meta}
        info["loadable_by"] = _projector_runtimes(meta)
    else:
        info["role"] = "language model"
        info["hyperparameters"] = {k: meta[f"{arch}.{k}"] for k in _LLM_KEYS if f"{arch}.{k}" in meta}
        tokens = meta.get("tokenizer.ggml.tokens")
        info["vocab_size"] = tokens.length if isinstance(tokens, ArraySummary) else (
            len(tokens) if tokens else None)
        info["tokenizer"] = meta.get("tokenizer.ggml.model")
        info["chat_template"] = "tokenizer.chat_template" in meta
        info["loadable_by"] = (["edgevlm"] if arch in EDGEVLM_ONLY_LLM_ARCHS else
                               ["llama.cpp (llama-cli, llama-server)", "llama-cpp-python", "edgevlm"])
    edgevlm_keys = {k: v for k, v in meta.items() if k.startswith("edgevlm.")}
    if edgevlm_keys:
        info["edgevlm"] = edgevlm_keys
    return info


def _projector_runtimes(meta: dict[str, Any]) -> list[str]:
    proj = meta.get("clip.projector_type")
    if proj is None or str(proj).startswith("edgevlm"):
        return ["edgevlm"]
    return ["libmtmd (llama-mtmd-cli, llama-server --mmproj)", "llama-cpp-python MTMDChatHandler", "edgevlm"]
