"""Llama-3.2-Vision (mllama) behind :class:`edgevlm.VLM`: a :class:`~edgevlm.engine_protocol.VLMEngine`
on :class:`~edgevlm.mllama_runtime.MllamaPipeline` (edgevlm's ggml graphs; llama.cpp only tokenises).

* Prompts: the GGUF's chat template (else the built-in format) with ``<|image|>`` in place of
  each image, tokenised by the vocabulary-only llama.cpp model. An image is one token in the
  text; the LLM reads it through cross-attention to the image's vision states.
* Prefix reuse: the engine keeps the conversation's tokens (the self-attention KV cache) and
  the cross-attention keys and values of its images. A request with the same images (in the
  same order) keeps the longest common token prefix and reads only the rest; the images are
  neither re-encoded nor their keys recomputed. A request with other images re-reads its text
  (tokens before the first image attend to every image, so no prefix survives a change of the
  image set) with the images' vision states from :class:`~edgevlm.mllama_images.MllamaImages`
  (RAM, and disk when the caches are on), so only new images are encoded.
* Sampling: llama.cpp's sampler chain on the kernels' logits (:meth:`edgevlm.llm.Sampler.sample_logits`)
  through :func:`edgevlm.generation.run_reply`: temperature, top-k/p, min-p, repeat penalty, seed,
  grammar, stop strings, log-probabilities, cancellation, exactly as the llama.cpp engine.

* Several conversations: a request that leaves the live conversation parks a copy of it
  (:mod:`edgevlm.parking`: the KV prefix copied to RAM, the images' cross-attention K/V shared,
  not copied), so alternating between conversations reads only each one's new turn.

* Choices: ``score_choices`` (the choices' tokens evaluated after the prompt, then cut back) and
  ``generate_choice`` (greedy under the choices' grammar), as on the llama.cpp engine.

Not done for mllama: KV snapshots on disk (memory plans: the family's ``own_memory_plan``).
The vision states are cached on disk like other models' image embeddings.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from edgevlm import constants as C
from edgevlm import native
from edgevlm.cache import EmbeddingStore, file_identity
from edgevlm.chunks import Chunk, ImageUnit, TextChunk, Unit
from edgevlm.engine_protocol import EngineRequest, RuntimeSettings
from edgevlm.errors import ComputeCancelled, ContextOverflowError, InvalidRequestError, RuntimeFailure
from edgevlm.generation import (CancelToken, ReplyStart, SamplingOptions, StreamHooks, TextStream,
                                run_reply)
from edgevlm.kernels.mllama_text import TextState, cross_attention_mask
from edgevlm.llm import Sampler, default_threads
from edgevlm.mllama_images import MllamaImages, n_tiles_for
from edgevlm.mllama_runtime import MllamaPipeline
from edgevlm.parking import ParkedState, ParkedStates, common_prefix
from edgevlm.planner import DEFAULT_CTX  # the training context, at most this, as every load
from edgevlm.progress import LoadStage
from edgevlm.prompt import Message, build_prompt, settled_rendering
from edgevlm.scoring import (ChoiceGeneration, ChoiceScores, GrammarSampler, answer_lead, check_choices,
                             choice_grammar, choice_tokens, generation_answers, score_sequences, settled_answer)
from edgevlm.stats import PrefillStats
from edgevlm.vision.images import LoadedImage, intake_size, preload_decoders, to_pil

if TYPE_CHECKING:  # pragma: no cover
    from edgevlm.families.base import Family, ImageCost

#: Tokens read per graph during a prefill (cancellation is checked between batches).
PREFILL_BATCH = 512


@dataclass(frozen=True)
class MllamaPrompt:
    """A request: its tokens (``<|image|>`` where each image is) and its images in order."""

    tokens: tuple[int, ...]
    images: tuple[LoadedImage, ...]

    @property
    def chunks(self) -> list[Chunk]:
        """One text chunk: images are single ``<|image|>`` tokens read through cross-attention."""
        return [TextChunk(self.tokens)]


def open_mllama_engine(family: Family, request: EngineRequest) -> MllamaEngine:
    """Load an mllama pair for :func:`edgevlm.load` (the family's :meth:`open_engine`).

    Raises:
        InvalidModelError, InvalidRequestError, KernelsUnavailableError: from the graphs.
    """
    files = request.described.files
    assert files.mmproj is not None  # the family refuses an LLM file without its projector
    trained = int(request.described.llm_metadata.get(f"{C.LLM_ARCH_MLLAMA}.context_length", DEFAULT_CTX))
    n_ctx = request.n_ctx or min(trained, DEFAULT_CTX)
    if n_ctx > trained:
        raise InvalidRequestError(f"n_ctx={n_ctx} is more than the {trained} tokens the model was trained for")
    threads = request.n_threads or default_threads()
    request.report.report(LoadStage.LOADING_LLM, 0.0, files.llm.name)
    described = request.described
    headers = (described.llm, described.projector.header) if described.projector is not None else None
    pipe = MllamaPipeline(files.llm, files.mmproj, device=request.device, n_threads=threads, n_ctx=n_ctx,
                          kv_type=request.kv_type, headers=headers,
                          text_progress=request.report.stage_callback(LoadStage.LOADING_LLM, files.llm.name),
                          vision_progress=request.report.stage_callback(LoadStage.LOADING_PROJECTOR,
                                                                        files.mmproj.name))
    try:  # a progress callback that raises aborts the load: the graphs are freed again
        request.report.report(LoadStage.CREATING_CONTEXT, 0.0, files.llm.name)
        template = request.chat_template if request.chat_template is not None else pipe.vocab.chat_template()
        settings = RuntimeSettings(n_ctx=n_ctx, n_batch=PREFILL_BATCH, n_threads=threads, n_threads_batch=threads,
                                   n_gpu_layers=0 if request.device == "cpu" else -1, kv_type=request.kv_type,
                                   flash_attn=int(pipe.text.flash))  # a quantised cache is read by flash attention
        images = MllamaImages(pipe, EmbeddingStore() if request.cache else None, file_identity(files.mmproj))
        return MllamaEngine(pipe, images, family, template=template,
                            chat_format=request.chat_format or family.default_chat_format(),
                            seed=request.seed, settings=settings)
    except BaseException:
        pipe.close()
        raise


class MllamaEngine:
    """mllama behind :class:`edgevlm.VLM`: one live conversation, others parked, with prefix reuse
    (see the module docstring).

    Args:
        pipeline: the loaded tokenizer, vision encoder and text decoder.
        images: the images' vision states (RAM and disk tiers over the pipeline's encoder).
        family: the model's family.
        template: the chat template (None: ``chat_format``).
        chat_format: a key of ``edgevlm.prompt.CHAT_FORMATS``.
        seed: the default sampling seed.
        settings: what :attr:`edgevlm.VLM.settings` reports.
    """

    def __init__(self, pipeline: MllamaPipeline, images: MllamaImages, family: Family, *, template: str | None, chat_format: str,
                 seed: int, settings: RuntimeSettings) -> None:
        self.pipe, self.images = pipeline, images
        self.family = family
        self.template, self.chat_format, self.seed, self._settings = template, chat_format, seed, settings
        self.lock = threading.RLock()
        self.closed = False
        self.last_prefill = PrefillStats()
        vocab = pipeline.vocab
        self.image_token = pipeline.text.config.image_token_id
        self.marker = vocab.token_text(self.image_token)
        self._bos = vocab.token_text(vocab.bos) if vocab.add_bos and vocab.bos >= 0 else ""
        self._eos = vocab.token_text(vocab.eos) if vocab.eos >= 0 else ""
        self.history: list[int] = []          # the tokens in the self-attention KV cache
        self.image_keys: tuple[str, ...] = ()  # digests of the images whose cross-attention K/V are set
        self.next_logits: np.ndarray | None = None  # logits after ``history`` (None: not computed)
        self.prompt_end = 0  # the last request's prompt length (a request sharing less leaves it)
        self.last_row: np.ndarray | None = None  # the last prompt's last cross-attention mask row
        self.parked = ParkedStates()
        preload_decoders()

    # ------------------------------------------------------------------ info
    @property
    def n_ctx(self) -> int:
        return self.pipe.text.n_ctx

    @property
    def n_vocab(self) -> int:
        return self.pipe.text.config.n_vocab

    @property
    def vision_engine(self) -> str:
        return "kernels"

    @property
    def encoder_calls(self) -> int:
        return self.images.n_encode_calls

    @property
    def caching(self) -> bool:
        return self.images.store is not None  # vision states on disk (no KV snapshots for mllama yet)

    def settings(self) -> RuntimeSettings:
        return self._settings

    def tokenize(self, text: str) -> list[int]:
        self.check_open()
        return self.pipe.vocab.tokenize(text, add_special=False)

    # ------------------------------------------------------------------ prompts
    def prompt_text(self, messages: list[Message], *, gen: bool = True) -> str:
        self.check_open()
        return build_prompt(messages, self.marker, template=self.template, chat_format=self.chat_format,
                            gen=gen, bos=self._bos, eos=self._eos)[0]

    def prompt(self, messages: list[Message], *, gen: bool = True,
               max_image_tokens: int | None = None) -> MllamaPrompt:
        """The request's tokens and images (``max_image_tokens`` is ignored: an image's tiles are fixed).

        Raises:
            InvalidRequestError: the rendered prompt's image tokens and the images disagree.
            ContextOverflowError: the prompt does not fit the context.
        """
        self.check_open()
        text, images = build_prompt(messages, self.marker, template=self.template, chat_format=self.chat_format,
                                    gen=gen, bos=self._bos, eos=self._eos)
        tokens = tuple(self.pipe.tokenize(text))
        if tokens.count(self.image_token) != len(images):
            raise InvalidRequestError(f"the prompt has {tokens.count(self.image_token)} {self.marker} tokens "
                                      f"for {len(images)} images (write no {self.marker} in the text)")
        if len(tokens) >= self.n_ctx:
            raise ContextOverflowError(f"the prompt takes {len(tokens)} tokens; the context holds {self.n_ctx} "
                                       "(load with a larger n_ctx)")
        return MllamaPrompt(tokens, tuple(images))

    def prompt_chunks(self, messages: list[Message], *, gen: bool = True,
                      max_image_tokens: int | None = None) -> list[Chunk]:
        return self.prompt(messages, gen=gen).chunks

    # ------------------------------------------------------------------ prefill
    def prefill(self, prompt: MllamaPrompt, cancelled: Callable[[], bool] | None = None) -> PrefillStats:
        """Make the caches hold ``prompt`` with the logits of its last position (prefix reused).

        ``cancelled`` is asked between the token batches and, on the CPU, inside an image's
        encode; True stops there (an image stopped mid-encode is not kept, and the live
        conversation is then empty; there are no logits).

        Raises:
            InvalidRequestError: the model was closed.
        """
        with self.lock:
            self.check_open()
            stats = PrefillStats(prompt_positions=len(prompt.tokens), kv_cells=len(prompt.tokens))
            try:
                reuse = self._keep_prefix(prompt, stats, cancelled)
            except ComputeCancelled:
                self.last_prefill, self.prompt_end = stats, 0
                return stats
            started = time.perf_counter()
            self._read(prompt, cancelled)
            stats.reused_positions = reuse
            stats.evaluated_positions = len(self.history) - reuse
            stats.decode_ms = (time.perf_counter() - started) * 1e3
            self.last_prefill, self.prompt_end = stats, len(prompt.tokens)
            return stats

    def prepare(self, messages: list[Message], *, max_image_tokens: int | None = None,
                cancelled: Callable[[], bool] | None = None) -> PrefillStats:
        """Encode the images and read the tokens ``messages`` fix of the next request (see
        :meth:`edgevlm.engine.Engine.prepare`); ``max_image_tokens`` is ignored, as in :meth:`prompt`.

        Raises:
            InvalidRequestError, ImageError, ContextOverflowError: as a request would.
        """
        with self.lock:
            self.check_open()
            if cancelled is not None and cancelled():
                return PrefillStats()
            first, shared = settled_rendering(self.prompt, messages, unmergeable={self.image_token})
            tokens = shared[0].tokens if shared and isinstance(shared[0], TextChunk) else ()
            images = first.images[:tokens.count(self.image_token)]
            held = (tuple(i.digest for i in images) == self.image_keys
                    and tuple(self.history[:len(tokens)]) == tokens)
            if not tokens or held:  # nothing settled, or a request got there first: keep it
                return PrefillStats()
            return self.prefill(MllamaPrompt(tokens, images), cancelled)

    def _keep_prefix(self, prompt: MllamaPrompt, stats: PrefillStats, cancelled: Callable[[], bool] | None) -> int:
        """Rewind the caches to what ``prompt`` can reuse (live or parked); set the images' K/V if they differ."""
        text = self.pipe.text
        keys = tuple(image.digest for image in prompt.images)
        live = common_prefix(self.history, prompt.tokens) if keys == self.image_keys else -1
        entry_id, shared = self.parked.best(_units(keys, prompt.tokens), len(prompt.tokens))
        if live < self.prompt_end:
            self._park()  # the request leaves this conversation: keep it for later
        if entry_id is not None and shared - 1 > max(live, 0):
            started = time.perf_counter()
            entry = self.parked.take(entry_id)
            assert isinstance(entry.state, TextState)
            text.attach(entry.state)
            self.history, self.image_keys, self.next_logits = [int(u) for u in entry.units[1:]], keys, None
            live = shared - 1
            stats.parked_restored, stats.restore_ms = True, (time.perf_counter() - started) * 1e3
        if live >= 0:
            reuse = min(live, len(prompt.tokens) - 1)  # the last token is read again for its logits
            text.rewind(reuse)
            del self.history[reuse:]
            stats.images_reused = prompt.tokens[:reuse].count(self.image_token)
            return reuse
        text.reset()
        self.history, self.image_keys, self.next_logits = [], (), None
        found = [self.images.get(image, stats, cancelled=cancelled) for image in prompt.images]
        if found:
            text.set_images([v.states for v in found], [v.n_tiles for v in found])
        self.image_keys = keys
        return 0

    def _park(self) -> None:
        """Keep a copy of the live conversation in the parked LRU (see :mod:`edgevlm.parking`)."""
        if not self.history or self.parked.max_bytes <= 0:
            return
        state = self.pipe.text.snapshot()
        if not self.parked.park(ParkedState(_units(self.image_keys, self.history), (), state)):
            state.close()

    def _read(self, prompt: MllamaPrompt, cancelled: Callable[[], bool] | None) -> None:
        """Read the prompt's tokens after ``history`` in batches (stopping between them, or inside one's
        graphs, when cancelled)."""
        tokens, text = prompt.tokens, self.pipe.text
        mask = (cross_attention_mask(tokens, self.image_token, text.image_tiles, text.tiles_per_image)
                if prompt.images else None)
        self.next_logits = None
        self.last_row = mask[-1] if mask is not None else None
        done = len(self.history)
        while done < len(tokens):
            if cancelled is not None and cancelled():
                return
            end = min(len(tokens), done + PREFILL_BATCH)
            try:
                logits = text.forward(tokens[done:end], mask[done:end] if mask is not None else None,
                                      cancelled=cancelled)[-1]
            except ComputeCancelled:  # stopped inside a graph: keep the micro-batches read before it
                self.history.extend(tokens[done:done + text.n_past - len(self.history)])
                text.rewind(text.n_past)  # (forgets the stopped micro-batch's cross-attention row)
                return
            self.history.extend(tokens[done:end])
            done = end
            self.next_logits = logits

    def append_token(self, token: int) -> None:
        """Read one generated token (its cross-attention row repeats the last one, as transformers' generate)."""
        self.next_logits = self.pipe.text.forward([token])[-1]
        self.history.append(token)

    def logits(self) -> np.ndarray:
        """The next-token logits after the live conversation.

        Raises:
            InvalidRequestError: the last prefill was cancelled (there are no logits).
        """
        if self.next_logits is None:
            raise InvalidRequestError("no logits: the last prefill was cancelled")
        return self.next_logits

    def next_token_logits(self, messages: list[Message], *, gen: bool = True,
                          max_image_tokens: int | None = None) -> np.ndarray:
        return self.prompt_logits(self.prompt(messages, gen=gen))

    def prompt_logits(self, prompt: MllamaPrompt) -> np.ndarray:
        """Logits of the token after ``prompt`` (any token prefix of a rendered prompt)."""
        with self.lock:
            self.prefill(prompt)
            return self.logits().copy()

    # ------------------------------------------------------------------ generation
    def generate(self, messages: list[Message], options: SamplingOptions, *,
                 max_image_tokens: int | None = None, cancel: CancelToken | None = None) -> TextStream:
        """Build the request now, then prefill it and stream the reply (the lock is held while it streams).

        ``max_image_tokens`` is ignored: an image's tiles are fixed.
        """
        prompt = self.prompt(messages)
        return TextStream(lambda hooks: self._generate(prompt, options, hooks), cancel)

    def _generate(self, prompt: MllamaPrompt, options: SamplingOptions, hooks: StreamHooks) -> Iterator[str]:
        hooks.also_cancel_when(lambda: self.closed)
        with self.lock:
            started = time.perf_counter()
            stats = self.prefill(prompt, hooks.cancelled)
            start = ReplyStart(stats, started, self.seed, tuple(self.history[-64:]))
            yield from run_reply(self.pipe.vocab, _Decoder(self), options, start, hooks)

    # ------------------------------------------------------------------ not done for mllama
    def score_choices(self, messages: list[Message], choices: Sequence[str], *,
                      max_image_tokens: int | None = None) -> ChoiceScores:
        """Each choice's log-probability as the answer (as :meth:`edgevlm.engine.Engine.score_choices`).

        Raises:
            InvalidRequestError: bad choices; ContextOverflowError: they do not fit.
        """
        choices = check_choices(choices)
        prompt = self.prompt(messages)
        tail_text = self.prompt_text(messages).rsplit(self.marker, 1)[-1]
        tail_tokens = prompt.tokens[len(prompt.tokens) - prompt.tokens[::-1].index(self.image_token):] \
            if prompt.images else prompt.tokens
        pairs = [choice_tokens(self.pipe.vocab, tail_text, tail_tokens, answer_lead(tail_text, c) + c)
                 for c in choices]
        with self.lock:
            stats = self.prefill(prompt)
            branch = _Branch(self)
            return score_sequences(branch, branch, choices, [t for t, _ in pairs], stats,
                                   joint=all(j for _, j in pairs))

    def generate_choice(self, messages: list[Message], choices: Sequence[str], *,
                        max_image_tokens: int | None = None) -> ChoiceGeneration:
        """Greedy decoding under a grammar admitting only ``choices`` (as the llama.cpp engine's).

        Raises:
            InvalidRequestError: bad choices; RuntimeFailure: the grammar ended off the answers.
        """
        choices = check_choices(choices)
        prompt = self.prompt(messages)
        tail_text = self.prompt_text(messages).rsplit(self.marker, 1)[-1]
        answers = generation_answers(choices, lambda c: answer_lead(tail_text, c))
        with self.lock:
            stats = self.prefill(prompt)
            tokens = _Branch(self).answer(answers)
        text = self.pipe.vocab.detokenize(list(tokens))
        if text not in answers:
            raise RuntimeFailure(f"the constrained answer {text[:60]!r} is not one of the choices")
        return ChoiceGeneration(choice=choices[answers.index(text)], index=answers.index(text), tokens=tokens,
                                prefill=stats)

    # ------------------------------------------------------------------ images
    def embed_image(self, image: LoadedImage, *, cache: bool = True,
                    max_image_tokens: int | None = None) -> np.ndarray:
        """The image's projected vision states of its real tiles: (tiles x tokens per tile, n_embd).

        What the cross-attention layers attend to (mllama gives the LLM no image embeddings in
        its input sequence). ``cache=False`` encodes again (for timing).
        """
        with self.lock:
            self.check_open()
            found = self.images.get(image, cache=cache)
        states = found.states[:found.n_tiles]
        return states.reshape(-1, states.shape[-1])

    def tower_pixels(self, image: LoadedImage) -> np.ndarray:
        """The image's first tile as the vision tower takes it: (3, S, S) float32 (MllamaImageProcessor's
        tiling; :meth:`embed_image` encodes every tile)."""
        self.check_open()
        tiles = self.pipe.tiles(to_pil(image))
        return np.ascontiguousarray(tiles.pixels[0], dtype=np.float32)

    def image_cost(self, width: int, height: int, max_image_tokens: int | None = None) -> ImageCost:
        """An image costs one context token (``<|image|>``); the LLM attends to its tiles' states.

        ``tokens``: the vision states cross-attended (tiles x tokens per tile); ``positions`` and
        ``cells``: 1; ``views``: the tiles. The budget is ignored (the tiling is fixed).
        """
        from edgevlm.families.base import ImageCost

        self.check_open()
        cfg = self.pipe.vision.config
        tiles = n_tiles_for(cfg, *intake_size(width, height))
        return ImageCost(tokens=tiles * cfg.n_positions, positions=1, cells=1, views=tiles)

    # ------------------------------------------------------------------ state
    def reset(self) -> None:
        """Forget the live conversation (the RAM cache of vision states stays)."""
        with self.lock:
            self.check_open()
            self.parked.clear()
            self.pipe.text.reset()
            self.history, self.image_keys, self.next_logits, self.prompt_end = [], (), None, 0

    @contextmanager
    def isolated_caches(self, root: Path) -> Iterator[None]:
        """Run with empty image caches (disk tier under ``root``) and no conversation; put back after."""
        with self.lock, self.images.isolated(root):
            self.reset()
            try:
                yield
            finally:
                self.reset()

    def check_open(self) -> None:
        """Raises: InvalidRequestError: the model was closed."""
        if self.closed:
            raise InvalidRequestError("this model was closed (VLM.close()); load it again with edgevlm.load()")

    def close(self) -> None:
        """Free the graphs, weights and caches; idempotent (waits for a running request)."""
        with self.lock:
            if self.closed:
                return
            self.closed = True
            self.images.clear()
            self.parked.clear()  # their image buffers live on the backend closed next
            self.pipe.close()
        native.release_free_memory()


