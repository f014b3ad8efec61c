"""The AMX guard: on builds with ggml's AMX path, weights skip the extra buffer types.

ggml's AMX buffer type crashes on quantised weights in the pinned llama.cpp;
edgevlm loads with use_extra_bufts=False when llama.cpp reports AMX_INT8.
The guard's decision is simulated both ways (CI machines may or may not have
AMX) and its effect is observed in llama.cpp's own load log (which extra
buffer types got weights).
"""

from __future__ import annotations

import logging

import pytest

from edgevlm import native
from edgevlm.llm import LlamaModel


def _load_log(path, caplog) -> str:
    caplog.clear()
    with caplog.at_level(logging.DEBUG, logger="edgevlm.llama"):
        LlamaModel(path).close()
    return caplog.text


def test_amx_builds_load_without_extra_buffer_types(siglip_q4km, caplog, monkeypatch):
    llm = next(p for p in siglip_q4km.glob("*.gguf") if not p.name.startswith("mmproj"))
    monkeypatch.setattr(native, "cpu_has_amx", lambda: True)
    log = _load_log(llm, caplog)
    assert "CPU_Mapped model buffer size" in log
    assert "REPACK model buffer" not in log and "AMX model buffer" not in log


def test_other_builds_keep_extra_buffer_types(siglip_q4km, caplog, monkeypatch):
    if "REPACK = 1" not in native.system_info():
        pytest.skip("this llama.cpp build has no CPU repack buffer type")
    llm = next(p for p in siglip_q4km.glob("*.gguf") if not p.name.startswith("mmproj"))
    amx_build = native.cpu_has_amx()
    monkeypatch.setattr(native, "cpu_has_amx", lambda: False)
    log = _load_log(llm, caplog)
    # an AMX build offers its AMX buffer type first (loading is safe; running quantised weights there is not)
    assert "REPACK model buffer" in log or (amx_build and "AMX model buffer" in log)
