"""The AMX guard's effect on llama.cpp's loader, and the AMX path's numbers.

With the guard active edgevlm loads with ``use_extra_bufts=False``; without
it llama.cpp's extra buffer types (CPU_REPACK, AMX) get the weights. The
guard's decision is simulated both ways (CI machines may or may not have
AMX) and its effect is observed in llama.cpp's own load log. Where the AMX
path is usable, a quantised model's logits through it match the plain
buffers'.
"""

from __future__ import annotations

import logging

import numpy as np
import pytest

import edgevlm
from edgevlm import amx_guard, native
from edgevlm.llm import LlamaModel
from tests.reference import cosine_rows


def _load_log(path, caplog) -> str:
    caplog.clear()
    with caplog.at_level(logging.DEBUG, logger="edgevlm.llama"):
        LlamaModel(path).close()
    return caplog.text


def _llm(folder):
    return next(p for p in folder.glob("*.gguf") if not p.name.startswith("mmproj"))


def test_a_guarded_load_uses_no_extra_buffer_types(siglip_q4km, caplog, monkeypatch):
    monkeypatch.setattr(amx_guard, "amx_guard_active", lambda: True)
    log = _load_log(_llm(siglip_q4km), caplog)
    assert "CPU_Mapped model buffer size" in log
    assert "REPACK model buffer" not in log and "AMX model buffer" not in log


def test_an_unguarded_load_keeps_extra_buffer_types(siglip_q4km, caplog, monkeypatch):
    if "REPACK = 1" not in native.system_info():
        pytest.skip("this llama.cpp build has no CPU repack buffer type")
    monkeypatch.setattr(amx_guard, "amx_guard_active", lambda: False)
    log = _load_log(_llm(siglip_q4km), caplog)
    # an AMX build offers its AMX buffer type first
    assert "REPACK model buffer" in log or (native.cpu_has_amx() and "AMX model buffer" in log)


def test_the_amx_path_gives_the_plain_logits(siglip_q4km, painting, caplog, monkeypatch):
    status = amx_guard.amx_status()
    if not (status.built and status.usable):
        pytest.skip(f"the AMX path is not used here: {status.reason}")
    messages = [{"role": "user", "content": [{"type": "image", "image": str(painting)},
                                             {"type": "text", "text": "Describe the painting in detail."}]}]
    logits = {}
    for guarded in (True, False):
        monkeypatch.setattr(amx_guard, "amx_guard_active", lambda g=guarded: g)
        caplog.clear()
        with caplog.at_level(logging.DEBUG, logger="edgevlm.llama"):
            vlm = edgevlm.load(siglip_q4km, n_threads=2, cache=False, n_gpu_layers=0)
        try:
            assert ("AMX model buffer" in caplog.text) is not guarded
            logits[guarded] = vlm.next_token_logits(messages)
        finally:
            vlm.close()
    plain, amx = logits[True], logits[False]
    cosine = float(cosine_rows(plain[None, :], amx[None, :]).min())
    print(f"AMX vs plain logits: cosine {cosine:.6f}, max-abs {np.abs(plain - amx).max():.3e}")
    assert int(plain.argmax()) == int(amx.argmax())
    assert cosine >= 0.999
