"""Model files read once: each GGUF header is parsed exactly once while a model loads."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import gguf
import pytest

import edgevlm
import edgevlm.gguf_info as gguf_info


def _load_and_count(monkeypatch: pytest.MonkeyPatch, model: Path, **kwargs) -> tuple[Counter[str], list[str]]:
    """Load ``model`` from a clean header cache; count header parses per file and GGUFReader opens."""
    parses: Counter[str] = Counter()
    readers: list[str] = []
    parse = gguf_info._parse
    reader_init = gguf.GGUFReader.__init__

    def counting_parse(path, fh, with_tensors):
        parses[Path(path).name] += 1
        return parse(path, fh, with_tensors)

    def counting_reader(self, path, *args, **kw):
        readers.append(Path(str(path)).name)
        return reader_init(self, path, *args, **kw)

    monkeypatch.setattr(gguf_info, "_parse", counting_parse)
    monkeypatch.setattr(gguf.GGUFReader, "__init__", counting_reader)
    gguf_info.clear_header_cache()
    with edgevlm.load(model, n_ctx=512, n_threads=2, cache=False, **kwargs) as vlm:
        assert vlm.family
    return parses, readers


@pytest.mark.parametrize("engine", ["kernels", "mtmd"])
def test_a_folder_load_parses_each_header_once(monkeypatch, clip_f32, engine):
    parses, readers = _load_and_count(monkeypatch, clip_f32, vision_engine=engine)
    files = sorted(p.name for p in Path(clip_f32).glob("*.gguf"))
    assert dict(parses) == {name: 1 for name in files}
    assert readers == []  # the kernels tower reads only tensor data, from the descriptor's header


def test_omnifusion_load_parses_each_header_once(monkeypatch, omnifusion_f32):
    parses, readers = _load_and_count(monkeypatch, omnifusion_f32)
    assert dict(parses) == {p.name: 1 for p in Path(omnifusion_f32).glob("*.gguf")}
    assert readers == []


def test_explicit_files_parse_each_header_once(monkeypatch, clip_f32):
    files = sorted(Path(clip_f32).glob("*.gguf"))
    mmproj = next(p for p in files if p.name.startswith("mmproj"))
    llm = next(p for p in files if p != mmproj)
    parses, readers = _load_and_count(monkeypatch, llm, mmproj=mmproj, vision_engine="kernels")
    assert dict(parses) == {llm.name: 1, mmproj.name: 1} and readers == []


def test_a_changed_file_is_read_again(tmp_path, clip_f32):
    mmproj = next(Path(clip_f32).glob("mmproj*.gguf"))
    copy = tmp_path / mmproj.name
    copy.write_bytes(mmproj.read_bytes())
    first = gguf_info.read_header(copy)
    assert gguf_info.read_header(copy) is first
    assert gguf_info.read_header(tmp_path / "." / mmproj.name).path == tmp_path / "." / mmproj.name
    copy.write_bytes(mmproj.read_bytes() + b"\0" * 64)  # another size: another file version
    assert gguf_info.read_header(copy) is not first
