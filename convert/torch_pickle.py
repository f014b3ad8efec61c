"""Read ``torch.save`` files without executing them (and without torch).

A torch file (torch >= 1.6) is a zip archive: ``<root>/data.pkl`` is a pickle
whose tensors refer, by key, to raw storages in ``<root>/data/<key>``, and
``<root>/byteorder`` says how those bytes are ordered. Unpickling normally
imports and calls whatever the pickle names, so a hostile file runs code.
:func:`load_torch_file` instead unpickles with :class:`RestrictedUnpickler`:

* ``find_class`` answers only from an explicit table: the tensor-rebuild
  helpers (re-implemented here on numpy), the storage types, ``OrderedDict``,
  ``set``, a few ``torch.nn`` module classes and ``torch.nn.functional``
  activations. Module classes become inert :class:`ModuleStandIn` objects that
  only record their pickled ``__dict__`` state; functions become
  non-callable :class:`TorchFunction` markers.
* A class from outside the standard library and the known libraries (the
  user's own ``models.VisualToGPTMapping``) becomes an inert stand-in as
  well; it refuses any constructor argument.
* Every other global (``os.system``, ``builtins.eval``,
  ``subprocess.Popen``...) raises :class:`UnsafePickleError`: the file is
  refused and nothing in it is executed.
"""

from __future__ import annotations

import _compat_pickle
import io
import pickle
import sys
import zipfile
import zlib
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from edgevlm.errors import ConversionError, UnsafePickleError

PICKLE_NAME = "data.pkl"
_ZIP_MAGIC = (b"PK\x03\x04", b"PK\x05\x06")
_STORAGE_DTYPES = {
    "FloatStorage": "f4", "HalfStorage": "f2", "BFloat16Storage": "bf16",
    "DoubleStorage": "f8", "LongStorage": "i8", "IntStorage": "i4", "ShortStorage": "i2",
    "CharStorage": "i1", "ByteStorage": "u1", "BoolStorage": "b1", "UntypedStorage": "u1",
}
_NN_CLASSES = {
    ("torch.nn.modules.transformer", "TransformerEncoderLayer"),
    ("torch.nn.modules.activation", "MultiheadAttention"),
    ("torch.nn.modules.activation", "ReLU"),
    ("torch.nn.modules.activation", "GELU"),
    ("torch.nn.modules.linear", "NonDynamicallyQuantizableLinear"),
    ("torch.nn.modules.linear", "Linear"),
    ("torch.nn.modules.normalization", "LayerNorm"),
    ("torch.nn.modules.dropout", "Dropout"),
}
_FUNCTIONS = {("torch.nn.functional", "relu"): "relu", ("torch.nn.functional", "gelu"): "gelu",
              ("torch._C._nn", "gelu"): "gelu"}
_PLAIN = {("collections", "OrderedDict"): OrderedDict, ("builtins", "set"): set}
# Names a refusal message adds, so that ``posix.system`` reads as ``os.system``.
_ALIASES = {"posix": "os", "nt": "os"}
# Top-level packages whose classes are never taken for a user's module class.
_KNOWN_PACKAGES = frozenset(sys.stdlib_module_names) | {
    "torch", "numpy", "edgevlm", "transformers", "safetensors", "dill", "joblib", "setuptools",
    "pip", "IPython", "_pytest", "pytest"}


class _Refused(Exception):
    """Raised inside the unpickler; :func:`load_torch_file` turns it into UnsafePickleError."""

    def __init__(self, global_name: str, why: str) -> None:
        super().__init__(global_name, why)
        self.global_name = global_name
        self.why = why


@dataclass(frozen=True)
class TorchFunction:
    """Marker for an allowed ``torch.nn.functional`` function (never called).

    Attributes:
        qualified_name: ``module.name`` as the pickle spells it.
        activation: ``"relu"`` or ``"gelu"``.
    """

    qualified_name: str
    activation: str


@dataclass(frozen=True)
class _StorageType:
    name: str
    dtype: str


