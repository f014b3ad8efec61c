"""Persistent KV snapshots: restore in a fresh process equals a full evaluation; foreign ones are refused."""

from __future__ import annotations

import dataclasses
import subprocess
import sys

import numpy as np
import pytest

import edgevlm
from edgevlm.snapshots import SnapshotMismatchError, SnapshotStore, read_snapshot


def _messages(painting, question):
    return [{"role": "user", "content": [{"type": "image", "image": str(painting)},
                                         {"type": "text", "text": question}]}]


def _load(folder, **kw):
    return edgevlm.load(folder, n_ctx=512, kv_type="f32", n_threads=2, **kw)


def test_restored_prefix_equals_full_evaluation(siglip_f32, painting):
    with _load(siglip_f32) as first:
        first.next_token_logits(_messages(painting, "What genre is it?"))
        snaps = list(first.engine.kv.snapshots.root.rglob("*.kv"))
        assert len(snaps) == 1
    follow = _messages(painting, "Which colours dominate?")
    with _load(siglip_f32) as second:
        restored = second.next_token_logits(follow)
        pre = second.engine.last_prefill
        assert pre.snapshot_restored and pre.reused_positions > 16
        assert second.encoder_calls == 0 and pre.images_from_cache == 0
    with _load(siglip_f32, cache=False) as fresh:
        full = fresh.next_token_logits(follow)
        assert fresh.encoder_calls == 1
    np.testing.assert_allclose(restored, full, rtol=0, atol=1e-4)


def test_snapshot_from_other_context_size_is_refused(siglip_f32, painting):
    with _load(siglip_f32) as vlm:
        vlm.next_token_logits(_messages(painting, "Genre?"))
        identity = vlm.engine.kv.snapshots.identity
        path = next(vlm.engine.kv.snapshots.root.rglob("*.kv"))
    other = dataclasses.replace(identity, n_ctx=identity.n_ctx * 2)
    with pytest.raises(SnapshotMismatchError, match="n_ctx"):
        read_snapshot(path, other)
    other_model = dataclasses.replace(identity, model="0" * 16)
    with pytest.raises(SnapshotMismatchError, match="model"):
        read_snapshot(path, other_model)
    # a bigger context gets its own snapshot and does not load this one
    with edgevlm.load(siglip_f32, n_ctx=1024, kv_type="f32", n_threads=2) as big:
        big.next_token_logits(_messages(painting, "Other question?"))
        assert not big.engine.last_prefill.snapshot_restored


def test_corrupt_snapshot_is_rebuilt(siglip_f32, painting):
    with _load(siglip_f32) as vlm:
        vlm.next_token_logits(_messages(painting, "Genre?"))
        path = next(vlm.engine.kv.snapshots.root.rglob("*.kv"))
    data = bytearray(path.read_bytes())
    data[-3] ^= 0xFF
    path.write_bytes(bytes(data))
    with _load(siglip_f32) as vlm:
        vlm.next_token_logits(_messages(painting, "Another?"))
        assert not vlm.engine.last_prefill.snapshot_restored
    assert read_snapshot(path, vlm.engine.kv.snapshots.identity)[0] > 0  # rewritten, valid


def test_cli_second_run_restores_without_encoding(siglip_f32, painting, tmp_path):
    code = ("import sys, edgevlm\n"
            f"vlm = edgevlm.load({str(siglip_f32)!r}, n_ctx=512, n_threads=2)\n"
            f"m = [{{'role': 'user', 'content': [{{'type': 'image', 'image': {str(painting)!r}}},"
            " {'type': 'text', 'text': sys.argv[1]}]}]\n"
            "vlm.chat(m, max_tokens=2, temperature=0)\n"
            "p = vlm.engine.last_prefill\n"
            "print(vlm.encoder_calls, int(p.snapshot_restored))\n")
    runs = [subprocess.run([sys.executable, "-c", code, q], capture_output=True, text=True, timeout=120)
            for q in ("Genre?", "Colours?")]
    assert all(r.returncode == 0 for r in runs), runs[0].stderr + runs[1].stderr
    assert runs[0].stdout.split() == ["1", "0"]
    assert runs[1].stdout.split() == ["0", "1"]


def test_store_eviction(tmp_path):
    from edgevlm.snapshots import SnapshotIdentity

    ident = SnapshotIdentity("m", "p", "b", 256, "f16", 0)
    store = SnapshotStore(ident, tmp_path, max_bytes=2500)
    for i in range(5):
        store.save([("t", i)], 1, bytes(1000))
    assert sum(p.stat().st_size for p in tmp_path.rglob("*.kv")) <= 2500
    assert store.load([("t", 4)]) is not None and store.load([("t", 0)]) is None


