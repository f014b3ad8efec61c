"""Converter base class and the architecture registry.

A model family is one small module defining a :class:`Converter` subclass
decorated with :func:`register`; it sets ``config_class`` (and ``llm_arch``
when the LLM is not a ``llama``) and overrides the hooks it needs
(``load_config``, ``validate``, ``llm_tensors``, ``projector_tensors``,
``write_llm_metadata``, ``write_projector_metadata``). The writers in
``llm_writer`` / ``projector_writer`` drive those hooks.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from edgevlm import constants
from edgevlm.errors import ConversionError, ModelNotFoundError, UnsupportedModelError

from .checkpoint import CheckpointReader, TensorSource
from .config import read_config_json
from .tensors import TensorSpec

ARCHITECTURES: dict[str, type[Converter]] = {}
"""Architecture name (``config.json``'s, or a family name such as ``"OmniFusion"`` for
layouts a converter detects itself) -> converter class."""

SHARED_MODULES: frozenset[str] = frozenset({
    "api", "base", "checkpoint", "config", "kquant", "llm_writer", "projector_writer", "quantize",
    "tensors", "tokenizer", "torch_pickle"})
"""Modules of this package that are shared machinery; every other module is a family's
converter and is imported on first lookup (a new family is one new file, nothing else edited)."""

Log = Callable[[str], None]


@dataclass(frozen=True)
class ConverterOption:
    """A family-specific option of :func:`edgevlm.convert.convert` (and ``edgevlm convert``).

    Attributes:
        name: keyword name (``vision_tower``); the CLI flag is ``--vision-tower``.
        kind: ``"path"``, ``"int"`` (a positive integer) or ``"str"``.
        help: one line for ``--help``.
    """

    name: str
    kind: str
    help: str

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")


def family_options() -> list[tuple[ConverterOption, tuple[str, ...]]]:
    """Every family-specific option with the architectures that take it (for the CLI)."""
    load_builtin_converters()
    found: dict[str, tuple[ConverterOption, list[str]]] = {}
    for cls in sorted(set(ARCHITECTURES.values()), key=lambda c: c.architectures[0]):
        for option in cls.options:
            found.setdefault(option.name, (option, []))[1].append(cls.architectures[0])
    return [(option, tuple(users)) for option, users in found.values()]


def edgevlm_version() -> str:
    """edgevlm's version (``edgevlm.__version__``, which pyproject.toml reads too)."""
    from edgevlm import __version__

    return __version__


def register(*names: str) -> Callable[[type[Converter]], type[Converter]]:
    """Class decorator registering a converter for ``config.json`` architecture names.

    Args:
        names: One or more ``architectures[0]`` values (the first is the family's
            own name, used by :func:`detect_architecture`).

    Returns:
        The decorator; it returns the class unchanged.

    Raises:
        ValueError: a name is already registered to another class.
    """
    def decorate(cls: type[Converter]) -> type[Converter]:
        for name in names:
            if ARCHITECTURES.get(name, cls) is not cls:
                raise ValueError(f"architecture {name!r} is already registered")
            ARCHITECTURES[name] = cls
        cls.architectures = tuple(names)
        return cls
    return decorate


def builtin_modules() -> list[str]:
    """The family modules of this package (every module but :data:`SHARED_MODULES`)."""
    import pkgutil

    folder = Path(__file__).resolve().parent
    return sorted(m.name for m in pkgutil.iter_modules([str(folder)])
                  if not m.name.startswith("_") and m.name not in SHARED_MODULES)


def load_builtin_converters() -> None:
    """Import the built-in converter modules so that they register themselves."""
    for module in builtin_modules():
        importlib.import_module(f"{__package__}.{module}")


def supported_architectures() -> list[str]:
    """Return the sorted names of all registered architectures."""
    load_builtin_converters()
    return sorted(ARCHITECTURES)