class ModuleStandIn:
    """Inert replacement of a pickled ``torch.nn.Module``: it only keeps its state.

    Attributes:
        qualified_name: The pickled class, ``module.Class``.
        state: The pickled ``__dict__`` (``_parameters``, ``_modules``,
            ``num_heads``, ``eps``...).
    """

    qualified_name: ClassVar[str] = "torch.nn.Module"

    state: dict[str, Any]

    def __new__(cls, *args: Any, **kwargs: Any) -> ModuleStandIn:
        if args or kwargs:
            raise _Refused(cls.qualified_name, "the pickle calls it with arguments")
        obj = super().__new__(cls)
        obj.state = {}
        return obj

    def __setstate__(self, state: Any) -> None:
        if isinstance(state, tuple) and len(state) == 2 and state[1] is None:
            state = state[0]
        if not isinstance(state, dict):
            raise _Refused(self.qualified_name, "its pickled state is not a dict")
        self.state = dict(state)

    def child(self, name: str) -> Any:
        """Return the sub-module ``name`` (or ``None``)."""
        return (self.state.get("_modules") or {}).get(name)

    def __repr__(self) -> str:
        return f"<stand-in {self.qualified_name}>"


@dataclass
class _Storage:
    data: np.ndarray


def _stand_in_class(module: str, name: str) -> type[ModuleStandIn]:
    return type(name, (ModuleStandIn,), {"qualified_name": f"{module}.{name}",
                                         "__module__": __name__})


def _python3_name(module: str, name: str) -> tuple[str, str]:
    """Undo the Python 2 renaming of protocol-2 pickles (``__builtin__``, ``commands``...).

    This is the mapping ``pickle.Unpickler.find_class`` applies with ``fix_imports``.
    """
    if (module, name) in _compat_pickle.NAME_MAPPING:
        return _compat_pickle.NAME_MAPPING[(module, name)]
    return _compat_pickle.IMPORT_MAPPING.get(module, module), name


def _is_user_class(module: str, name: str) -> bool:
    """Whether ``module.name`` looks like a user's own nn.Module subclass."""
    parts = module.split(".")
    return (all(p.isidentifier() for p in parts) and name.isidentifier()
            and name[:1].isupper() and parts[0] not in _KNOWN_PACKAGES)


