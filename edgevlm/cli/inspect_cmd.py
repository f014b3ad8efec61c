"""``edgevlm inspect``: what a GGUF file holds and which runtimes load it."""

from __future__ import annotations

import json

import click


@click.command()
@click.argument("files", nargs=-1, required=True, type=click.Path())
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def inspect(files: tuple[str, ...], as_json: bool) -> None:
    """Describe GGUF FILES: architecture, hyper-parameters, tensor types, size."""
    from edgevlm.gguf_info import describe

    reports = [describe(f) for f in files]
    if as_json:
        click.echo(json.dumps(reports if len(reports) > 1 else reports[0], indent=2, default=str))
        return
    for report in reports:
        click.echo(f"{report['file']}")
        click.echo(f"  role:         {report['role']} ({report['architecture']})")
        click.echo(f"  size:         {report['size_bytes'] / 2**20:.1f} MiB, {report['tensor_count']} tensors")
        types = ", ".join(f"{k}: {v}" for k, v in report["tensor_types"].items())
        click.echo(f"  tensor types: {types}")
        for key, value in report["hyperparameters"].items():
            click.echo(f"  {key}: {value}")
        if report.get("vocab_size") is not None:
            click.echo(f"  vocabulary:   {report['vocab_size']} tokens ({report.get('tokenizer')}),"
                       f" chat template: {'yes' if report.get('chat_template') else 'no'}")
        click.echo(f"  loadable by:  {', '.join(report['loadable_by'])}")
