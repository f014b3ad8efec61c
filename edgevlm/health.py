"""``edgevlm.doctor()``: is this installation healthy? (no model is loaded).

(The module is ``health``, not ``doctor``: a submodule named like the function would replace
``edgevlm.doctor`` on the package as soon as it is imported.)

Checks, each returning its own dataclass:

- :func:`check_versions`: edgevlm, llama-cpp-python, libllama, ggml (and its commit);
- :func:`check_build`: the ggml backends compiled in, their build features
  (``llama_print_system_info``), GPU offload, the CPU backend's ISA level;
- :func:`check_cpu`: the CPU features that matter, as built into llama.cpp
  and as the hardware reports them (``/proc/cpuinfo``), and edgevlm's AMX guard;
- :func:`check_kernels`: ``edgevlm.kernels`` loads and its struct layouts
  match the loaded ggml; the ggml devices with their memory;
- :func:`check_cache`: the cache folder's path, size and writability;
- :func:`run_self_test`: a matmul + softmax graph through ``edgevlm.kernels``
  on random data, compared with numpy and timed, plus a llama.cpp smoke call.

:func:`doctor` runs them all; :class:`DoctorReport` says whether the install is
healthy and, when it is not, what is wrong (``problems``, one sentence each).
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import os
import platform
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

import numpy as np

from edgevlm.errors import EdgeVLMError

if TYPE_CHECKING:  # pragma: no cover
    from edgevlm.kernels.backend import Backend

#: Exactly the llama-cpp-python edgevlm is pinned to (pyproject.toml).
PINNED_LLAMA_CPP_PYTHON = "0.3.36"

#: CPU features that matter for llama.cpp's kernels: (name in ``llama_print_system_info``, flag in
#: ``/proc/cpuinfo``). Names: ggml-cpu.cpp ``ggml_backend_cpu_get_features`` (pinned llama.cpp);
#: flags: Linux arch/x86/include/asm/cpufeatures.h and arm64 hwcaps (``Features`` line).
X86_FEATURES = (("AVX2", "avx2"), ("FMA", "fma"), ("F16C", "f16c"), ("AVX512", "avx512f"),
                ("AVX512_VNNI", "avx512_vnni"), ("AVX512_BF16", "avx512_bf16"), ("AVX_VNNI", "avx_vnni"),
                ("AMX_INT8", "amx_int8"))
ARM_FEATURES = (("NEON", "asimd"), ("DOTPROD", "asimddp"), ("MATMUL_INT8", "i8mm"), ("SVE", "sve"),
                ("SME", "sme"))
#: ISA levels of the CPU backend build, best first (names as in ``llama_print_system_info``).
ISA_LEVELS = ("AVX512", "AVX2", "AVX", "SSE3", "SME", "SVE", "NEON", "RISCV_V", "VSX", "VXE", "WASM_SIMD")
#: Registry names of GPU backends (ggml-cuda.h ``GGML_CUDA_NAME``, ggml-metal.cpp ``GGML_METAL_NAME``).
CUDA_BACKENDS, METAL_BACKENDS = ("CUDA", "ROCm", "MUSA"), ("MTL", "Metal")
#: llama_context_default_params() of the pinned llama.cpp (src/llama-context.cpp): read back
#: through llama-cpp-python's ctypes struct, they show the binding matches libllama.
LLAMA_DEFAULT_CONTEXT = {"n_ctx": 512, "n_batch": 2048, "n_ubatch": 512}
#: Self-test matmul shape (m, n, k) and the largest error allowed, relative to the reference's
#: largest magnitude (float32 kernels are ~1e-6 here; a broken kernel is off by O(1)).
SELF_TEST_SHAPE = (512, 512, 512)
SELF_TEST_TOLERANCE = 1e-3


@dataclass(frozen=True)
class Versions:
    """Versions of edgevlm and what it runs on (None: could not be determined)."""

    edgevlm: str
    llama_cpp_python: str | None
    libllama: str | None
    ggml: str | None
    ggml_commit: str | None
    python: str
    platform: str
    problems: tuple[str, ...] = ()


@dataclass(frozen=True)
class BackendBuild:
    """One ggml backend of this build: its registry name, device count and build features."""

    name: str
    n_devices: int
    features: dict[str, str]


@dataclass(frozen=True)
class Build:
    """What llama.cpp / ggml was compiled with.

    Attributes:
        backends: the registered ggml backends (CPU always; CUDA, Metal, ... when built in).
        system_info: ``llama_print_system_info()`` as printed.
        gpu_offload: ``llama_supports_gpu_offload()``.
        cuda, metal: whether a CUDA (or ROCm/MUSA) / Metal backend is compiled in.
        cpu_variant: the best ISA level the CPU backend was compiled for (e.g. ``x86 AVX512``).
        cpu_libraries: the CPU backend library files shipped (several when variants are).
        library_dir: where llama-cpp-python's shared libraries are.
    """

    backends: tuple[BackendBuild, ...] = ()
    system_info: str = ""
    gpu_offload: bool = False
    cuda: bool = False
    metal: bool = False
    cpu_variant: str = "unknown"
    cpu_libraries: tuple[str, ...] = ()
    library_dir: str | None = None
    problems: tuple[str, ...] = ()
    warnings: tuple[str, ...] = ()


@dataclass(frozen=True)
class CpuFeature:
    """One CPU feature: compiled into llama.cpp's CPU backend, and present in the hardware.

    ``hardware`` is None where the OS does not say (no ``/proc/cpuinfo``).
    """

    name: str
    built: bool
    hardware: bool | None


@dataclass(frozen=True)
class Cpu:
    """The CPU, its features that matter, and edgevlm's AMX guard.

    Attributes:
        amx_guard_active: llama.cpp has ggml's AMX path but it is not safe to use, so edgevlm
            loads weights without llama.cpp's extra buffer types (see README "Builds").
        amx_reason: why the AMX path is used or guarded (:class:`edgevlm.amx_guard.AmxStatus`).
    """

    model: str
    machine: str
    logical_cores: int
    features: tuple[CpuFeature, ...]
    amx_guard_active: bool
    problems: tuple[str, ...] = ()
    warnings: tuple[str, ...] = ()
    amx_reason: str = ""


@dataclass(frozen=True)
class DeviceReport:
    """One ggml device (``kind``: cpu, gpu, igpu, accel) and its memory."""

    name: str
    description: str
    kind: str
    free_bytes: int
    total_bytes: int


@dataclass(frozen=True)
class KernelsCheck:
    """Whether ``edgevlm.kernels`` can run: libraries found, struct layouts as pinned."""

    ok: bool
    message: str
    seconds: float
    devices: tuple[DeviceReport, ...] = ()

    @property
    def problems(self) -> tuple[str, ...]:
        return () if self.ok else (f"edgevlm.kernels cannot run: {self.message}",)


@dataclass(frozen=True)
class CacheCheck:
    """The on-disk cache folder (``EDGEVLM_CACHE_DIR`` or the platform cache)."""

    path: str
    exists: bool
    entries: int
    nbytes: int
    writable: bool
    message: str

    @property
    def problems(self) -> tuple[str, ...]:
        return () if self.writable else (self.message,)


@dataclass(frozen=True)
class SelfTest:
    """A timed matmul + softmax graph through edgevlm.kernels, compared with numpy.

    Attributes:
        ran: False when the kernels cannot run (see ``message``).
        n_threads: CPU threads (0 on a GPU).
        shape: (m, n, k) of the matmul ``[m, k] @ [k, n]``.
        median_ms: the graph's median compute time over ``runs`` runs (inputs already uploaded).
        gflops: matmul GFLOP/s at that time (2 m n k flops; the softmax is not counted).
        matmul_error, softmax_error: max |ggml - numpy| / max |numpy| of each output.
        llama_smoke: llama.cpp answered (system info, default context parameters read back).
    """

    ran: bool
    ok: bool
    message: str
    device: str = ""
    n_threads: int = 0
    shape: tuple[int, int, int] = SELF_TEST_SHAPE
    runs: int = 0
    median_ms: float = 0.0
    gflops: float = 0.0
    matmul_error: float | None = None
    softmax_error: float | None = None
    tolerance: float = SELF_TEST_TOLERANCE
    llama_smoke: bool = False
    seconds: float = 0.0

    @property
    def problems(self) -> tuple[str, ...]:
        return () if self.ok else (self.message,)


@dataclass(frozen=True)
class DoctorReport:
    """Everything :func:`doctor` found. ``healthy`` is True when there is no problem."""

    versions: Versions
    build: Build
    cpu: Cpu
    kernels: KernelsCheck
    cache: CacheCheck
    self_test: SelfTest
    sections: ClassVar[tuple[str, ...]] = ("versions", "build", "cpu", "kernels", "cache", "self_test")

    @property
    def problems(self) -> tuple[str, ...]:
        """What is wrong, one sentence each (empty when healthy)."""
        return tuple(p for name in self.sections for p in getattr(self, name).problems)

    @property
    def warnings(self) -> tuple[str, ...]:
        """What works but could be better (e.g. a CPU feature the build does not use)."""
        return self.build.warnings + self.cpu.warnings

    @property
    def healthy(self) -> bool:
        return not self.problems

    def to_dict(self) -> dict[str, object]:
        """The report as JSON-ready data: ``versions``, ``build``, ``devices``, ``cpu``, ``kernels``,
        ``cache``, ``self_test``, ``healthy``, ``problems``, ``warnings``."""
        parts: dict[str, dict[str, object]] = {}
        for name in self.sections:
            parts[name] = dataclasses.asdict(getattr(self, name))
            parts[name].pop("problems", None)
            parts[name].pop("warnings", None)
        devices = parts["kernels"].pop("devices")
        return {"versions": parts["versions"], "build": parts["build"], "devices": devices,
                **{name: parts[name] for name in self.sections[2:]},
                "healthy": self.healthy, "problems": list(self.problems), "warnings": list(self.warnings)}


def doctor(*, cache_root: Path | None = None, device: str = "auto", n_threads: int | None = None,
           self_test_seconds: float = 1.0) -> DoctorReport:
    """Check this installation without loading a model.

    Args:
        cache_root: the cache folder to check (default: ``EDGEVLM_CACHE_DIR`` or the platform cache).
        device: where the self-test graph runs ("auto": the first GPU, else the CPU).
        n_threads: CPU threads of the self-test (default: physical cores, as for models).
        self_test_seconds: how long the self-test keeps timing the graph.

    Returns:
        The report; ``report.healthy`` and ``report.problems`` say whether anything is wrong.
        Nothing raises: a failing check is recorded as a problem.
    """
    build = check_build()
    kernels = check_kernels()
    return DoctorReport(
        versions=check_versions(),
        build=build,
        cpu=check_cpu(build),
        kernels=kernels,
        cache=check_cache(cache_root),
        self_test=run_self_test(device, self_test_seconds, n_threads=n_threads) if kernels.ok else
        SelfTest(False, False, "the self-test did not run: edgevlm.kernels cannot run"),
    )


# ------------------------------------------------------------------ versions and build
def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


def check_versions() -> Versions:
    """Versions of edgevlm, llama-cpp-python, libllama and ggml.

    Returns:
        :class:`Versions`; a missing llama-cpp-python or another version than the pinned one is
        a problem.
    """
    from edgevlm import __version__, native

    problems: list[str] = []
    try:
        lcp: str | None = importlib.metadata.version("llama_cpp_python")
    except importlib.metadata.PackageNotFoundError:
        lcp = None
        problems.append("llama-cpp-python is not installed; install edgevlm as the README says")
    if lcp is not None and lcp != PINNED_LLAMA_CPP_PYTHON:
        problems.append(f"llama-cpp-python {lcp} is installed but edgevlm is pinned to "
                        f"{PINNED_LLAMA_CPP_PYTHON}; run pip install llama-cpp-python=={PINNED_LLAMA_CPP_PYTHON}")
    libllama = ggml_version = ggml_commit = None
    try:
        libllama = (native.llama().llama_version() or b"").decode() or None
        from edgevlm.kernels.backend import ggml_build

        ggml_version, ggml_commit = ggml_build()
    except EdgeVLMError:
        pass  # reported by check_build / check_kernels
    return Versions(__version__, lcp, libllama, ggml_version, ggml_commit, sys.version.split()[0],
                    platform.platform(), tuple(problems))


def parse_system_info(text: str) -> dict[str, dict[str, str]]:
    """``llama_print_system_info()`` as backend -> feature -> value.

    ``"CPU : AVX2 = 1 | AVX512 = 1 | CUDA : ARCHS = 890 |"`` ->
    ``{"CPU": {"AVX2": "1", "AVX512": "1"}, "CUDA": {"ARCHS": "890"}}``.
    """
    out: dict[str, dict[str, str]] = {}
    current: str | None = None
    for part in text.split("|"):
        if " : " in part:
            current, _, part = part.partition(" : ")
            current = current.strip()
            out[current] = {}
        name, eq, value = part.partition("=")
        if current is not None and eq:
            out[current][name.strip()] = value.strip()
    return out


def check_build() -> Build:
    """The ggml backends compiled into llama-cpp-python's libraries, and their build features.

    Returns:
        :class:`Build`; llama.cpp failing to load is a problem.
    """
    from edgevlm import native

    try:
        lib = native.llama()
        info = native.system_info()
        gpu_offload = bool(lib.llama_supports_gpu_offload())
        folder = native.library_dir()
    except EdgeVLMError as exc:
        return Build(problems=(f"llama.cpp could not be loaded: {_one_line(exc)}",))
    features = parse_system_info(info)
    try:
        from edgevlm.kernels.backend import registered_backends

        regs = [(r.name, r.n_devices) for r in registered_backends()]
    except EdgeVLMError:
        regs = [(name, -1) for name in features]  # kernels unavailable: check_kernels says why
    backends = tuple(BackendBuild(name, n, features.get(name, {})) for name, n in regs)
    names = {b.name for b in backends}
    cpu = features.get("CPU", {})
    isa = next((level for level in ISA_LEVELS if cpu.get(level) == "1"), "baseline")
    arch = "x86" if _is_x86() else platform.machine() or "cpu"
    warnings = tuple(f"the {b.name} backend is compiled in but found no device (driver missing?)"
                     for b in backends if b.n_devices == 0)
    return Build(backends=backends, system_info=info.strip(), gpu_offload=gpu_offload,
                 cuda=bool(names & set(CUDA_BACKENDS)), metal=bool(names & set(METAL_BACKENDS)),
                 cpu_variant=f"{arch} {isa}", cpu_libraries=_cpu_libraries(folder),
                 library_dir=str(folder), warnings=warnings)


def _cpu_libraries(folder: Path) -> tuple[str, ...]:
    """The CPU backend library names in ``folder`` (``libggml-cpu``; ``libggml-cpu-haswell``, ...)."""
    return tuple(sorted({p.name.split(".")[0] for p in folder.glob("*ggml-cpu*")}))


def _is_x86() -> bool:
    return platform.machine().lower() in ("x86_64", "amd64", "i386", "i686", "x86")


# ------------------------------------------------------------------ cpu
def _proc_cpuinfo() -> tuple[str | None, set[str] | None]:
    """CPU model name and feature flags from /proc/cpuinfo (None, None where there is none)."""
    try:
        text = Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:
        return None, None
    model, flags = None, set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip().lower()
        if key in ("model name", "hardware") and model is None:
            model = value.strip()
        elif key in ("flags", "features") and not flags:
            flags = set(value.split())
    return model, flags or None


def check_cpu(build: Build) -> Cpu:
    """CPU features as built into llama.cpp and as the hardware has them; the AMX guard.

    Args:
        build: from :func:`check_build` (its CPU backend features).

    Returns:
        :class:`Cpu`; a feature the build uses but the CPU lacks is a problem (llama.cpp would
        stop on an illegal instruction), one the CPU has but the build does not use is a warning.
    """
    from edgevlm.amx_guard import ENV as AMX_ENV
    from edgevlm.amx_guard import AmxStatus, amx_status

    model, flags = _proc_cpuinfo()
    built = next((b.features for b in build.backends if b.name == "CPU"), {})
    table = X86_FEATURES if _is_x86() else ARM_FEATURES
    features = tuple(CpuFeature(name, built.get(name) == "1", None if flags is None else flag in flags)
                     for name, flag in table)
    problems = tuple(f"llama.cpp was built with {f.name} but this CPU lacks it, so it will stop on an "
                     "illegal instruction; reinstall llama-cpp-python on this machine "
                     "(pip install --force-reinstall --no-binary llama-cpp-python llama-cpp-python==0.3.36)"
                     for f in features if f.built and f.hardware is False)
    warnings = tuple(f"this CPU has {f.name} but llama.cpp was built without it (slower kernels)"
                     for f in features if f.hardware and not f.built)
    try:
        amx = amx_status()
    except EdgeVLMError:  # llama.cpp missing: check_build reports it
        amx = AmxStatus(False, False, "llama.cpp could not be loaded")
    if amx.guard_active and os.environ.get(AMX_ENV, "").strip().lower() != "off":
        warnings += (amx.reason,)
    return Cpu(model or platform.processor() or "unknown", platform.machine(), os.cpu_count() or 1,
               features, amx.guard_active, problems, warnings, amx.reason)


# ------------------------------------------------------------------ kernels
def check_kernels() -> KernelsCheck:
    """Load edgevlm.kernels' ggml bindings, run the struct layout self-check, list the devices.

    Returns:
        :class:`KernelsCheck`; a missing library or symbol or a layout mismatch is a problem.
    """
    start = time.perf_counter()
    try:
        from edgevlm.kernels import backend, ggml

        ggml.check_layouts(ggml.lib())  # lib() checks once per process; check again, visibly
        devices = tuple(DeviceReport(d.name, d.description, d.kind, d.free_bytes, d.total_bytes)
                        for d in backend.available_devices())
    except EdgeVLMError as exc:
        return KernelsCheck(False, _one_line(exc), time.perf_counter() - start)
    return KernelsCheck(True, "ggml libraries loaded; struct layouts match the pinned ggml",
                        time.perf_counter() - start, devices)


# ------------------------------------------------------------------ cache
def check_cache(root: Path | None = None) -> CacheCheck:
    """The cache folder: where, how big, and whether edgevlm can write there.

    Writability is tried for real: a temporary file is created and removed (the folder too,
    with any parents, when they did not exist before).

    Args:
        root: the folder (default: ``EDGEVLM_CACHE_DIR`` or the platform cache).

    Returns:
        :class:`CacheCheck`; a folder that cannot be created or written is a problem.
    """
    from edgevlm import DiskCache

    disk = DiskCache(root)
    path = disk.directory
    writable, message = _probe_writable(path)
    entries = nbytes = 0
    if path.is_dir():
        try:
            usage = disk.usage()
            entries, nbytes = sum(u.entries for u in usage), sum(u.nbytes for u in usage)
        except OSError as exc:
            writable, message = False, f"the cache folder {path} cannot be listed ({exc.strerror or exc})"
    return CacheCheck(str(path), path.is_dir(), entries, nbytes, writable, message)


def _probe_writable(path: Path) -> tuple[bool, str]:
    """Create (if needed) ``path``, write and delete a file in it, remove what was created."""
    advice = "set EDGEVLM_CACHE_DIR to a folder you can write to"
    missing: list[Path] = []
    existing = path
    while not existing.exists() and existing.parent != existing:
        missing.append(existing)
        existing = existing.parent
    if not existing.is_dir():
        what = "is a file, not a folder" if existing == path else f"cannot be created: {existing} is a file"
        return False, f"the cache folder {path} {what}; {advice}"
    try:
        path.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(prefix=".edgevlm-doctor-", dir=path)
        os.close(fd)
        os.unlink(name)
    except OSError as exc:
        return False, f"the cache folder {path} is not writable ({exc.strerror or exc}); {advice}"
    finally:
        for folder in missing:  # deepest first
            try:
                folder.rmdir()
            except OSError:
                break
    return True, "writable" + (" (does not exist yet; created on first use)" if missing else "")


# ------------------------------------------------------------------ self-test
def matmul_softmax_reference(x: np.ndarray, w: np.ndarray, scale: float) -> tuple[np.ndarray, np.ndarray]:
    """numpy (float64) ``x @ w.T`` and ``softmax(scale * (x @ w.T))`` over its last axis."""
    mm = x.astype(np.float64) @ w.astype(np.float64).T
    z = scale * mm
    e = np.exp(z - z.max(axis=-1, keepdims=True))
    return mm, e / e.sum(axis=-1, keepdims=True)


def relative_error(got: np.ndarray, want: np.ndarray) -> float:
    """max |got - want| / max |want| (inf when ``got`` has a NaN or inf)."""
    if not np.all(np.isfinite(got)):
        return float("inf")
    return float(np.max(np.abs(got - want)) / max(float(np.max(np.abs(want))), 1e-30))


def run_self_test(device: str = "auto", seconds: float = 1.0, *, n_threads: int | None = None,
                  seed: int = 0) -> SelfTest:
    """Run softmax(x @ w.T) through edgevlm.kernels on random data, compare with numpy, time it.

    Args:
        device: the ggml device ("auto", "cpu", "cuda", ... as :class:`edgevlm.kernels.backend.Backend`).
        seconds: how long to keep timing (at least 3 runs).
        n_threads: CPU threads (default: physical cores).
        seed: the random data's seed.

    Returns:
        :class:`SelfTest`; a result off by more than the tolerance, a failed graph or llama.cpp
        not answering is a problem.
    """
    from edgevlm.kernels.backend import Backend
    from edgevlm.llm import default_threads

    start = time.perf_counter()
    m, n, k = SELF_TEST_SHAPE
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((m, k), dtype=np.float32)
    w = rng.standard_normal((n, k), dtype=np.float32)
    scale = 1.0 / float(np.sqrt(k))
    try:
        threads = n_threads or default_threads()
        backend = Backend(device, n_threads=threads)
        try:
            out, times = _timed_graph(backend, x, w, scale, seconds)
        finally:
            backend.close()
    except EdgeVLMError as exc:
        return SelfTest(True, False, f"the kernels self-test failed: {_one_line(exc)}",
                        seconds=time.perf_counter() - start)
    mm, soft = matmul_softmax_reference(x, w, scale)
    errors = relative_error(out[:, :n], mm), relative_error(out[:, n:], soft)
    median = statistics.median(times)
    smoke = _llama_smoke()
    ok, message = _verdict(backend.name, errors, smoke)
    return SelfTest(True, ok, message, device=backend.name, n_threads=threads if backend.is_cpu else 0,
                    shape=(m, n, k), runs=len(times), median_ms=median * 1e3,
                    gflops=2.0 * m * n * k / median / 1e9, matmul_error=errors[0], softmax_error=errors[1],
                    llama_smoke=smoke, seconds=time.perf_counter() - start)


def _verdict(device: str, errors: tuple[float, float], smoke: bool) -> tuple[bool, str]:
    """(ok, message) of the self-test from its two errors and the llama.cpp smoke call."""
    if max(errors) > SELF_TEST_TOLERANCE:
        return False, (f"the kernels self-test on {device} disagrees with numpy (matmul error {errors[0]:.2g}, "
                       f"softmax error {errors[1]:.2g}, allowed {SELF_TEST_TOLERANCE:g}): this ggml build "
                       "computes wrong results; reinstall llama-cpp-python")
    if not smoke:
        return False, ("llama.cpp's default context parameters do not read back as the pinned llama.cpp's: "
                       "llama-cpp-python and libllama do not match; reinstall llama-cpp-python==0.3.36")
    return True, "matmul and softmax match numpy; llama.cpp answers"


def _timed_graph(backend: Backend, x: np.ndarray, w: np.ndarray, scale: float,
                 seconds: float) -> tuple[np.ndarray, list[float]]:
    """The graph's output ``[m, 2n]`` (matmul | softmax) and the compute times of its runs."""
    from edgevlm.kernels.graph import CompiledGraph, GraphBuilder

    (m, k), n = x.shape, w.shape[0]
    builder = GraphBuilder(max_nodes=16)
    mm = builder.linear(builder.input("x", (k, m)), builder.input("w", (k, n)))  # [n, m]
    graph = CompiledGraph(backend, builder, builder.concat(mm, builder.softmax(mm, scale), 0))
    try:
        out = graph.run({"x": x, "w": w})
        times: list[float] = []
        deadline = time.perf_counter() + seconds
        while len(times) < 3 or (time.perf_counter() < deadline and len(times) < 1000):
            t0 = time.perf_counter()
            graph.compute()
            times.append(time.perf_counter() - t0)
    finally:
        graph.close()
    return out, times


def _llama_smoke() -> bool:
    """llama.cpp answers: system info is non-empty and its default context parameters read back."""
    from edgevlm import native

    try:
        params = native.llama().llama_context_default_params()
        return bool(native.system_info().strip()) and all(
            getattr(params, name) == value for name, value in LLAMA_DEFAULT_CONTEXT.items())
    except EdgeVLMError:
        return False
