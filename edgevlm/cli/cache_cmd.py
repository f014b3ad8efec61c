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
    snaps = _snapshot_files()
    click.echo(f"kv snapshots: {len(snaps)} entries, {sum(p.stat().st_size for p in snaps) / 2**20:.1f} MiB")


def _snapshot_files() -> list:
    from edgevlm.cache import cache_dir

    return sorted((cache_dir() / "kv").glob("*/*.kv"))


@cache.command(name="ls")
def list_entries() -> None:
    """List cache entries, least recently used first."""
    from edgevlm.cache import EmbeddingStore

    for entry in EmbeddingStore().entries():
        stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(entry.last_used))
        click.echo(f"{stamp}  {entry.size:>10d}  {entry.path}")
    for path in _snapshot_files():
        stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(path.stat().st_mtime))
        click.echo(f"{stamp}  {path.stat().st_size:>10d}  {path}")


@cache.command()
def clear() -> None:
    """Delete every cache entry."""
    from edgevlm.cache import EmbeddingStore

    freed = EmbeddingStore().clear()
    for path in _snapshot_files():
        freed += path.stat().st_size
        path.unlink()
    click.echo(f"freed {freed / 2**20:.1f} MiB")
