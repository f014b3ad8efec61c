"""edgevlm.amx_guard: when quantised weights may use ggml's AMX buffer type.

The decision's branches are driven with monkeypatched inputs (CI machines may
or may not have AMX); the probe itself runs for real in a child process, and
on a machine whose build has a working AMX path the product it checks is the
one the guard protects.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from edgevlm import amx_guard, native


@pytest.fixture
def fresh(monkeypatch):
    """amx_status() recomputed for the test and forgotten afterwards; no inherited probe answer."""
    monkeypatch.delenv(amx_guard.PROBE_ENV, raising=False)
    monkeypatch.delenv(amx_guard.ENV, raising=False)
    amx_guard.amx_status.cache_clear()
    yield monkeypatch
    amx_guard.amx_status.cache_clear()


def test_a_build_without_the_amx_path_needs_no_guard(fresh):
    fresh.setattr(native, "cpu_has_amx", lambda: False)
    status = amx_guard.amx_status()
    assert not status.built and not status.guard_active and "no AMX path" in status.reason


@pytest.mark.parametrize("choice,guarded", [("off", True), ("on", False), (" OFF ", True)])
def test_the_user_can_force_the_decision(fresh, choice, guarded):
    fresh.setattr(native, "cpu_has_amx", lambda: True)
    fresh.setenv(amx_guard.ENV, choice)
    fresh.setattr(amx_guard, "run_probe", lambda: pytest.fail("a forced choice must not probe"))
    assert amx_guard.amx_guard_active() is guarded
    assert amx_guard.ENV in amx_guard.amx_status().reason


def _unmarked_amx_build(monkeypatch, probe_answer: bool) -> list[int]:
    calls: list[int] = []
    monkeypatch.setattr(native, "cpu_has_amx", lambda: True)
    monkeypatch.setattr(amx_guard, "_has_marker", lambda path: False)

    def probe() -> bool:
        calls.append(1)
        return probe_answer

    monkeypatch.setattr(amx_guard, "run_probe", probe)
    return calls


def test_a_failed_probe_keeps_the_guard_on_and_says_how_to_fix_it(fresh):
    calls = _unmarked_amx_build(fresh, probe_answer=False)
    status = amx_guard.amx_status()
    assert status.guard_active and calls == [1]
    assert "README" in status.reason and "reinstall" in status.reason.lower()


def test_the_probe_answer_is_kept_on_disk_and_for_child_processes(fresh):
    calls = _unmarked_amx_build(fresh, probe_answer=True)
    assert not amx_guard.amx_guard_active() and calls == [1]
    assert os.environ[amx_guard.PROBE_ENV].endswith("=ok")
    stored = amx_guard.cache_dir() / amx_guard.PROBE_FILE
    assert stored.is_file() and not list(stored.parent.glob("*.tmp"))
    # a new process (simulated: cleared memo and environment) reads the file instead of probing again
    fresh.delenv(amx_guard.PROBE_ENV)
    amx_guard.amx_status.cache_clear()
    assert not amx_guard.amx_guard_active() and calls == [1]
    # another library file (rebuilt llama-cpp-python) is probed afresh
    fresh.setattr(amx_guard, "_library_key", lambda path: "another-build")
    amx_guard.amx_status.cache_clear()
    amx_guard.amx_guard_active()
    assert calls == [1, 1]


def test_an_unwritable_cache_only_costs_a_probe(fresh, tmp_path):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("x")
    fresh.setenv("EDGEVLM_CACHE_DIR", str(blocker / "cache"))
    calls = _unmarked_amx_build(fresh, probe_answer=True)
    assert not amx_guard.amx_guard_active() and calls == [1]


def test_the_marker_must_be_libggml_cpus_own():
    """dlsym searches a library's dependencies too; where the marker lives is checked by address."""
    import ctypes

    libc_function = ctypes.cast(ctypes.CDLL(None).printf, ctypes.c_void_p).value
    assert amx_guard._defined_in(libc_function, "libc")
    assert not amx_guard._defined_in(libc_function, "libggml-cpu")


def test_the_real_probe_agrees_with_the_build(fresh):
    """The child process computes a Q8_0 product in the AMX buffer type: it passes exactly when the build has
    an AMX path that works (builds with the README's fix do; without AMX there is no such buffer type)."""
    works = amx_guard.run_probe()
    if not native.cpu_has_amx():
        assert works is False
        return
    library = amx_guard._cpu_library()
    assert library is not None
    if amx_guard._has_marker(library):
        assert works is True, "a build with edgevlm's AMX fix failed the probe"
    print(f"AMX build, marker {amx_guard._has_marker(library)}, probe {'passed' if works else 'failed'}")


MIXED_PROCESS = """
import torch
from edgevlm.kernels.amx_check import check_product
assert check_product() == 0
a = torch.randn(256, 256, dtype=torch.bfloat16)
float((a @ a).sum())  # oneDNN's AMX kernels release the tiles of the threads they ran on
assert check_product() == 0
print("ok")
"""


def test_ggml_amx_products_survive_pytorch_amx_products_in_the_same_process(fresh):
    """ggml loads the tile configuration once per thread; the repaired build reloads it when PyTorch released
    the tiles in between (benchmarks and tests run transformers beside edgevlm). In a child: a failure is a
    SIGILL."""
    status = amx_guard.amx_status()
    if not (status.built and status.usable):
        pytest.skip(f"the AMX path is not used here: {status.reason}")
    done = subprocess.run([sys.executable, "-c", MIXED_PROCESS], capture_output=True, text=True, timeout=600,
                          check=False)
    assert done.returncode == 0 and done.stdout.strip() == "ok", (done.returncode, done.stderr[-2000:])
