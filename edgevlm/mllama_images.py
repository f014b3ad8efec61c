"""The vision states of Llama-3.2-Vision (mllama) images: encoded once, kept in RAM and on disk.

An mllama image becomes ``(max_tiles, tokens per tile, width)`` projected vision states
(:meth:`edgevlm.kernels.mllama_vision.MllamaVisionEncoder.encode`) that the text decoder's
cross-attention layers attend to. :class:`MllamaImages` keeps the last :data:`IMAGE_CACHE`
in RAM and, when the on-disk caches are on, every one in the embedding store
(:class:`edgevlm.cache.EmbeddingStore`, keyed by the projector file and the image's pixels),
so another process asking about the same image does not run the vision encoder.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgevlm.cache import EmbeddingStore
from edgevlm.kernels.mllama_vision import MllamaVisionConfig
from edgevlm.mllama_runtime import MllamaPipeline
from edgevlm.stats import PrefillStats
from edgevlm.vision.images import LoadedImage, to_pil
from edgevlm.vision.mllama_tiles import best_canvas

#: Images whose vision states stay in RAM (an 11B image: 4 x 1601 x 4096 float32 = 105 MB).
IMAGE_CACHE = 4


@dataclass(frozen=True)
class VisionStates:
    """An image's projected vision states ``(max_tiles, tokens per tile, width)`` and its real tiles."""

    states: np.ndarray
    n_tiles: int


def n_tiles_for(cfg: MllamaVisionConfig, width: int, height: int) -> int:
    """The tiles MllamaImageProcessor cuts an image of ``width`` x ``height`` into (no pixels needed)."""
    canvas_h, canvas_w = best_canvas(height, width, cfg.max_image_tiles, cfg.image_size)
    return (canvas_h // cfg.image_size) * (canvas_w // cfg.image_size)


class MllamaImages:
    """Vision states by image digest: the RAM tier (LRU), the disk tier, else the encoder.

    Args:
        pipeline: the loaded mllama pair (its vision encoder).
        store: the disk tier, or None.
        projector: the projector file's identity (part of every disk key).
    """

    def __init__(self, pipeline: MllamaPipeline, store: EmbeddingStore | None, projector: str) -> None:
        self.pipe, self.store, self.projector = pipeline, store, projector
        self.ram: OrderedDict[str, VisionStates] = OrderedDict()
        self.n_encode_calls = 0

    def get(self, image: LoadedImage, stats: PrefillStats | None = None, *, cache: bool = True,
            cancelled: Callable[[], bool] | None = None) -> VisionStates:
        """``image``'s vision states (``cache=False``: encoded again, nothing looked up or kept).

        Raises:
            ComputeCancelled: ``cancelled`` stopped the encoder mid-graph (nothing was kept).
        """
        stats = stats if stats is not None else PrefillStats()
        hit = self.ram.get(image.digest) if cache else None
        if hit is not None:
            self.ram.move_to_end(image.digest)
            stats.images_from_cache += 1
            return hit
        cfg = self.pipe.vision.config
        shape = (cfg.max_num_tiles * cfg.n_positions, cfg.output_width)
        if cache and self.store is not None:
            flat, computed = self.store.get_or_compute(f"mllama/{self.projector}/{image.digest}",
                                                       lambda: self._encode(image, stats, cancelled).reshape(shape), shape)
            if not computed:
                stats.images_from_cache += 1
        else:
            flat = self._encode(image, stats, cancelled).reshape(shape)
        found = VisionStates(np.asarray(flat, np.float32).reshape(cfg.max_num_tiles, cfg.n_positions, -1),
                             n_tiles_for(cfg, image.width, image.height))
        if cache:
            self.ram[image.digest] = found
            while len(self.ram) > IMAGE_CACHE:
                self.ram.popitem(last=False)
        return found

    def _encode(self, image: LoadedImage, stats: PrefillStats, cancelled: Callable[[], bool] | None) -> np.ndarray:
        started = time.perf_counter()
        encoded = self.pipe.encode_image(to_pil(image), cancelled)
        self.n_encode_calls += 1
        stats.images_encoded += 1
        stats.encode_ms += (time.perf_counter() - started) * 1e3
        return encoded.states

    @contextmanager
    def isolated(self, root: Path) -> Iterator[None]:
        """Run with an empty RAM tier and a disk tier under ``root`` (if one is on); both put back after."""
        saved = self.ram, self.store
        self.ram = OrderedDict()
        self.store = EmbeddingStore(root) if self.store is not None else None
        try:
            yield
        finally:
            self.ram, self.store = saved

    def clear(self) -> None:
        self.ram.clear()
