"""ggml backends: which devices this llama.cpp build has, and opening one.

``device="auto"`` picks the first GPU (CUDA, Metal, Vulkan, ...) the build
registers and falls back to the CPU. A device can also be named (``"cpu"``,
``"cuda"``, ``"metal"``, or an exact ggml device name such as ``"CUDA0"``).
"""

from __future__ import annotations

import ctypes
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from edgevlm import amx_guard
from edgevlm.errors import KernelsUnavailableError

from . import abort, ggml

#: More extra buffer types than any ggml CPU build registers: a longer list is a broken table.
_MAX_EXTRA_BUFTS = 16


@dataclass(frozen=True)
class DeviceInfo:
    """One ggml device of this build."""

    name: str
    description: str
    kind: str  # "cpu" | "gpu" | "igpu" | "accel"
    free_bytes: int
    total_bytes: int


@dataclass(frozen=True)
class BufferType:
    """A ggml buffer type (``ggml_backend_buffer_type_t``) and its name (``CPU``, ``CPU_REPACK``, ...)."""

    ptr: int
    name: str


_KINDS = {ggml.DEV_TYPE_CPU: "cpu", ggml.DEV_TYPE_GPU: "gpu", ggml.DEV_TYPE_IGPU: "igpu",
          ggml.DEV_TYPE_ACCEL: "accel"}


def _devices() -> list[tuple[int, DeviceInfo]]:
    g = ggml.lib()
    out = []
    for i in range(g.ggml_backend_dev_count()):
        dev = g.ggml_backend_dev_get(i)
        free, total = ctypes.c_size_t(0), ctypes.c_size_t(0)
        g.ggml_backend_dev_memory(dev, ctypes.byref(free), ctypes.byref(total))
        out.append((dev, DeviceInfo(
            name=(g.ggml_backend_dev_name(dev) or b"?").decode(),
            description=(g.ggml_backend_dev_description(dev) or b"").decode(),
            kind=_KINDS.get(g.ggml_backend_dev_type(dev), "other"),
            free_bytes=free.value, total_bytes=total.value)))
    return out


def available_devices() -> list[DeviceInfo]:
    """The devices ggml registered in this build (the CPU is always one)."""
    return [info for _, info in _devices()]


@dataclass(frozen=True)
class BackendRegistration:
    """One ggml backend compiled into (or loaded by) this build, e.g. ``CPU`` or ``CUDA``."""

    name: str
    n_devices: int


def registered_backends() -> list[BackendRegistration]:
    """The backends in ggml's registry, in registration order."""
    g = ggml.lib()
    out = []
    for i in range(g.ggml_backend_reg_count()):
        reg = g.ggml_backend_reg_get(i)
        out.append(BackendRegistration((g.ggml_backend_reg_name(reg) or b"?").decode(),
                                       int(g.ggml_backend_reg_dev_count(reg))))
    return out


def ggml_build() -> tuple[str, str]:
    """The loaded ggml's version and the commit it was built from (``("0.25.3", "0c1e570")``)."""
    g = ggml.lib()
    return ((g.ggml_version() or b"?").decode(), (g.ggml_commit() or b"?").decode())


def _pick(device: str) -> tuple[int, DeviceInfo]:
    devices = _devices()
    wanted = device.strip().lower()
    if wanted == "auto":
        for kind in ("gpu", "igpu", "cpu"):
            for dev, info in devices:
                if info.kind == kind:
                    return dev, info
    for dev, info in devices:
        if info.name.lower() == wanted or (wanted != "cpu" and info.name.lower().startswith(wanted)):
            return dev, info
        if wanted == "cpu" and info.kind == "cpu":
            return dev, info
    names = ", ".join(["auto"] + [info.name for _, info in devices])
    raise KernelsUnavailableError(
        f"no ggml device {device!r} in this llama-cpp-python build; available: {names}. "
        "GPU devices need llama-cpp-python built with CMAKE_ARGS=-DGGML_CUDA=on (or -DGGML_METAL=on).")


