"""The engine: one model, its context and vision encoder, split by job.

* prompts: the family's :class:`~edgevlm.prompt_layout.PromptLayout` turns
  messages into chunks (and a text-prefix hint for snapshots), once per request;
* prefill: :class:`~edgevlm.prefill.KVPrefix` reuses the live, parked or
  snapshotted KV prefix and evaluates the rest, fetching image embeddings
  from :class:`~edgevlm.embeddings.ImageEmbeddings`;
* generation: :func:`~edgevlm.generation.sample_reply` samples, matches stop
  strings and streams;
* statistics: typed dataclasses (:mod:`edgevlm.stats`) returned, never filled in.

Every call is serialised by one lock (the context has one sequence).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgevlm import native
from edgevlm.cache import EmbeddingStore
from edgevlm.chunks import Chunk, ImageChunk, TextChunk, answer_reserve, kv_cells
from edgevlm.embeddings import ImageEmbeddings
from edgevlm.engine_protocol import RuntimeSettings
from edgevlm.errors import ContextOverflowError, InvalidRequestError, UnsupportedModelError
from edgevlm.families.base import Family, ImageCost
from edgevlm.generation import CancelToken, SamplingOptions, StreamHooks, TextStream, sample_reply
from edgevlm.image_plans import ImagePlans
from edgevlm.llm import LlamaContext, LlamaModel
from edgevlm.prefill import KVPrefix
from edgevlm.prompt import ImagePart, Message, settled_rendering
from edgevlm.prompt_layout import ImageBudget, PromptLayout, check_image_tokens, enforce_image_budget
from edgevlm.scoring import (ChoiceGeneration, ChoiceScores, answer_lead, check_choices, choice_tokens,
                             generate_answer, generation_answers, score_sequences)
from edgevlm.snapshots import SnapshotStore
from edgevlm.stats import PrefillStats
from edgevlm.vision.encoder import VisionEncoder
from edgevlm.vision.images import LoadedImage, intake_size, preload_decoders



@dataclass(frozen=True)
class Prompt:
    """A request's chunks and its text-prefix hint (tokens worth a snapshot), built once."""

    chunks: list[Chunk]
    text_prefix: tuple[int, ...] = ()
    prepared: bool = False  # the part of a request known before its question (see Engine.prepare)


