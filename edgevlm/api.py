"""The Python API: :func:`load` and :class:`VLM`."""

from __future__ import annotations

import dataclasses
import os
import time
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from edgevlm.chunks import Chunk, ImageChunk
from edgevlm.constants import KEY_PROMPT_FAMILY
from edgevlm.engine import Engine, PrefillStats, Reply, SamplingOptions
from edgevlm.errors import InvalidRequestError, UnsupportedModelError
from edgevlm.layouts import layout_for
from edgevlm.vision.kernels_encoder import VISION_ENGINES
from edgevlm.llm import ContextOptions, LlamaContext, LlamaModel
from edgevlm.prompt import normalize_messages
from edgevlm.resolve import ModelFiles, check_llm, check_pair, resolve
from edgevlm.vision.images import load_image

Messages = Sequence[dict[str, Any]]

#: Batch size for projectors whose image tokens attend to each other (non-causal).
NON_CAUSAL_MIN_BATCH = 2048


def load(model: str | os.PathLike[str], *, mmproj: str | os.PathLike[str] | None = None,
         n_ctx: int = 4096, n_batch: int = 512, n_threads: int | None = None,
         n_gpu_layers: int = -1, kv_type: str = "f16", seed: int = 0,
         chat_template: str | None = None, family: str | None = None,
         quant: str | None = None, revision: str | None = None, cache: bool = True,
         vision_engine: str = "auto", vision_device: str | None = None) -> "VLM":
    """Load a vision-language model.

    Args:
        model: a folder with one LLM GGUF and one projector GGUF, an LLM
            ``.gguf`` (projector via ``mmproj`` or found beside it), or a
            Hugging Face repo id (downloaded into the hub cache).
        mmproj: the vision projector GGUF (optional with a folder / repo).
        n_ctx: context window in tokens.
        n_batch: prompt batch size (raised automatically for large images).
        n_threads: CPU threads (default: physical cores).
        n_gpu_layers: LLM layers on the GPU (-1 all, 0 none); CPU-only builds ignore it.
        kv_type: KV cache type: "f16", "f32", "q8_0", "q4_0", "bf16".
        seed: default sampling seed.
        chat_template: a Jinja chat template overriding the GGUF's.
        family: built-in prompt family when there is no usable template
            ("llava-1.5", "chatml").
        quant: pick among several LLM files in a folder / repo.
        revision: hub revision.
        cache: keep image embeddings and KV snapshots of image prefixes in the
            on-disk cache (``EDGEVLM_CACHE_DIR`` or the platform cache home), so
            that another process asking about the same image neither runs the
            vision encoder nor re-reads the prompt up to the image.
        vision_engine: who runs the vision tower: "kernels" (edgevlm's own
            ggml graphs: CLIP towers computed as the reference does, OmniFusion
            adapters), "mtmd" (llama.cpp's libmtmd: every projector type it
            knows) or "auto" (kernels for CLIP-tower LLaVA and OmniFusion
            projectors, libmtmd otherwise).
        vision_device: ggml device for the kernels engine ("auto", "cpu",
            "cuda", "metal", or a device name); default "cpu" when
            ``n_gpu_layers == 0``, else "auto".

    Returns:
        A ready :class:`VLM`.

    Raises:
        ModelNotFoundError, InvalidModelError, IncompatibleModelError,
        UnsupportedModelError, HubError: see the message for what to do.
    """
    t0 = time.perf_counter()
    if vision_engine not in VISION_ENGINES:
        raise InvalidRequestError(f"unknown vision engine {vision_engine!r}; choose one of {', '.join(VISION_ENGINES)}")
    files = resolve(model, mmproj, quant=quant, revision=revision)
    options = ContextOptions(n_ctx=n_ctx, n_batch=n_batch, n_threads=n_threads,
                             n_gpu_layers=n_gpu_layers, kv_type=kv_type, seed=seed)
    check_llm(files.llm)
    llm = LlamaModel(files.llm, n_gpu_layers=n_gpu_layers)
    check_pair(files, llm.n_embd_inp)
    encoder = None
    if files.mmproj is not None:
        device = vision_device or ("cpu" if n_gpu_layers == 0 else "auto")
        encoder = _make_encoder(files.mmproj, llm, vision_engine, device, options.threads()[1])
    if encoder is not None and encoder.non_causal and options.n_batch < NON_CAUSAL_MIN_BATCH:
        # Images attended bidirectionally (Gemma 3, ...) must fit in one batch.
        options = dataclasses.replace(options, n_batch=NON_CAUSAL_MIN_BATCH)
    ctx = LlamaContext(llm, options)
    template = chat_template if chat_template is not None else llm.chat_template()
    family = family or llm.meta(KEY_PROMPT_FAMILY) or _guess_family(files)
    store = snapshots = None
    if cache:
        from edgevlm.cache import EmbeddingStore
        from edgevlm.snapshots import SnapshotStore

        store = EmbeddingStore() if encoder is not None else None
        snapshots = SnapshotStore(_snapshot_identity(files, ctx, encoder))
    engine = Engine(llm, ctx, encoder, template=template, family=family, store=store,
                    snapshots=snapshots, layout=layout_for(llm, encoder) if encoder else None)
    return VLM(engine, files, load_ms=(time.perf_counter() - t0) * 1e3)


