"""Vision encoding on edgevlm's own ggml graphs (:mod:`edgevlm.kernels`).

Same interface as :class:`edgevlm.vision.mtmd.MtmdEncoder`: split a prompt at
media markers into text and image chunks, encode an image chunk into
embeddings, put embeddings into the LLM context (through ``llama_batch``
embeddings, so the engine's prefix and embedding caches work unchanged).

Chosen automatically for CLIP-tower LLaVA projectors (libmtmd computes those
wrongly at the pinned llama.cpp) and for projectors libmtmd cannot run at all
(OmniFusion); see :func:`choose_engine`.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from edgevlm import constants as C
from edgevlm.cache import file_identity
from edgevlm.chunks import Chunk, ImageChunk, TextChunk
from edgevlm.errors import IncompatibleModelError, InvalidRequestError, UnsupportedModelError
from edgevlm.llm import LlamaContext, LlamaModel
from edgevlm.vision.images import LoadedImage
from edgevlm.vision.preprocess import preprocess

VISION_ENGINES = ("auto", "kernels", "mtmd")
MARKER = "<__media__>"


def choose_engine(requested: str, meta: Mapping[str, Any], tensor_names: frozenset[str]) -> str:
    """Which vision engine runs a projector file.

    ``auto``: the kernels for edgevlm projector kinds (libmtmd cannot load
    them) and for LLaVA MLP projectors with a CLIP tower (class embedding),
    libmtmd for everything else.

    Raises:
        InvalidRequestError: an unknown engine name.
        UnsupportedModelError: "mtmd" for a projector only the kernels run, or
            "kernels" for one they do not implement.
    """
    from edgevlm.kernels.vision import kernels_can_run, projector_kind

    if requested not in VISION_ENGINES:
        raise InvalidRequestError(f"unknown vision engine {requested!r}; choose one of {', '.join(VISION_ENGINES)}")
    kind = projector_kind(meta)
    if kind in C.PROJECTOR_KINDS:
        if requested == "mtmd":
            raise UnsupportedModelError(f"libmtmd cannot run {kind} projectors; use vision_engine='kernels'")
        return "kernels"
    if requested == "kernels" and not kernels_can_run(meta):
        raise UnsupportedModelError(f"the kernels vision engine does not implement projector type {kind!r}; "
                                    "use vision_engine='mtmd' (or 'auto')")
    if requested == "auto":
        return "kernels" if kernels_can_run(meta) and "v.class_embd" in tensor_names else "mtmd"
    return requested


class KernelsEncoder:
    """A projector file run by :class:`edgevlm.kernels.vision.VisionTower`.

    Args:
        mmproj: projector GGUF.
        model: the LLM it feeds.
        n_threads: CPU threads for the tower.
        device: ggml device for the tower ("auto", "cpu", "cuda", ...).

    Raises:
        IncompatibleModelError: the projector's output width is not the LLM's.
        InvalidModelError, UnsupportedModelError, KernelsUnavailableError.
    """

    name = "kernels"
    marker = MARKER
    uses_mrope = False
    non_causal = False

    def __init__(self, mmproj: Path, model: LlamaModel, *, n_threads: int, device: str = "auto") -> None:
        from edgevlm.kernels.vision import VisionTower

        self.path = Path(mmproj)
        self.model = model
        self.tower = VisionTower(self.path, device=device, n_threads=n_threads)
        cfg = self.tower.config
        if cfg.output_width != model.n_embd_inp:
            self.tower.close()
            raise IncompatibleModelError(
                f"projector {self.path.name} produces {cfg.output_width}-wide embeddings but the LLM "
                f"{model.path.name} expects {model.n_embd_inp}; use the projector converted with this LLM")
        self.identity = file_identity(self.path)
        self._variant = f"kernels:{cfg.resize}:{cfg.image_size}"
        self.n_encode_calls = 0
        self._lock = threading.Lock()

    @property
    def meta(self) -> Mapping[str, Any]:
        return self.tower.meta

    @property
    def device(self) -> str:
        return self.tower.device

    def close(self) -> None:
        if getattr(self, "tower", None) is not None:
            self.tower.close()

    # ------------------------------------------------------------------
    def image_chunk(self, image: LoadedImage) -> ImageChunk:
        """The chunk of one image (the kernels engine does not tile)."""
        n = self.tower.config.n_tokens
        return ImageChunk(key=f"{image.digest}/{self.identity}/{self._variant}/0", n_tokens=n, n_pos=n,
                          handle=image)

    def tokenize(self, prompt: str, images: list[LoadedImage], *, add_special: bool) -> list[Chunk]:
        """Split ``prompt`` at media markers into text and image chunks.

        Raises:
            InvalidRequestError: the number of markers differs from the number of images.
        """
        parts = prompt.split(self.marker)
        if len(parts) - 1 != len(images):
            raise InvalidRequestError(f"the prompt has {len(parts) - 1} image markers but "
                                      f"{len(images)} images were given")
        out: list[Chunk] = []
        for i, text in enumerate(parts):
            if i:
                out.append(self.image_chunk(images[i - 1]))
            tokens = self.model.tokenize(text, add_special=add_special and i == 0) if text or i == 0 else []
            if tokens:
                out.append(TextChunk(tuple(tokens)))
        return out

    def pixels(self, image: LoadedImage) -> np.ndarray:
        """Normalised pixels (3, S, S) as the projector's image processor makes them."""
        cfg = self.tower.config
        pil = Image.frombytes("RGB", (image.width, image.height), image.rgb)
        return preprocess(pil, size=cfg.image_size, mode=cfg.resize, mean=cfg.image_mean, std=cfg.image_std)

    def encode(self, chunk: ImageChunk) -> np.ndarray:
        """Run tower + projector: (n_tokens, n_embd_inp) float32."""
        pixels = self.pixels(chunk.handle)
        with self._lock:
            out = self.tower.encode(pixels)
            self.n_encode_calls += 1
        return out

    def decode(self, ctx: LlamaContext, chunk: ImageChunk, embd: np.ndarray, pos: int) -> int:
        """Put ``embd`` into the context at ``pos``; return the next position."""
        ctx.check_fits(pos + chunk.n_pos, "the prompt with its images")
        ctx.decode_embeddings(embd, pos, causal=True)
        return pos + chunk.n_pos
