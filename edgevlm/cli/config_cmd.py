"""``edgevlm config get|set|unset|path``: edgevlm's settings file (through :class:`edgevlm.UserConfig`)."""

from __future__ import annotations

import os
import sys

import click

from edgevlm.constants import ENV_MODEL

_KEY = click.argument("key")


@click.group()
def config() -> None:
    """Show or change edgevlm's settings (in the file `edgevlm config path` prints).

    \b
    Keys:
      model  the model chat, serve, bench and edgevlm.load() use when none is given
             (a folder, an LLM .gguf file or a Hugging Face repo id); EDGEVLM_MODEL
             and --model take precedence
    """


def _note_override(key: str) -> None:
    if key == "model" and os.environ.get(ENV_MODEL, "").strip():
        click.echo(f"note: {ENV_MODEL}={os.environ[ENV_MODEL]} overrides this setting", err=True)


@config.command(name="path")
def path_cmd() -> None:
    """Print where the settings file is (it may not exist yet)."""
    from edgevlm import UserConfig

    click.echo(str(UserConfig().path))


@config.command(name="get")
@click.argument("key", required=False)
def get_cmd(key: str | None) -> None:
    """Print KEY's value (every key's without KEY); exit 1 when KEY is not set."""
    from edgevlm import UserConfig

    settings = UserConfig()
    if key is None:
        values = settings.values()
        for name in UserConfig.KEYS:
            click.echo(f"{name} = {values[name]}" if name in values else f"{name} (not set)")
        return
    value = settings.get(key)
    if value is None:
        click.echo(f"{key} is not set", err=True)
        sys.exit(1)
    click.echo(value)
    _note_override(key)


@config.command(name="set")
@_KEY
@click.argument("value")
def set_cmd(key: str, value: str) -> None:
    """Set KEY to VALUE (a local model is stored as an absolute path)."""
    from edgevlm import UserConfig

    settings = UserConfig()
    stored = settings.set(key, value)
    click.echo(f"{key} = {stored}  ({settings.path})")
    _note_override(key)


@config.command(name="unset")
@_KEY
def unset_cmd(key: str) -> None:
    """Remove KEY from the settings file."""
    from edgevlm import UserConfig

    removed = UserConfig().unset(key)
    click.echo(f"{key} removed" if removed else f"{key} was not set")