def _make_encoder(mmproj: Path, llm: LlamaModel, engine: str, device: str, n_threads: int) -> Any:
    """The vision encoder ``engine`` (resolved by :func:`choose_engine`) for ``mmproj``."""
    from edgevlm.gguf_info import read_header
    from edgevlm.vision.kernels_encoder import KernelsEncoder, choose_engine

    header = read_header(mmproj)
    chosen = choose_engine(engine, header.metadata, frozenset(t.name for t in header.tensors))
    if chosen == "kernels":
        return KernelsEncoder(mmproj, llm, n_threads=n_threads, device=device)
    from edgevlm.vision.mtmd import MtmdEncoder

    return MtmdEncoder(mmproj, llm, n_threads=n_threads, use_gpu=device != "cpu")


def _snapshot_identity(files: ModelFiles, ctx: LlamaContext, encoder: Any) -> Any:
    import llama_cpp

    from edgevlm import native
    from edgevlm.cache import file_identity
    from edgevlm.snapshots import SnapshotIdentity

    return SnapshotIdentity(model=file_identity(files.llm),
                            projector=encoder.identity if encoder is not None else "none",
                            build=f"{llama_cpp.__version__} {native.system_info()}",
                            n_ctx=ctx.n_ctx, kv_type=ctx.options.kv_type,
                            flash_attn=ctx.flash_attn_type)


def _guess_family(files: ModelFiles) -> str:
    if files.mmproj is not None:
        from edgevlm.gguf_info import read_metadata

        if read_metadata(files.mmproj).get("clip.projector_type") in ("mlp", "mlp_norm", "ldp", "ldpv2"):
            return "llava-1.5"
    return "chatml"


