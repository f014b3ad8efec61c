"""Loading by Hugging Face repo id, against a local fake hub (tests/fakehub.py).

No real network: ``HF_ENDPOINT`` points at a threaded HTTP server on
127.0.0.1 serving repos built from the converted ``siglip_f32`` GGUFs.
"""

from __future__ import annotations

from pathlib import Path

import pytest

import edgevlm
from edgevlm.errors import EdgeVLMError, HubError, InvalidRequestError, ModelNotFoundError
from edgevlm.resolve import resolve
from tests.fakehub import FakeHub, go_offline, point_hub_at, unreachable_url

REPO = "fake/tiny-llava"
LLM_F32, LLM_Q8 = "tiny-llava-F32.gguf", "tiny-llava-Q8_0.gguf"
PROJ_F16, PROJ_F32 = "mmproj-tiny-llava-f16.gguf", "tiny-llava-mmproj-f32.gguf"  # both namings occur


@pytest.fixture(scope="module")
def repo_files(siglip_f32: Path) -> dict[str, bytes]:
    llm = next(p for p in siglip_f32.glob("*.gguf") if not p.name.startswith("mmproj"))
    proj = next(siglip_f32.glob("mmproj-*.gguf"))
    return {
        LLM_Q8: llm.read_bytes(),          # same bytes: only the name tells the quants apart here
        LLM_F32: llm.read_bytes(),
        PROJ_F16: proj.read_bytes(),
        PROJ_F32: proj.read_bytes(),
        "README.md": b"---\nlicense: mit\n---\n# tiny llava (test)\n",
    }


@pytest.fixture
def fake_hub(hf_cache: Path, repo_files: dict[str, bytes], monkeypatch: pytest.MonkeyPatch):
    """A running fake hub with HF_ENDPOINT pointing at it and offline mode off."""
    hub = FakeHub({
        REPO: repo_files,
        "fake/with-default": {"m-F16.gguf": repo_files[LLM_F32], "m-Q4_K_M.gguf": repo_files[LLM_F32],
                              "m-Q8_0.gguf": repo_files[LLM_F32], PROJ_F16: repo_files[PROJ_F16]},
        "fake/safetensors-only": {"model.safetensors": b"\0" * 64, "config.json": b"{}"},
    }).start()
    try:
        point_hub_at(monkeypatch, hub.url)
        yield hub
    finally:
        hub.stop()
    assert not hub.unhandled, f"requests the fake hub does not implement (xet?): {hub.unhandled}"


def _image_msg(image: Path, text: str) -> list[dict]:
    return [{"role": "user", "content": [{"type": "image", "image": str(image)}, {"type": "text", "text": text}]}]


def _cached_files(cache: Path, repo_id: str) -> set[str]:
    snapshots = cache / f"models--{repo_id.replace('/', '--')}" / "snapshots"
    return {p.name for p in snapshots.rglob("*") if p.is_file()}


def test_load_by_repo_id_downloads_only_the_chosen_files(fake_hub, hf_cache, painting):
    vlm = edgevlm.load(REPO, quant="f32", n_ctx=256, n_threads=2)
    try:
        assert fake_hub.downloaded_files(REPO) == {LLM_F32, PROJ_F16}
        assert all(n == 1 for n in fake_hub.downloaded.values()), fake_hub.downloaded
        assert _cached_files(hf_cache, REPO) == {LLM_F32, PROJ_F16}
        reply = vlm.chat(_image_msg(painting, "What is in the picture?"), max_tokens=2, temperature=0)
        assert reply.completion_tokens >= 1
        assert reply.prefill.images_encoded == 1
    finally:
        vlm.close()


def test_resolve_picks_paths_inside_the_hub_cache(fake_hub, hf_cache):
    files = resolve(REPO, quant="F32")
    assert files.llm.name == LLM_F32 and files.mmproj is not None and files.mmproj.name == PROJ_F16
    assert hf_cache in files.llm.parents and files.llm.is_file() and files.mmproj.is_file()


