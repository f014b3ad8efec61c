"""``edgevlm classify``: answer an image with exactly one of the given choices."""

from __future__ import annotations

import json
from typing import Any

import click

from edgevlm.cli.options import load_from_options, model_options
from edgevlm.errors import InvalidRequestError
from edgevlm.evaluate import classify as run_classify
from edgevlm.evaluate import load_choices
from edgevlm.evaluate.data import check_choice_list
from edgevlm.evaluate.prompts import DEFAULT_PROMPT, layout
from edgevlm.evaluate.runner import METHODS


def choices_from(choices_file: str | None, choice: tuple[str, ...]) -> tuple[str, ...]:
    """The choices of ``--choices FILE`` or the repeated ``--choice TEXT`` (exactly one of the two).

    Raises:
        InvalidRequestError: both or neither given; DataError: a bad list.
    """
    if bool(choices_file) == bool(choice):
        raise InvalidRequestError("give the answers with --choices FILE (one a line) or --choice TEXT "
                                  "(repeated), one of the two")
    if choices_file:
        return load_choices(choices_file)
    return check_choice_list(tuple(c.strip() for c in choice), "--choice")


@click.command()
@model_options
@click.option("-i", "--image", required=True, type=click.Path(), help="The image to classify.")
@click.option("--choices", "choices_file", type=click.Path(dir_okay=False), default=None,
              help="Text file with one choice a line.")
@click.option("--choice", multiple=True, help="A choice (repeatable; instead of --choices).")
@click.option("-p", "--prompt", default=DEFAULT_PROMPT, show_default=True,
              help="The question; {choices} becomes the choices.")
@click.option("--system", default=None, help="System prompt.")
@click.option("--method", type=click.Choice(METHODS), default="score", show_default=True,
              help="score: the most probable choice; grammar: greedy decoding constrained to the choices.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON with each choice's probability.")
def classify(image: str, choices_file: str | None, choice: tuple[str, ...], prompt: str, system: str | None,
             method: str, as_json: bool, **params: Any) -> None:
    """Answer IMAGE with exactly one of the choices (prints the choice)."""
    choices = choices_from(choices_file, choice)
    layout(prompt, choices)  # a bad prompt is refused before a model is loaded
    vlm = load_from_options(params)
    result = run_classify(vlm, image, choices, prompt=prompt, system=system, method=method,
                          image_tokens=params.get("max_image_tokens"))
    if as_json:
        click.echo(json.dumps({"choice": result.choice, "method": result.method,
                               "probabilities": result.probabilities, "ms": round(result.ms, 1)}, indent=2))
    else:
        click.echo(result.choice)
