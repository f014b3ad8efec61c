"""The Llama-3.2-Vision (mllama) text decoder on ggml, as transformers' ``MllamaTextModel``.

Reads the LLM GGUF of ``convert/mllama.py`` (``general.architecture =
"mllama"``). Self-attention layers are Llama 3.1 layers: RMSNorm, GQA with
NEOX-style RoPE (HF's rotate-half layout is kept in the file) and llama3
frequency divisors (``edgevlm.rope.freq_factors``), SwiGLU MLP. Their keys and
values go to a KV cache that lives in backend buffers (one K and one V tensor
per layer, ``[head_dim, kv_heads, n_ctx]``), written by the same graph that
reads it.

Cross-attention layers attend to the images' states. Their keys and values
(``k_norm(k_proj(states))`` and ``v_proj(states)``) are computed once per
image set by :meth:`MllamaTextModel.set_images` and kept in backend buffers
for every later call. ``cross_attention_mask`` (per token: which tiles of
which image it may see) follows transformers exactly, quirks included:

* a token that may see no tile at all (text before the first ``<|image|>``)
  gets *no* mask in the attention (it attends to every image token, padding
  tiles included), while its cross-attention MLP output is zeroed;
* without images (a text-only conversation) the cross-attention layers are
  skipped entirely.

After the last token of a call, a token given no mask row reuses the last
row (what ``generate`` does).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from edgevlm import constants as C
from edgevlm.errors import ContextOverflowError, InvalidModelError, InvalidRequestError, KernelsUnavailableError
from edgevlm.gguf_info import GGUFHeader

from . import ggml
from .backend import Backend
from .graph import CompiledGraph, GraphBuilder, MappedTensor, RawTensor, Weights, mapped_file, upload_weights
from .mllama_vision import gate_values
from .vision import _positive, read_gguf_tensors

ARCH = C.LLM_ARCH_MLLAMA
#: The self-attention KV cache's element types: numpy float types, or ggml block types (q8_0: 34 bytes
#: per 32 values, q4_0: 18) read by ggml's flash attention (quantised V needs it).
KV_TYPES: dict[str, Any] = {"f32": np.float32, "f16": np.float16, "q8_0": ggml.GGML_TYPE_Q8_0,
                            "q4_0": ggml.GGML_TYPE_Q4_0}
#: The block types among :data:`KV_TYPES`; with them, the images' cross-attention K/V stay f16.
EMBD = "token_embd.weight"
ROPE_BETA_FAST, ROPE_BETA_SLOW = 32.0, 1.0  # ggml defaults; unused without YaRN (ext_factor 0)
#: Tokens per graph (llama.cpp's micro-batch): a longer forward runs in graphs of this many, so the
#: hidden rows and masks stay bounded (the attention scores are bounded by :data:`ATTN_CHUNK`).
UBATCH = 256
#: Query tokens per attention product inside a graph: the scores (heads x tokens x max(context, image
#: states), f32 + an f16 copy) of at most this many tokens exist at once: 75 MiB on the 11B at a 4096
#: context with one 4-tile image (300 MiB for all 256 tokens of a graph; measured on the bench model:
#: 71 + 25 MiB of buffers instead of 214 + 100).
ATTN_CHUNK = 64
#: Image states per graph when computing the cross-attention keys and values.
CROSS_KV_CHUNK = 2048


@dataclass(frozen=True)
class MllamaTextConfig:
    """What the decoder graph needs from an mllama LLM file."""

    n_embd: int
    n_layer: int
    n_head: int
    n_head_kv: int
    n_ff: int
    eps: float
    rope_base: float
    n_ctx_train: int
    n_vocab: int
    cross_layers: tuple[int, ...]
    image_token_id: int

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head


def read_text_config(meta: Mapping[str, Any], tensors: Mapping[str, RawTensor]) -> MllamaTextConfig:
    """Parse an mllama LLM file's metadata.

    Raises:
        InvalidModelError: not an mllama file, or missing / inconsistent keys.
    """
    if meta.get("general.architecture") != ARCH:
        raise InvalidModelError(f"general.architecture is {meta.get('general.architecture')!r}, not {ARCH!r}")
    p = f"{ARCH}."
    n_layer = _positive(meta, p + "block_count")
    cross = tuple(int(x) for x in meta.get(C.KEY_MLLAMA_CROSS_ATTENTION_LAYERS) or [])
    if not cross or any(not 0 <= i < n_layer for i in cross):
        raise InvalidModelError(f"{C.KEY_MLLAMA_CROSS_ATTENTION_LAYERS} {list(cross)} must name layers "
                                f"below {n_layer}")
    if "output.weight" not in tensors:
        raise InvalidModelError("the LLM file has no tensor 'output.weight'")
    cfg = MllamaTextConfig(
        n_embd=_positive(meta, p + "embedding_length"), n_layer=n_layer,
        n_head=_positive(meta, p + "attention.head_count"),
        n_head_kv=_positive(meta, p + "attention.head_count_kv"),
        n_ff=_positive(meta, p + "feed_forward_length"),
        eps=float(meta.get(p + "attention.layer_norm_rms_epsilon", 1e-5)),
        rope_base=float(meta.get(p + "rope.freq_base", 10000.0)),
        n_ctx_train=_positive(meta, p + "context_length"), n_vocab=int(tensors["output.weight"].ne[1]),
        cross_layers=cross, image_token_id=int(meta.get(C.KEY_MLLAMA_IMAGE_TOKEN_ID, -1)))
    if cfg.n_embd % cfg.n_head or cfg.n_head % cfg.n_head_kv:
        raise InvalidModelError(f"{cfg.n_head} heads / {cfg.n_head_kv} KV heads do not divide "
                                f"the width {cfg.n_embd}")
    return cfg


def image_spans(tokens: Sequence[int], image_token_id: int) -> list[tuple[int, int]]:
    """``[start, end)`` token range each image is seen from (transformers' processor rules).

    An image is seen from its ``<|image|>`` token up to the next image token (the
    last image: to the end); adjacent image tokens share the end of the last one.
    """
    locs = [i for i, t in enumerate(tokens) if t == image_token_id]
    ends = locs[1:] + [len(tokens)]
    for i in range(len(locs) - 2, -1, -1):
        if ends[i] == locs[i] + 1:     # the next image token follows at once
            ends[i] = ends[i + 1]
    return list(zip(locs, ends))


def cross_attention_mask(tokens: Sequence[int], image_token_id: int, n_tiles: Sequence[int],
                         max_tiles: int) -> np.ndarray:
    """``(len(tokens), n_images, max_tiles)`` 0/1 mask: which tiles each token may see.

    Raises:
        InvalidRequestError: the prompt has another number of image tokens than images.
    """
    spans = image_spans(tokens, image_token_id)
    if len(spans) != len(n_tiles):
        raise InvalidRequestError(f"the prompt has {len(spans)} image tokens for {len(n_tiles)} images")
    mask = np.zeros((len(tokens), len(n_tiles), max_tiles), dtype=np.float32)
    for i, ((start, end), tiles) in enumerate(zip(spans, n_tiles)):
        mask[start:end, i, :tiles] = 1
    return mask


class ImageKV:
    """The images' cross-attention keys and values in backend buffers, shared by reference count
    between the live conversation and parked :class:`TextState` copies (freed with the last)."""

    def __init__(self, weights: Weights) -> None:
        self.weights, self.refs = weights, 1

    def __getitem__(self, name: str) -> object:
        return self.weights[name]

    @property
    def nbytes(self) -> int:
        return self.weights.nbytes

    def share(self) -> ImageKV:
        self.refs += 1
        return self

    def release(self) -> None:
        self.refs -= 1
        if self.refs == 0:
            self.weights.close()


@dataclass
class TextState:
    """A copy of :class:`MllamaTextModel`'s conversation (:meth:`~MllamaTextModel.snapshot`).

    Attributes:
        n_past: cached positions.
        kv: per self-attention cache tensor, its first ``n_past`` positions (host copies).
        images: the images' cross-attention keys and values (shared with the model, not copied).
        image_tiles, tiles_per_image, tokens_per_tile, n_image_tokens: the images' geometry.
        last_row: the last cross-attention mask row seen.
    """

    n_past: int
    kv: dict[str, np.ndarray]
    images: ImageKV | None
    image_tiles: tuple[int, ...]
    tiles_per_image: int
    tokens_per_tile: int
    n_image_tokens: int
    last_row: np.ndarray | None

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.kv.values()) + (self.images.nbytes if self.images is not None else 0)

    def close(self) -> None:
        """Let go of the images' buffers (a state that is not attached again)."""
        if self.images is not None:
            self.images.release()
            self.images = None


class MllamaTextModel:
    """An mllama LLM GGUF on a ggml backend with a KV cache: tokens in, logits out.

    Args:
        path: The LLM GGUF.
        device: ggml device ("auto", "cpu", "cuda", "metal", or a name).
        n_threads: CPU threads.
        n_ctx: Tokens the KV cache holds.
        kv_type: elements of the KV cache (:data:`KV_TYPES`) and of the images' cross-attention
            keys and values (f16 halves both: 210 MB instead of 420 MB per 4-tile image for
            the 11B's 8 cross-attention layers; with q8_0 / q4_0 the self-attention cache is
            quantised, read by ggml's flash attention, and the images' K/V stay f16).
        n_ubatch: tokens per graph (:data:`UBATCH`).
        header: the file's header when already read (the model descriptor's); read otherwise.
        progress: called with the fraction of the weights uploaded; raising stops the load.

    Raises:
        InvalidModelError, KernelsUnavailableError, InvalidRequestError (bad kv_type / n_ctx).
    """

    def __init__(self, path: str | Path, *, device: str = "auto", n_threads: int = 4, n_ctx: int = 512,
                 kv_type: str = "f32", n_ubatch: int = UBATCH, header: GGUFHeader | None = None,
                 progress: Callable[[float], None] | None = None) -> None:
        check_kv_type(kv_type)
        if n_ctx < 1 or n_ubatch < 1:
            raise InvalidRequestError(f"n_ctx ({n_ctx}) and n_ubatch ({n_ubatch}) must be at least 1")
        self.path, self.n_ctx, self.kv_type, self.n_ubatch = Path(path), n_ctx, kv_type, n_ubatch
        self.flash = kv_type in C.QUANTISED_KV_TYPES
        self._decode_alloc: int | None = None  # one-token graphs' allocator, kept across tokens
        self.meta, tensors = read_gguf_tensors(self.path, header)
        self.config = cfg = read_text_config(self.meta, tensors)
        check_kv_type(kv_type, cfg.head_dim)
        self.gates = gate_values(tensors)
        device_tensors = {n: t for n, t in tensors.items() if n not in self.gates and n != EMBD}
        factors = self.meta.get(C.KEY_ROPE_FREQ_FACTORS)
        if factors is not None:
            device_tensors["rope_freqs"] = RawTensor.from_numpy(np.asarray(factors, np.float32))
        for name in self._cache_names():
            device_tensors[name] = _empty_cache(kv_type, (n_ctx, cfg.n_head_kv, cfg.head_dim))
        matmul = {n for n, t in device_tensors.items()
                  if len(t.ne) == 2 and n.endswith(".weight") and n != "token_embd.weight"}
        self.weights = upload_weights(device, n_threads, device_tensors, matmul=matmul, progress=progress)
        self.backend = self.weights.backend
        self._embd = self._place_embeddings(tensors[EMBD])
        self.images: ImageKV | None = None
        self.image_tiles: tuple[int, ...] = ()
        self.n_image_tokens = self.tiles_per_image = self.tokens_per_tile = 0
        self.n_past = 0
        self._last_row: np.ndarray | None = None

    def _place_embeddings(self, raw: RawTensor) -> MappedTensor | Weights:
        """The token embeddings read in place from the mapped file on the CPU (only the rows of the
        tokens seen become resident: 282 MiB of Q4_K table on the 11B), else uploaded."""
        if self.backend.is_cpu and raw.convert is None and mapped_file(raw.data):
            try:
                return MappedTensor(self.backend, EMBD, raw)
            except KernelsUnavailableError:
                pass  # an unaligned file: upload it
        try:
            return Weights(self.backend, {EMBD: raw})
        except Exception:
            self.close()
            raise

    @property
    def embeddings(self) -> object:
        """The ``token_embd`` tensor (mapped or uploaded)."""
        return self._embd.tensor if isinstance(self._embd, MappedTensor) else self._embd[EMBD]

    # ------------------------------------------------------------------ state
    def reset(self) -> None:
        """Forget the conversation: the KV cache position, the images and their states."""
        self.n_past = 0
        self._last_row = None
        self._drop_images()

    def rewind(self, n_past: int) -> None:
        """Keep the first ``n_past`` cached positions (the rest are overwritten by the next forward).

        The images' cross-attention keys and values stay; the next :meth:`forward` must pass its
        ``cross_mask`` (the last row seen belongs to the dropped tokens).

        Raises:
            InvalidRequestError: ``n_past`` outside ``[0, self.n_past]``.
        """
        if not 0 <= n_past <= self.n_past:
            raise InvalidRequestError(f"cannot rewind to {n_past} of {self.n_past} cached positions")
        self.n_past = n_past
        self._last_row = None

    @property
    def cross_dtype(self) -> type:
        """numpy type of the images' cross-attention K/V (f16 beside a quantised cache)."""
        return np.float16 if self.flash else KV_TYPES[self.kv_type]

    def _cache_names(self) -> list[str]:
        return [f"cache.{kind}.{il}" for il in range(self.config.n_layer) if il not in self.config.cross_layers
                for kind in "kv"]

    def snapshot(self) -> TextState:
        """A copy of the conversation: the KV prefix copied to the host, the images' K/V shared."""
        g = self.backend.g
        kv = {}
        shape, dtype = self._host_shape(self.n_past), (np.uint8 if self.flash else KV_TYPES[self.kv_type])
        for name in self._cache_names():
            host = np.empty(shape, dtype)
            if host.nbytes:
                g.ggml_backend_tensor_get(self.weights[name], host.ctypes.data, 0, host.nbytes)
            kv[name] = host
        images = self.images.share() if self.images is not None else None
        return TextState(self.n_past, kv, images, self.image_tiles, self.tiles_per_image,
                         self.tokens_per_tile, self.n_image_tokens, self._last_row)

    def _host_shape(self, n_pos: int) -> tuple[int, ...]:
        """A host copy of ``n_pos`` cache positions: ``(n, kv_heads, hd)`` values, or ``(n, bytes)`` of blocks."""
        if self.flash:
            return (n_pos, int(self.weights[self._cache_names()[0]].contents.nb[2]))
        return (n_pos, self.config.n_head_kv, self.config.head_dim)

    def attach(self, state: TextState) -> None:
        """Make ``state`` the live conversation (the current one is dropped); ``state`` is consumed."""
        self.reset()
        g = self.backend.g
        for name, host in state.kv.items():
            if host.nbytes:
                g.ggml_backend_tensor_set(self.weights[name], host.ctypes.data, 0, host.nbytes)
        self.images, state.images = state.images, None
        self.image_tiles, self.tiles_per_image = state.image_tiles, state.tiles_per_image
        self.tokens_per_tile, self.n_image_tokens = state.tokens_per_tile, state.n_image_tokens
        self.n_past, self._last_row = state.n_past, state.last_row

    def _drop_images(self) -> None:
        if self.images is not None:
            self.images.release()
        self.images, self.image_tiles, self.n_image_tokens = None, (), 0

    def set_images(self, states: Sequence[np.ndarray], n_tiles: Sequence[int]) -> None:
        """Compute and keep the cross-attention keys and values of the conversation's images.

        Args:
            states: Per image, the projected vision states ``(max_tiles, tokens per tile, n_embd)``
                (:meth:`MllamaVisionEncoder.encode`), in prompt order.
            n_tiles: Per image, its real tiles.

        Raises:
            InvalidRequestError: shapes disagree with the model or each other.
        """
        if not states or len(states) != len(n_tiles):
            raise InvalidRequestError(f"{len(states)} image states for {len(n_tiles)} tile counts")
        shapes = {tuple(s.shape) for s in states}
        if len(shapes) != 1 or len(next(iter(shapes))) != 3 or next(iter(shapes))[2] != self.config.n_embd:
            raise InvalidRequestError(f"image states of shapes {sorted(shapes)}; expected one shape "
                                      f"(tiles, tokens, {self.config.n_embd})")
        rows = [np.asarray(s, np.float32).reshape(-1, self.config.n_embd) for s in states]
        flat = rows[0] if len(rows) == 1 else np.concatenate(rows)  # one image: its states, not a copy
        self._drop_images()
        self.images = ImageKV(self._run_cross_kv(flat))
        self.image_tiles, self.n_image_tokens = tuple(int(t) for t in n_tiles), len(flat)
        self.tiles_per_image, self.tokens_per_tile = states[0].shape[0], states[0].shape[1]

    def _run_cross_kv(self, flat: np.ndarray) -> Weights:
        """Each cross layer's K (normed) and V in backend buffers allocated first, computed layer by
        layer in graphs of :data:`CROSS_KV_CHUNK` states and uploaded as they come (the host holds one
        layer's V at most); V is kept transposed ``[n, hd, kv_heads]``."""
        cfg, n, dtype = self.config, len(flat), self.cross_dtype
        hd, kvh = cfg.head_dim, cfg.n_head_kv
        specs = {}
        for il in cfg.cross_layers:
            specs[f"k.{il}"] = RawTensor.empty((n, kvh, hd), dtype)   # ne [hd, kvh, n]
            specs[f"v.{il}"] = RawTensor.empty((kvh, hd, n), dtype)   # ne [n, hd, kvh]
        kv = Weights(self.backend, specs, upload=False)
        try:
            for il in cfg.cross_layers:
                v_t = np.empty((kvh, hd, n), dtype)
                for start in range(0, n, CROSS_KV_CHUNK):
                    part = flat[start:start + CROSS_KV_CHUNK]
                    data = self._cross_kv_graph(il, part)
                    kv.set(f"k.{il}", data[:, 0].astype(dtype), start * kvh * hd * v_t.itemsize)
                    v_t[:, :, start:start + len(part)] = data[:, 1].transpose(1, 2, 0)
                kv.set(f"v.{il}", v_t)
                del v_t
        except Exception:
            kv.close()
            raise
        return kv

    def _cross_kv_graph(self, il: int, states: np.ndarray) -> np.ndarray:
        """``(n, 2, kv_heads, hd)`` f32: layer ``il``'s normed K and its V of ``states``."""
        cfg, w, n, p = self.config, self.weights, len(states), f"blk.{il}.cross_attn_"
        hd, kvh = cfg.head_dim, cfg.n_head_kv
        b = GraphBuilder()
        x = b.input("states", (cfg.n_embd, n))
        k = b.rms_norm(b.reshape_3d(b.linear(x, w[p + "k_proj.weight"]), hd, kvh, n), w[p + "k_norm.weight"], cfg.eps)
        graph = CompiledGraph(self.backend, b, b.concat(b.reshape_2d(k, hd * kvh, n),
                                                        b.linear(x, w[p + "v_proj.weight"]), 0))
        try:
            return graph.run({"states": states}).reshape(n, 2, kvh, hd)
        finally:
            graph.close()

    # ------------------------------------------------------------------ forward
    def forward(self, tokens: Sequence[int], cross_mask: np.ndarray | None = None, *,
                all_logits: bool = False, cancelled: Callable[[], bool] | None = None) -> np.ndarray:
        """Run ``tokens`` after the conversation so far; return their logits.

        Args:
            tokens: Token ids.
            cross_mask: ``(len(tokens), n_images, max_tiles)`` 0/1 (see :func:`cross_attention_mask`);
                ``None`` repeats the last row seen (or no row: every token is masked out).
            all_logits: Logits of every token (else of the last only).
            cancelled: asked while each micro-batch's graph runs (on the CPU); True stops it.

        Returns:
            float32 ``(len(tokens) or 1, n_vocab)``.

        Raises:
            InvalidRequestError: empty input, a bad token or mask.
            ContextOverflowError: the KV cache is full.
            ComputeCancelled: ``cancelled`` stopped a micro-batch (``n_past`` counts the
                micro-batches before it; :meth:`rewind` to drop those too).
        """
        n = len(tokens)
        ids = np.asarray(tokens, dtype=np.int32)
        if not n or ids.min() < 0 or ids.max() >= self.embeddings.contents.ne[1]:
            raise InvalidRequestError(f"tokens must be a non-empty list of ids in the vocabulary, got {list(tokens)[:8]}")
        if self.n_past + n > self.n_ctx:
            raise ContextOverflowError(f"{self.n_past} + {n} tokens exceed the KV cache of {self.n_ctx}")
        if self.images is not None and cross_mask is not None:
            self._check_mask(n, cross_mask)
        out = []
        # several tokens: on a scratch backend, so that the prefill's work buffer is not kept
        backend = self.backend.scratch() if n > 1 else self.backend
        try:
            for start in range(0, n, self.n_ubatch):  # graphs of at most n_ubatch tokens
                end = min(n, start + self.n_ubatch)
                mask = cross_mask[start:end] if cross_mask is not None else None
                out.append(self._forward_batch(backend, ids[start:end], mask, "all" if all_logits else
                                               "last" if end == n else "none", cancelled))
        finally:
            self.backend.close_scratch(backend)
        return out[0] if len(out) == 1 else np.concatenate(out) if all_logits else out[-1]

    def _forward_batch(self, backend: Backend, ids: np.ndarray, cross_mask: np.ndarray | None,
                       logits: str, cancelled: Callable[[], bool] | None = None) -> np.ndarray:
        """One graph over ``ids`` on ``backend`` with the ``logits`` of "all" tokens, the "last" one or
        "none" (an earlier micro-batch: its last hidden row is returned); one-token graphs share an
        allocator kept across tokens."""
        n = len(ids)
        mask = _causal_mask(self.n_past, n)
        inputs = {"tokens": ids, "pos": np.arange(self.n_past, self.n_past + n, dtype=np.int32),
                  "kq_mask": mask.astype(np.float16) if self.flash else mask}
        if self.images is not None:
            inputs.update(self._cross_inputs(n, cross_mask))
        if n == 1 and self._decode_alloc is None:
            self._decode_alloc = self.backend.g.ggml_gallocr_new(self.backend.buffer_type)
        b = GraphBuilder()
        try:
            out, writes = self._build(b, n, logits)
            graph = CompiledGraph(backend, b, out, before=writes,
                                  allocator=self._decode_alloc if n == 1 else None)
        except Exception:
            b.close()
            raise
        try:
            result = graph.run(inputs, cancelled)
        finally:
            graph.close()
        self.n_past += n
        return result.reshape(-1, self.config.n_vocab) if logits != "none" else result

    def _check_mask(self, n: int, cross_mask: np.ndarray) -> None:
        want = (n, len(self.image_tiles), self.tiles_per_image)
        if cross_mask.shape != want:
            raise InvalidRequestError(f"cross_mask of shape {cross_mask.shape}; expected {want}")

    def _cross_inputs(self, n: int, cross_mask: np.ndarray | None) -> dict[str, np.ndarray]:
        want = (len(self.image_tiles), self.tiles_per_image)
        if cross_mask is None:
            row = self._last_row if self._last_row is not None else np.zeros(want, np.float32)
            cross_mask = np.broadcast_to(row, (n, *want))
        if cross_mask.shape != (n, *want):
            raise InvalidRequestError(f"cross_mask of shape {cross_mask.shape}; expected {(n, *want)}")
        self._last_row = np.array(cross_mask[-1], dtype=np.float32)
        seen = np.repeat(cross_mask.reshape(n, -1) > 0, self.tokens_per_tile, axis=1)  # (n, image tokens)
        keep = seen.any(axis=1)
        additive = np.where(seen | ~keep[:, None], 0.0, -np.inf).astype(np.float32)
        return {"cross_mask": additive, "cross_keep": keep.astype(np.float32).reshape(n, 1)}

    def _build(self, b: GraphBuilder, n: int, logits: str) -> tuple[object, list[object]]:
        cfg, w = self.config, self.weights
        x = b.get_rows(self.embeddings, b.input("tokens", (n,), ggml.GGML_TYPE_I32))
        pos = b.input("pos", (n,), ggml.GGML_TYPE_I32)
        kq_mask = b.input("kq_mask", (self.n_past + n, n), ggml.GGML_TYPE_F16 if self.flash else ggml.GGML_TYPE_F32)
        if self.images is not None:
            b.input("cross_mask", (self.n_image_tokens, n))
            b.input("cross_keep", (1, n))
        writes: list[object] = []
        for il in range(cfg.n_layer):
            if il in cfg.cross_layers:
                if self.images is not None:
                    x = self._cross_layer(b, il, x, n)
                continue
            x = self._self_layer(b, il, x, pos, kq_mask, n, writes)
        x = b.rms_norm(x, w["output_norm.weight"], cfg.eps)
        if logits != "all" and n > 1:
            x = b.rows(x, n - 1, 1)
        return (b.linear(x, w["output.weight"]) if logits != "none" else x), writes

    def _attend(self, b: GraphBuilder, q: object, k: object, v_t: object, mask: object, n: int) -> object:
        """softmax(q k^T / sqrt(hd) + mask) v over heads (GQA by broadcasting): ``[n_embd, n]``, in
        products of :data:`ATTN_CHUNK` query tokens run one after another (their scores are freed
        before the next chunk's)."""
        g, hd = b.g, self.config.head_dim
        parts = []
        for start in range(0, n, ATTN_CHUNK):
            m = min(ATTN_CHUNK, n - start)
            qt, mt = q.contents, mask.contents
            q_part = q if m == n else g.ggml_view_3d(b.ctx, q, hd, m, qt.ne[2], qt.nb[1], qt.nb[2], start * qt.nb[1])
            mask_part = mask if m == n else g.ggml_view_2d(b.ctx, mask, mt.ne[0], m, mt.nb[1], start * mt.nb[1])
            probs = b.softmax(g.ggml_mul_mat(b.ctx, k, q_part), 1.0 / math.sqrt(hd), mask_part)  # [n_kv, m, H]
            ctx = g.ggml_mul_mat(b.ctx, v_t, probs)                                                # [hd, m, H]
            part = g.ggml_cont(b.ctx, g.ggml_permute(b.ctx, ctx, 0, 2, 1, 3))                      # [hd, H, m]
            parts.append(part if not parts else b.concat(parts.pop(), part, 2))
        return b.reshape_2d(parts[0], self.config.n_embd, n)

    def _rope(self, b: GraphBuilder, x: object, pos: object) -> object:
        cfg = self.config
        return b.g.ggml_rope_ext(b.ctx, x, pos, self.weights.get("rope_freqs"), cfg.head_dim,
                                 ggml.GGML_ROPE_TYPE_NEOX, cfg.n_ctx_train, cfg.rope_base, 1.0, 0.0, 1.0,
                                 ROPE_BETA_FAST, ROPE_BETA_SLOW)

    def _self_layer(self, b: GraphBuilder, il: int, x: object, pos: object, kq_mask: object, n: int,
                    writes: list[object]) -> object:
        cfg, w, g, p = self.config, self.weights, b.g, f"blk.{il}."
        hd, kvh, n_kv = cfg.head_dim, cfg.n_head_kv, self.n_past + n
        h = b.rms_norm(x, w[p + "attn_norm.weight"], cfg.eps)
        q = self._rope(b, b.reshape_3d(b.linear(h, w[p + "attn_q.weight"]), hd, cfg.n_head, n), pos)
        k = self._rope(b, b.reshape_3d(b.linear(h, w[p + "attn_k.weight"]), hd, kvh, n), pos)
        v = b.reshape_3d(b.linear(h, w[p + "attn_v.weight"]), hd, kvh, n)
        views = []
        for new, cache in ((k, w[f"cache.k.{il}"]), (v, w[f"cache.v.{il}"])):
            nb = cache.contents.nb
            writes.append(g.ggml_cpy(b.ctx, new, g.ggml_view_3d(b.ctx, cache, hd, kvh, n, nb[1], nb[2],
                                                                 self.n_past * nb[2])))
            views.append(g.ggml_view_3d(b.ctx, cache, hd, kvh, n_kv, nb[1], nb[2], 0))
        keys = g.ggml_permute(b.ctx, views[0], 0, 2, 1, 3)                           # [hd, n_kv, kvh]
        q = g.ggml_permute(b.ctx, q, 0, 2, 1, 3)                                     # [hd, n, H]
        if self.flash:  # the quantised cache read in place: ggml's fused kernel, f32 accumulation
            fused = g.ggml_flash_attn_ext(b.ctx, q, keys, g.ggml_permute(b.ctx, views[1], 0, 2, 1, 3), kq_mask,
                                          1.0 / math.sqrt(hd), 0.0, 0.0)
            g.ggml_prec_set_acc(fused, ggml.GGML_PREC_F32)                           # [hd, H, n]
            attn = b.reshape_2d(fused, cfg.n_embd, n)
        else:
            values_t = g.ggml_cont(b.ctx, g.ggml_permute(b.ctx, views[1], 1, 2, 0, 3))  # [n_kv, hd, kvh]
            attn = self._attend(b, q, keys, values_t, kq_mask, n)
        x = b.add(x, b.linear(attn, w[p + "attn_output.weight"]))
        return b.add(x, self._mlp(b, p, b.rms_norm(x, w[p + "ffn_norm.weight"], cfg.eps)))

    def _mlp(self, b: GraphBuilder, p: str, h: object) -> object:
        w = self.weights
        gate = b.g.ggml_silu(b.ctx, b.linear(h, w[p + "ffn_gate.weight"]))
        return b.linear(b.mul(gate, b.linear(h, w[p + "ffn_up.weight"])), w[p + "ffn_down.weight"])

    def _cross_layer(self, b: GraphBuilder, il: int, x: object, n: int) -> object:
        cfg, w, g, p = self.config, self.weights, b.g, f"blk.{il}."
        assert self.images is not None
        h = b.rms_norm(x, w[p + "attn_norm.weight"], cfg.eps)
        q = b.reshape_3d(b.linear(h, w[p + "cross_attn_q_proj.weight"]), cfg.head_dim, cfg.n_head, n)
        q = b.rms_norm(q, w[p + "cross_attn_q_norm.weight"], cfg.eps)
        keys = g.ggml_permute(b.ctx, self.images[f"k.{il}"], 0, 2, 1, 3)          # [hd, n_img, kvh]
        attn = self._attend(b, g.ggml_permute(b.ctx, q, 0, 2, 1, 3), keys, self.images[f"v.{il}"],
                            b.inputs["cross_mask"], n)
        x = b.add(x, b.scale(b.linear(attn, w[p + "cross_attn_o_proj.weight"]), self.gates[p + "cross_attn_attn_gate"]))
        mlp = self._mlp(b, p, b.rms_norm(x, w[p + "ffn_norm.weight"], cfg.eps))
        return b.add(x, b.scale(b.mul(mlp, b.inputs["cross_keep"]), self.gates[p + "cross_attn_mlp_gate"]))

    def close(self) -> None:
        self._drop_images()
        if getattr(self, "_decode_alloc", None) is not None:
            self.backend.g.ggml_gallocr_free(self._decode_alloc)
            self._decode_alloc = None
        if getattr(self, "_embd", None) is not None:
            self._embd.close()
            self._embd = None
        if getattr(self, "weights", None) is not None:
            self.weights.close()
            self.weights = None
        if getattr(self, "backend", None) is not None:
            self.backend.close()
            self.backend = None


def check_kv_type(kv_type: str, head_dim: int | None = None) -> None:
    """Refuse a KV cache type the decoder does not keep, or (given ``head_dim``) a quantised one whose
    rows of one head are not whole quantisation blocks.

    Raises:
        InvalidRequestError: either, with what to pass instead.
    """
    if kv_type not in KV_TYPES:
        raise InvalidRequestError(f"kv_type={kv_type!r}: the mllama decoder keeps its KV cache in one of "
                                  f"{', '.join(KV_TYPES)}; pass one of these")
    if head_dim is not None and kv_type in C.QUANTISED_KV_TYPES:
        block = GGML_QUANT_SIZES[GGMLQuantizationType(KV_TYPES[kv_type])][0]
        if head_dim % block:
            raise InvalidRequestError(f"kv_type={kv_type!r} quantises rows of one head ({head_dim} values), "
                                      f"which must be whole blocks of {block}; use kv_type='f16'")


def _empty_cache(kv_type: str, shape: tuple[int, int, int]) -> RawTensor:
    """A zeroed cache tensor of numpy ``shape`` (positions, kv heads, head dim) in ``kv_type``."""
    if kv_type not in C.QUANTISED_KV_TYPES:
        return RawTensor.from_numpy(np.zeros(shape, KV_TYPES[kv_type]))
    block, size = GGML_QUANT_SIZES[GGMLQuantizationType(KV_TYPES[kv_type])]
    return RawTensor(KV_TYPES[kv_type], tuple(reversed(shape)), np.zeros(math.prod(shape) // block * size, np.uint8))


def _causal_mask(n_past: int, n: int) -> np.ndarray:
    """``(n, n_past + n)``: token ``i`` sees positions up to ``n_past + i``."""
    cols = np.arange(n_past + n)[None, :]
    rows = n_past + np.arange(n)[:, None]
    return np.where(cols <= rows, 0.0, -np.inf).astype(np.float32)
