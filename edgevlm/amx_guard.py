"""The AMX guard: whether quantised weights may go into ggml's AMX buffer type.

llama.cpp's CPU backend, built on a CPU with AMX, offers an extra buffer type
("AMX") whose int8 tile kernels run Q4_0/Q8_0/K-quant matrix products several
times faster than AVX-512. Built with GCC (12.2 here), those kernels load an
all-zero tile configuration (GCC's ``_tile_loadconfig`` declares an 8-byte
operand, so the stores that fill the configuration are dropped) and the first
tile load stops the process with SIGILL; and in any build, once another
library in the process (PyTorch's oneDNN after a bf16 product) releases a
thread's tiles, ggml's next product there does the same, because ggml loads
the configuration once per thread. The README's install command builds
llama-cpp-python with ``edgevlm/build_fixes/amx_tile_config.h`` forced into
llama.cpp's C++ sources, which repairs both and exports a marker symbol.

:func:`amx_status` decides, once per process:

* no AMX path in the build (or not an AMX CPU): nothing to guard;
* ``EDGEVLM_AMX=off`` / ``on``: the user's choice, not checked;
* the build carries the marker: the AMX path is used;
* otherwise the AMX path is *probed* in a child process
  (``python -m edgevlm.kernels.amx_check``: one Q8_0 product in the AMX buffer
  type checked against numpy), so a broken build costs a child's SIGILL, not
  the caller's process. The answer is kept for the library file (its path,
  size and modification time) in ``amx-probe.json`` under the cache folder and
  in ``EDGEVLM_AMX_PROBE`` for child processes.

When the guard is active, llama.cpp's loader gets ``use_extra_bufts=False`` and
the kernels' towers keep their matrices in plain buffers (slower, but safe).
"""

from __future__ import annotations

import ctypes
import functools
import json
import logging
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from edgevlm import native
from edgevlm.errors import EdgeVLMError
from edgevlm.paths import cache_dir

LOG = logging.getLogger("edgevlm")

#: ``auto`` (default: marker, else probe), ``on`` (trust the build), ``off`` (always guard).
ENV = "EDGEVLM_AMX"
#: Set by the parent after a probe: ``<library key>=ok`` or ``<library key>=broken``.
PROBE_ENV = "EDGEVLM_AMX_PROBE"
#: Exported by builds that include edgevlm/build_fixes/amx_tile_config.h, with the header's version:
#: 1 repaired the tile configuration's stores; 2 also reloads tiles that another library released.
MARKER = "edgevlm_amx_tile_config_fix"
MARKER_VERSION = 2
PROBE_FILE = "amx-probe.json"
PROBE_TIMEOUT_S = 120.0
#: The exit status of a probe whose product was computed and correct.
PROBE_OK = 0


@dataclass(frozen=True)
class AmxStatus:
    """What edgevlm decided about ggml's AMX path, and why.

    Attributes:
        built: llama.cpp's CPU backend has its AMX path (``AMX_INT8 = 1``).
        usable: quantised weights may go into the AMX buffer type.
        reason: one line for ``doctor`` and ``--verbose``.
    """

    built: bool
    usable: bool
    reason: str

    @property
    def guard_active(self) -> bool:
        """The build has an AMX path that edgevlm keeps weights out of."""
        return self.built and not self.usable


def _cpu_library() -> ctypes.CDLL | None:
    """The libggml-cpu llama.cpp loaded (the file the AMX kernels live in), if found."""
    try:
        return native.ggml_library("cpu")
    except EdgeVLMError:
        return None


def _library_key(library: ctypes.CDLL) -> str:
    path = Path(library._name)
    stat = path.stat()
    return f"{path}:{stat.st_size}:{stat.st_mtime_ns}"


def _has_marker(library: ctypes.CDLL) -> bool:
    """Whether libggml-cpu exports :data:`MARKER` at :data:`MARKER_VERSION` or later."""
    try:
        marker = ctypes.c_int.in_dll(library, MARKER)
    except ValueError:
        return False
    # dlsym also searches the library's dependencies: the marker must be libggml-cpu's own
    return _defined_in(ctypes.addressof(marker), "libggml-cpu") and marker.value >= MARKER_VERSION