def test_offline_load_uses_the_cache_without_network(fake_hub, hf_cache, monkeypatch, painting):
    online = resolve(REPO, quant="f32")
    before = len(fake_hub.requests)
    go_offline(monkeypatch)
    offline = resolve(REPO, quant="f32")
    assert offline == online
    # Only the chosen quant is cached, so no quant is needed offline either.
    assert resolve(REPO) == online
    vlm = edgevlm.load(REPO, n_ctx=256, n_threads=2)
    try:
        assert vlm.chat(_image_msg(painting, "Hi"), max_tokens=2, temperature=0).completion_tokens >= 1
    finally:
        vlm.close()
    assert len(fake_hub.requests) == before, fake_hub.requests[before:]


def test_offline_quant_not_cached(fake_hub, hf_cache, monkeypatch):
    resolve(REPO, quant="f32")
    go_offline(monkeypatch)
    with pytest.raises(ModelNotFoundError, match="HF_HUB_OFFLINE") as err:
        resolve(REPO, quant="q8_0")
    assert LLM_F32 in str(err.value)


def test_ambiguous_repo_lists_the_files(fake_hub):
    with pytest.raises(InvalidRequestError) as err:
        edgevlm.load(REPO)
    message = str(err.value)
    assert REPO in message and LLM_F32 in message and LLM_Q8 in message
    assert "quant" in message
    assert fake_hub.downloaded == {}


def test_q4_k_m_is_the_default_among_several_quants(fake_hub):
    files = resolve("fake/with-default")
    assert files.llm.name == "m-Q4_K_M.gguf" and files.mmproj is not None and files.mmproj.name == PROJ_F16
    assert fake_hub.downloaded_files("fake/with-default") == {"m-Q4_K_M.gguf", PROJ_F16}


def test_quant_matching_nothing_is_refused(fake_hub):
    with pytest.raises(InvalidRequestError, match="q5_k_m") as err:
        resolve(REPO, quant="q5_k_m")
    assert LLM_F32 in str(err.value) and LLM_Q8 in str(err.value)
    assert fake_hub.downloaded == {}


def test_explicit_projector_skips_the_repo_projector(fake_hub, siglip_f32):
    proj = next(siglip_f32.glob("mmproj-*.gguf"))
    files = resolve(REPO, proj, quant="q8_0")
    assert files.llm.name == LLM_Q8 and files.mmproj == proj
    assert fake_hub.downloaded_files(REPO) == {LLM_Q8}


def test_unknown_repo(fake_hub):
    with pytest.raises(EdgeVLMError) as err:
        edgevlm.load("fake/does-not-exist")
    assert isinstance(err.value, ModelNotFoundError)
    assert "fake/does-not-exist" in str(err.value)
    assert "not found" in str(err.value)


def test_unknown_revision(fake_hub):
    with pytest.raises(ModelNotFoundError, match="nope") as err:
        resolve(REPO, quant="f32", revision="nope")
    assert REPO in str(err.value)


def test_revision_by_commit(fake_hub):
    commit = fake_hub.commits[REPO]
    files = resolve(REPO, quant="f32", revision=commit)
    assert files.llm.parent.name == commit


def test_repo_without_gguf(fake_hub):
    with pytest.raises(ModelNotFoundError, match="no GGUF") as err:
        resolve("fake/safetensors-only")
    assert "fake/safetensors-only" in str(err.value)


def test_offline_and_not_cached(hf_cache, monkeypatch):
    go_offline(monkeypatch)
    with pytest.raises(ModelNotFoundError, match="HF_HUB_OFFLINE") as err:
        edgevlm.load(REPO, quant="f32")
    assert REPO in str(err.value)


def test_hub_unreachable(hf_cache, monkeypatch):
    import huggingface_hub.utils._http as hf_http

    point_hub_at(monkeypatch, unreachable_url())
    monkeypatch.setattr(hf_http.time, "sleep", lambda _s: None)  # skip the retry back-off
    with pytest.raises(HubError, match=REPO):
        resolve(REPO, quant="f32")
