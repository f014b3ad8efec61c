"""Vision encoding through llama.cpp's multimodal library (libmtmd).

libmtmd supports every projector type llama.cpp knows (LLaVA, SigLIP/Gemma 3,
Qwen2-VL, SmolVLM, ...). It tokenises a prompt with media markers into chunks,
preprocesses images (resize, tiling where the model has it) and runs the
vision tower. edgevlm keeps its own chunk identities on top so that the KV
prefix and embedding caches work across requests.

Families whose own tiling differs from libmtmd's (InternVL) cut the image
themselves and hand the encoder a :class:`TiledImage`: libmtmd then encodes
every view as one bitmap of exactly the tower's size, and the family lays out
the text around the views.
"""

from __future__ import annotations

import ctypes
import os
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edgevlm import constants as C
from edgevlm import native
from edgevlm.cache import file_identity
from edgevlm.chunks import Chunk, ImageChunk, TextChunk
from edgevlm.errors import (
    ComputeCancelled,
    ImageError,
    IncompatibleModelError,
    InvalidModelError,
    RuntimeFailure,
    UnsupportedModelError,
)
from edgevlm.llm import DECODE_ABORTED, LlamaContext, LlamaModel
from edgevlm.vision.images import LoadedImage, has_pixels


class _OwnedChunk:
    """A libmtmd chunk copy that frees itself."""

    def __init__(self, lib: object, ptr: int) -> None:
        self._lib = lib
        self.ptr = ptr

    def __del__(self) -> None:  # pragma: no cover - GC timing
        if self.ptr:
            try:
                self._lib.mtmd_input_chunk_free(self.ptr)
            except Exception:
                pass
            self.ptr = None


@dataclass(frozen=True)
class TiledImage(LoadedImage):
    """An image its family has already cut into views (libmtmd must not tile it again).

    The inherited fields describe the original image (its digest is the
    image's cache identity); :meth:`MtmdEncoder.image_chunks` encodes each view
    as one bitmap.

    Attributes:
        views: the views in the order the LLM receives them, each exactly the
            tower's input size.
        plan: names the cut (e.g. ``internvl:3x2+t:448``); part of every chunk
            key, so another plan (another budget) never reuses these embeddings.
    """

    views: tuple[LoadedImage, ...] = field(repr=False)
    plan: str