class VLM:
    """A loaded vision-language model. Thread-safe: calls are serialised.

    Every call takes the whole conversation (OpenAI style); the engine keeps
    the KV cache of the longest common prefix, so a follow-up only evaluates
    the new turn and never re-encodes an image already in the context. Other
    conversations' states are parked in RAM (``engine.parked``, 1 GiB LRU), so
    alternating between conversations evaluates only each one's new turn.
    """

    def __init__(self, engine: Engine, files: ModelFiles, *, load_ms: float = 0.0) -> None:
        self.engine = engine
        self.files = files
        self.load_ms = load_ms

    # ----------------------------------------------------------------- info
    @property
    def model_path(self) -> Path:
        return self.files.llm

    @property
    def mmproj_path(self) -> Path | None:
        return self.files.mmproj

    @property
    def n_ctx(self) -> int:
        return self.engine.ctx.n_ctx

    @property
    def n_vocab(self) -> int:
        return self.engine.model.n_vocab

    @property
    def vision_engine(self) -> str | None:
        """"kernels" or "mtmd" (None without a projector)."""
        return self.engine.encoder.name if self.engine.encoder else None

    @property
    def encoder_calls(self) -> int:
        """How many times the vision encoder ran (cache hits do not count)."""
        return self.engine.encoder.n_encode_calls if self.engine.encoder else 0

    def close(self) -> None:
        """Free the context and weights (also done on garbage collection)."""
        with self.engine.lock:
            if self.engine.encoder is not None:
                self.engine.encoder.close()
            self.engine.ctx.close()
            self.engine.model.close()

    def __enter__(self) -> "VLM":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ----------------------------------------------------------------- chat
    def chat(self, messages: Messages, *, max_tokens: int = 512, temperature: float = 0.2,
             top_p: float = 0.95, top_k: int = 40, min_p: float = 0.05,
             repeat_penalty: float = 1.0, seed: int | None = None,
             stop: str | Sequence[str] | None = None) -> Reply:
        """Answer the conversation ``messages``.

        Args:
            messages: OpenAI / transformers style messages; image parts are
                ``{"type": "image", "image": path | bytes | PIL.Image}`` or
                ``{"type": "image_url", "image_url": {"url": "data:..."}}``.
            max_tokens, temperature, top_p, top_k, min_p, repeat_penalty, seed,
            stop: sampling options as in the OpenAI API (temperature 0 = greedy).

        Returns:
            A :class:`Reply` (``str(reply)`` is the text; it also carries
            ``finish_reason``, token counts and timings).

        Raises:
            InvalidRequestError, ImageError, ContextOverflowError.
        """
        stats: dict[str, Any] = {}
        pieces = list(self._generate(messages, stats, max_tokens=max_tokens, temperature=temperature,
                                     top_p=top_p, top_k=top_k, min_p=min_p,
                                     repeat_penalty=repeat_penalty, seed=seed, stop=stop))
        return Reply(text="".join(pieces).rstrip(), finish_reason=stats.get("finish_reason", "stop"),
                     prompt_tokens=stats.get("prompt_tokens", 0),
                     completion_tokens=stats.get("completion_tokens", 0),
                     prefill=stats.get("prefill", PrefillStats()),
                     timings={k: stats[k] for k in ("ttft_ms", "total_ms") if k in stats})

    def stream(self, messages: Messages, *, max_tokens: int = 512, temperature: float = 0.2,
               top_p: float = 0.95, top_k: int = 40, min_p: float = 0.05,
               repeat_penalty: float = 1.0, seed: int | None = None,
               stop: str | Sequence[str] | None = None,
               stats: dict[str, Any] | None = None) -> Iterator[str]:
        """Like :meth:`chat`, yielding the reply piece by piece.

        ``stats``, if given, is filled with timings and token counts at the end.
        """
        return self._generate(messages, stats, max_tokens=max_tokens, temperature=temperature,
                              top_p=top_p, top_k=top_k, min_p=min_p,
                              repeat_penalty=repeat_penalty, seed=seed, stop=stop)

    def _generate(self, messages: Messages, stats: dict[str, Any] | None, *,
                  stop: str | Sequence[str] | None, **sampling: Any) -> Iterator[str]:
        stops = (stop,) if isinstance(stop, str) else tuple(stop or ())
        options = SamplingOptions(stop=stops, **sampling)
        chunks, prefix = self._prompt(messages)
        return self.engine.generate(chunks, options, stats, text_prefix=prefix)

    def _prompt(self, messages: Messages, gen: bool = True) -> tuple[list[Chunk], tuple[int, ...]]:
        """The chunks and the text-prefix hint for snapshots (see Engine.text_prefix)."""
        msgs = normalize_messages(messages)
        return self.engine.chunks(msgs, gen=gen), self.engine.text_prefix(msgs)

    # ----------------------------------------------------------------- analysis
    def prompt_chunks(self, messages: Messages, *, add_generation_prompt: bool = True) -> list[Chunk]:
        """The chunks (text tokens, image chunks) the model sees for ``messages``."""
        return self.engine.chunks(normalize_messages(messages), gen=add_generation_prompt)

    def prompt_text(self, messages: Messages, *, add_generation_prompt: bool = True) -> str:
        """The rendered prompt, images shown as the media marker."""
        return self.engine.prompt_text(normalize_messages(messages), gen=add_generation_prompt)[0]

    def next_token_logits(self, messages: Messages, *, add_generation_prompt: bool = True) -> np.ndarray:
        """Logits (n_vocab,) of the token after the prompt (generation prompt added)."""
        chunks, prefix = self._prompt(messages, add_generation_prompt)
        with self.engine.lock:
            self.engine.prefill(chunks, text_prefix=prefix)
            return self.engine.logits()

    def embed_image(self, image: Any) -> np.ndarray:
        """The projected image embeddings the LLM receives: (n_image_tokens, n_embd).

        Tiled images (several chunks) are concatenated in order.
        """
        encoder = self.engine.encoder
        if encoder is None:
            raise UnsupportedModelError("this model has no vision projector")
        loaded = load_image(image)
        chunks = encoder.tokenize(encoder.marker, [loaded], add_special=False)
        with self.engine.lock:  # the embedding caches are shared with running requests
            parts = [self.engine.image_embeddings(c) for c in chunks if isinstance(c, ImageChunk)]
        if not parts:
            raise InvalidRequestError("the projector produced no image chunk for this image")
        return np.concatenate(parts, axis=0)

    def reset(self) -> None:
        """Forget the cached conversations (the next call evaluates from scratch)."""
        self.engine.reset()