class _Branch:
    """Scoring's view of an :class:`MllamaEngine` after a prefill (:class:`edgevlm.scoring.ScoringContext`
    and :class:`~edgevlm.scoring.BranchEvaluator`): tokens evaluated after the prompt, then cut back."""

    def __init__(self, engine: MllamaEngine) -> None:
        self.engine = engine
        self.n_batch = PREFILL_BATCH

    def check_fits(self, n_cells: int, what: str = "the prompt", detail: str = "", alternative: str = "") -> None:
        if n_cells > self.engine.n_ctx:
            raise ContextOverflowError(f"{what} needs {n_cells} tokens of context but it holds "
                                       f"{self.engine.n_ctx}; load with a larger n_ctx")

    def logits(self) -> np.ndarray:
        return self.engine.logits()

    def evaluate_after(self, tokens: Sequence[int]) -> np.ndarray:
        """Logits (len(tokens), n_vocab) of ``tokens`` after the prompt (they see the prompt's last
        cross-attention row, as generated tokens do); the caches are left as they were."""
        engine = self.engine
        text, held = engine.pipe.text, len(engine.history)
        row = engine.last_row
        mask = np.broadcast_to(row, (len(tokens), *row.shape)) if row is not None else None
        try:
            return text.forward(list(tokens), mask, all_logits=True)
        finally:
            text.rewind(held)

    def answer(self, answers: Sequence[str]) -> tuple[int, ...]:
        """Greedy tokens of one of ``answers`` under their grammar; the caches are cut back afterwards."""
        vocab, logits = self.engine.pipe.vocab, self.engine.logits()
        sampler = GrammarSampler(vocab, choice_grammar(answers))
        generated: list[int] = []
        try:
            for _ in range(max(len(a.encode("utf-8")) for a in answers) + 1):  # a token holds a byte at least
                token = sampler.sample_logits(logits)
                if vocab.is_eog(token):
                    break
                generated.append(token)
                if settled_answer(vocab.detokenize(generated), answers):
                    break
                self.check_fits(len(self.engine.history) + len(generated), "the prompt and the answer")
                logits = self.evaluate_after(generated)[-1]
        finally:
            sampler.close()
        return tuple(generated)


def _units(image_keys: tuple[str, ...], tokens: Sequence[int]) -> tuple[Unit, ...]:
    """A conversation's identity for :class:`~edgevlm.parking.ParkedStates`: its image set (one unit:
    no prefix survives another image set), then its tokens."""
    return (ImageUnit("mllama:" + ",".join(image_keys)), *tokens)


class _Decoder:
    """:class:`edgevlm.generation.TokenDecoder` on an :class:`MllamaEngine`'s live conversation."""

    def __init__(self, engine: MllamaEngine) -> None:
        self.engine = engine

    def sample(self, sampler: Sampler) -> int:
        return sampler.sample_logits(self.engine.logits())

    def logits(self) -> np.ndarray:
        return self.engine.logits()

    def fits(self, n_generated: int) -> bool:
        return len(self.engine.history) < self.engine.n_ctx

    def append(self, token: int) -> None:
        self.engine.append_token(token)