class MtmdEncoder:
    """A projector file loaded by libmtmd, bound to one :class:`LlamaModel`.

    Implements :class:`edgevlm.vision.encoder.VisionEncoder`.

    Args:
        mmproj: the projector GGUF.
        model: the LLM it feeds.
        meta: the projector's metadata (from the model descriptor; read from the file if None).
        n_threads: CPU threads.
        use_gpu: let libmtmd put the tower on the GPU when the build has one.

    Raises:
        InvalidModelError, IncompatibleModelError, UnsupportedModelError: libmtmd refused the file.
    """

    name = C.VISION_ENGINE_MTMD

    def __init__(self, mmproj: Path, model: LlamaModel, *, n_threads: int, use_gpu: bool = True,
                 meta: Mapping[str, Any] | None = None) -> None:
        lib = native.mtmd()
        self._lib = lib
        self.path = Path(mmproj)
        self.model = model
        if meta is None:
            from edgevlm.gguf_info import read_metadata

            meta = read_metadata(self.path)
        self._meta = dict(meta)
        self._device = "gpu" if use_gpu and bool(native.llama().llama_supports_gpu_offload()) else "CPU"
        self.identity = file_identity(self.path)
        params = lib.mtmd_context_params_default()
        params.use_gpu = use_gpu
        params.print_timings = False
        params.n_threads = n_threads
        params.warmup = False
        self.ptr = lib.mtmd_init_from_file(str(self.path).encode(), model.ptr, params)
        if not self.ptr:
            raise _explain_load_failure(self.path, model)
        if not lib.mtmd_support_vision(self.ptr):
            self.close()
            raise UnsupportedModelError(f"{self.path} has no vision encoder (audio-only projectors are not supported)")
        self.marker = (lib.mtmd_default_marker() or C.MEDIA_MARKER.encode()).decode()
        self.uses_mrope = bool(lib.mtmd_decode_use_mrope(self.ptr))
        # Non-causal image chunks must be decoded in one batch (see engine).
        self.non_causal = bool(lib.mtmd_decode_use_non_causal(self.ptr, None))
        self.n_encode_calls = 0
        self._lock = threading.Lock()

    @property
    def meta(self) -> Mapping[str, Any]:
        return self._meta

    @property
    def device(self) -> str:
        return self._device

    def close(self) -> None:
        if getattr(self, "ptr", None):
            self._lib.mtmd_free(self.ptr)
            self.ptr = None

    def __del__(self) -> None:  # pragma: no cover
        try:
            self.close()
        except Exception:
            pass

    # ------------------------------------------------------------------
    def image_chunks(self, image: LoadedImage, *, max_tokens: int | None = None) -> list[ImageChunk]:
        """The chunks libmtmd makes of one image (several for models it tiles).

        libmtmd plans images itself: ``max_tokens`` is met by the family resizing
        the image first (``Family.prepare_image``). A :class:`TiledImage` gives
        one chunk per view instead (see :meth:`view_chunks`).
        """
        if isinstance(image, TiledImage):
            return self.view_chunks(image, max_tokens=max_tokens)
        return [c for c in self.tokenize(self.marker, [image], add_special=False) if isinstance(c, ImageChunk)]

    def view_chunks(self, image: TiledImage, *, max_tokens: int | None = None) -> list[ImageChunk]:
        """One image chunk per view of ``image``, without libmtmd's text around each bitmap.

        Keys are ``digest/projector identity/plan/view index`` of the original image.

        Args:
            image: the views cut by the family.
            max_tokens: the budget the views were planned under (recorded on the chunks).

        Returns:
            ``len(image.views)`` chunks, in the views' order.

        Raises:
            ImageError: libmtmd made other than one chunk of a view (a view that
                is not the tower's input size).
        """
        views = list(image.views)
        made = [c for c in self.tokenize(self.marker * len(views), views, add_special=False)
                if isinstance(c, ImageChunk)]
        if len(made) != len(views):
            raise ImageError(f"{image.source}: libmtmd made {len(made)} image chunks of {len(views)} views; "
                             f"every view must be exactly the projector's input size")
        # the chunks keep the original image (not its views' pixels) for budget checks and messages
        original = LoadedImage(image.width, image.height, image.rgb, image.digest, image.source)
        return [ImageChunk(key=f"{image.digest}/{self.identity}/{image.plan}/{i}", n_tokens=c.n_tokens,
                           n_pos=c.n_pos, image=original, native=c.native, budget=max_tokens)
                for i, c in enumerate(made)]

    def tokenize(self, prompt: str, images: list[LoadedImage], *, add_special: bool,
                 max_tokens: int | None | Sequence[int | None] = None) -> list[Chunk]:
        """Split ``prompt`` at media markers into text and image chunks (see :meth:`image_chunks`).

        Raises:
            RuntimeFailure: a :class:`TiledImage` (its family lays its views out).
            ImageError: libmtmd could not take or preprocess an image.
        """
        if any(isinstance(img, TiledImage) for img in images):
            raise RuntimeFailure("an image already cut into views is laid out by its model family's "
                                 "prompt layout, not by libmtmd's tokenizer")
        lib = self._lib
        bitmaps = []
        try:
            for img in images:
                bm = lib.mtmd_bitmap_init(img.width, img.height, _bitmap_bytes(img))
                if not bm:
                    raise ImageError(f"{img.source}: libmtmd could not take the image")
                lib.mtmd_bitmap_set_id(bm, img.digest.encode())
                bitmaps.append(bm)
            return self._tokenize(prompt, bitmaps, add_special, images)
        finally:
            for bm in bitmaps:
                lib.mtmd_bitmap_free(bm)

    def _tokenize(self, prompt: str, bitmaps: list[int], add_special: bool,
                  images: list[LoadedImage]) -> list[Chunk]:
        lib = self._lib
        text = lib.mtmd_input_text()
        data = prompt.encode("utf-8")
        text.text = data
        text.text_len = len(data)
        text.add_special = add_special
        text.parse_special = True
        arr = (lib.mtmd_bitmap_p_ctypes * max(1, len(bitmaps)))(*bitmaps)
        chunks = lib.mtmd_input_chunks_init()
        try:
            rc = lib.mtmd_tokenize(self.ptr, chunks, ctypes.byref(text), arr, len(bitmaps))
            if rc == 1:
                raise RuntimeFailure(f"prompt has a different number of image markers than images ({len(bitmaps)})")
            if rc != 0:
                raise ImageError(f"libmtmd could not preprocess the image(s) (code {rc})")
            return self._convert_chunks(chunks, {img.digest: img for img in images})
        finally:
            lib.mtmd_input_chunks_free(chunks)

    def _convert_chunks(self, chunks: int, images: dict[str, LoadedImage]) -> list[Chunk]:
        lib = self._lib
        out: list[Chunk] = []
        per_image: dict[str, int] = {}
        for i in range(lib.mtmd_input_chunks_size(chunks)):
            chunk = lib.mtmd_input_chunks_get(chunks, i)
            kind = lib.mtmd_input_chunk_get_type(chunk)
            if kind == lib.MTMD_INPUT_CHUNK_TYPE_TEXT:
                n = ctypes.c_size_t(0)
                ptr = lib.mtmd_input_chunk_get_tokens_text(chunk, ctypes.byref(n))
                out.append(TextChunk(tuple(ptr[j] for j in range(n.value))))
            elif kind == lib.MTMD_INPUT_CHUNK_TYPE_IMAGE:
                raw_id = lib.mtmd_input_chunk_get_id(chunk)
                image_id = raw_id.decode() if raw_id else "anon"
                index = per_image.get(image_id, 0)
                per_image[image_id] = index + 1
                owned = _OwnedChunk(lib, lib.mtmd_input_chunk_copy(chunk))
                out.append(ImageChunk(
                    key=f"{image_id}/{self.identity}/{index}",
                    n_tokens=int(lib.mtmd_input_chunk_get_n_tokens(chunk)),
                    n_pos=int(lib.mtmd_input_chunk_get_n_pos(chunk)),
                    image=images.get(image_id), native=owned))
            else:
                raise UnsupportedModelError("audio chunks are not supported by edgevlm")
        return out

    # ------------------------------------------------------------------
    def encode(self, chunk: ImageChunk, cancelled: Callable[[], bool] | None = None) -> np.ndarray:
        """Run the vision tower + projector: (n_tokens, n_embd_inp) float32 (libmtmd's encode has
        no stop hook: ``cancelled`` is not asked, the encode runs to its end)."""
        with self._lock:
            rc = self._lib.mtmd_encode_chunk(self.ptr, _native(chunk).ptr)
            if rc != 0:
                raise RuntimeFailure(f"libmtmd failed to encode an image (code {rc})")
            self.n_encode_calls += 1
            ptr = self._lib.mtmd_get_output_embd(self.ptr)
            width = self.model.n_embd_inp
            return np.ctypeslib.as_array(ptr, shape=(chunk.n_tokens * width,)).reshape(
                chunk.n_tokens, width).copy()

    def decode(self, ctx: LlamaContext, chunk: ImageChunk, embd: np.ndarray, pos: int) -> int:
        """Put ``embd`` into the context at ``pos``; return the next position."""
        ctx.check_fits(pos + chunk.n_pos, "the prompt with its images")
        embd = np.ascontiguousarray(embd, dtype=np.float32)
        new_pos = ctypes.c_int32(0)
        buf = embd.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
        rc = self._lib.mtmd_helper_decode_image_chunk(
            self.ptr, ctx.ptr, _native(chunk).ptr, buf, pos, ctx.SEQ, ctx.n_batch,
            ctypes.byref(new_pos), self._lib.mtmd_helper_post_decode_callback(), None)
        if rc == DECODE_ABORTED:
            raise ComputeCancelled("the image's decode was cancelled")
        if rc != 0:
            raise RuntimeFailure(f"decoding image embeddings failed (code {rc}); raise --ctx?")
        return int(new_pos.value)


