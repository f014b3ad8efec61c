"""``edgevlm serve``: the OpenAI-compatible server (needs the ``serve`` extra)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import click

from edgevlm.cli.options import load_from_options, model_options
from edgevlm.server import config as defaults

ENV_API_KEY = "EDGEVLM_API_KEY"


@click.command()
@model_options
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to listen on (0.0.0.0 exposes the server to the network).")
@click.option("--port", type=click.IntRange(0, 65535), default=8080, show_default=True,
              help="Port (0: a free one, printed at start).")
@click.option("--api-key", default=None, envvar=ENV_API_KEY,
              help=f"Require 'Authorization: Bearer KEY' on /v1 requests (also ${ENV_API_KEY}).")
@click.option("--allow-dir", "allow_dirs", multiple=True,
              type=click.Path(exists=True, file_okay=False, resolve_path=True),
              help="Folder that file:// image URLs may read from (repeatable; default: none).")
@click.option("--allow-remote-images", is_flag=True,
              help="Fetch http(s):// image URLs (size and time limited; off by default).")
@click.option("--remote-timeout", type=click.FloatRange(min=0.1), default=defaults.DEFAULT_REMOTE_TIMEOUT_S,
              show_default=True, help="Seconds allowed to fetch one remote image.")
@click.option("--max-queue", type=click.IntRange(min=0), default=defaults.DEFAULT_MAX_QUEUE, show_default=True,
              help="Requests waiting behind the running one; more get HTTP 503 with Retry-After.")
@click.option("--max-image-bytes", type=click.IntRange(min=1), default=defaults.DEFAULT_MAX_IMAGE_BYTES,
              show_default=True, help="Largest encoded image accepted.")
@click.option("--max-image-pixels", type=click.IntRange(min=1), default=defaults.DEFAULT_MAX_IMAGE_PIXELS,
              show_default=True, help="Largest image accepted (width x height).")
@click.option("--max-images", type=click.IntRange(min=1), default=defaults.DEFAULT_MAX_IMAGES,
              show_default=True, help="Most images in one request.")
@click.option("--max-tokens", "max_reply_tokens", type=click.IntRange(min=1), default=None,
              help="Most tokens one reply may generate (default: what the context allows).")
@click.option("--model-name", default=None, help="The model's id in responses (default: its folder or repo name).")
@click.pass_context
def serve(ctx: click.Context, host: str, port: int, api_key: str | None, allow_dirs: tuple[str, ...],
          allow_remote_images: bool, remote_timeout: float, max_queue: int, max_image_bytes: int,
          max_image_pixels: int, max_images: int, max_reply_tokens: int | None, model_name: str | None,
          **params: Any) -> None:
    """Serve a model over an OpenAI-compatible HTTP API (/v1/chat/completions, /v1/models, /health)."""
    from edgevlm.server import ServerConfig
    from edgevlm.server.app import bind_socket, require_serve_extra, serve as run_server

    require_serve_extra()
    config = ServerConfig(model_id=model_name or _model_id(params["model"]), api_key=api_key or None,
                          allow_dirs=tuple(Path(d) for d in allow_dirs), allow_remote_images=allow_remote_images,
                          remote_timeout_s=remote_timeout, max_queue=max_queue, max_image_bytes=max_image_bytes,
                          max_image_pixels=max_image_pixels, max_images=max_images, max_tokens=max_reply_tokens)
    sock = bind_socket(host, port)  # fail on a taken port before loading gigabytes
    vlm = load_from_options(params)
    bound_port = sock.getsockname()[1]
    shown = f"[{host}]" if ":" in host else host
    click.echo(f"edgevlm: serving {config.model_id} at http://{shown}:{bound_port}/v1 (Ctrl-C stops)", err=True)
    verbose = bool(ctx.find_root().params.get("verbose"))
    try:
        run_server(vlm, config, sock, verbose=verbose)
    finally:
        vlm.close()
        sock.close()


def _model_id(model: str) -> str:
    """A short id: a local model's folder or file name, else the repo id."""
    path = Path(os.path.expanduser(model))
    return path.name if path.exists() else model
