"""Bad input gets a clear edgevlm error (and the right builtin type)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

import edgevlm
from edgevlm.errors import (
    ContextOverflowError,
    EdgeVLMError,
    ImageError,
    IncompatibleModelError,
    InvalidModelError,
    InvalidRequestError,
    ModelNotFoundError,
)


def _files(folder: Path) -> tuple[Path, Path]:
    llm = next(p for p in folder.glob("*.gguf") if not p.name.startswith("mmproj"))
    proj = next(folder.glob("mmproj*.gguf"))
    return llm, proj


def test_missing_model_file(tmp_path):
    with pytest.raises(ModelNotFoundError) as info:
        edgevlm.load(tmp_path / "nope.gguf")
    assert isinstance(info.value, FileNotFoundError)
    assert "nope.gguf" in str(info.value)


def test_not_a_gguf(tmp_path):
    bogus = tmp_path / "model.gguf"
    bogus.write_bytes(b"PK\x03\x04 this is a zip, not a model" * 10)
    with pytest.raises(InvalidModelError, match="not a GGUF"):
        edgevlm.load(bogus, mmproj=bogus)


def test_truncated_gguf(tmp_path, siglip_f32):
    llm, _ = _files(siglip_f32)
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(llm.read_bytes()[:200])
    with pytest.raises(InvalidModelError):
        edgevlm.load(cut)


def test_projector_width_mismatch_names_both_numbers(tmp_path, siglip_f32, clip_narrow):
    llm, _ = _files(siglip_f32)
    _, other_proj = _files(clip_narrow)
    with pytest.raises(IncompatibleModelError) as info:
        edgevlm.load(llm, mmproj=other_proj)
    msg = str(info.value)
    assert "128" in msg and "256" in msg


def test_llm_passed_as_projector(siglip_f32):
    llm, _ = _files(siglip_f32)
    with pytest.raises(IncompatibleModelError, match="not a vision projector"):
        edgevlm.load(llm, mmproj=llm)


def test_folder_with_two_llms_is_ambiguous(tmp_path, siglip_f32):
    for p in siglip_f32.glob("*.gguf"):
        shutil.copy(p, tmp_path / p.name)
    llm, _ = _files(siglip_f32)
    shutil.copy(llm, tmp_path / "other-Q8_0.gguf")
    with pytest.raises(InvalidRequestError, match="several LLM"):
        edgevlm.load(tmp_path)


def test_unreadable_image(siglip_vlm, tmp_path):
    bad = tmp_path / "bad.png"
    bad.write_text("not an image")
    msgs = [{"role": "user", "content": [{"type": "image", "image": str(bad)}, {"type": "text", "text": "hi"}]}]
    with pytest.raises(ImageError, match="not a readable image"):
        siglip_vlm.chat(msgs, max_tokens=1)


def test_missing_image_is_file_not_found(siglip_vlm, tmp_path):
    msgs = [{"role": "user", "content": [{"type": "image", "image": str(tmp_path / "x.jpg")}]}]
    with pytest.raises(FileNotFoundError):
        siglip_vlm.chat(msgs, max_tokens=1)


def test_remote_image_urls_are_refused(siglip_vlm):
    msgs = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "https://x.test/a.jpg"}}]}]
    with pytest.raises(InvalidRequestError, match="does not download"):
        siglip_vlm.chat(msgs, max_tokens=1)


def test_prompt_longer_than_context(siglip_f32):
    with edgevlm.load(siglip_f32, n_ctx=64, n_threads=2) as vlm:
        n_ctx = vlm.n_ctx  # llama.cpp rounds the context up (to 256)
        with pytest.raises(ContextOverflowError) as info:
            vlm.chat([{"role": "user", "content": "word " * 400}], max_tokens=1)
    assert f"holds {n_ctx}" in str(info.value) and "--ctx" in str(info.value)


@pytest.mark.parametrize("messages", [[], "hello", [{"content": "x"}], [{"role": "bot", "content": "x"}],
                                      [{"role": "user", "content": [{"type": "audio"}]}]])
def test_malformed_messages(siglip_vlm, messages):
    with pytest.raises(InvalidRequestError):
        siglip_vlm.chat(messages, max_tokens=1)


def test_bad_sampling_option(siglip_vlm):
    with pytest.raises(InvalidRequestError, match="top_p"):
        siglip_vlm.chat([{"role": "user", "content": "x"}], top_p=0)


def test_every_error_is_an_edgevlm_error():
    import edgevlm.errors as errors

    for name in dir(errors):
        obj = getattr(errors, name)
        if isinstance(obj, type) and issubclass(obj, Exception) and obj is not EdgeVLMError:
            assert issubclass(obj, EdgeVLMError), name
