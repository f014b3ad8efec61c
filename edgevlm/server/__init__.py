"""``edgevlm serve``: an OpenAI-compatible HTTP server on the public API.

:func:`create_app` wraps a loaded :class:`edgevlm.VLM` in a Starlette
application (``POST /v1/chat/completions``, ``GET /v1/models``,
``GET /health``); :func:`serve` runs it with uvicorn. Both need the
``serve`` extra (``pip install "edgevlm[serve]"``). Importing this package
imports neither.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from edgevlm.server.config import ServerConfig

__all__ = ["ServerConfig", "create_app", "serve"]

if TYPE_CHECKING:  # pragma: no cover
    from edgevlm.server.app import create_app, serve


def __getattr__(name: str) -> Any:
    if name in ("create_app", "serve"):
        from edgevlm.server import app

        return getattr(app, name)
    raise AttributeError(f"module 'edgevlm.server' has no attribute {name!r}")
