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
from edgevlm.chunks import Chunk, ImageChunk, TextChunk
from edgevlm.embeddings import ImageEmbeddings
from edgevlm.errors import InvalidRequestError, UnsupportedModelError
from edgevlm.families.base import Family
from edgevlm.generation import CancelToken, SamplingOptions, TextStream, sample_reply
from edgevlm.llm import LlamaContext, LlamaModel
from edgevlm.prefill import KVPrefix
from edgevlm.prompt import ImagePart, Message
from edgevlm.prompt_layout import ImageBudget, PromptLayout, enforce_image_budget
from edgevlm.scoring import (ChoiceGeneration, ChoiceScores, answer_lead, check_choices, choice_tokens,
                             generate_answer, generation_answers, score_sequences)
from edgevlm.snapshots import SnapshotStore
from edgevlm.stats import GenerationStats, PrefillStats
from edgevlm.vision.encoder import VisionEncoder
from edgevlm.vision.images import LoadedImage, preload_decoders

#: Context kept free for the text and the answer when images are capped (tokens, at most
#: a quarter of the context).
ANSWER_RESERVE_TOKENS = 512


@dataclass(frozen=True)
class Prompt:
    """A request's chunks and its text-prefix hint (tokens worth a snapshot), built once."""

    chunks: list[Chunk]
    text_prefix: tuple[int, ...] = ()


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
        self.last_prefill = PrefillStats()
        self.closed = False
        if encoder is not None:
            preload_decoders()  # one-time work belongs to load, not to the first request

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
        self.check_open()
        n_images = sum(isinstance(p, ImagePart) for m in messages for p in m.parts)
        chunks = self.layout.chunks(messages, gen=gen, budget=self.image_budget(max_image_tokens, n_images))
        prefix = self.layout.text_prefix(messages) if self.kv.snapshots is not None else ()
        return Prompt(chunks, prefix)

    def image_budget(self, requested: int | None, n_images: int) -> ImageBudget:
        """Each image's budget: the request's, else the load default, capped by the context.

        The cap leaves room for the text and an answer (a quarter of the
        context, at most :data:`ANSWER_RESERVE_TOKENS`), shared by the images.

        Raises:
            InvalidRequestError: a budget below 1.
        """
        chosen = requested if requested is not None else self.max_image_tokens
        if chosen is not None and chosen < 1:
            raise InvalidRequestError(f"max_image_tokens must be at least 1, got {chosen}")
        if n_images == 0:
            return ImageBudget(chosen, chosen is not None)
        n_ctx = self.ctx.n_ctx
        cap = max(1, (n_ctx - min(ANSWER_RESERVE_TOKENS, n_ctx // 4)) // n_images)
        return ImageBudget(min(chosen, cap) if chosen is not None else cap, chosen is not None)

    # ------------------------------------------------------------------ prefill
    def prefill(self, prompt: Prompt, cancelled: Callable[[], bool] | None = None) -> PrefillStats:
        """Make the context hold ``prompt`` with logits for its last position.

        Args:
            prompt: the request's prompt.
            cancelled: asked between chunks; True stops the prefill there (the
                KV cache keeps what was evaluated, and there are no logits).

        Raises:
            InvalidRequestError: the model was closed.
        """
        with self.lock:
            self.check_open()
            stats = self.kv.prefill(prompt.chunks, prompt.text_prefix, cancelled)
            self.last_prefill = stats
            return stats

    def logits(self) -> np.ndarray:
        return self.ctx.logits()

    def generate(self, prompt: Prompt, options: SamplingOptions, cancel: CancelToken | None = None) -> TextStream:
        """Prefill ``prompt`` and stream the reply (the lock is held while it streams).

        ``cancel`` (or closing the stream) stops the prefill between chunks and
        the reply before its next token; so does closing the engine from the
        thread iterating (the lock is re-entrant), before anything freed is used.
        """
        return TextStream(lambda done, cancelled: self._generate(prompt, options, done,
                                                                 lambda: self.closed or cancelled()), cancel)

    def _generate(self, prompt: Prompt, options: SamplingOptions, done: Callable[[GenerationStats], None],
                  cancelled: Callable[[], bool]) -> Iterator[str]:
        with self.lock:
            started = time.perf_counter()
            stats = self.prefill(prompt, cancelled)
            yield from sample_reply(self.model, self.ctx, self.kv, options, stats, started, done, cancelled)

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
    def image_chunks(self, image: LoadedImage, max_image_tokens: int | None = None) -> list[ImageChunk]:
        """The chunks one image becomes in a request (the same budget rules as a request).

        Raises:
            UnsupportedModelError: a model without a projector.
        """
        self.check_open()
        if self.encoder is None:
            raise UnsupportedModelError("this model has no vision projector")
        budget = self.image_budget(max_image_tokens, 1)
        prepared = self.family.prepare_image(image, budget.tokens, self.encoder)
        chunks = self.encoder.image_chunks(prepared, max_tokens=budget.tokens)
        enforce_image_budget(list(chunks), budget, self.family, self.family.delimiter_tokens(self.model))
        return chunks

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
