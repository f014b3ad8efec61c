"""A real ``edgevlm serve`` process on a loopback port, for tests that talk to it as a client would."""

from __future__ import annotations

import base64
import io
import json
import os
import re
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np

URL_LINE = re.compile(r"serving (\S+) at (http://\S+/v1)")


@contextmanager
def running_server(model: Path, home: Path, *extra: str, timeout_s: float = 120) -> Iterator[tuple[str, subprocess.Popen]]:
    """Start ``edgevlm serve --port 0`` with its home and caches under ``home``; yields (base URL, process)."""
    home.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "HOME": str(home), "XDG_CACHE_HOME": str(home / "cache"),
           "XDG_CONFIG_HOME": str(home / "config"), "EDGEVLM_CACHE_DIR": str(home / "cache" / "edgevlm"),
           "HF_HUB_OFFLINE": "1"}
    env.pop("EDGEVLM_API_KEY", None)
    log = (home / "server.log").open("w+")
    proc = subprocess.Popen([sys.executable, "-m", "edgevlm.cli.main", "serve", "--model", str(model), "--port", "0",
                             "--threads", "2", "--no-cache", *extra], env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        base = _wait_for_url(proc, home / "server.log", timeout_s)
        yield base, proc
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:  # pragma: no cover - a hung shutdown is itself a failure
            proc.kill()
            proc.wait()
            raise AssertionError("edgevlm serve did not stop within 20 s of SIGTERM")
        finally:
            log.close()


def _wait_for_url(proc: subprocess.Popen, log: Path, timeout_s: float) -> str:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        match = URL_LINE.search(log.read_text())
        if match:
            base = match.group(2)
            try:
                with urllib.request.urlopen(base.removesuffix("/v1") + "/health", timeout=2) as response:
                    if response.status == 200:
                        return base
            except OSError:
                pass
        if proc.poll() is not None:
            raise AssertionError(f"edgevlm serve exited with {proc.returncode}: {log.read_text()[-2000:]}")
        time.sleep(0.1)
    raise AssertionError(f"edgevlm serve did not start in {timeout_s} s: {log.read_text()[-2000:]}")


def health(base: str) -> dict:
    with urllib.request.urlopen(base.removesuffix("/v1") + "/health", timeout=5) as response:
        return json.loads(response.read())


def data_url(path_or_bytes: Path | bytes) -> str:
    raw = path_or_bytes.read_bytes() if isinstance(path_or_bytes, Path) else path_or_bytes
    return "data:image/png;base64," + base64.b64encode(raw).decode()


def random_png(seed: int, size: tuple[int, int] = (40, 32)) -> bytes:
    from PIL import Image

    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def image_message(url: str, text: str) -> dict:
    return {"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                        {"type": "text", "text": text}]}
