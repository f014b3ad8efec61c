"""llama-cpp-python's OpenAI server (``python -m llama_cpp.server``) with edgevlm's AMX guard.

``python -m edgevlm.benchmarks.peer_server ARGS`` runs llama_cpp.server's own
command line with ARGS; on CPUs where llama.cpp reports AMX, weights are
loaded without extra buffer types first (see
:func:`edgevlm.benchmarks.compare.guard_peer_amx`), as edgevlm loads its own.
"""

from __future__ import annotations

import runpy

from edgevlm.benchmarks.compare import guard_peer_amx


def main() -> None:
    guard_peer_amx()
    runpy.run_module("llama_cpp.server", run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
