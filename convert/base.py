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
import json
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar

from edgevlm import constants
from edgevlm.errors import ConversionError, ModelNotFoundError, UnsupportedModelError

from .checkpoint import CheckpointReader
from .config import read_config_json
from .tensors import TensorSpec

ARCHITECTURES: dict[str, type[Converter]] = {}
"""``config.json`` architecture name -> converter class."""

BUILTIN_MODULES: tuple[str, ...] = ("llava", "qwen2vl")
"""Modules of this package that register converters (imported on first lookup)."""

Log = Callable[[str], None]


def register(*names: str) -> Callable[[type[Converter]], type[Converter]]:
    """Class decorator registering a converter for ``config.json`` architecture names.

    Args:
        names: One or more ``architectures[0]`` values.

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


def load_builtin_converters() -> None:
    """Import the built-in converter modules so that they register themselves."""
    for module in BUILTIN_MODULES:
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
    """Return ``config.json["architectures"][0]`` of ``folder`` if it is supported.

    Args:
        folder: Checkpoint folder.

    Returns:
        The architecture name.

    Raises:
        ModelNotFoundError: the folder is missing.
        ConversionError: no or unreadable ``config.json``.
        UnsupportedModelError: unknown architecture; lists the supported names.
    """
    data = read_config_json(check_source_folder(folder))
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


def _edgevlm_version() -> str:
    try:
        from importlib.metadata import version
        return version("edgevlm")
    except Exception:  # noqa: BLE001 - metadata missing in odd installs
        return "0+unknown"


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
    :attr:`projector_prefixes` and override the hooks below.
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

    def __init__(self, folder: Path, log: Log | None = None) -> None:
        self.folder = check_source_folder(folder)
        self.log: Log = log or (lambda _msg: None)
        self.raw_config: dict[str, Any] = read_config_json(self.folder)
        self.config = self.load_config(self.raw_config)
        self.reader = CheckpointReader(self.folder)
        names = self.reader.names()
        self.text_names = split_names(names, self.text_prefixes)
        self.vision_names = split_names(names, self.vision_prefixes)
        self.projector_names = split_names(names, self.projector_prefixes)
        self.notes: list[str] = []
        self.validate()

    # --- hooks -------------------------------------------------------------
    def load_config(self, data: Mapping[str, Any]) -> Any:
        """Parse ``config.json`` into a typed config (hook; default: ``config_class.from_dict``)."""
        if self.config_class is None:
            raise NotImplementedError
        return self.config_class.from_dict(data)

    def validate(self) -> None:
        """Reject checkpoints this converter cannot handle (hook; default: accept)."""

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
        """Rows of the token embedding matrix (``model.embed_tokens.weight``)."""
        return self.reader.shape(self.source(self.text_names, "model.embed_tokens.weight"))[0]

    def write_edgevlm_keys(self, writer: Any) -> None:
        """Add the ``edgevlm.*`` provenance keys every output file carries."""
        writer.add_string(constants.KEY_EDGEVLM_VERSION, _edgevlm_version())
        writer.add_string(constants.KEY_SOURCE_ARCHITECTURE, self.config.architecture)
        writer.add_string(constants.KEY_PROMPT_FAMILY, self.prompt_family)

    def processor_normalisation(self) -> tuple[list[float], list[float]] | None:
        """Return (mean, std) of the image processor config, if the folder has one."""
        for file, key in (("preprocessor_config.json", None),
                          ("processor_config.json", "image_processor")):
            path = self.folder / file
            if path.is_file():
                data = json.loads(path.read_text(encoding="utf-8"))
                data = data.get(key, {}) if key else data
                if "image_mean" in data and "image_std" in data:
                    return list(data["image_mean"]), list(data["image_std"])
        return None

    def note(self, message: str) -> None:
        """Record a note for :class:`ConversionResult` and log it."""
        self.notes.append(message)
        self.log(f"note: {message}")
