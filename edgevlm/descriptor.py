"""What a model's files hold, read once at load: both GGUF headers.

:func:`describe_model` reads the LLM's and the projector's headers (key/value
metadata and tensor infos, never tensor data) and every later step of
loading — the pair checks, the family lookup, the vision engine choice, the
encoders' metadata — reads this descriptor instead of the files.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgevlm import constants as C
from edgevlm.errors import IncompatibleModelError
from edgevlm.gguf_info import GGUFHeader, read_header


@dataclass(frozen=True)
class ModelFiles:
    """The LLM GGUF and, for a vision model, its projector GGUF."""

    llm: Path
    mmproj: Path | None


@dataclass(frozen=True)
class ProjectorInfo:
    """A projector file's header, with what the families and engines ask of it."""

    header: GGUFHeader = field(repr=False)

    @property
    def path(self) -> Path:
        return self.header.path

    @property
    def metadata(self) -> Mapping[str, Any]:
        return self.header.metadata

    @property
    def tensor_names(self) -> frozenset[str]:
        return frozenset(t.name for t in self.header.tensors)

    def shape(self, name: str) -> tuple[int, ...] | None:
        """ggml shape (ne) of a tensor, or None when the file has no such tensor."""
        return next((t.shape for t in self.header.tensors if t.name == name), None)

    @property
    def projector_type(self) -> str:
        """``clip.projector_type`` (libmtmd's name), "" when absent."""
        meta = self.metadata
        return str(meta.get("clip.projector_type") or meta.get("clip.vision.projector_type") or "")

    @property
    def kind(self) -> str:
        """edgevlm's projector kind (``edgevlm.projector.kind``) or else the projector type."""
        return str(self.metadata.get(C.KEY_PROJECTOR_KIND) or self.projector_type)

    @property
    def output_width(self) -> int | None:
        """The width of the embeddings it produces, from its last projection matrix."""
        return C.projector_output_width({t.name: t.shape for t in self.header.tensors})


@dataclass(frozen=True)
class ModelDescriptor:
    """Both files of a model and their headers.

    Attributes:
        files: the paths.
        llm: the LLM file's header.
        projector: the projector's header, or None for a text-only model.
    """

    files: ModelFiles
    llm: GGUFHeader = field(repr=False)
    projector: ProjectorInfo | None = field(repr=False)

    @property
    def llm_metadata(self) -> Mapping[str, Any]:
        return self.llm.metadata

    @property
    def llm_architecture(self) -> str:
        return str(self.llm.architecture or "")

    def llm_key(self, suffix: str) -> Any:
        """``<architecture>.<suffix>`` of the LLM (``context_length``...), or None."""
        return self.llm.metadata.get(f"{self.llm_architecture}.{suffix}")


def describe_model(files: ModelFiles) -> ModelDescriptor:
    """Read both headers once and check that the files are what they claim.

    Raises:
        ModelNotFoundError: a file is missing.
        InvalidModelError: a file is not GGUF or is truncated.
        IncompatibleModelError: the LLM is a projector, or the projector is not one.
    """
    llm = read_header(files.llm)
    if llm.architecture == "clip":
        raise IncompatibleModelError(f"{files.llm.name} is a vision projector, not an LLM; pass it as mmproj")
    projector = None
    if files.mmproj is not None:
        header = read_header(files.mmproj)
        if header.architecture != "clip":
            raise IncompatibleModelError(
                f"{files.mmproj.name} is not a vision projector (architecture {header.architecture!r})")
        projector = ProjectorInfo(header)
    return ModelDescriptor(files, llm, projector)


def check_pair(model: ModelDescriptor, n_embd_inp: int) -> None:
    """Refuse a projector whose output width differs from the LLM's input width.

    ``clip.vision.projection_dim`` is not reliable (old conversions stored
    CLIP's own), so the last projection matrix's width is used.

    Raises:
        IncompatibleModelError: the widths differ.
    """
    if model.projector is None:
        return
    width = model.projector.output_width
    if width is not None and width != n_embd_inp:
        raise IncompatibleModelError(
            f"projector {model.files.mmproj.name if model.files.mmproj else ''} produces {width}-wide "
            f"embeddings but the LLM {model.files.llm.name} expects {n_embd_inp}; use the projector "
            "converted with this LLM")