def _checked_int(value: Any, what: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise _Refused("torch._utils._rebuild_tensor_v2", f"{what} {value!r} is not a size")
    return value


def _rebuild_tensor_v2(storage: Any, offset: Any, size: Any, stride: Any,
                       requires_grad: Any = False, backward_hooks: Any = None,
                       metadata: Any = None) -> np.ndarray:
    """numpy version of ``torch._utils._rebuild_tensor_v2`` with bounds checks."""
    if not isinstance(storage, _Storage) or not isinstance(size, tuple) or \
            not isinstance(stride, tuple) or len(size) != len(stride):
        raise _Refused("torch._utils._rebuild_tensor_v2", "its arguments are malformed")
    offset = _checked_int(offset, "offset")
    size = tuple(_checked_int(s, "size") for s in size)
    stride = tuple(_checked_int(s, "stride") for s in stride)
    data = storage.data
    if 0 in size:
        return np.zeros(size, dtype=data.dtype)
    last = offset + sum((n - 1) * s for n, s in zip(size, stride))
    if last >= data.size:
        raise _Refused("torch._utils._rebuild_tensor_v2",
                       f"a tensor reaches element {last} of a storage of {data.size}")
    view = np.lib.stride_tricks.as_strided(
        data[offset:], shape=size, strides=tuple(s * data.itemsize for s in stride),
        writeable=False)
    return np.array(view, copy=True)


def _rebuild_parameter(data: Any, requires_grad: Any = False, backward_hooks: Any = None,
                       state: Any = None) -> np.ndarray:
    """numpy version of ``torch._utils._rebuild_parameter``: the tensor itself."""
    if not isinstance(data, np.ndarray):
        raise _Refused("torch._utils._rebuild_parameter", "its argument is not a tensor")
    return data


_HELPERS = {("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
            ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
            ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter}


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickler of a torch archive's ``data.pkl`` that never imports or executes.

    Args:
        file: The pickle stream.
        archive: The open torch zip archive (storages are read from it).
        root: The archive's top folder name.
        byteorder: ``"little"`` or ``"big"``.
    """

    def __init__(self, file: Any, archive: zipfile.ZipFile, root: str, byteorder: str) -> None:
        super().__init__(file)
        self.archive = archive
        self.root = root
        self.order = "<" if byteorder == "little" else ">"
        self.storages: dict[str, _Storage] = {}
        self.classes: dict[tuple[str, str], type[ModuleStandIn]] = {}

    def find_class(self, module: str, name: str) -> Any:
        """Answer from the allow-list; refuse everything else."""
        module, name = _python3_name(module, name)
        key = (module, name)
        if key in _HELPERS:
            return _HELPERS[key]
        if key in _PLAIN:
            return _PLAIN[key]
        if key in _FUNCTIONS:
            return TorchFunction(f"{module}.{name}", _FUNCTIONS[key])
        if module == "torch" and name in _STORAGE_DTYPES:
            return _StorageType(name, _STORAGE_DTYPES[name])
        if key in _NN_CLASSES or _is_user_class(module, name):
            if key not in self.classes:
                self.classes[key] = _stand_in_class(module, name)
            return self.classes[key]
        shown = f"{module}.{name}"
        if module in _ALIASES:
            shown += f" ({_ALIASES[module]}.{name})"
        raise _Refused(shown, "it is not on edgevlm's list of allowed globals")

    def persistent_load(self, pid: Any) -> _Storage:
        """Resolve ``('storage', type, key, location, numel)`` to a numpy storage."""
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"
                and isinstance(pid[1], _StorageType) and isinstance(pid[2], str)):
            raise _Refused("persistent_load", f"unexpected persistent id {pid!r}")
        kind, key, numel = pid[1], pid[2], pid[4]
        if key not in self.storages:
            self.storages[key] = _Storage(self._read_storage(kind, key, numel))
        return self.storages[key]

    def _read_storage(self, kind: _StorageType, key: str, numel: Any) -> np.ndarray:
        if not isinstance(numel, int) or numel < 0:
            raise _Refused("persistent_load", f"storage size {numel!r} is not a size")
        raw = _read_member(self.archive, f"{self.root}/data/{key}")
        is_bf16 = kind.dtype == "bf16"
        dtype = np.dtype(self.order + ("u2" if is_bf16 else kind.dtype))
        if len(raw) != numel * dtype.itemsize:
            raise ConversionError(
                f"{self.archive.filename}: storage {key} holds {len(raw)} bytes, expected "
                f"{numel * dtype.itemsize}; the file is truncated or corrupt, download it again.")
        data = np.frombuffer(raw, dtype=dtype)
        if is_bf16:
            return (data.astype(np.uint32) << 16).view(np.float32)
        return data.astype(dtype.newbyteorder("="))


def _read_member(archive: zipfile.ZipFile, member: str) -> bytes:
    try:
        return archive.read(member)
    except KeyError:
        raise ConversionError(f"{archive.filename}: {member} is missing from the archive; the "
                              "file is truncated or corrupt, download it again.") from None
    except (zipfile.BadZipFile, zlib.error, EOFError, OSError) as exc:
        raise ConversionError(f"{archive.filename}: cannot read {member} ({exc}); the file is "
                              "truncated or corrupt, download it again.") from exc


def _check_zip(path: Path) -> None:
    """Fail clearly for a missing, legacy or non-zip file."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(4)
    except FileNotFoundError:
        raise ConversionError(f"{path} does not exist.") from None
    except OSError as exc:
        raise ConversionError(f"{path} cannot be read ({exc}).") from exc
    if head[:1] == b"\x80":
        raise ConversionError(
            f"{path} is a legacy (pre-1.6, non-zip) torch file, which edgevlm does not read; "
            "re-save it with torch>=1.6: torch.save(torch.load(path), path).")
    if head not in _ZIP_MAGIC:
        raise ConversionError(f"{path} is not a torch.save file (no zip archive inside).")


def _archive_root(archive: zipfile.ZipFile, path: Path) -> str:
    roots = [n[:-len(PICKLE_NAME) - 1] for n in archive.namelist()
             if n.count("/") == 1 and n.endswith("/" + PICKLE_NAME)]
    if len(roots) != 1:
        found = "no" if not roots else "several"
        raise ConversionError(f"{path} has {found} <archive>/{PICKLE_NAME}; it is not a torch "
                              "file written by torch.save, or it is damaged.")
    return roots[0]


def load_torch_file(path: str | Path) -> Any:
    """Load a ``torch.save`` zip file without executing anything in it.

    Args:
        path: The ``.pt`` file.

    Returns:
        The unpickled object: tensors are numpy arrays (bfloat16 decoded to
        float32 exactly), ``nn.Module`` objects are :class:`ModuleStandIn`.

    Raises:
        UnsafePickleError: the pickle names a global outside the allow-list; the
            message names it. Nothing was executed.
        ConversionError: missing, legacy (non-zip), truncated or corrupt file.
    """
    path = Path(path)
    _check_zip(path)
    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as exc:
        raise ConversionError(f"{path} is truncated or corrupt ({exc}); download it "
                              "again.") from exc
    with archive:
        root = _archive_root(archive, path)
        order = "little"
        if f"{root}/byteorder" in archive.namelist():
            order = _read_member(archive, f"{root}/byteorder").decode("ascii", "replace")
        if order not in ("little", "big"):
            raise ConversionError(f"{path}: unknown byteorder {order!r}.")
        return _unpickle(path, archive, root, order)


def _unpickle(path: Path, archive: zipfile.ZipFile, root: str, order: str) -> Any:
    stream = io.BytesIO(_read_member(archive, f"{root}/{PICKLE_NAME}"))
    try:
        return RestrictedUnpickler(stream, archive, root, order).load()
    except _Refused as exc:
        raise UnsafePickleError(
            f"{path} was refused and not executed: its pickle asks for {exc.global_name} "
            f"({exc.why}). Only torch tensors, state dicts and plain torch.nn modules are "
            "read; re-save the weights with torch.save(module.state_dict(), path) from a "
            "trusted source.") from None
    except ConversionError:
        raise
    except (pickle.UnpicklingError, EOFError, TypeError, ValueError, AttributeError,
            IndexError, KeyError, RecursionError, MemoryError) as exc:
        raise ConversionError(f"{path} holds a pickle edgevlm cannot read ({type(exc).__name__}: "
                              f"{exc}); the file is damaged or not a torch.save file.") from exc


def state_dict_of(obj: Any, source: str = "the file") -> dict[str, np.ndarray]:
    """Flatten a loaded module tree, or check a plain state dict.

    Args:
        obj: What :func:`load_torch_file` returned.
        source: File name used in error messages.

    Returns:
        ``dotted name -> array`` (``transformer_layer.self_attn.in_proj_weight``...),
        parameters and persistent buffers of a module in pickled order.

    Raises:
        ConversionError: ``obj`` is neither a module nor a mapping of names to tensors.
    """
    if isinstance(obj, ModuleStandIn):
        out: dict[str, np.ndarray] = {}
        _collect(obj, "", out, source)
        return out
    if isinstance(obj, Mapping) and all(isinstance(k, str) and isinstance(v, np.ndarray)
                                        for k, v in obj.items()):
        return dict(obj)
    raise ConversionError(f"{source} holds neither a torch.nn.Module nor a state dict "
                          f"(name -> tensor) but {type(obj).__name__}.")


def _collect(module: ModuleStandIn, prefix: str, out: dict[str, np.ndarray], source: str) -> None:
    state = module.state
    skip = state.get("_non_persistent_buffers_set") or set()
    for table in ("_parameters", "_buffers"):
        for name, value in (state.get(table) or {}).items():
            if value is None or (table == "_buffers" and name in skip):
                continue
            if not isinstance(value, np.ndarray):
                raise ConversionError(f"{source}: {prefix}{name} of {module.qualified_name} is "
                                      "not a tensor.")
            out[prefix + name] = value
    for name, child in (state.get("_modules") or {}).items():
        if child is None:
            continue
        if not isinstance(child, ModuleStandIn):
            raise ConversionError(f"{source}: sub-module {prefix}{name} is not a module.")
        _collect(child, f"{prefix}{name}.", out, source)
