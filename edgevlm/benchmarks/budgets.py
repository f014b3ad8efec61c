"""Image figures for ``edgevlm bench``: what the bench image costs, and what a token budget saves.

For tiled models (LLaVA-NeXT, InternVL, ``tiles="grid"``) an image's cost
depends on its size and on the image-token budget (``max_image_tokens``):
fewer tiles mean fewer views through the vision tower and fewer positions to
prefill. :func:`image_figures` reports the bench image under the load-time
budget; :func:`budget_sweep` re-measures it under each given budget, cold
(empty caches, :meth:`edgevlm.VLM.isolated_caches`): tokens and views from
:meth:`edgevlm.VLM.image_cost`, the median encode time and the first turn's
time to first token. Public API only.
"""

from __future__ import annotations

import time
from typing import Any

from edgevlm import load_image
from edgevlm.api import VLM
from edgevlm.benchmarks.probe import image_question, timed_turn
from edgevlm.benchmarks.vision import time_encoder
from edgevlm.errors import ContextOverflowError


def image_figures(vlm: VLM, image: str, repeats: int, max_image_tokens: int | None = None) -> dict[str, Any]:
    """What ``image`` costs and how long the vision tower takes on it, caches empty.

    Args:
        vlm: a loaded model with a vision projector.
        image: the image (path).
        repeats: timed encodes after the first (``image_encode_ms`` is their median).
        max_image_tokens: the budget (None: the load default).

    Returns:
        ``image_size`` ([width, height] as decoded), ``image_tokens`` and
        ``image_views`` (:meth:`VLM.image_cost`), ``image_embedding_rows`` (what
        the encoder returned), ``image_encode_first_ms`` (the first encode:
        graph set-up included) and ``image_encode_ms``.

    Raises:
        UnsupportedModelError: the model has no projector.
        ImageError: the image cannot be read.
    """
    size = load_image(image)
    cost = vlm.image_cost(size.width, size.height, max_image_tokens=max_image_tokens)
    with vlm.isolated_caches():
        t0 = time.perf_counter()
        emb = vlm.embed_image(image, cache=False, max_image_tokens=max_image_tokens)
        first_ms = (time.perf_counter() - t0) * 1e3
        encode_ms = time_encoder(vlm, image, repeats, max_image_tokens)
    return {"image_size": [size.width, size.height], "image_tokens": cost.tokens, "image_views": cost.views,
            "image_embedding_rows": int(emb.shape[0]), "image_encode_first_ms": round(first_ms, 1),
            "image_encode_ms": encode_ms}


def budget_sweep(vlm: VLM, image: str, budgets: list[int], prompt: str, max_tokens: int,
                 repeats: int) -> list[dict[str, Any]]:
    """:func:`image_figures` and a cold first turn about ``image`` under each budget.

    Args:
        vlm: a loaded model with a vision projector.
        image: the image (path).
        budgets: image-token budgets (``max_image_tokens``), measured in this order.
        prompt: the question of the timed turn.
        max_tokens: reply length limit of the turn.
        repeats: timed encodes per budget.

    Returns:
        One dict per budget: ``max_image_tokens``, ``image_tokens``, ``views``,
        ``image_encode_ms``, ``ttft_ms`` (the turn: image encoded, prompt
        prefilled, first token), ``prompt_tokens`` and ``images_encoded``; or,
        for a budget the model cannot meet (or a prompt over the context),
        ``max_image_tokens`` and ``error`` (the message).

    Raises:
        UnsupportedModelError: the model has no projector.
    """
    rows = []
    for budget in budgets:
        try:
            rows.append(_budget_row(vlm, image, budget, prompt, max_tokens, repeats))
        except ContextOverflowError as exc:  # the model cannot make the image that small
            rows.append({"max_image_tokens": budget, "error": str(exc)})
    return rows


def _budget_row(vlm: VLM, image: str, budget: int, prompt: str, max_tokens: int,
                repeats: int) -> dict[str, Any]:
    figures = image_figures(vlm, image, repeats, budget)  # the first encode also sets the graph up
    with vlm.isolated_caches():
        turn = timed_turn(vlm, image_question(image, prompt), max_tokens, max_image_tokens=budget)
    return {"max_image_tokens": budget, "image_tokens": figures["image_tokens"], "views": figures["image_views"],
            "image_encode_ms": figures["image_encode_ms"], "ttft_ms": round(turn["ttft_ms"], 1),
            "prompt_tokens": turn["prompt_positions"], "images_encoded": turn["images_encoded"]}
