"""Loading llama.cpp / libmtmd / ggml, routing their log output into ``logging``, giving memory back.

llama.cpp and libmtmd print to stderr even when asked to be quiet. edgevlm
installs one log callback for both, forwarding every line to the
``edgevlm.llama`` logger and to the listeners of :func:`log_lines`. That
logger has a ``NullHandler``: without one, Python's last-resort handler would
print its warnings (libmtmd's Qwen-VL ``--image-min-tokens`` advice, ...) to
stderr in any script that has not configured logging. So llama.cpp is silent
unless the application configures logging, passes ``verbose=True`` to
``edgevlm.load`` (:func:`show_logs`) or the CLI runs with ``--verbose``. Nothing happens at
import time; :func:`llama` and :func:`mtmd` load the libraries on first use.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import logging
import os
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from types import ModuleType

from edgevlm.errors import RuntimeFailure

LOG = logging.getLogger("edgevlm.llama")
LOG.addHandler(logging.NullHandler())  # never Python's last-resort stderr handler

# ggml_log_level in the pinned ggml.h: NONE=0 DEBUG=1 INFO=2 WARN=3 ERROR=4 CONT=5
_GGML_TO_LOGGING = {0: logging.DEBUG, 1: logging.DEBUG, 2: logging.DEBUG, 3: logging.WARNING,
                    4: logging.ERROR}

# Re-entrant: Python may collect garbage at any allocation inside _forward, and freeing a llama.cpp
# object there logs, which calls _forward again on the same thread (a plain Lock deadlocked).
_state_lock = threading.RLock()
_pending = {"level": logging.DEBUG, "text": ""}
_callbacks: list[object] = []  # keeps the ctypes callbacks alive
_listeners: list[Callable[[str], None]] = []
_demoted = threading.local()  # .checks: this thread's "lines are expected now" predicates


@contextmanager
def demoted_while(expected: Callable[[], bool]) -> Iterator[None]:
    """Log llama.cpp's lines from this thread at debug level whenever ``expected()`` is true.

    For the lines a deliberate stop makes llama.cpp write as errors (an aborted
    ``llama_decode``: "failed to compute graph", "removing memory module entries", ...).
    """
    checks = _demoted.__dict__.setdefault("checks", [])
    checks.append(expected)
    try:
        yield
    finally:
        checks.remove(expected)


def _expected_here() -> bool:
    return any(check() for check in getattr(_demoted, "checks", ()))


@contextmanager
def log_lines(listener: Callable[[str], None]) -> Iterator[None]:
    """Hand every whole line llama.cpp logs to ``listener`` while in the block.

    Whatever the ``edgevlm.llama`` logger's level: the listener sees lines that
    are not shown (e.g. the quantiser's tensor list, read for a progress bar).
    An exception in the listener is logged at debug level and otherwise ignored.
    """
    with _state_lock:
        _listeners.append(listener)
    try:
        yield
    finally:
        with _state_lock:
            _listeners.remove(listener)


def _forward(level: int, text: bytes | None, _user_data: object) -> None:
    """ctypes log callback: buffers partial lines, emits whole ones."""
    if not text:
        return
    chunk = text.decode("utf-8", errors="replace")
    expected = _expected_here()
    with _state_lock:
        if level != 5:
            _pending["level"] = _GGML_TO_LOGGING.get(level, logging.DEBUG)
        buffered = _pending["text"] + chunk
        *lines, rest = buffered.split("\n")
        _pending["text"] = rest
        lvl = logging.DEBUG if expected else _pending["level"]
        listeners = list(_listeners)
    for line in lines:
        if line.strip():
            LOG.log(lvl, "%s", line)
            for listener in listeners:
                try:
                    listener(line)
                except Exception as exc:  # noqa: BLE001 - never raise through the C callback
                    LOG.debug("log listener failed: %s", exc)


#: OpenMP wait policy set (unless already set) before llama.cpp loads. ggml's CPU backend (OpenMP
#: build) runs each graph in one OpenMP team; with the default policy idle workers spin between graphs
#: and, on a busy machine with few cores, starve the threads doing the work: measured on a shared 2-core
#: VM, the first request's prompt decode took 21-43 s of CPU against 13-15 s for the second; passive: 10.8
#: s for both (README "Benchmarks").
OMP_WAIT_POLICY = "passive"


@functools.lru_cache(maxsize=1)
def llama() -> ModuleType:
    """Return the ``llama_cpp`` low-level module, initialised, logs routed.

    Before the libraries load, ``OMP_WAIT_POLICY`` defaults to ``passive`` (:data:`OMP_WAIT_POLICY`).
    """
    os.environ.setdefault("OMP_WAIT_POLICY", OMP_WAIT_POLICY)
    try:
        import llama_cpp
        import llama_cpp.llama_cpp as lib
    except (ImportError, OSError) as exc:  # pragma: no cover - install problem
        raise RuntimeFailure(
            f"llama-cpp-python could not be loaded ({exc}); reinstall edgevlm as the README says"
        ) from exc
    del llama_cpp
    callback = lib.llama_log_callback(_forward)
    _callbacks.append(callback)
    lib.llama_log_set(callback, ctypes.c_void_p(0))
    lib.llama_backend_init()
    return lib


@functools.lru_cache(maxsize=1)
def mtmd() -> ModuleType:
    """Return the ``llama_cpp.mtmd_cpp`` module with its logs routed too."""
    lib = llama()
    try:
        import llama_cpp.mtmd_cpp as mtmd_lib
    except (ImportError, OSError) as exc:  # pragma: no cover - install problem
        raise RuntimeFailure(f"libmtmd could not be loaded ({exc})") from exc
    callback = lib.llama_log_callback(_forward)
    _callbacks.append(callback)
    # mtmd_helper_log_set routes both libmtmd's and its helpers' loggers.
    mtmd_lib.mtmd_helper_log_set(callback, ctypes.c_void_p(0))
    return mtmd_lib


#: ggml's shared libraries shipped in llama-cpp-python's ``llama_cpp/lib`` (key -> file stem).
GGML_LIBRARY_FILES = {"base": "libggml-base", "cpu": "libggml-cpu", "ggml": "libggml"}


def library_dir() -> Path:
    """The folder holding llama-cpp-python's shared libraries (loaded first, see :func:`llama`)."""
    llama()  # loads libllama and therefore the same libggml* files first
    import llama_cpp

    return Path(llama_cpp.__file__).parent / "lib"


@functools.lru_cache(maxsize=None)
def ggml_library(which: str) -> ctypes.CDLL:
    """One of ggml's libraries (:data:`GGML_LIBRARY_FILES` key), the very file llama-cpp-python loaded.

    The one place edgevlm opens them: :mod:`edgevlm.kernels.ggml` binds its graph API from
    these handles, the converter its quantiser (``ggml_quantize_chunk``), so ggml's backend
    registry and type tables are shared with the LLM.

    Raises:
        RuntimeFailure: the library is not in llama-cpp-python's folder (or ``which`` is unknown).
    """
    stem = GGML_LIBRARY_FILES.get(which)
    folder = library_dir()
    # libllama links the versioned name (its soname, libggml-base.so.0): wheels store it as a separate
    # copy of the file, and opening the unversioned copy would load a second, separate ggml
    for suffix in (".so.0", ".so", ".0.dylib", ".dylib", ".dll"):
        path = folder / f"{stem}{suffix}"
        if not path.exists() and suffix == ".dll":
            path = folder / f"{str(stem).removeprefix('lib')}{suffix}"
        if stem and path.exists():
            return ctypes.CDLL(str(path), mode=getattr(os, "RTLD_GLOBAL", 0))
    raise RuntimeFailure(f"{stem or which} was not found in {folder}; edgevlm needs the ggml libraries "
                         "that llama-cpp-python installs (reinstall llama-cpp-python==0.3.36)")


@functools.lru_cache(maxsize=1)
def system_info() -> str:
    """llama.cpp's build/CPU feature line (e.g. ``AVX512 = 1 | AMX_INT8 = 1``)."""
    return llama().llama_print_system_info().decode("utf-8", errors="replace")


def cpu_has_amx() -> bool:
    """Whether ggml's CPU backend was built with its AMX path on an AMX CPU.

    Whether that path may be used is :func:`edgevlm.amx_guard.amx_status`'s decision (unrepaired
    builds crash in it; README "Builds").
    """
    return "AMX_INT8 = 1" in system_info()


_shown: list[logging.Handler] = []


def show_logs() -> None:
    """Show edgevlm's and llama.cpp's log lines on stderr from now on (``verbose=True``).

    Adds one stderr handler to the ``edgevlm`` logger (unless it has a
    handler already) and lowers both loggers to DEBUG; process-wide.
    """
    root = logging.getLogger("edgevlm")
    with _state_lock:
        if not root.handlers and not _shown:
            handler = logging.StreamHandler(sys.stderr)
            handler.setFormatter(logging.Formatter("%(name)s: %(message)s"))
            root.addHandler(handler)
            _shown.append(handler)
    root.setLevel(logging.DEBUG)
    LOG.setLevel(logging.DEBUG)


@functools.lru_cache(maxsize=1)
def _libc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    try:
        lib = ctypes.CDLL(name) if name else None
    except OSError:  # pragma: no cover - no C library by that name
        return None
    return lib if lib is not None and hasattr(lib, "malloc_trim") else None


def release_free_memory() -> None:
    """Return the C heap's free pages to the system (glibc's ``malloc_trim``; a no-op elsewhere).

    llama.cpp frees a model's buffers with ``free``; glibc keeps much of that
    in its heap, so without this the process's RSS stays ~20 MiB per model
    above where it was before the load.
    """
    lib = _libc()
    if lib is not None:
        lib.malloc_trim(0)