def test_refused_restore_falls_back_to_full_evaluation(siglip_f32, painting, monkeypatch):
    follow = _messages(painting, "Which colours dominate?")
    with _load(siglip_f32, cache=False) as fresh:
        full = fresh.next_token_logits(follow)
    with _load(siglip_f32) as vlm:
        vlm.next_token_logits(_messages(painting, "Genre?"))  # snapshot saved, prefix cached
        vlm.engine.kv.parked.max_bytes = 0  # no parked state to fall back on: the snapshot is the way
        vlm.next_token_logits([{"role": "user", "content": "USER text only"}])  # diverge early
        monkeypatch.setattr(vlm.engine.ctx, "restore_state", lambda data: (vlm.engine.ctx.clear(), False)[1])
        logits = vlm.next_token_logits(follow)
        assert not vlm.engine.last_prefill.snapshot_restored
    np.testing.assert_allclose(logits, full, rtol=0, atol=1e-4)


LONG_SYSTEM = " ".join(["You are a careful assistant that describes pictures in plain words."] * 4)

_PROCESS = """
import json, sys
import numpy as np
import edgevlm
vlm = edgevlm.load(sys.argv[1], n_ctx=512, kv_type="f32", n_threads=2)
np.save(sys.argv[3], vlm.next_token_logits(json.loads(sys.argv[2])))
p = vlm.engine.last_prefill
print(json.dumps({"restored": p.snapshot_restored, "reused": p.reused_positions,
                  "saved": p.snapshots_saved}))
"""


def _in_new_process(folder, messages, out):
    import json

    proc = subprocess.run([sys.executable, "-c", _PROCESS, str(folder), json.dumps(messages), str(out)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _text_chat(system, question):
    return [{"role": "system", "content": system}, {"role": "user", "content": question}]


def test_long_text_prefix_snapshot_restored_in_new_process(siglip_f32, tmp_path):
    from edgevlm.snapshots import MIN_TEXT_SNAPSHOT_TOKENS

    first = _in_new_process(siglip_f32, _text_chat(LONG_SYSTEM, "What is a cat?"), tmp_path / "a.npy")
    assert first == {"restored": False, "reused": 0, "saved": 1}
    follow = _text_chat(LONG_SYSTEM, "Name three colours.")
    second = _in_new_process(siglip_f32, follow, tmp_path / "b.npy")
    assert second["restored"] and second["reused"] >= MIN_TEXT_SNAPSHOT_TOKENS and second["saved"] == 0
    with _load(siglip_f32, cache=False) as fresh:
        full = fresh.next_token_logits(follow)
        assert second["reused"] < fresh.engine.last_prefill.prompt_positions - 5  # the question was evaluated
    np.testing.assert_allclose(np.load(tmp_path / "b.npy"), full, rtol=0, atol=1e-4)
    other = _text_chat(LONG_SYSTEM.replace("careful", "cheerful"), "Name three colours.")
    third = _in_new_process(siglip_f32, other, tmp_path / "c.npy")
    assert not third["restored"] and third["saved"] == 1


def test_short_text_prefix_is_not_snapshotted(siglip_f32):
    with _load(siglip_f32) as vlm:
        vlm.next_token_logits(_text_chat("Be brief.", "What is a cat?"))
        assert vlm.engine.last_prefill.snapshots_saved == 0
        assert not list(vlm.engine.kv.snapshots.root.rglob("*.kv"))


def test_text_before_first_image_is_shared_across_images(siglip_f32, painting, square_image):
    def ask(image):
        return [{"role": "system", "content": LONG_SYSTEM}] + _messages(image, "Describe it.")

    other = square_image(40, seed=11)
    with _load(siglip_f32) as vlm:
        vlm.next_token_logits(ask(painting))
        assert vlm.engine.last_prefill.snapshots_saved == 2  # text prefix + image prefix
    with _load(siglip_f32) as vlm:
        restored = vlm.next_token_logits(ask(other))
        pre = vlm.engine.last_prefill
        assert pre.snapshot_restored and pre.images_encoded == 1 and pre.reused_positions >= 128
    with _load(siglip_f32, cache=False) as fresh:
        full = fresh.next_token_logits(ask(other))
    np.testing.assert_allclose(restored, full, rtol=0, atol=1e-4)


def test_text_only_model_snapshots_its_long_prefix(siglip_f32, tmp_path):
    """An LLM loaded without a projector still snapshots long instruction prefixes."""
    import shutil

    llm = shutil.copy(next(p for p in siglip_f32.glob("*.gguf") if not p.name.startswith("mmproj-")),
                      tmp_path / "text-only.gguf")
    with edgevlm.load(llm, n_ctx=512, kv_type="f32", n_threads=2) as vlm:
        assert vlm.engine.encoder is None
        vlm.next_token_logits(_text_chat(LONG_SYSTEM, "What is a cat?"))
        assert vlm.engine.last_prefill.snapshots_saved == 1
    follow = _text_chat(LONG_SYSTEM, "Name three colours.")
    with edgevlm.load(llm, n_ctx=512, kv_type="f32", n_threads=2) as vlm:
        restored = vlm.next_token_logits(follow)
        assert vlm.engine.last_prefill.snapshot_restored
    with edgevlm.load(llm, n_ctx=512, kv_type="f32", n_threads=2, cache=False) as vlm:
        np.testing.assert_allclose(restored, vlm.next_token_logits(follow), rtol=0, atol=1e-4)
