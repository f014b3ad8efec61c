"""Public entry point: :func:`convert` a Hugging Face folder into two GGUF files."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgevlm.constants import GGUF_SUFFIX, MMPROJ_PREFIX

from .base import check_source_folder, converter_class, detect_architecture
from .progress import ConvertProgress, Stage, as_progress, begin
from .quantize import quant_type, vision_type as check_vision_type


@dataclass(frozen=True)
class ConversionResult:
    """What :func:`convert` produced.

    Attributes:
        llm_path: The language model GGUF.
        mmproj_path: The vision projector GGUF.
        architecture: ``config.json`` architecture that was converted.
        llm_type: Quantisation name of the LLM (``"q4_k_m"``...).
        vision_type: Type of the projector matrices (``"f16"``...).
        llm_bytes: Size of ``llm_path``.
        mmproj_bytes: Size of ``mmproj_path``.
        notes: Human-readable remarks (e.g. quantisation fallbacks).
    """

    llm_path: Path
    mmproj_path: Path
    architecture: str
    llm_type: str
    vision_type: str
    llm_bytes: int
    mmproj_bytes: int
    notes: tuple[str, ...]


def output_paths(output_dir: Path, name: str, quant_label: str, vtype: str) -> tuple[Path, Path]:
    """Return the final (LLM, projector) paths for a conversion."""
    return (output_dir / f"{name}-{quant_label}{GGUF_SUFFIX}",
            output_dir / f"{MMPROJ_PREFIX}{name}-{vtype}{GGUF_SUFFIX}")


def _partial(path: Path) -> Path:
    return path.with_name(f".{path.name}.partial-{os.getpid()}")


@contextmanager
def _atomic_outputs(*finals: Path) -> Iterator[tuple[Path, ...]]:
    """Yield temporary paths; move them to ``finals`` only if the block succeeds.

    Any exception (KeyboardInterrupt included) removes every temporary file and
    leaves existing final files untouched.
    """
    temps = tuple(_partial(p) for p in finals)
    try:
        yield temps
        for temp, final in zip(temps, finals):
            os.replace(temp, final)
    finally:
        for temp in temps:
            temp.unlink(missing_ok=True)
            for leftover in temp.parent.glob(f"{temp.name}.f-*"):
                leftover.unlink(missing_ok=True)


def convert(source: str | Path, output_dir: str | Path, *, quant: str = "f16",
            vision_type: str = "f16", architecture: str | None = None, name: str | None = None,
            progress: ConvertProgress | Callable[[str], None] | None = None,
            **options: Any) -> ConversionResult:
    """Convert a Hugging Face vision-language checkpoint into an LLM GGUF and an mmproj GGUF.

    Args:
        source: Local checkpoint folder (``config.json`` + safetensors + tokenizer),
            or an OmniFusion release folder (``tuned-model/``, ``projection.pt``...).
        output_dir: Folder for the two files (created if needed).
        quant: LLM type: one of ``edgevlm.constants.LLM_QUANT_TYPES``.
        vision_type: Projector matrix type: one of ``VISION_QUANT_TYPES``.
        architecture: Override the detected architecture (``config.json["architectures"][0]``).
        name: Base file name; defaults to the lower-cased source folder name.
        progress: A :class:`~edgevlm.convert.progress.ConvertProgress` (steps, the total
            work, each tensor done: what a progress bar needs), or a callable receiving
            one line per step and per tensor written.
        options: Family-specific options (``Converter.options`` of the family;
            ``edgevlm.convert.family_options()`` lists them): e.g. OmniFusion's
            ``vision_tower`` (local CLIP folder, required) and ``adapter_heads``.
            ``None`` values are ignored.

    Returns:
        Paths, sizes and notes of the written files.

    Raises:
        ModelNotFoundError: ``source`` (or ``vision_tower``) does not exist.
        ConversionError: bad quant/vision type, missing config/tensors, shape mismatch,
            an option the family does not take or needs.
        UnsafePickleError: a ``.pt`` file asks for code edgevlm refuses to run.
        UnsupportedModelError: unknown architecture or unsupported variant.
        RuntimeFailure: llama.cpp quantisation failed.
    """
    report = as_progress(progress)
    qtype = quant_type(quant)
    vtype = check_vision_type(vision_type)
    folder = check_source_folder(Path(source))
    arch = architecture or detect_architecture(folder)
    given = {key: value for key, value in options.items() if value is not None}
    converter = converter_class(arch)(folder, report.step, **given)
    out = Path(output_dir).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    base = name or folder.resolve().name.lower()
    llm_path, mmproj_path = output_paths(out, base, qtype.label, vtype)
    from .llm_writer import plan_llm, write_llm, writes_directly
    from .projector_writer import write_projector

    llm_specs = plan_llm(converter, qtype)
    stages = [Stage(report, "LLM", llm_specs),
              Stage(report, f"quantising to {qtype.label}", llm_specs, quantise_to=qtype.label),
              Stage(report, "projector", converter.projector_tensors(vtype))]
    direct = writes_directly(converter, qtype)
    if direct:
        del stages[1]
    begin(report, stages)
    with _atomic_outputs(llm_path, mmproj_path) as (llm_tmp, mmproj_tmp):
        report.step(f"writing {llm_path.name}")
        llm_bytes = write_llm(converter, llm_tmp, qtype, stages[0], None if direct else stages[1])
        report.step(f"writing {mmproj_path.name}")
        mmproj_bytes = write_projector(converter, mmproj_tmp, vtype, stages[-1])
    return ConversionResult(llm_path, mmproj_path, arch, qtype.name, vtype, llm_bytes,
                            mmproj_bytes, tuple(converter.notes))
