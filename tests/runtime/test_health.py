"""edgevlm.doctor(): the install checks on this machine, and each check failing when it should."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch

import edgevlm
from edgevlm import amx_guard, health
from edgevlm.errors import KernelsUnavailableError


def _cpuinfo_flags() -> set[str] | None:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    lines = [line for line in text.splitlines() if line.split(":")[0].strip() in ("flags", "Features")]
    return set(lines[0].split(":", 1)[1].split()) if lines else None


@pytest.fixture(scope="module")
def report() -> health.DoctorReport:
    return edgevlm.doctor(self_test_seconds=0.2)


def test_doctor_is_the_public_function_even_after_the_module_is_imported():
    import edgevlm.health  # noqa: F401  (a submodule import must not shadow edgevlm.doctor)

    assert edgevlm.doctor is health.doctor and callable(edgevlm.doctor)


def test_this_machine_is_healthy_with_plausible_values(report):
    import llama_cpp

    from edgevlm import native

    assert report.healthy and report.problems == (), report.problems
    v = report.versions
    assert v.edgevlm == edgevlm.__version__ and v.llama_cpp_python == llama_cpp.__version__ == "0.3.36"
    assert re.fullmatch(r"\d+\.\d+\.\d+", v.ggml) and v.ggml_commit and v.libllama
    cpu_backend = next(b for b in report.build.backends if b.name == "CPU")
    assert cpu_backend.n_devices >= 1 and cpu_backend.features
    assert report.build.system_info == native.system_info().strip()
    assert report.build.gpu_offload == bool(native.llama().llama_supports_gpu_offload())
    assert report.build.cuda == any(b.name == "CUDA" for b in report.build.backends)
    assert report.build.cpu_libraries and report.build.library_dir
    kinds = {d.kind for d in report.kernels.devices}
    assert "cpu" in kinds and all(0 < d.total_bytes and d.free_bytes <= d.total_bytes
                                  for d in report.kernels.devices if d.kind == "cpu")
    assert report.cpu.amx_guard_active == amx_guard.amx_guard_active()
    assert report.cpu.amx_guard_active <= ("AMX_INT8 = 1" in native.system_info()) and report.cpu.amx_reason
    assert report.cpu.logical_cores >= 1 and report.cpu.model


def test_cpu_features_agree_with_system_info_and_cpuinfo(report):
    from edgevlm import native

    flags = _cpuinfo_flags()
    built = native.system_info()
    by_name = {f.name: f for f in report.cpu.features}
    for name, flag in (health.X86_FEATURES if health._is_x86() else health.ARM_FEATURES):
        assert by_name[name].built == (f" {name} = 1 " in f" {built} ")
        assert by_name[name].hardware == (None if flags is None else flag in flags)
    if flags is not None and "avx512f" in flags:  # the CI machine: AVX-512 with BF16/VNNI, no AMX
        assert by_name["AVX512"].hardware and by_name["AVX512"].built
        assert report.build.cpu_variant.endswith("AVX512")
    if flags is not None and "amx_int8" not in flags:
        assert not by_name["AMX_INT8"].hardware and not report.cpu.amx_guard_active


def test_json_has_every_section(report):
    data = json.loads(json.dumps(report.to_dict()))
    assert list(data) == ["versions", "build", "devices", "cpu", "kernels", "cache", "self_test", "healthy",
                          "problems", "warnings"]
    assert data["healthy"] is True and data["problems"] == []
    assert data["devices"][0]["name"] and data["self_test"]["gflops"] > 0


def test_system_info_parsing_of_several_backends():
    text = "CPU : SSE3 = 1 | AVX512 = 1 | OPENMP = 1 | CUDA : ARCHS = 890,900 | USE_GRAPHS = 1 | "
    assert health.parse_system_info(text) == {
        "CPU": {"SSE3": "1", "AVX512": "1", "OPENMP": "1"}, "CUDA": {"ARCHS": "890,900", "USE_GRAPHS": "1"}}
    assert health.parse_system_info("") == {}


def test_a_feature_built_in_but_missing_from_the_cpu_is_a_problem():
    flags = _cpuinfo_flags()
    if flags is None or not health._is_x86() or "amx_int8" in flags or "avx2" not in flags:
        pytest.skip("needs an x86 Linux CPU with AVX2 and without AMX")
    fake = health.Build(backends=(health.BackendBuild("CPU", 1, {"AMX_INT8": "1"}),))
    cpu = health.check_cpu(fake)
    assert len(cpu.problems) == 1 and "built with AMX_INT8 but this CPU lacks it" in cpu.problems[0]
    assert any("has AVX2 but llama.cpp was built without it" in w for w in cpu.warnings)


@pytest.mark.parametrize("forced", [False, True])
def test_an_unrepaired_amx_build_is_a_warning_unless_the_user_chose_the_guard(monkeypatch, forced):
    status = amx_guard.AmxStatus(True, False, "this llama.cpp build's AMX path fails ... Reinstall llama-cpp-python")
    monkeypatch.setattr(amx_guard, "amx_status", lambda: status)
    if forced:
        monkeypatch.setenv(amx_guard.ENV, "off")
    else:
        monkeypatch.delenv(amx_guard.ENV, raising=False)
    cpu = health.check_cpu(health.Build(backends=(health.BackendBuild("CPU", 1, {}),)))
    assert cpu.amx_guard_active and cpu.amx_reason == status.reason
    assert (status.reason in cpu.warnings) is not forced


# ------------------------------------------------------------------ self-test
def test_self_test_matches_numpy_and_torch():
    result = health.run_self_test("cpu", 0.05, n_threads=1)
    assert result.ok and result.ran and result.llama_smoke, result.message
    assert result.runs >= 3 and result.median_ms > 0 and result.gflops > 0 and result.n_threads == 1
    assert result.matmul_error < 1e-5 and result.softmax_error < 1e-5
    # The same graph on other data, checked against torch rather than the module's own reference.
    from edgevlm.kernels.backend import Backend

    rng = np.random.default_rng(7)
    x, w = rng.standard_normal((48, 40), dtype=np.float32), rng.standard_normal((24, 40), dtype=np.float32)
    backend = Backend("cpu", n_threads=1)
    try:
        out, _ = health._timed_graph(backend, x, w, 0.3, 0.0)
    finally:
        backend.close()
    mm = torch.from_numpy(x).double() @ torch.from_numpy(w).double().T
    np.testing.assert_allclose(out[:, :24], mm.numpy(), rtol=0, atol=1e-4)
    np.testing.assert_allclose(out[:, 24:], torch.softmax(0.3 * mm, dim=-1).numpy(), rtol=0, atol=1e-6)


def test_self_test_fails_on_a_wrong_result(monkeypatch):
    real = health._timed_graph

    def transposed(backend, x, w, scale, seconds):
        out, times = real(backend, x, w, scale, seconds)
        n = w.shape[0]
        return np.concatenate([out[:, :n].T, out[:, n:]], axis=1), times  # matmul half transposed

    monkeypatch.setattr(health, "_timed_graph", transposed)
    result = health.run_self_test("cpu", 0.0)
    assert not result.ok and result.matmul_error > 0.1 and result.softmax_error < 1e-5
    assert "disagrees with numpy" in result.message and "\n" not in result.message
    assert health.relative_error(np.array([np.nan]), np.array([1.0])) == float("inf")


def test_unknown_self_test_device_is_a_problem():
    result = health.run_self_test("no-such-device", 0.0)
    assert not result.ok and "no ggml device 'no-such-device'" in result.message


def test_kernels_layout_failure_is_a_problem_and_skips_the_self_test(monkeypatch):
    from edgevlm.kernels import ggml

    def broken(_lib):
        raise KernelsUnavailableError("ggml struct layout mismatch: field 'ne' does not read back")

    monkeypatch.setattr(ggml, "check_layouts", broken)
    report = edgevlm.doctor(self_test_seconds=0.0)
    assert not report.healthy and not report.kernels.ok and not report.self_test.ran
    assert report.problems[0] == ("edgevlm.kernels cannot run: ggml struct layout mismatch: "
                                  "field 'ne' does not read back")


# ------------------------------------------------------------------ cache
def test_cache_folder_that_does_not_exist_yet_is_writable_and_left_as_it_was(tmp_path):
    root = tmp_path / "a" / "b" / "cache"
    check = health.check_cache(root)
    assert check.writable and not check.exists and check.entries == 0 and not check.problems
    assert not (tmp_path / "a").exists()


def test_cache_size_counts_entries(tmp_path):
    root = tmp_path / "cache"
    (root / "embeddings" / "ab").mkdir(parents=True)
    (root / "embeddings" / "ab" / "x.emb").write_bytes(b"0" * 1000)
    check = health.check_cache(root)
    assert check.writable and check.exists and check.entries == 1 and check.nbytes == 1000
    assert list(root.iterdir()) == [root / "embeddings"]  # the probe file is gone


@pytest.mark.parametrize("below", [True, False])
def test_cache_folder_under_a_file_is_a_problem(tmp_path, below):
    blocker = tmp_path / "plain-file"
    blocker.write_text("not a folder")
    root = blocker / "cache" if below else blocker
    check = health.check_cache(root)
    assert not check.writable and len(check.problems) == 1
    assert str(root) in check.message and "EDGEVLM_CACHE_DIR" in check.message and "\n" not in check.message
    assert ("cannot be created" if below else "is a file, not a folder") in check.message


def test_llama_cpp_that_does_not_load_is_a_problem(monkeypatch):
    from edgevlm import native
    from edgevlm.errors import RuntimeFailure

    def missing():
        raise RuntimeFailure("llama-cpp-python could not be loaded (libllama.so: cannot open shared object file)")

    monkeypatch.setattr(native, "llama", missing)
    build = health.check_build()
    assert build.backends == () and build.problems == (
        "llama.cpp could not be loaded: llama-cpp-python could not be loaded "
        "(libllama.so: cannot open shared object file)",)
    assert health.check_versions().libllama is None