def check_source_folder(folder: Path) -> Path:
    """Check that ``folder`` is an existing directory.

    Raises:
        ModelNotFoundError: it does not exist or is not a folder.
    """
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise ModelNotFoundError(
            f"checkpoint folder {folder} does not exist; pass the folder that holds "
            "config.json and the *.safetensors files (download it first).")
    return folder


def detect_architecture(folder: Path) -> str:
    """Name the converter for ``folder``: a layout hook first, then ``config.json``.

    Converters that recognise their own folder layout (:meth:`Converter.detect`,
    e.g. OmniFusion's release folder without a top-level ``config.json``) are
    asked first; otherwise ``config.json["architectures"][0]`` is used.

    Args:
        folder: Checkpoint folder.

    Returns:
        The architecture name.

    Raises:
        ModelNotFoundError: the folder is missing.
        ConversionError: no or unreadable ``config.json``.
        UnsupportedModelError: unknown architecture; lists the supported names.
    """
    folder = check_source_folder(folder)
    load_builtin_converters()
    for name, cls in sorted(ARCHITECTURES.items()):
        if name == cls.architectures[0] and cls.detect(folder):
            return name
    data = read_config_json(folder)
    archs = data.get("architectures") or []
    if not archs:
        raise ConversionError(f"{folder}/config.json has no 'architectures' entry; pass "
                              f"architecture= one of: {', '.join(supported_architectures())}.")
    converter_class(str(archs[0]))  # raises for unknown names
    return str(archs[0])


def converter_class(architecture: str) -> type[Converter]:
    """Return the converter registered for ``architecture``.

    Raises:
        UnsupportedModelError: not registered; the message lists supported names.
    """
    load_builtin_converters()
    try:
        return ARCHITECTURES[architecture]
    except KeyError:
        raise UnsupportedModelError(
            f"architecture {architecture!r} is not supported by edgevlm convert; supported: "
            f"{', '.join(sorted(ARCHITECTURES))}.") from None


def split_names(names: Sequence[str],
                prefixes: Sequence[tuple[str, str]]) -> dict[str, str]:
    """Map checkpoint names to local names using the first matching prefix rewrite.

    Args:
        names: Checkpoint tensor names.
        prefixes: ``(prefix, replacement)`` pairs, tried in order.

    Returns:
        ``local name -> checkpoint name`` for names matching some prefix.
    """
    found: dict[str, str] = {}
    for name in names:
        for prefix, replacement in prefixes:
            if name.startswith(prefix):
                found[replacement + name[len(prefix):]] = name
                break
    return found


