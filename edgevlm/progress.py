"""Load progress: the typed events :func:`edgevlm.load` sends to its ``progress`` callback.

A load goes through the stages of :class:`LoadStage` in order. Each event
carries the stage, how far the stage is, and an overall fraction for one
progress bar: the two weight files are weighted by their sizes, the rest
(finding the files, reading their headers, creating the context) takes a
few percent. The overall fraction never decreases and the last event is
:attr:`LoadStage.READY` at 1.0.

A callback that raises aborts the load (llama.cpp stops reading weights at
its next progress report) and its exception propagates from ``load``.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass


class LoadStage(str, enum.Enum):
    """The stages of a load, in order."""

    RESOLVING = "resolving"  # finding the files (a hub repo id may download them)
    READING_HEADERS = "reading_headers"  # both GGUF headers: architecture, family, sizes
    LOADING_LLM = "loading_llm"  # llama.cpp reads the LLM weights (stage_fraction from llama.cpp)
    LOADING_PROJECTOR = "loading_projector"  # the vision projector's weights
    CREATING_CONTEXT = "creating_context"  # the KV cache and compute buffers
    READY = "ready"


@dataclass(frozen=True)
class LoadProgress:
    """One progress event of a load.

    Attributes:
        stage: the stage the load is in.
        stage_fraction: how far that stage is, 0..1.
        fraction: how far the whole load is, 0..1 (never decreasing).
        detail: what is being done, for a status line (e.g. a file name).
    """

    stage: LoadStage
    stage_fraction: float
    fraction: float
    detail: str = ""


ProgressCallback = Callable[[LoadProgress], None]

#: Overall fractions before the weights and after them (the weights take the rest).
_HEADERS_AT, _WEIGHTS_FROM, _WEIGHTS_TO = 0.01, 0.03, 0.95


class LoadReporter:
    """Sends :class:`LoadProgress` events to a callback (or nowhere), with the overall fraction.

    Args:
        callback: the application's callback, or None.
    """

    def __init__(self, callback: ProgressCallback | None) -> None:
        self.callback = callback
        self._llm_share = 1.0
        self._last = 0.0

    def weigh(self, llm_bytes: int, projector_bytes: int) -> None:
        """Split the weights' part of the bar between the LLM and the projector by file size."""
        total = llm_bytes + projector_bytes
        self._llm_share = llm_bytes / total if total > 0 else 1.0

    def report(self, stage: LoadStage, stage_fraction: float = 0.0, detail: str = "") -> None:
        """Send one event (nothing without a callback).

        Raises:
            Exception: whatever the callback raises (it aborts the load).
        """
        if self.callback is None:
            return
        part = min(max(stage_fraction, 0.0), 1.0)
        overall = max(self._last, self._overall(stage, part))
        self._last = overall
        self.callback(LoadProgress(stage=stage, stage_fraction=part, fraction=overall, detail=detail))

    def _overall(self, stage: LoadStage, part: float) -> float:
        llm_to = _WEIGHTS_FROM + (_WEIGHTS_TO - _WEIGHTS_FROM) * self._llm_share
        spans = {LoadStage.RESOLVING: (0.0, _HEADERS_AT), LoadStage.READING_HEADERS: (_HEADERS_AT, _WEIGHTS_FROM),
                 LoadStage.LOADING_LLM: (_WEIGHTS_FROM, llm_to), LoadStage.LOADING_PROJECTOR: (llm_to, _WEIGHTS_TO),
                 LoadStage.CREATING_CONTEXT: (_WEIGHTS_TO, 1.0), LoadStage.READY: (1.0, 1.0)}
        low, high = spans[stage]
        return low + (high - low) * part

    def stage_callback(self, stage: LoadStage, detail: str = "") -> Callable[[float], None] | None:
        """A ``fraction -> None`` callback reporting ``stage`` (None without a callback)."""
        if self.callback is None:
            return None
        return lambda part: self.report(stage, part, detail)
