"""The on-disk image-embedding cache: integrity, eviction, concurrency, engine use."""

from __future__ import annotations

import multiprocessing
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

import edgevlm
from edgevlm.cache import EmbeddingStore, cache_dir
from edgevlm.cli.main import cli


def _array(seed: int = 0, rows: int = 16, cols: int = 32) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((rows, cols)).astype(np.float32)


def test_cache_dir_follows_env(tmp_path, monkeypatch):
    monkeypatch.setenv("EDGEVLM_CACHE_DIR", str(tmp_path / "c"))
    assert cache_dir() == tmp_path / "c"


def test_roundtrip(tmp_path):
    store = EmbeddingStore(tmp_path)
    assert store.get("k") is None
    store.put("k", _array())
    np.testing.assert_array_equal(store.get("k"), _array())


@pytest.mark.parametrize("damage", ["truncate", "bitflip", "version", "empty"])
def test_corrupt_entries_are_ignored_and_removed(tmp_path, damage):
    store = EmbeddingStore(tmp_path)
    store.put("k", _array())
    path = store.entries()[0].path
    data = bytearray(path.read_bytes())
    if damage == "truncate":
        data = data[: len(data) // 2]
    elif damage == "bitflip":
        data[-5] ^= 0x10
    elif damage == "version":
        data[8] = 99
    else:
        data = bytearray()
    path.write_bytes(bytes(data))
    assert store.get("k") is None
    assert not path.exists()
    store.put("k", _array(1))
    np.testing.assert_array_equal(store.get("k"), _array(1))


def test_lru_eviction_respects_budget(tmp_path):
    one = len(_array().tobytes()) + 64
    store = EmbeddingStore(tmp_path, max_bytes=3 * one)
    for i in range(5):
        store.put(f"k{i}", _array(i))
    assert sum(e.size for e in store.entries()) <= 3 * one
    assert store.get("k0") is None and store.get("k4") is not None


def _hammer(root: str, seed: int) -> None:
    store = EmbeddingStore(Path(root))
    for i in range(40):
        store.put("shared", _array(seed))
        got = store.get("shared")
        assert got is not None and got.shape == (16, 32)


def test_two_processes_writing_one_key_leave_a_valid_entry(tmp_path):
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_hammer, args=(str(tmp_path), s)) for s in (1, 2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    assert all(p.exitcode == 0 for p in procs)
    got = EmbeddingStore(tmp_path).get("shared")
    assert any(np.array_equal(got, _array(s)) for s in (1, 2))
    assert not list(tmp_path.rglob("*.tmp")), "temp files left behind"


def test_new_process_reuses_disk_embeddings_without_encoding(siglip_f32, painting):
    messages = [{"role": "user", "content": [{"type": "image", "image": str(painting)},
                                             {"type": "text", "text": "Genre?"}]}]
    with edgevlm.load(siglip_f32, n_ctx=512, kv_type="f32", n_threads=2) as first:
        encoded = first.next_token_logits(messages)
        assert first.encoder_calls == 1
    with edgevlm.load(siglip_f32, n_ctx=512, kv_type="f32", n_threads=2) as second:
        second.engine.kv.snapshots = None  # exercise the embedding tier alone
        cached = second.next_token_logits(messages)
        assert second.encoder_calls == 0, "the vision encoder ran despite a disk cache hit"
        assert second.engine.last_prefill.images_from_cache == 1
    np.testing.assert_array_equal(cached, encoded)
    with edgevlm.load(siglip_f32, n_ctx=512, n_threads=2, cache=False) as nocache:
        nocache.next_token_logits(messages)
        assert nocache.encoder_calls == 1


def test_cache_command(siglip_f32, painting):
    with edgevlm.load(siglip_f32, n_ctx=256, n_threads=2) as vlm:
        vlm.embed_image(painting)
    runner = CliRunner()
    info = runner.invoke(cli, ["cache", "info"])
    assert info.exit_code == 0 and "1 entries" in info.output
    ls = runner.invoke(cli, ["cache", "ls"])
    assert ls.exit_code == 0 and ".emb" in ls.output
    clear = runner.invoke(cli, ["cache", "clear"])
    assert clear.exit_code == 0
    after = runner.invoke(cli, ["cache", "info"]).output
    assert "embeddings: 0 entries" in after and "kv snapshots: 0 entries" in after


def test_lock_timeout_computes_without_caching(tmp_path, caplog):
    from edgevlm.cache import entry_lock

    store = EmbeddingStore(tmp_path, lock_timeout=0.2)
    digest = store._path("k").stem
    with entry_lock(tmp_path, "emb", digest, timeout=1) as held:  # another holder, e.g. a stuck process
        assert held
        array, computed = store.get_or_compute("k", lambda: _array(3))
    assert computed and np.array_equal(array, _array(3))
    assert store.get("k") is None, "an entry was written without holding its lock"
    assert "could not lock" in caplog.text
    array, computed = store.get_or_compute("k", lambda: _array(4))  # the lock is free again
    assert computed and np.array_equal(store.get("k"), _array(4))
    assert store.get_or_compute("k", lambda: _array(5))[1] is False


def _embed_after_barrier(folder: str, image: str, barrier, results) -> None:
    with edgevlm.load(folder, n_ctx=256, n_threads=1) as vlm:
        barrier.wait(120)
        emb = vlm.embed_image(image)
        results.put((vlm.encoder_calls, emb.shape))


def test_two_processes_asking_together_encode_once(siglip_f32, painting):
    """Both processes start encoding at the same moment; the lock lets one encoder run in total."""
    ctx = multiprocessing.get_context("spawn")
    barrier, results = ctx.Barrier(2), ctx.Queue()
    procs = [ctx.Process(target=_embed_after_barrier, args=(str(siglip_f32), str(painting), barrier, results))
             for _ in range(2)]
    for p in procs:
        p.start()
    got = [results.get(timeout=180) for _ in procs]
    for p in procs:
        p.join(60)
    assert all(p.exitcode == 0 for p in procs)
    assert sorted(calls for calls, _ in got) == [0, 1], got
    assert got[0][1] == got[1][1]
    entries = EmbeddingStore().entries()
    assert len(entries) == 1 and not list(cache_dir().rglob("*.tmp"))
    with edgevlm.load(siglip_f32, n_ctx=256, n_threads=1) as vlm:
        vlm.embed_image(painting)
        assert vlm.encoder_calls == 0  # the entry is valid
