"""``edgevlm cache info|ls|clear``: the on-disk caches."""

from __future__ import annotations

import time

import click


@click.group()
def cache() -> None:
    """Inspect or clear edgevlm's on-disk caches."""


@cache.command()
def info() -> None:
    """Where the cache is, how many entries and bytes it holds."""
    from edgevlm.cache import EmbeddingStore, cache_dir

    store = EmbeddingStore()
    entries = store.entries()
    click.echo(f"directory:  {cache_dir()}")
    click.echo(f"embeddings: {len(entries)} entries, {sum(e.size for e in entries) / 2**20:.1f} MiB "
               f"(limit {store.max_bytes / 2**20:.0f} MiB)")


@cache.command(name="ls")
def list_entries() -> None:
    """List cache entries, least recently used first."""
    from edgevlm.cache import EmbeddingStore

    for entry in EmbeddingStore().entries():
        stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(entry.last_used))
        click.echo(f"{stamp}  {entry.size:>10d}  {entry.path}")


@cache.command()
def clear() -> None:
    """Delete every cache entry."""
    from edgevlm.cache import EmbeddingStore

    freed = EmbeddingStore().clear()
    click.echo(f"freed {freed / 2**20:.1f} MiB")
