"""``edgevlm convert``: a Hugging Face checkpoint folder -> LLM GGUF + projector GGUF.

Family-specific options (``--vision-tower``...) come from the converter
registry (:func:`edgevlm.convert.family_options`): a new family's options
appear here, with the family that takes them, without editing this file.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, Callable

import click

from edgevlm.cli.options import setup_logging
from edgevlm.constants import LLM_QUANT_TYPES, VISION_QUANT_TYPES

if TYPE_CHECKING:  # pragma: no cover
    from edgevlm.convert.progress import TensorDone

_KINDS: dict[str, Any] = {"path": click.Path(), "int": click.IntRange(min=1), "str": str}


def _family_options(func: Callable[..., Any]) -> Callable[..., Any]:
    from edgevlm.convert import family_options

    for option, users in reversed(family_options()):
        func = click.option(option.flag, option.name, type=_KINDS[option.kind], default=None,
                            help=f"{', '.join(users)}: {option.help}.")(func)
    return func


class StepLines:
    """Steps, notes and warnings, one line each on stderr; no tensor lines (stderr is not a terminal)."""

    def step(self, message: str) -> None:
        click.echo(message, err=True)

    def begin(self, tensors: int, nbytes: int) -> None:
        del tensors, nbytes

    def tensor(self, done: TensorDone) -> None:
        del done

    def close(self) -> None:
        """Nothing to close."""


class ProgressBar(StepLines):
    """One tqdm bar on stderr for the whole conversion: bytes done, rate and ETA, the stage's tensors.

    Steps, notes and warnings are printed above the bar.
    """

    def __init__(self) -> None:
        self.bar: Any = None

    def step(self, message: str) -> None:
        if self.bar is None:
            super().step(message)
        else:
            self.bar.write(message, file=sys.stderr)

    def begin(self, tensors: int, nbytes: int) -> None:
        from tqdm import tqdm

        del tensors
        self.bar = tqdm(total=nbytes, unit="B", unit_scale=True, unit_divisor=1024, file=sys.stderr,
                        dynamic_ncols=True, desc="converting")

    def tensor(self, done: TensorDone) -> None:
        if self.bar is not None:
            self.bar.set_description_str(done.stage, refresh=False)
            self.bar.set_postfix_str(f"{done.index}/{done.count} tensors", refresh=False)
            self.bar.update(done.nbytes)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


class _WarningsTo(logging.Handler):
    """The gguf package's warnings (e.g. about a tokenizer's special tokens) as steps, above the bar."""

    def __init__(self, progress: StepLines) -> None:
        super().__init__(logging.WARNING)
        self.progress = progress

    def emit(self, record: logging.LogRecord) -> None:
        self.progress.step(f"warning: {record.getMessage()}")


@contextmanager
def _gguf_warnings_to(progress: StepLines) -> Iterator[None]:
    logger = logging.getLogger("gguf")
    handler, propagate = _WarningsTo(progress), logger.propagate
    logger.addHandler(handler)
    logger.propagate = False
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.propagate = propagate
        progress.close()


@click.command()
@click.argument("source", type=click.Path())
@click.argument("output_dir", type=click.Path(file_okay=False))
@click.option("--quant", type=click.Choice(LLM_QUANT_TYPES, case_sensitive=False), default="f16",
              show_default=True,
              help="LLM weight type (quantised with llama.cpp's quantiser; mllama's by edgevlm with ggml's).")
@click.option("--vision-type", type=click.Choice(VISION_QUANT_TYPES, case_sensitive=False),
              default="f16", show_default=True, help="Projector weight type.")
@click.option("--architecture", default=None, help="Override config.json's architectures[0].")
@click.option("--name", default=None, help="Base name of the output files.")
@click.option("-v", "--verbose", is_flag=True,
              help="List every tensor and show llama.cpp's log (instead of a progress bar).")
@_family_options
@click.pass_context
def convert(ctx: click.Context, source: str, output_dir: str, quant: str, vision_type: str,
            architecture: str | None, name: str | None, verbose: bool, **options: Any) -> None:
    """Convert the checkpoint in SOURCE into GGUF files in OUTPUT_DIR.

    Progress is one bar on a terminal, steps only when stderr is not one; --verbose lists every tensor.
    """
    from edgevlm.convert import convert as run_convert

    kwargs = dict(quant=quant.lower(), vision_type=vision_type.lower(), architecture=architecture, name=name,
                  **options)
    if verbose or ctx.find_root().params.get("verbose"):
        setup_logging(True)  # llama.cpp's log, the quantiser's tensor list included
        result = run_convert(source, output_dir, progress=lambda msg: click.echo(msg, err=True), **kwargs)
    else:
        progress = ProgressBar() if sys.stderr.isatty() else StepLines()
        with _gguf_warnings_to(progress):
            result = run_convert(source, output_dir, progress=progress, **kwargs)
    click.echo(f"LLM       {result.llm_path}  ({result.llm_type}, {result.llm_bytes / 2**20:.1f} MiB)")
    click.echo(f"projector {result.mmproj_path}  ({result.vision_type}, {result.mmproj_bytes / 2**20:.1f} MiB)")
    for note in result.notes:
        click.echo(f"note: {note}")
