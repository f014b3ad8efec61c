"""edgevlm's tests (and the fixtures examples/make_bench_model.py builds its models with)."""

from __future__ import annotations

import os
import sys
from pathlib import Path


def _import_installed_namesakes() -> None:
    """Import installed top-level packages that the checkout's folders would shadow.

    The top-level ``kernels/`` and ``convert/`` folders are installed as
    ``edgevlm.kernels`` / ``edgevlm.convert``; from the checkout (on
    ``sys.path`` for ``tests.*``) they would shadow installed top-level
    packages of the same names — transformers >= 5.18 imports PyPI's
    ``kernels``. Importing those once with the checkout off ``sys.path`` puts
    the installed ones in ``sys.modules`` for good.
    """
    import importlib
    import importlib.metadata

    root = str(Path(__file__).resolve().parents[1])
    saved = list(sys.path)
    sys.path[:] = [p for p in sys.path if p not in ("", ".") and os.path.abspath(p) != root]
    try:
        for name in ("kernels", "convert"):
            try:
                importlib.metadata.distribution(name)
            except importlib.metadata.PackageNotFoundError:
                continue
            importlib.import_module(name)
    finally:
        sys.path[:] = saved


_import_installed_namesakes()
