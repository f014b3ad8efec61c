"""Where edgevlm keeps files of its own: the cache folder (bottom layer: no edgevlm imports)."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """The root cache directory (created on first write, not here).

    ``EDGEVLM_CACHE_DIR`` when set, else the platform's user cache folder
    (``platformdirs.user_cache_dir("edgevlm")``, e.g. ``~/.cache/edgevlm``).
    """
    env = os.environ.get("EDGEVLM_CACHE_DIR")
    if env:
        return Path(env).expanduser()
    try:
        import platformdirs

        return Path(platformdirs.user_cache_dir("edgevlm", appauthor=False))
    except ImportError:  # pragma: no cover - platformdirs is a dependency
        return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "edgevlm"
