"""Loading llama.cpp / libmtmd and routing their log output into ``logging``.

llama.cpp and libmtmd print to stderr even when asked to be quiet. edgevlm
installs one log callback for both, forwarding every line to the
``edgevlm.llama`` logger (silent unless the application, or ``--verbose``,
enables it) and to the listeners of :func:`log_lines`. Nothing happens at
import time; :func:`llama` and :func:`mtmd` load the libraries on first use.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from types import ModuleType

from edgevlm.errors import RuntimeFailure

LOG = logging.getLogger("edgevlm.llama")

# ggml_log_level in the pinned ggml.h: NONE=0 DEBUG=1 INFO=2 WARN=3 ERROR=4 CONT=5
_GGML_TO_LOGGING = {0: logging.DEBUG, 1: logging.DEBUG, 2: logging.DEBUG, 3: logging.WARNING,
                    4: logging.ERROR}

_state_lock = threading.Lock()
_pending = {"level": logging.DEBUG, "text": ""}
_callbacks: list[object] = []  # keeps the ctypes callbacks alive
_listeners: list[Callable[[str], None]] = []


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
    with _state_lock:
        if level != 5:
            _pending["level"] = _GGML_TO_LOGGING.get(level, logging.DEBUG)
        buffered = _pending["text"] + chunk
        *lines, rest = buffered.split("\n")
        _pending["text"] = rest
        lvl = _pending["level"]
        listeners = list(_listeners)
    for line in lines:
        if line.strip():
            LOG.log(lvl, "%s", line)
            for listener in listeners:
                try:
                    listener(line)
                except Exception as exc:  # noqa: BLE001 - never raise through the C callback
                    LOG.debug("log listener failed: %s", exc)


@functools.lru_cache(maxsize=1)
def llama() -> ModuleType:
    """Return the ``llama_cpp`` low-level module, initialised, logs routed."""
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


@functools.lru_cache(maxsize=1)
def system_info() -> str:
    """llama.cpp's build/CPU feature line (e.g. ``AVX512 = 1 | AMX_INT8 = 1``)."""
    return llama().llama_print_system_info().decode("utf-8", errors="replace")


def cpu_has_amx() -> bool:
    """Whether ggml's CPU backend was built with its AMX path on an AMX CPU.

    In the pinned llama.cpp, quantised weights placed in the AMX extra buffer
    type crash (SIGSEGV in ``ggml_backend_amx_mul_mat``); see README "CPU builds".
    """
    return "AMX_INT8 = 1" in system_info()
