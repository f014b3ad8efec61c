"""The ctypes bindings: struct layouts are checked against the loaded ggml."""

from __future__ import annotations

import ctypes

import pytest

from edgevlm.errors import KernelsUnavailableError
from edgevlm.kernels import ggml
from edgevlm.kernels.backend import Backend


def test_layouts_match_the_loaded_library():
    lib = ggml.lib()
    ggml.check_layouts(lib)  # raises on any mismatch
    assert ctypes.sizeof(ggml.GgmlTensor) == lib.ggml_tensor_overhead() - ggml.GGML_OBJECT_SIZE


class _Shifted:
    """A library whose answers disagree with the pinned layout in one place."""

    def __init__(self, lib, **overrides):
        self._lib, self._overrides = lib, overrides

    def __getattr__(self, name):
        return self._overrides.get(name, getattr(self._lib, name))


def test_wrong_struct_size_fails_loudly():
    lib = ggml.lib()
    fake = _Shifted(lib, ggml_tensor_overhead=lambda: lib.ggml_tensor_overhead() + 8)
    with pytest.raises(KernelsUnavailableError, match="sizeof"):
        ggml.check_layouts(fake)


def test_wrong_field_offset_fails_loudly():
    lib = ggml.lib()
    fake = _Shifted(lib, ggml_get_name=lambda t: b"something else")
    with pytest.raises(KernelsUnavailableError, match="'name'"):
        ggml.check_layouts(fake)


def test_unknown_device_lists_what_exists():
    with pytest.raises(KernelsUnavailableError, match="available: auto, CPU"):
        Backend("tpu9")


def test_cpu_backend_threads():
    backend = Backend("cpu", n_threads=2)
    try:
        assert backend.is_cpu and backend.name == "CPU"
    finally:
        backend.close()


def test_the_kernels_use_the_ggml_that_llama_cpp_loaded():
    """One copy of each ggml library in the process: the wheel stores libggml-base.so and .so.0 as two files,
    and opening the one libllama does not link would load a second ggml (its own backend registry, AMX
    buffer type and log callback, which nobody routes)."""
    import sys

    if not sys.platform.startswith("linux"):
        pytest.skip("reads /proc/self/maps")
    ggml.lib()
    loaded = {line.split()[-1] for line in open("/proc/self/maps") if "libggml" in line}
    for stem in ("libggml-base", "libggml-cpu"):
        copies = {p for p in loaded if p.rsplit("/", 1)[-1].startswith(stem + ".")}
        assert len(copies) == 1, copies
