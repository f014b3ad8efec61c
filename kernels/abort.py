"""Stopping a ggml graph compute from Python without the compute threads waiting for the GIL.

ggml's backend abort hook (``ggml_backend_set_abort_callback``, which the pinned ggml's CPU backend
exports by name; its CUDA and Metal backends do not, and run every graph to its end) is asked
after every graph node by the compute's first thread. A Python function as the hook takes
the GIL there: measured on the development machine, 300 nodes of 256x256 products went from
114 ms to 1665 ms while another Python thread was busy (each call waited out the
interpreter's switch interval). So the hook is C code reading one byte: libc's ``strlen``
on a two-byte buffer, 0 (false) while the first byte is zero and 1 (true) once a watcher
thread, asking the Python check every :data:`POLL_S` seconds, sets it. ``strlen``'s result
read as a ``bool`` is its lowest byte on the x86-64, AArch64 and Windows calling
conventions, and it is only ever 0 or 1 here.
"""

from __future__ import annotations

import ctypes
import functools
import os
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager

POLL_S = 0.02  # how often the watcher asks: the compute stops within this (and one node) of a True


@functools.cache
def byte_flag_hook() -> int | None:
    """The address of libc's ``strlen`` (the hook), or None where it cannot be found."""
    try:
        libc = ctypes.cdll.msvcrt if os.name == "nt" else ctypes.CDLL(None)
        return ctypes.cast(libc.strlen, ctypes.c_void_p).value
    except (OSError, AttributeError):
        return None


def _asked(cancelled: Callable[[], bool]) -> bool:
    try:
        return bool(cancelled())
    except Exception:  # a broken check stops the compute rather than letting it run on unasked
        return True


@contextmanager
def stop_hook(install: Callable[[int | None, int | None], None],
              cancelled: Callable[[], bool] | None) -> Iterator[int | None]:
    """Install the flag-reading hook with ``install(hook, flag)`` for the block and remove it with
    ``install(None, None)`` after; yields the flag's address (None, and nothing installed, without
    ``cancelled`` or where libc's ``strlen`` cannot be found). The hook never outlives its flag."""
    hook = byte_flag_hook()
    if cancelled is None or hook is None:
        yield None
        return
    with watched_flag(cancelled) as flag:
        try:
            install(hook, flag)
            yield flag
        finally:
            install(None, None)


@contextmanager
def watched_flag(cancelled: Callable[[], bool]) -> Iterator[int]:
    """A two-byte buffer set to ``"\\x01"`` once ``cancelled()`` is true; yields its address, valid inside
    the block. Asked once at the start (in this thread: a check already true stops the compute at
    its first node), then every :data:`POLL_S` s from a watcher thread until the block ends."""
    flag = ctypes.create_string_buffer(2)
    if _asked(cancelled):
        flag[0] = b"\x01"
        yield ctypes.addressof(flag)
        return
    done = threading.Event()

    def watch() -> None:
        while not done.wait(POLL_S):
            if _asked(cancelled):
                flag[0] = b"\x01"
                return

    watcher = threading.Thread(target=watch, name="edgevlm-cancel-watch", daemon=True)
    watcher.start()
    try:
        yield ctypes.addressof(flag)
    finally:
        done.set()
        watcher.join()
