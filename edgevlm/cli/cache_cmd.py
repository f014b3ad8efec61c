"""``edgevlm cache info|ls|clear``: the on-disk caches (through :class:`edgevlm.DiskCache`)."""

from __future__ import annotations

import time

import click


@click.group()
def cache() -> None:
    """Inspect or clear edgevlm's on-disk caches."""


@cache.command()
def info() -> None:
    """Where the cache is, how many entries and bytes it holds."""
    from edgevlm import DiskCache

    disk = DiskCache()
    click.echo(f"directory:  {disk.directory}")
    for usage in disk.usage():
        click.echo(f"{usage.kind}: {usage.entries} entries, {usage.nbytes / 2**20:.1f} MiB "
                   f"(limit {usage.limit_bytes / 2**20:.0f} MiB)")


@cache.command(name="ls")
def list_entries() -> None:
    """List cache entries, least recently used first."""
    from edgevlm import DiskCache

    for entry in DiskCache().entries():
        stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(entry.last_used))
        click.echo(f"{stamp}  {entry.size:>10d}  {entry.path}")


@cache.command()
def clear() -> None:
    """Delete every cache entry."""
    from edgevlm import DiskCache

    click.echo(f"freed {DiskCache().clear() / 2**20:.1f} MiB")
