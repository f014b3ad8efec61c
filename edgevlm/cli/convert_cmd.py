"""``edgevlm convert``: a Hugging Face checkpoint folder -> LLM GGUF + projector GGUF."""

from __future__ import annotations

import click

from edgevlm.constants import LLM_QUANT_TYPES, VISION_QUANT_TYPES


@click.command()
@click.argument("source", type=click.Path())
@click.argument("output_dir", type=click.Path(file_okay=False))
@click.option("--quant", type=click.Choice(LLM_QUANT_TYPES, case_sensitive=False), default="f16",
              show_default=True, help="LLM weight type (quantised with llama.cpp's quantiser).")
@click.option("--vision-type", type=click.Choice(VISION_QUANT_TYPES, case_sensitive=False),
              default="f16", show_default=True, help="Projector weight type.")
@click.option("--architecture", default=None, help="Override config.json's architectures[0].")
@click.option("--name", default=None, help="Base name of the output files.")
@click.option("--vision-tower", type=click.Path(), default=None,
              help="Local CLIP folder for releases without their tower (OmniFusion).")
@click.option("--adapter-heads", type=click.IntRange(min=1), default=None,
              help="OmniFusion: attention heads of an adapter saved as a plain state dict.")
def convert(source: str, output_dir: str, quant: str, vision_type: str, architecture: str | None,
            name: str | None, vision_tower: str | None, adapter_heads: int | None) -> None:
    """Convert the checkpoint in SOURCE into GGUF files in OUTPUT_DIR."""
    from edgevlm.convert import convert as run_convert

    result = run_convert(source, output_dir, quant=quant.lower(), vision_type=vision_type.lower(),
                         architecture=architecture, name=name, vision_tower=vision_tower,
                         adapter_heads=adapter_heads,
                         progress=lambda msg: click.echo(msg, err=True))
    click.echo(f"LLM       {result.llm_path}  ({result.llm_type}, {result.llm_bytes / 2**20:.1f} MiB)")
    click.echo(f"projector {result.mmproj_path}  ({result.vision_type}, {result.mmproj_bytes / 2**20:.1f} MiB)")
    for note in result.notes:
        click.echo(f"note: {note}")