def _bitmap_bytes(image: LoadedImage) -> ctypes.Array:
    """The RGB bytes libmtmd copies into a bitmap; a size-only image (pricing) gets one zeroed
    buffer, made here only because libmtmd plans from a bitmap (callers cap the size first)."""
    if has_pixels(image):
        return (ctypes.c_ubyte * len(image.rgb)).from_buffer_copy(image.rgb)
    return (ctypes.c_ubyte * (image.width * image.height * 3))()


def _native(chunk: ImageChunk) -> _OwnedChunk:
    if not isinstance(chunk.native, _OwnedChunk):
        raise RuntimeFailure("this image chunk was not made by libmtmd; it cannot be encoded by libmtmd")
    return chunk.native


def _explain_load_failure(path: Path, model: LlamaModel) -> Exception:
    """Turn libmtmd's bare failure into a message that says what is wrong."""
    from edgevlm.gguf_info import read_metadata

    try:
        meta = read_metadata(path)
    except InvalidModelError as exc:
        return exc
    if meta.get("general.architecture") != "clip":
        return InvalidModelError(f"{path} is not a vision projector (general.architecture="
                                 f"{meta.get('general.architecture')!r}); pass the mmproj-*.gguf file")
    proj_dim = meta.get("clip.vision.projection_dim")
    if proj_dim is not None and int(proj_dim) != model.n_embd_inp:
        return IncompatibleModelError(
            f"projector {path.name} outputs {proj_dim}-wide embeddings but the LLM "
            f"{model.path.name} takes {model.n_embd_inp}; use the projector converted with this LLM")
    proj_type = meta.get("clip.projector_type") or meta.get("clip.vision.projector_type")
    return UnsupportedModelError(
        f"libmtmd could not load projector {path.name} (projector type {proj_type!r}); "
        f"run with --verbose for llama.cpp's reason. Size: {os.path.getsize(path)} bytes")
