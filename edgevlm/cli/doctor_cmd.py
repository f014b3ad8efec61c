"""``edgevlm doctor``: is this installation healthy? (through :func:`edgevlm.doctor`; no model is loaded)."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

import click

from edgevlm.errors import UnhealthyInstallError

if TYPE_CHECKING:  # pragma: no cover
    from edgevlm.health import DoctorReport

_WIDTH = 20


def _row(label: str, value: object) -> None:
    click.echo(f"  {label:<{_WIDTH}}{value}")


def _yes(flag: bool | None) -> str:
    return "?" if flag is None else ("yes" if flag else "no")


def _gib(nbytes: int) -> str:
    return f"{nbytes / 2**30:.1f} GiB"


def _print_versions_and_build(report: DoctorReport) -> None:
    v, b = report.versions, report.build
    click.echo("versions")
    _row("edgevlm", v.edgevlm)
    _row("llama-cpp-python", v.llama_cpp_python or "not installed")
    _row("libllama", v.libllama or "not loaded")
    _row("ggml", f"{v.ggml} (commit {v.ggml_commit})" if v.ggml else "not loaded")
    _row("python", f"{v.python} on {v.platform}")
    click.echo("build")
    for backend in b.backends:
        devices = "" if backend.n_devices < 0 else f"{backend.n_devices} device(s)"
        features = " ".join(k if val == "1" else f"{k}={val}" for k, val in backend.features.items())
        _row(f"backend {backend.name}", "; ".join(x for x in (devices, features) if x))
    _row("GPU offload", f"{_yes(b.gpu_offload)} (CUDA: {_yes(b.cuda)}, Metal: {_yes(b.metal)})")
    _row("CPU variant", f"{b.cpu_variant} ({', '.join(b.cpu_libraries) or 'no CPU library found'})")
    _row("libraries", b.library_dir or "not found")


def _print_hardware(report: DoctorReport) -> None:
    click.echo("devices")
    for d in report.kernels.devices:
        _row(d.name, f"{d.kind}, {d.description}, {_gib(d.free_bytes)} free of {_gib(d.total_bytes)}")
    if not report.kernels.devices:
        _row("(none listed)", "edgevlm.kernels cannot run")
    cpu = report.cpu
    click.echo("cpu")
    _row("model", f"{cpu.model} ({cpu.machine}, {cpu.logical_cores} logical cores)")
    _row("feature", "built into llama.cpp / in this CPU")
    for f in cpu.features:
        _row(f"  {f.name}", f"{_yes(f.built)} / {_yes(f.hardware)}")
    _row("AMX guard", f"{'on' if cpu.amx_guard_active else 'off'}: {cpu.amx_reason}")


def _print_checks(report: DoctorReport) -> None:
    k, c, t = report.kernels, report.cache, report.self_test
    click.echo("kernels")
    _row("layout self-check", f"{'pass' if k.ok else 'FAIL'}: {k.message} ({k.seconds * 1e3:.1f} ms)")
    click.echo("cache")
    _row("path", c.path)
    _row("size", f"{c.entries} entries, {c.nbytes / 2**20:.1f} MiB" if c.exists else "empty (no folder yet)")
    _row("writable", f"{'yes' if c.writable else 'NO'}: {c.message}")
    click.echo("self-test")
    if t.ran and t.matmul_error is not None:
        m, n, kk = t.shape
        _row("device", t.device + (f", {t.n_threads} threads" if t.n_threads else ""))
        _row("matmul + softmax", f"{m}x{kk} @ {kk}x{n}: {t.median_ms:.2f} ms median of {t.runs}, "
                                 f"{t.gflops:.1f} GFLOP/s")
        _row("vs numpy", f"error {t.matmul_error:.1e} (matmul), {t.softmax_error:.1e} (softmax), "
                         f"allowed {t.tolerance:.0e}")
        _row("llama.cpp smoke", "ok" if t.llama_smoke else "FAIL")
    _row("result", f"{'pass' if t.ok else 'FAIL'}: {t.message}")


def print_report(report: DoctorReport) -> None:
    """The report as a human-readable table."""
    _print_versions_and_build(report)
    _print_hardware(report)
    _print_checks(report)
    for warning in report.warnings:
        click.echo(f"warning: {warning}")
    for problem in report.problems:
        click.echo(f"problem: {problem}")
    click.echo("healthy" if report.healthy else f"NOT healthy: {len(report.problems)} problem(s)")


@click.command()
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.option("--device", default="auto", show_default=True,
              help="ggml device for the self-test graph (auto, cpu, cuda, metal, CUDA0, ...).")
@click.option("--threads", "n_threads", type=click.IntRange(min=1), default=None,
              help="CPU threads of the self-test (default: physical cores).")
@click.option("--seconds", type=click.FloatRange(min=0), default=1.0, show_default=True,
              help="How long the self-test keeps timing its graph (at least 3 runs).")
def doctor(as_json: bool, device: str, n_threads: int | None, seconds: float) -> None:
    """Check this installation without loading a model: versions, build, devices, CPU
    features, kernels, cache folder, and a short self-test. Exits non-zero when something is wrong."""
    import edgevlm

    report = edgevlm.doctor(device=device, n_threads=n_threads, self_test_seconds=seconds)
    if as_json:
        click.echo(json.dumps(report.to_dict(), indent=2))
    else:
        print_report(report)
    if not report.healthy:
        problems = report.problems
        summary = problems[0] if len(problems) == 1 else f"{len(problems)} problems: " + "; ".join(problems)
        raise UnhealthyInstallError(summary)