class Engine:
    """One model + context + optional vision encoder, with prefix reuse.

    Args:
        llm: the language model.
        ctx: its context.
        family: the model's family (layouts, image costs).
        encoder: the vision encoder, or None for a text-only model.
        layout: how messages become chunks.
        embedding_store: the disk tier of image embeddings, or None.
        snapshots: the persistent KV snapshot store, or None.
        max_image_tokens: the default image-token budget per image (None: the model's own).
    """

    def __init__(self, llm: LlamaModel, ctx: LlamaContext, family: Family, encoder: VisionEncoder | None,
                 layout: PromptLayout, *, embedding_store: EmbeddingStore | None = None,
                 snapshots: SnapshotStore | None = None, max_image_tokens: int | None = None) -> None:
        self.model = llm
        self.ctx = ctx
        self.family = family
        self.encoder = encoder
        self.layout = layout
        self.max_image_tokens = max_image_tokens
        self.lock = threading.RLock()
        self.embeddings = ImageEmbeddings(encoder, llm.n_embd_inp, embedding_store) if encoder else None
        self.kv = KVPrefix(ctx, encoder, self.embeddings, snapshots)
        self.plans = ImagePlans()
        self.last_prefill = PrefillStats()
        self.closed = False
        if encoder is not None:
            preload_decoders()  # one-time work belongs to load, not to the first request

    # ------------------------------------------------------------------ info (the VLMEngine interface)
    @property
    def n_ctx(self) -> int:
        return self.ctx.n_ctx

    @property
    def n_vocab(self) -> int:
        return self.model.n_vocab

    @property
    def vision_engine(self) -> str | None:
        """"kernels" or "mtmd" (None without a projector)."""
        return self.encoder.name if self.encoder else None

    @property
    def encoder_calls(self) -> int:
        return self.encoder.n_encode_calls if self.encoder else 0

    @property
    def caching(self) -> bool:
        return self.kv.snapshots is not None

    def settings(self) -> RuntimeSettings:
        ctx = self.ctx
        n_threads, n_threads_batch = ctx.options.threads()
        return RuntimeSettings(n_ctx=ctx.n_ctx, n_batch=ctx.n_batch, n_threads=n_threads,
                               n_threads_batch=n_threads_batch, n_gpu_layers=ctx.options.n_gpu_layers,
                               kv_type=ctx.options.kv_type, flash_attn=ctx.flash_attn_type)

    def tokenize(self, text: str) -> list[int]:
        self.check_open()
        return self.model.tokenize(text, add_special=False)

    def prompt_chunks(self, messages: list[Message], *, gen: bool = True,
                      max_image_tokens: int | None = None) -> list[Chunk]:
        return self.prompt(messages, gen=gen, max_image_tokens=max_image_tokens).chunks

    def prompt_text(self, messages: list[Message], *, gen: bool = True) -> str:
        self.check_open()
        return self.layout.text(messages, gen=gen)

    def next_token_logits(self, messages: list[Message], *, gen: bool = True,
                          max_image_tokens: int | None = None) -> np.ndarray:
        prompt = self.prompt(messages, gen=gen, max_image_tokens=max_image_tokens)
        with self.lock:
            self.prefill(prompt)
            return self.logits()

    def image_cost(self, width: int, height: int, max_image_tokens: int | None = None) -> ImageCost:
        """What an image of ``width`` x ``height`` costs in the context, before encoding it.

        Raises:
            UnsupportedModelError: the model has no projector.
        """
        encoder, budget = self._one_image(max_image_tokens)
        planned = intake_size(width, height)  # what a request of that image will plan
        cost = self.family.image_cost(*planned, encoder, budget.tokens)
        # only the size and a name are read for the message: no pixels are allocated
        sized = LoadedImage(width, height, b"", f"size-{width}x{height}", f"a {width}x{height} image")
        check_image_tokens(cost.tokens, budget, self.family, sized)
        return cost
    def cap_ram_caches(self, embedding_bytes: int, parked_bytes: int) -> None:
        """Bound the RAM embedding cache and the parked conversations (what a memory budget leaves them)."""
        if self.embeddings is not None:
            self.embeddings.ram.max_bytes = embedding_bytes
        self.kv.parked.max_bytes = parked_bytes

    # ------------------------------------------------------------------ prompts
    def prompt(self, messages: list[Message], *, gen: bool = True,
               max_image_tokens: int | None = None) -> Prompt:
        """The request's chunks, plus the text-prefix hint when snapshots are on.

        Args:
            messages: the normalised conversation.
            gen: end with the reply's opening.
            max_image_tokens: this request's budget per image (None: the load default).
        """
        with self.lock:  # reads the KV ledger, which a request in another thread may be changing
            self.check_open()
            images = [p.image for m in messages for p in m.parts if isinstance(p, ImagePart)]
            budget = self.request_budget(max_image_tokens, images)
            try:
                chunks = self.layout.chunks(messages, gen=gen, budget=budget)
                fits = not budget.kept or kv_cells(chunks) <= self.ctx.n_ctx
            except ContextOverflowError:
                if not budget.kept:
                    raise
                fits = False
            if not fits:  # the new images do not fit beside the kept ones: share the context evenly
                budget = self.image_budget(max_image_tokens, len(images))
                chunks = self.layout.chunks(messages, gen=gen, budget=budget)
            if images:
                self.plans.record(images, [budget.for_image(i).tokens for i in images],
                                  self._chosen(max_image_tokens), chunks)
            prefix = self.layout.text_prefix(messages) if self.kv.snapshots is not None else ()
            return Prompt(chunks, prefix)

    def _chosen(self, requested: int | None) -> int | None:
        """The budget asked for: the request's, else the load default.

        Raises:
            InvalidRequestError: a budget below 1.
        """
        chosen = requested if requested is not None else self.max_image_tokens
        if chosen is not None and chosen < 1:
            raise InvalidRequestError(f"max_image_tokens must be at least 1, got {chosen}")
        return chosen

    def request_budget(self, requested: int | None, images: Sequence[LoadedImage]) -> ImageBudget:
        """Each image's budget in a request: as :meth:`image_budget`, except that images still in
        the live or a parked KV state keep their earlier plan (see :mod:`edgevlm.image_plans`)
        and only the new ones share what the context has left. (:meth:`prompt` falls back to
        :meth:`image_budget` when the new images cannot fit beside the kept ones.)

        Raises:
            InvalidRequestError: a budget below 1.
        """
        chosen = self._chosen(requested)
        kept = self.plans.kept(images, chosen, self.kv.held_image_keys()) if images else {}
        new = [image for image in images if image.digest not in kept]
        if not kept:
            return self.image_budget(requested, len(images))
        n_ctx = self.ctx.n_ctx
        left = n_ctx - answer_reserve(n_ctx) - sum(kept[i.digest].cells for i in images
                                                                     if i.digest in kept)
        cap = max(1, left // max(1, len(new)))
        tokens = min(chosen, cap) if chosen is not None else cap
        return ImageBudget(tokens, chosen is not None, tuple((d, p.tokens) for d, p in kept.items()))

    def image_budget(self, requested: int | None, n_images: int) -> ImageBudget:
        """Each image's budget: the request's, else the load default, capped by the context.

        The cap leaves room for the text and an answer (a quarter of the
        context, at most :data:`ANSWER_RESERVE_TOKENS`), shared by the images.

        Raises:
            InvalidRequestError: a budget below 1.
        """
        chosen = self._chosen(requested)
        if n_images == 0:
            return ImageBudget(chosen, chosen is not None)
        n_ctx = self.ctx.n_ctx
        cap = max(1, (n_ctx - answer_reserve(n_ctx)) // n_images)
        return ImageBudget(min(chosen, cap) if chosen is not None else cap, chosen is not None)

    # ------------------------------------------------------------------ prefill
    def prefill(self, prompt: Prompt, cancelled: Callable[[], bool] | None = None) -> PrefillStats:
        """Make the context hold ``prompt`` with logits for its last position.

        Args:
            prompt: the request's prompt.
            cancelled: asked between chunks and while one is decoded; True stops the
                prefill there (the KV cache keeps the chunks before, and there are no logits).

        Raises:
            InvalidRequestError: the model was closed.
        """
        with self.lock:
            self.check_open()
            stats = self.kv.prefill(prompt.chunks, prompt.text_prefix, cancelled, continued=prompt.prepared)
            self.last_prefill = stats
            return stats

    def prepare(self, messages: list[Message], *, max_image_tokens: int | None = None,
                cancelled: Callable[[], bool] | None = None) -> PrefillStats:
        """Evaluate what ``messages`` fix of the next request, before its question is known.

        The conversation is rendered with two different questions appended to
        its last user message; the chunks both share (images included) are
        prefilled, so the request that follows reuses them. Nothing is done
        when ``cancelled`` already says so, or when the live sequence already
        starts with those chunks (a request got there first: it is kept).

        Raises:
            InvalidRequestError, ImageError, ContextOverflowError: as a request would.
        """
        with self.lock:
            self.check_open()
            if cancelled is not None and cancelled():
                return PrefillStats()
            first, chunks = settled_rendering(lambda m: self.prompt(m, max_image_tokens=max_image_tokens), messages)
            if not chunks or self.kv.holds(chunks):
                return PrefillStats()
            return self.prefill(Prompt(chunks, first.text_prefix, prepared=True), cancelled)

    def logits(self) -> np.ndarray:
        return self.ctx.logits()

    def generate(self, messages: list[Message], options: SamplingOptions, *,
                 max_image_tokens: int | None = None, cancel: CancelToken | None = None) -> TextStream:
        """Build the request for ``messages`` now, then prefill it and stream the reply (the lock is held while it streams).

        ``cancel`` (or closing the stream) stops the prefill between or inside chunks and
        the reply before its next token; so does closing the engine from the
        thread iterating (the lock is re-entrant), before anything freed is used.
        """
        prompt = self.prompt(messages, max_image_tokens=max_image_tokens)
        return TextStream(lambda hooks: self._generate(prompt, options, hooks), cancel)

    def _generate(self, prompt: Prompt, options: SamplingOptions, hooks: StreamHooks) -> Iterator[str]:
        hooks.also_cancel_when(lambda: self.closed)
        with self.lock:
            started = time.perf_counter()
            stats = self.prefill(prompt, hooks.cancelled)
            yield from sample_reply(self.model, self.ctx, self.kv, options, stats, started, hooks)

    # ------------------------------------------------------------------ choices
    def score_choices(self, messages: list[Message], choices: Sequence[str], *,
                      max_image_tokens: int | None = None) -> ChoiceScores:
        """Each choice's log-probability as the answer to ``messages`` (see :mod:`edgevlm.scoring`).

        Raises:
            InvalidRequestError: bad choices; ContextOverflowError: they do not fit.
        """
        choices = check_choices(choices)
        prompt = self.prompt(messages, max_image_tokens=max_image_tokens)
        tail = self._answer_tail(messages, prompt)
        pairs = [choice_tokens(self.model, tail[0], tail[1], answer_lead(tail[0], c) + c) for c in choices]
        with self.lock:
            stats = self.prefill(prompt)
            return score_sequences(self.kv, self.ctx, choices, [t for t, _ in pairs], stats,
                                   joint=all(j for _, j in pairs))

    def generate_choice(self, messages: list[Message], choices: Sequence[str], *,
                        max_image_tokens: int | None = None) -> ChoiceGeneration:
        """Greedy decoding under a grammar admitting only ``choices`` (see :mod:`edgevlm.scoring`)."""
        choices = check_choices(choices)
        prompt = self.prompt(messages, max_image_tokens=max_image_tokens)
        tail_text = self._answer_tail(messages, prompt)[0]
        answers = generation_answers(choices, lambda c: answer_lead(tail_text, c))
        with self.lock:
            stats = self.prefill(prompt)
            index, tokens = generate_answer(self.model, self.ctx, self.kv, answers, stats)
            return ChoiceGeneration(choice=choices[index], index=index, tokens=tokens, prefill=stats)

    def _answer_tail(self, messages: list[Message], prompt: Prompt) -> tuple[str, tuple[int, ...]]:
        """The rendered prompt after its last image, and the prompt's last text chunk (answers follow both)."""
        text = self.layout.text(messages, gen=True)
        if self.encoder is not None:
            text = text.rsplit(self.encoder.marker, 1)[-1]
        last = prompt.chunks[-1] if prompt.chunks else None
        return text, last.tokens if isinstance(last, TextChunk) else ()

    # ------------------------------------------------------------------ images
    def _one_image(self, max_image_tokens: int | None) -> tuple[VisionEncoder, ImageBudget]:
        """The encoder and the budget of one image alone in a request.

        Raises:
            UnsupportedModelError: a model without a projector.
        """
        self.check_open()
        if self.encoder is None:
            raise UnsupportedModelError("this model has no vision projector")
        return self.encoder, self.image_budget(max_image_tokens, 1)

    def image_chunks(self, image: LoadedImage, max_image_tokens: int | None = None) -> list[ImageChunk]:
        """The chunks one image becomes in a request (the same budget rules as a request).

        Raises:
            UnsupportedModelError: a model without a projector.
        """
        encoder, budget = self._one_image(max_image_tokens)
        prepared = self.family.prepare_image(image, budget.tokens, encoder)
        chunks = encoder.image_chunks(prepared, max_tokens=budget.tokens)
        enforce_image_budget(list(chunks), budget, self.family, self.family.delimiter_tokens(self.model))
        return chunks

    def tower_pixels(self, image: LoadedImage) -> np.ndarray:
        """``image`` preprocessed as the projector file declares, as one vision-tower view: (3, S, S).

        Raises:
            UnsupportedModelError: no projector, or one the kernels engine cannot describe.
        """
        from edgevlm.kernels.vision import read_tower_config
        from edgevlm.vision.preprocess import tower_pixels

        projector = self.family.model.projector
        if projector is None:
            raise UnsupportedModelError("this model has no vision projector")
        return tower_pixels(image, read_tower_config(projector.metadata, set(projector.tensor_names)))

    def embed_image(self, image: LoadedImage, *, cache: bool = True,
                    max_image_tokens: int | None = None) -> np.ndarray:
        """What the LLM receives for ``image``: (n_tokens, n_embd), views concatenated in order."""
        chunks = self.image_chunks(image, max_image_tokens)
        if not chunks or self.embeddings is None:
            raise InvalidRequestError("the projector produced no image chunk for this image")
        with self.lock:  # the embedding caches are shared with running requests
            self.check_open()
            parts = [self.embeddings.get(c) if cache else self.embeddings.encode(c) for c in chunks]
        return np.concatenate(parts, axis=0)

    # ------------------------------------------------------------------ state
    def reset(self) -> None:
        """Forget the live sequence and every parked conversation."""
        with self.lock:
            self.check_open()
            self.kv.reset()

    @contextmanager
    def isolated_caches(self, root: Path) -> Iterator[None]:
        """Run with empty caches whose disk tiers live under ``root``; all is put back afterwards."""
        with self.lock:
            emb = self.embeddings
            saved = (emb.store, emb.ram) if emb is not None else None
            snapshots = self.kv.snapshots
            if emb is not None and saved is not None:
                emb.store = EmbeddingStore(root) if saved[0] is not None else None
                emb.ram = type(saved[1])(saved[1].max_bytes)
            self.kv.snapshots = SnapshotStore(snapshots.identity, root) if snapshots is not None else None
            self.kv.reset()
            try:
                yield
            finally:
                if emb is not None and saved is not None:
                    emb.store, emb.ram = saved
                self.kv.snapshots = snapshots
                self.kv.reset()

    def check_open(self) -> None:
        """Refuse work on a closed engine (its llama.cpp objects are freed).

        Raises:
            InvalidRequestError: the model was closed.
        """
        if self.closed:
            raise InvalidRequestError("this model was closed (VLM.close()); load it again with edgevlm.load()")

    def close(self) -> None:
        """Free the encoder, context and weights and the RAM caches; idempotent.

        Waits for a running request (the lock); later calls raise
        :class:`~edgevlm.errors.InvalidRequestError`.
        """
        with self.lock:
            if self.closed:
                return
            self.closed = True
            self.kv.parked.clear()
            if self.embeddings is not None:
                self.embeddings.ram.clear()
            if self.encoder is not None:
                self.encoder.close()
            self.ctx.close()
            self.model.close()
        native.release_free_memory()
