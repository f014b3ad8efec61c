"""The first request of a fresh process against the second: one-time costs that load leaves to requests.

``edgevlm bench`` loads the model and, before anything else touches it (no
warm-up encode, no other request), times the first request, then a second,
*different* request (the image mirrored, so nothing is reused from a cache,
and the follow-up question), both with empty caches
(:meth:`edgevlm.VLM.isolated_caches`). Whatever the first pays and the second
does not (page faults on the weights, thread-pool start, compute buffers
touched for the first time, first-call set-up in the libraries) shows as
``first_to_second_ttft_ratio``. Public API only.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from edgevlm.api import VLM
from edgevlm.benchmarks.probe import image_question, timed_turn


def other_image(image: str, folder: Path) -> str:
    """``image`` mirrored left-right, as a PNG in ``folder`` (same size and cost, other pixels)."""
    from PIL import Image, ImageOps

    with Image.open(image) as img:
        path = folder / "mirrored.png"
        ImageOps.mirror(img.convert("RGB")).save(path)
    return str(path)


def first_and_second_request(vlm: VLM, image: str | None, prompt: str, follow_up: str,
                             max_tokens: int) -> dict[str, Any]:
    """TTFT of the process's first request and of a second, different one (ms), and their ratio.

    Call it right after :func:`edgevlm.load`, before any other request.
    """
    with tempfile.TemporaryDirectory(prefix="edgevlm-first-") as tmp, vlm.isolated_caches():
        if image is None:
            requests = [[{"role": "user", "content": prompt}], [{"role": "user", "content": follow_up}]]
        else:
            requests = [image_question(image, prompt), image_question(other_image(image, Path(tmp)), follow_up)]
        first, second = (timed_turn(vlm, messages, max_tokens) for messages in requests)
    return {"first_request_ttft_ms": round(first["ttft_ms"], 1),
            "second_request_ttft_ms": round(second["ttft_ms"], 1),
            "first_to_second_ttft_ratio": round(first["ttft_ms"] / max(second["ttft_ms"], 1e-6), 2)}
