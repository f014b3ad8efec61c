"""``edgevlm convert``: a Hugging Face checkpoint folder -> LLM GGUF + projector GGUF.

Family-specific options (``--vision-tower``...) come from the converter
registry (:func:`edgevlm.convert.family_options`): a new family's options
appear here, with the family that takes them, without editing this file.
"""

from __future__ import annotations

from typing import Any, Callable

import click

from edgevlm.constants import LLM_QUANT_TYPES, VISION_QUANT_TYPES

_KINDS: dict[str, Any] = {"path": click.Path(), "int": click.IntRange(min=1), "str": str}


def _family_options(func: Callable[..., Any]) -> Callable[..., Any]:
    from edgevlm.convert import family_options

    for option, users in reversed(family_options()):
        func = click.option(option.flag, option.name, type=_KINDS[option.kind], default=None,
                            help=f"{', '.join(users)}: {option.help}.")(func)
    return func


@click.command()
@click.argument("source", type=click.Path())
@click.argument("output_dir", type=click.Path(file_okay=False))
@click.option("--quant", type=click.Choice(LLM_QUANT_TYPES, case_sensitive=False), default="f16",
              show_default=True, help="LLM weight type (quantised with llama.cpp's quantiser).")
@click.option("--vision-type", type=click.Choice(VISION_QUANT_TYPES, case_sensitive=False),
              default="f16", show_default=True, help="Projector weight type.")
@click.option("--architecture", default=None, help="Override config.json's architectures[0].")
@click.option("--name", default=None, help="Base name of the output files.")
@_family_options
def convert(source: str, output_dir: str, quant: str, vision_type: str, architecture: str | None,
            name: str | None, **options: Any) -> None:
    """Convert the checkpoint in SOURCE into GGUF files in OUTPUT_DIR."""
    from edgevlm.convert import convert as run_convert

    result = run_convert(source, output_dir, quant=quant.lower(), vision_type=vision_type.lower(),
                         architecture=architecture, name=name,
                         progress=lambda msg: click.echo(msg, err=True), **options)
    click.echo(f"LLM       {result.llm_path}  ({result.llm_type}, {result.llm_bytes / 2**20:.1f} MiB)")
    click.echo(f"projector {result.mmproj_path}  ({result.vision_type}, {result.mmproj_bytes / 2**20:.1f} MiB)")
    for note in result.notes:
        click.echo(f"note: {note}")
