"""What :class:`edgevlm.VLM` needs from an engine, and what a family gets to open one.

Two engines implement :class:`VLMEngine`: :class:`edgevlm.engine.Engine`
(llama.cpp's context, the LLaVA-like families) and the engines a family opens
itself through :meth:`edgevlm.families.base.Family.open_engine` (a kernels
LLM llama.cpp cannot run). ``VLM`` only talks to this interface; the family
picks the engine, so generic code never names a family.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import numpy as np

from edgevlm.chunks import Chunk
from edgevlm.descriptor import ModelDescriptor
from edgevlm.generation import CancelToken, SamplingOptions, TextStream
from edgevlm.progress import LoadReporter
from edgevlm.prompt import Message
from edgevlm.scoring import ChoiceGeneration, ChoiceScores
from edgevlm.stats import PrefillStats
from edgevlm.vision.images import LoadedImage

if TYPE_CHECKING:  # pragma: no cover
    from edgevlm.families.base import Family, ImageCost


@dataclass(frozen=True)
class RuntimeSettings:
    """How a loaded model runs (what a peer must be given to run it the same way).

    Attributes:
        n_ctx, n_batch: context and batch size in tokens.
        n_threads, n_threads_batch: CPU threads for generation / prompt processing.
        n_gpu_layers: LLM layers offloaded (-1 all).
        kv_type: KV cache element type.
        flash_attn: llama.cpp's flash-attention setting (-1 auto, 0 off, 1 on).
    """

    n_ctx: int
    n_batch: int
    n_threads: int
    n_threads_batch: int
    n_gpu_layers: int
    kv_type: str
    flash_attn: int


@dataclass(frozen=True)
class EngineRequest:
    """What :func:`edgevlm.load` decided, for a family that opens its own engine.

    Attributes:
        described: both files' headers.
        n_ctx: the requested context (None: the family's default).
        n_batch, n_threads, n_gpu_layers, kv_type, seed: as :func:`edgevlm.load` took them.
        device: the ggml device for the kernels graphs ("cpu", "auto", ...).
        chat_template, chat_format: prompt overrides (None: the GGUF's / the family's).
        cache: whether the on-disk caches were asked for.
        max_image_tokens: the default image budget.
        memory_budget: the budget asked for (None: none).
        report: the load's progress reporter.
        flash_attn: flash attention as asked for (None: the engine's choice).
    """

    described: ModelDescriptor
    n_ctx: int | None
    n_batch: int
    n_threads: int | None
    n_gpu_layers: int
    kv_type: str
    seed: int
    device: str
    chat_template: str | None
    chat_format: str | None
    cache: bool
    max_image_tokens: int | None
    memory_budget: int | str | None
    report: LoadReporter
    flash_attn: bool | None = None


class VLMEngine(Protocol):
    """The engine interface :class:`edgevlm.VLM` runs on (every call takes the whole conversation).

    Each engine renders ``messages`` into its own request form (chunks for llama.cpp,
    tokens and images for mllama); ``generate`` does so before returning, so a bad request
    raises at the call, not when the stream is read. Engines serialise calls with
    ``lock`` and raise :class:`~edgevlm.errors.InvalidRequestError` once closed.
    """

    family: Family
    lock: threading.RLock
    closed: bool
    last_prefill: PrefillStats

    @property
    def n_ctx(self) -> int: ...
    @property
    def n_vocab(self) -> int: ...
    @property
    def vision_engine(self) -> str | None: ...
    @property
    def encoder_calls(self) -> int: ...
    @property
    def caching(self) -> bool: ...
    def settings(self) -> RuntimeSettings: ...
    def tokenize(self, text: str) -> list[int]: ...
    def prompt_chunks(self, messages: list[Message], *, gen: bool = True,
                      max_image_tokens: int | None = None) -> list[Chunk]: ...
    def prompt_text(self, messages: list[Message], *, gen: bool = True) -> str: ...
    def prepare(self, messages: list[Message], *, max_image_tokens: int | None = None,
                cancelled: Callable[[], bool] | None = None) -> PrefillStats: ...
    def generate(self, messages: list[Message], options: SamplingOptions, *,
                 max_image_tokens: int | None = None, cancel: CancelToken | None = None) -> TextStream: ...
    def next_token_logits(self, messages: list[Message], *, gen: bool = True,
                          max_image_tokens: int | None = None) -> np.ndarray: ...
    def score_choices(self, messages: list[Message], choices: Sequence[str], *,
                      max_image_tokens: int | None = None) -> ChoiceScores: ...
    def generate_choice(self, messages: list[Message], choices: Sequence[str], *,
                        max_image_tokens: int | None = None) -> ChoiceGeneration: ...
    def embed_image(self, image: LoadedImage, *, cache: bool = True,
                    max_image_tokens: int | None = None) -> np.ndarray: ...
    def image_cost(self, width: int, height: int, max_image_tokens: int | None = None) -> ImageCost: ...
    def tower_pixels(self, image: LoadedImage) -> np.ndarray: ...
    def reset(self) -> None: ...
    def isolated_caches(self, root: Path) -> AbstractContextManager[None]: ...
    def check_open(self) -> None: ...
    def close(self) -> None: ...