class _DlInfo(ctypes.Structure):
    _fields_ = [("dli_fname", ctypes.c_char_p), ("dli_fbase", ctypes.c_void_p),
                ("dli_sname", ctypes.c_char_p), ("dli_saddr", ctypes.c_void_p)]


def _defined_in(address: int, stem: str) -> bool:
    """Whether ``address`` lies in a loaded file whose name starts with ``stem`` (glibc's ``dladdr``)."""
    try:
        dladdr = ctypes.CDLL(None).dladdr
    except (OSError, AttributeError):
        return True  # no dladdr: trust the lookup
    dladdr.argtypes = [ctypes.c_void_p, ctypes.POINTER(_DlInfo)]
    info = _DlInfo()
    if not dladdr(address, ctypes.byref(info)) or not info.dli_fname:
        return False
    return os.path.basename(info.dli_fname.decode(errors="replace")).startswith(stem)


def _stored_probe(key: str) -> bool | None:
    inherited = os.environ.get(PROBE_ENV, "")
    if inherited.startswith(key + "="):
        return inherited.endswith("=ok")
    try:
        stored = json.loads((cache_dir() / PROBE_FILE).read_text())
    except (OSError, ValueError):
        return None
    return stored.get("ok") if isinstance(stored, dict) and stored.get("library") == key else None


def _store_probe(key: str, ok: bool) -> None:
    os.environ[PROBE_ENV] = f"{key}={'ok' if ok else 'broken'}"
    folder = cache_dir()
    try:
        folder.mkdir(parents=True, exist_ok=True)
        tmp = folder / f".{PROBE_FILE}.{os.getpid()}.tmp"
        tmp.write_text(json.dumps({"library": key, "ok": ok}))
        os.replace(tmp, folder / PROBE_FILE)
    except OSError as exc:  # an unwritable cache only costs a probe per process
        LOG.debug("could not keep the AMX probe's answer in %s: %s", folder, exc)


def run_probe() -> bool:
    """Run the AMX product check in a child process; True when it computed the right numbers."""
    env = dict(os.environ, OMP_WAIT_POLICY="passive")
    env.pop(PROBE_ENV, None)
    try:
        done = subprocess.run([sys.executable, "-m", "edgevlm.kernels.amx_check"], env=env,
                              capture_output=True, timeout=PROBE_TIMEOUT_S, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        LOG.debug("AMX probe did not finish: %s", exc)
        return False
    if done.returncode != PROBE_OK:
        LOG.debug("AMX probe exit status %s: %s", done.returncode, done.stderr.decode(errors="replace")[-500:])
    return done.returncode == PROBE_OK


def _decide() -> AmxStatus:
    if not native.cpu_has_amx():
        return AmxStatus(False, False, "llama.cpp's CPU backend has no AMX path on this machine")
    choice = os.environ.get(ENV, "auto").strip().lower()
    if choice == "off":
        return AmxStatus(True, False, f"{ENV}=off: quantised weights stay out of the AMX buffer type")
    if choice == "on":
        return AmxStatus(True, True, f"{ENV}=on: the AMX buffer type is used unchecked")
    library = _cpu_library()
    if library is None:
        return AmxStatus(True, False, "libggml-cpu was not found to check its AMX path; guard on")
    if _has_marker(library):
        return AmxStatus(True, True, "this llama.cpp build carries edgevlm's AMX tile-configuration fix")
    key = _library_key(library)
    ok = _stored_probe(key)
    if ok is None:
        ok = run_probe()
        _store_probe(key, ok)
    if ok:
        return AmxStatus(True, True, "the AMX path passed edgevlm's probe (a Q8_0 product checked against numpy)")
    return AmxStatus(True, False, "this llama.cpp build's AMX path fails (built without edgevlm's tile-configuration "
                                  "fix by a GCC that miscompiles it); quantised weights stay out of it. Reinstall "
                                  "llama-cpp-python as the README's \"Builds\" section says for the faster AMX kernels")


@functools.lru_cache(maxsize=1)
def amx_status() -> AmxStatus:
    """The AMX decision for this process (see the module docstring); logged once at debug level."""
    status = _decide()
    LOG.debug("AMX: %s", status.reason)
    return status


def amx_guard_active() -> bool:
    """Whether quantised weights must stay out of ggml's AMX buffer type in this process."""
    return amx_status().guard_active
