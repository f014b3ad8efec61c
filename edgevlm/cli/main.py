"""``edgevlm``: the command group, error reporting and logging switches."""

from __future__ import annotations

import sys
from typing import Any

import click

from edgevlm import __version__
from edgevlm.cli.options import setup_logging
from edgevlm.errors import EdgeVLMError, MemoryBudgetError


class EdgeVLMGroup(click.Group):
    """Turns edgevlm errors into one line on stderr and a non-zero exit."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except EdgeVLMError as exc:
            message = " ".join(str(exc).split())
            click.echo(f"edgevlm: error: {message}", err=True)
            sys.exit(2 if isinstance(exc, (ValueError, MemoryBudgetError)) else 1)
        except KeyboardInterrupt:
            click.echo("edgevlm: interrupted", err=True)
            sys.exit(130)


@click.group(cls=EdgeVLMGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="edgevlm")
@click.option("-v", "--verbose", is_flag=True, help="Show edgevlm's and llama.cpp's logs.")
def cli(verbose: bool) -> None:
    """edgevlm: run vision-language models on your own hardware."""
    setup_logging(verbose)


def _register() -> None:
    from edgevlm.cli import (bench, cache_cmd, chat, classify_cmd, config_cmd, convert_cmd, doctor_cmd, eval_cmd,
                             inspect_cmd, plan_cmd, serve_cmd)

    cli.add_command(chat.chat)
    cli.add_command(convert_cmd.convert)
    cli.add_command(inspect_cmd.inspect)
    cli.add_command(bench.bench)
    cli.add_command(cache_cmd.cache)
    cli.add_command(doctor_cmd.doctor)
    cli.add_command(plan_cmd.plan)
    cli.add_command(config_cmd.config)
    cli.add_command(classify_cmd.classify)
    cli.add_command(eval_cmd.eval_)
    cli.add_command(serve_cmd.serve)


_register()


def main() -> None:
    cli(prog_name="edgevlm")


if __name__ == "__main__":  # pragma: no cover
    main()