class Backend:
    """An initialised ggml backend (one device) with its thread count.

    Args:
        device: "auto", "cpu", "cuda", "metal", or a ggml device name.
        n_threads: CPU threads (CPU backend only).

    Raises:
        KernelsUnavailableError: no such device, or it failed to start.
    """

    def __init__(self, device: str = "auto", *, n_threads: int = 4) -> None:
        self.g = ggml.lib()
        dev, self.info = _pick(device)
        self.dev = dev
        self.ptr = self.g.ggml_backend_dev_init(dev, None)
        if not self.ptr:
            raise KernelsUnavailableError(f"ggml could not start device {self.info.name}")
        self.is_cpu = bool(self.g.ggml_backend_is_cpu(self.ptr))
        self.n_threads = n_threads
        if self.is_cpu:
            self.g.ggml_backend_cpu_set_n_threads(self.ptr, max(1, int(n_threads)))
        self.buffer_type = self.g.ggml_backend_get_default_buffer_type(self.ptr)

    @property
    def name(self) -> str:
        return self.info.name

    def scratch(self) -> Backend:
        """A backend to run transient graphs on: on the CPU a new one with the same threads (its
        work buffer, which ggml's CPU backend keeps at its largest size, goes when it is closed);
        elsewhere this one. Close it with :func:`close_scratch`."""
        return Backend("cpu", n_threads=self.n_threads) if self.is_cpu else self

    def close_scratch(self, scratch: Backend) -> None:
        if scratch is not self:
            scratch.close()

    @contextmanager
    def abort_when(self, cancelled: Callable[[], bool] | None) -> Iterator[bool]:
        """Inside, a graph compute on this backend stops between nodes soon after ``cancelled()``
        turns true (``ggml_backend_graph_compute`` then returns ``GGML_STATUS_ABORTED``).

        ``cancelled`` is asked from a watcher thread, never from ggml's compute threads
        (:mod:`edgevlm.kernels.abort`). Backends without ggml's abort hook (CUDA, Metal) run each
        graph to its end; so does everything when ``cancelled`` is None. Yields whether the
        hook is installed.
        """
        setter = self._abort_setter() if cancelled is not None else None
        if setter is None:
            yield False
            return
        with abort.stop_hook(lambda hook, flag: setter(self.ptr, hook, flag), cancelled) as flag:
            yield flag is not None

    def _abort_setter(self) -> Callable[..., None] | None:
        """The device's ``ggml_backend_set_abort_callback`` (the CPU's; CUDA and Metal export none), or None."""
        reg = self.g.ggml_backend_dev_backend_reg(self.dev)
        address = self.g.ggml_backend_reg_get_proc_address(reg, b"ggml_backend_set_abort_callback") if reg else None
        return ggml.SET_ABORT_CALLBACK(address) if address else None

    def extra_buffer_types(self, allow: bool | None = None) -> list[BufferType]:
        """The CPU device's extra buffer types (weight repacking), in ggml's order of preference.

        They are what llama.cpp's loader tries before the plain CPU buffer
        (``make_cpu_buft_list``): AMX, KleidiAI, CPU_REPACK, whichever this
        build has. A weight goes into one only if ggml accepts a ``mul_mat``
        on it there (see :class:`edgevlm.kernels.graph.Weights`).

        Args:
            allow: None = yes, unless the AMX guard is on (an AMX build whose
                tile kernels crash: :mod:`edgevlm.amx_guard`; the LLM follows
                the same rule); True/False force.

        Returns:
            The buffer types; empty off the CPU, when not allowed, or when the
            build has none.

        Raises:
            KernelsUnavailableError: ggml's list is not NULL-terminated.
        """
        if allow is None:
            allow = not amx_guard.amx_guard_active()
        if not (allow and self.is_cpu):
            return []
        g = self.g
        reg = g.ggml_backend_dev_backend_reg(self.dev)
        address = g.ggml_backend_reg_get_proc_address(reg, b"ggml_backend_dev_get_extra_bufts") if reg else None
        if not address:
            return []
        table = ggml.GET_EXTRA_BUFTS(address)(self.dev)
        out: list[BufferType] = []
        while table and table[len(out)]:
            if len(out) == _MAX_EXTRA_BUFTS:
                raise KernelsUnavailableError(
                    "ggml's extra CPU buffer type list is not NULL-terminated; edgevlm.kernels is pinned "
                    "to llama-cpp-python 0.3.36 (reinstall it, or use vision_engine='mtmd')")
            buft = table[len(out)]
            out.append(BufferType(int(buft), (g.ggml_backend_buft_name(buft) or b"?").decode()))
        return out

    def close(self) -> None:
        if getattr(self, "ptr", None):
            self.g.ggml_backend_free(self.ptr)
            self.ptr = None

    def __del__(self) -> None:  # pragma: no cover - interpreter shutdown order
        try:
            self.close()
        except Exception:
            pass