class Converter:
    """Base class: one instance converts one checkpoint folder.

    Subclasses set :attr:`text_prefixes`, :attr:`vision_prefixes`,
    :attr:`projector_prefixes` and override the hooks below. Extra keyword
    options of :func:`edgevlm.convert.convert` (``vision_tower``...) reach only
    converters that declare them in :attr:`options`.
    """

    architectures: ClassVar[tuple[str, ...]] = ()
    prompt_family: ClassVar[str] = ""
    llm_arch: ClassVar[str] = "llama"
    """``general.architecture`` of the LLM file (a llama.cpp architecture name)."""
    config_class: ClassVar[Any] = None
    """Frozen config dataclass with a ``from_dict(config_json)`` constructor."""
    text_prefixes: ClassVar[tuple[tuple[str, str], ...]] = ()
    vision_prefixes: ClassVar[tuple[tuple[str, str], ...]] = ()
    projector_prefixes: ClassVar[tuple[tuple[str, str], ...]] = ()
    options: ClassVar[tuple[ConverterOption, ...]] = ()
    """Family-specific options this converter takes (shown by ``edgevlm convert --help``)."""
    direct_llm_quants: ClassVar[frozenset[str]] = frozenset()
    """Integer LLM quantisations (``"q8_0"``) this family writes itself with gguf's quantiser
    instead of llama.cpp's, which cannot load an architecture it does not know."""

    @classmethod
    def option_names(cls) -> tuple[str, ...]:
        return tuple(option.name for option in cls.options)

    def __init__(self, folder: Path, log: Log | None = None, **options: Any) -> None:
        """Open and validate the checkpoint in ``folder``.

        Args:
            folder: Checkpoint folder.
            log: Progress callback.
            options: Family-specific options declared in :attr:`options`.

        Raises:
            ConversionError: an option this family does not take, or a bad checkpoint.
        """
        self.folder = check_source_folder(folder)
        self.log: Log = log or (lambda _msg: None)
        unknown = sorted(set(options) - set(self.option_names()))
        if unknown:
            raise ConversionError(
                f"option {unknown[0]}= (--{unknown[0].replace('_', '-')}) does not apply to "
                f"{self.architectures[0]} checkpoints.")
        self.settings: dict[str, Any] = dict(options)
        self.notes: list[str] = []
        self.open()
        self.validate()

    # --- hooks -------------------------------------------------------------
    @classmethod
    def detect(cls, folder: Path) -> bool:
        """Whether ``folder`` has this family's own layout (hook; default: no).

        Consulted by :func:`detect_architecture` before ``config.json``.
        """
        return False

    def open(self) -> None:
        """Read ``config.json`` and index one safetensors checkpoint (hook)."""
        self.raw_config: dict[str, Any] = read_config_json(self.folder)
        self.config = self.load_config(self.raw_config)
        self.reader = CheckpointReader(self.folder)
        names = self.reader.names()
        self.text_names = split_names(names, self.text_prefixes)
        self.vision_names = split_names(names, self.vision_prefixes)
        self.projector_names = split_names(names, self.projector_prefixes)

    def load_config(self, data: Mapping[str, Any]) -> Any:
        """Parse ``config.json`` into a typed config (hook; default: ``config_class.from_dict``)."""
        if self.config_class is None:
            raise NotImplementedError
        return self.config_class.from_dict(data)

    def validate(self) -> None:
        """Reject checkpoints this converter cannot handle (hook; default: accept)."""

    def check_llm_quant(self, quant: str) -> None:
        """Reject an LLM quantisation name this family cannot write (hook; default: accept)."""

    def llm_tensors(self, ggml_type: str) -> list[TensorSpec]:
        """Plan the LLM GGUF tensors, float type ``ggml_type`` for matrices (hook)."""
        raise NotImplementedError

    def projector_tensors(self, vision_type: str) -> list[TensorSpec]:
        """Plan the vision projector GGUF tensors (hook)."""
        raise NotImplementedError

    def write_llm_metadata(self, writer: Any) -> None:
        """Add architecture hparams and vocabulary to the LLM writer (hook)."""
        raise NotImplementedError

    def write_projector_metadata(self, writer: Any) -> None:
        """Add ``clip.*`` keys to the projector writer (hook)."""
        raise NotImplementedError

    # --- helpers -----------------------------------------------------------
    @property
    def projector_reader(self) -> TensorSource:
        """Where projector tensors are read from (default: the checkpoint reader)."""
        return self.reader

    def write_edgevlm_keys(self, writer: Any, source_architecture: str) -> None:
        """Add ``edgevlm.version``, the source architecture and the prompt family."""
        writer.add_string(constants.KEY_EDGEVLM_VERSION, edgevlm_version())
        writer.add_string(constants.KEY_SOURCE_ARCHITECTURE, source_architecture)
        writer.add_string(constants.KEY_PROMPT_FAMILY, self.prompt_family)

    def source(self, table: Mapping[str, str], local: str) -> str:
        """Return the checkpoint name of ``local`` in ``table`` or fail naming it.

        Raises:
            ConversionError: the tensor is missing.
        """
        if local not in table:
            raise ConversionError(f"tensor {local!r} is missing from the checkpoint in "
                                  f"{self.folder}; the download may be incomplete.")
        return table[local]

    def vocab_rows(self) -> int:
        """Rows of the LLM's token embedding matrix."""
        return self.reader.shape(self.source(self.text_names, "model.embed_tokens.weight"))[0]

    def note(self, message: str) -> None:
        """Record a note for :class:`ConversionResult` and log it."""
        self.notes.append(message)
        self.log(f"note: {message}")
