"""What a conversion reports while it runs: steps, the work ahead, and each tensor done.

:func:`edgevlm.convert.convert` takes a :class:`ConvertProgress` (the CLI's
progress bar is one) or a plain ``Callable[[str], None]`` receiving lines
(:class:`LineProgress`: one per step and one per tensor written). The work is
counted in bytes: each tensor written counts its output size, and a tensor that
llama.cpp's quantiser then rewrites counts its float size once more, so the
total is known, and an ETA meaningful, before the first tensor.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from .tensors import TensorSpec, tensor_nbytes

__all__ = ["ConvertProgress", "LineProgress", "Stage", "TensorDone", "as_progress"]


@dataclass(frozen=True)
class TensorDone:
    """One tensor written (or quantised).

    Attributes:
        stage: what is being done ("LLM", "projector", or "quantising to Q4_K_M").
        quantising: whether llama.cpp's quantiser did it (it logs its own tensor list).
        index: 1-based position within the stage.
        count: tensors in the stage.
        name: GGUF tensor name.
        ggml_type: the type written.
        shape: numpy (row-major) shape.
        nbytes: the work it stood for (see the module docstring).
    """

    stage: str
    quantising: bool
    index: int
    count: int
    name: str
    ggml_type: str
    shape: tuple[int, ...]
    nbytes: int


class ConvertProgress(Protocol):
    """Receives a conversion's progress (all calls from the converting thread)."""

    def step(self, message: str) -> None:
        """A step or a note ("writing x.gguf", "note: ...")."""

    def begin(self, tensors: int, nbytes: int) -> None:
        """The whole work, once, before the first tensor: tensor events and bytes to come."""

    def tensor(self, done: TensorDone) -> None:
        """One tensor done."""


class LineProgress:
    """A :class:`ConvertProgress` writing lines to a callback: steps, and each tensor written.

    The quantiser's tensors are left out: llama.cpp logs its own list (``edgevlm.llama``).
    """

    def __init__(self, write: Callable[[str], None]) -> None:
        self.write = write

    def step(self, message: str) -> None:
        self.write(message)

    def begin(self, tensors: int, nbytes: int) -> None:
        del tensors, nbytes

    def tensor(self, done: TensorDone) -> None:
        if not done.quantising:
            self.write(f"[{done.index}/{done.count}] {done.name} {done.ggml_type} {list(done.shape)}")


class _Silent:
    def step(self, message: str) -> None:
        del message

    def begin(self, tensors: int, nbytes: int) -> None:
        del tensors, nbytes

    def tensor(self, done: TensorDone) -> None:
        del done


def as_progress(progress: ConvertProgress | Callable[[str], None] | None) -> ConvertProgress:
    """A :class:`ConvertProgress` for what :func:`~edgevlm.convert.convert` was given."""
    if progress is None:
        return _Silent()
    if all(hasattr(progress, name) for name in ("step", "begin", "tensor")):
        return progress  # type: ignore[return-value]
    return LineProgress(progress)  # type: ignore[arg-type]


#: A tensor line of llama.cpp's quantiser: ``[  12/ 291] blk.0.attn_k.weight - [...], type = ...``.
_QUANTISER_LINE = re.compile(r"^\[\s*(\d+)/\s*(\d+)\]\s+(\S+)")


class Stage:
    """One pass over a file's tensors, reported to ``progress``.

    Args:
        progress: where to report.
        label: :attr:`TensorDone.stage`.
        specs: the tensors of the pass.
        quantise_to: the type llama.cpp's quantiser writes (its pass counts the float sizes), or None.
    """

    def __init__(self, progress: ConvertProgress, label: str, specs: Sequence[TensorSpec],
                 quantise_to: str | None = None) -> None:
        self.progress = progress
        self.label = label
        self.quantise_to = quantise_to
        self.plan = list(specs)
        self.specs = {spec.name: spec for spec in self.plan}
        self.nbytes = sum(tensor_nbytes(s.shape, s.ggml_type) for s in specs)
        self.done = 0

    @property
    def count(self) -> int:
        return len(self.plan)

    def tensor(self, spec: TensorSpec) -> None:
        """``spec`` was written."""
        self.done += 1
        self.progress.tensor(TensorDone(self.label, self.quantise_to is not None, self.done, self.count, spec.name,
                                        self.quantise_to or spec.ggml_type, spec.shape,
                                        tensor_nbytes(spec.shape, spec.ggml_type)))

    def quantiser_line(self, line: str) -> None:
        """A line llama.cpp logged while quantising: reports the tensor it names, if any."""
        match = _QUANTISER_LINE.match(line)
        spec = self.specs.get(match.group(3)) if match else None
        if spec is not None and self.done < self.count:
            self.tensor(spec)


def begin(progress: ConvertProgress, stages: Sequence[Stage]) -> None:
    """Tell ``progress`` the work of all ``stages``."""
    progress.begin(sum(s.count for s in stages), sum(s.nbytes for s in stages))
