"""``edgevlm plan``: what a model, its context and its largest image take, before loading anything."""

from __future__ import annotations

import json
from typing import Any

import click

from edgevlm.constants import KV_TYPES, VISION_ENGINES


def _size(text: str | None) -> tuple[int, int] | None:
    if text is None:
        return None
    w, sep, h = text.lower().partition("x")
    if not sep or not w.isdigit() or not h.isdigit() or int(w) < 1 or int(h) < 1:
        raise click.BadParameter(f"{text!r} is not WIDTHxHEIGHT (e.g. 4000x3072)", param_hint="--image")
    return int(w), int(h)


@click.command()
@click.option("-m", "--model", required=True,
              help="Model folder, LLM .gguf file, or Hugging Face repo id (a repo is downloaded first).")
@click.option("--mmproj", type=click.Path(dir_okay=False), default=None, help="Vision projector .gguf.")
@click.option("--quant", default=None, help="Pick the LLM file whose name contains this.")
@click.option("--ctx", "n_ctx", type=click.IntRange(min=0), default=None,
              help="Context size (default: the training context, at most 4096).")
@click.option("--batch", "n_batch", type=click.IntRange(min=1), default=512, show_default=True)
@click.option("--kv-type", type=click.Choice(list(KV_TYPES)), default="f16", show_default=True)
@click.option("--gpu-layers", "n_gpu_layers", type=int, default=-1, show_default=True)
@click.option("--image-tokens", "max_image_tokens", type=click.IntRange(min=1), default=None,
              help="Image-token budget per image.")
@click.option("--image", "image_size", default=None, help="The largest image, WIDTHxHEIGHT (e.g. 4000x3072).")
@click.option("--vision-engine", type=click.Choice(VISION_ENGINES), default="auto", show_default=True)
@click.option("--tiles", type=click.Choice(["none", "grid"]), default="none", show_default=True)
@click.option("--no-cache", is_flag=True, help="Plan without the disk caches' copies.")
@click.option("--memory-budget", default=None, help="Check against this many bytes, RAM and VRAM together (e.g. 1.5GiB; a GPU share: 6GiB,vram=4GiB).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def plan(model: str, image_size: str | None, no_cache: bool, memory_budget: str | None, as_json: bool,
         **options: Any) -> None:
    """Price MODEL before loading it: bytes per part and device; exit 2 if over --memory-budget."""
    import edgevlm
    from edgevlm.errors import MemoryBudgetError

    result = edgevlm.plan(model, image_size=_size(image_size), cache=not no_cache,
                          memory_budget=memory_budget, **options)
    click.echo(json.dumps(result.as_json(), indent=2) if as_json else "\n".join(result.table()))
    if not result.fits:
        raise MemoryBudgetError(result.refusal())
