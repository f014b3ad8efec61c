"""The llama.cpp side of the engine: one model, one context, one sequence.

:class:`LlamaModel` owns the weights and vocabulary; :class:`LlamaContext`
owns the KV cache and knows how to decode tokens or embeddings at explicit
positions, drop a suffix of the cache, read logits and sample. Everything
above it (prompt layout, prefix reuse, images) lives in ``edgevlm.engine``.
"""

from __future__ import annotations

import ctypes
import logging
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgevlm import native
from edgevlm import amx_guard
from edgevlm.constants import KV_TYPES, QUANTISED_KV_TYPES
from edgevlm.errors import (ComputeCancelled, ContextOverflowError, InvalidModelError, InvalidRequestError,
                            RuntimeFailure)
from edgevlm.kernels.abort import stop_hook

#: llama.h ``LLAMA_LOAD_MODE_NONE``: read tensor data into the buffers (no memory map).
LOAD_MODE_READ = 0

#: What ``llama_decode`` returns when its abort callback stopped it (llama-context.cpp, ``GGML_STATUS_ABORTED``).
DECODE_ABORTED = 2

LOG = logging.getLogger("edgevlm")



@dataclass(frozen=True)
class ContextOptions:
    """How the llama.cpp context is created.

    Attributes:
        n_ctx: context window in tokens (None = the model's training context, at
            most :data:`DEFAULT_CTX`; 0 = the training context).
        n_batch: logical batch size; images are decoded in one batch, so it is
            raised to the largest image's token count when needed.
        n_threads: CPU threads for generation (None = physical cores).
        n_threads_batch: CPU threads for prompt processing (None = n_threads).
        n_gpu_layers: layers offloaded to the GPU (-1 = all, 0 = none).
        kv_type: KV cache element type ("f16", "f32", "q8_0", ...).
        flash_attn: None = off on CPU (on for a quantised KV cache, which needs
            it), llama.cpp decides on GPU; True/False to force.
        seed: default sampling seed.
    """

    n_ctx: int | None = None
    n_batch: int = 512
    n_threads: int | None = None
    n_threads_batch: int | None = None
    n_gpu_layers: int = -1
    kv_type: str = "f16"
    flash_attn: bool | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        if self.n_ctx is not None and self.n_ctx < 0:
            raise ValueError(f"n_ctx must be >= 0, got {self.n_ctx}")
        if self.n_batch < 1:
            raise ValueError(f"n_batch must be >= 1, got {self.n_batch}")
        if self.kv_type not in KV_TYPES:
            raise ValueError(f"kv_type {self.kv_type!r} is not one of {sorted(KV_TYPES)}")

    def threads(self) -> tuple[int, int]:
        n = self.n_threads or default_threads()
        return n, self.n_threads_batch or n


def default_threads() -> int:
    """Physical cores if known (hyper-threads slow ggml down), else logical."""
    try:
        import psutil

        return max(1, psutil.cpu_count(logical=False) or os.cpu_count() or 1)
    except Exception:  # pragma: no cover - psutil missing or broken
        return max(1, os.cpu_count() or 1)


class LlamaModel:
    """A GGUF language model loaded by llama.cpp (weights + vocabulary)."""

    def __init__(self, path: str | os.PathLike[str], *, n_gpu_layers: int = -1,
                 extra_buffers: bool | None = None, progress: Callable[[float], None] | None = None,
                 vocab_only: bool = False) -> None:
        """Load the weights.

        Args:
            path: the LLM GGUF.
            n_gpu_layers: layers offloaded to the GPU (-1 = all).
            extra_buffers: allow ggml's extra CPU buffer types (weight
                repacking, AMX). None = yes, except on builds with ggml's AMX
                path, whose AMX buffer type crashes on quantised weights in
                the pinned llama.cpp (see README).
            progress: called with the fraction of the weights read (llama.cpp's
                progress callback); if it raises, llama.cpp stops reading and
                the exception propagates.
            vocab_only: load the vocabulary alone (tokenising for a model llama.cpp
                does not run, such as mllama's).

        Raises:
            InvalidModelError: llama.cpp could not load the file.
        """
        lib = native.llama()
        self.path = Path(path)
        params = lib.llama_model_default_params()
        params.n_gpu_layers = n_gpu_layers
        params.vocab_only = vocab_only
        if extra_buffers is None:
            extra_buffers = not amx_guard.amx_guard_active()
        params.use_extra_bufts = extra_buffers
        if extra_buffers and native.cpu_has_amx():
            # ggml's AMX buffer type keeps its own repacked copy of the weights: read the file into it
            # instead of mapping it, or the mapped pages stay resident beside the copy (measured on the
            # 0.5B Q8_0 bench LLM: peak RSS 909 MiB mapped, 521 MiB read; load 0.55 s vs 0.96 s)
            params.load_mode = LOAD_MODE_READ
        self._lib = lib
        failure: list[BaseException] = []
        callback = _progress_callback(lib, progress, failure) if progress is not None else None
        if callback is not None:
            params.progress_callback = callback  # kept alive by ``callback`` during the load
        self.ptr = lib.llama_model_load_from_file(str(self.path).encode(), params)
        if failure:
            self.close()
            raise failure[0]
        if not self.ptr:
            raise InvalidModelError(
                f"llama.cpp could not load {self.path} (run with --verbose for its log); "
                "check that it is an LLM GGUF for a llama.cpp-supported architecture"
            )
        self.vocab = lib.llama_model_get_vocab(self.ptr)
        self.n_vocab = lib.llama_vocab_n_tokens(self.vocab)
        self.n_embd = lib.llama_model_n_embd(self.ptr)
        self.n_embd_inp = lib.llama_model_n_embd_inp(self.ptr)
        self.n_ctx_train = lib.llama_model_n_ctx_train(self.ptr)
        self.bos = lib.llama_vocab_bos(self.vocab)
        self.eos = lib.llama_vocab_eos(self.vocab)
        self.add_bos = bool(lib.llama_vocab_get_add_bos(self.vocab))

    def close(self) -> None:
        if getattr(self, "ptr", None):
            self._lib.llama_model_free(self.ptr)
            self.ptr = None

    def __del__(self) -> None:  # pragma: no cover - interpreter shutdown order
        try:
            self.close()
        except Exception:
            pass

    def meta(self, key: str) -> str | None:
        """A metadata value from the GGUF as a string, or None."""
        buf = ctypes.create_string_buffer(1 << 16)
        n = self._lib.llama_model_meta_val_str(self.ptr, key.encode(), buf, len(buf))
        if n < 0:
            return None
        if n >= len(buf):
            buf = ctypes.create_string_buffer(n + 1)
            self._lib.llama_model_meta_val_str(self.ptr, key.encode(), buf, len(buf))
        return buf.value.decode("utf-8", errors="replace")

    def chat_template(self) -> str | None:
        ptr = self._lib.llama_model_chat_template(self.ptr, None)
        return ptr.decode("utf-8", errors="replace") if ptr else None

    def tokenize(self, text: str, *, add_special: bool, parse_special: bool = True) -> list[int]:
        data = text.encode("utf-8")
        cap = len(data) + 16
        buf = (ctypes.c_int32 * cap)()
        n = self._lib.llama_tokenize(self.vocab, data, len(data), buf, cap, add_special, parse_special)
        if n < 0:
            cap = -n
            buf = (ctypes.c_int32 * cap)()
            n = self._lib.llama_tokenize(self.vocab, data, len(data), buf, cap, add_special,
                                         parse_special)
        return list(buf[:n])

    def token_bytes(self, token: int, *, special: bool = False) -> bytes:
        buf = ctypes.create_string_buffer(64)
        n = self._lib.llama_token_to_piece(self.vocab, token, buf, len(buf), 0, special)
        if n < 0:
            buf = ctypes.create_string_buffer(-n)
            n = self._lib.llama_token_to_piece(self.vocab, token, buf, len(buf), 0, special)
        return buf.raw[:n]

    def detokenize(self, tokens: list[int] | tuple[int, ...], *, special: bool = False) -> str:
        return b"".join(self.token_bytes(t, special=special) for t in tokens).decode(
            "utf-8", errors="replace")

    def is_eog(self, token: int) -> bool:
        return bool(self._lib.llama_vocab_is_eog(self.vocab, token))

    def token_text(self, token: int) -> str:
        raw = self._lib.llama_vocab_get_text(self.vocab, token)
        return raw.decode("utf-8", errors="replace") if raw else ""


def _progress_callback(lib: object, progress: Callable[[float], None], failure: list[BaseException]) -> object:
    """llama.cpp's progress callback around ``progress``: an exception is kept in ``failure`` and stops the load.

    The ctypes object must outlive the load (the caller keeps it in the params).
    """
    def forward(fraction: float, _user_data: object) -> bool:
        if failure:
            return False
        try:
            progress(float(fraction))
        except BaseException as exc:  # noqa: BLE001 - re-raised by the caller once llama.cpp has returned
            failure.append(exc)
            return False
        return True

    return lib.llama_progress_callback(forward)  # type: ignore[attr-defined]


class LlamaContext:
    """A llama.cpp context over one sequence (seq_id 0) of a :class:`LlamaModel`."""

    SEQ = 0

    def __init__(self, model: LlamaModel, options: ContextOptions) -> None:
        lib = native.llama()
        self._lib = lib
        self.model = model
        self.options = options
        params = lib.llama_context_default_params()
        params.n_ctx = context_size(options, model)
        params.n_batch = options.n_batch
        params.n_ubatch = options.n_batch
        params.n_seq_max = 1
        n_threads, n_threads_batch = options.threads()
        params.n_threads = n_threads
        params.n_threads_batch = n_threads_batch
        params.type_k = KV_TYPES[options.kv_type]
        params.type_v = KV_TYPES[options.kv_type]
        self.flash_attn_type = _flash_attn_type(lib, options)
        params.flash_attn_type = self.flash_attn_type
        params.no_perf = False
        self.ptr = lib.llama_init_from_model(model.ptr, params)
        if not self.ptr:
            raise RuntimeFailure(
                f"llama.cpp could not create a context of {params.n_ctx} tokens; "
                "try a smaller --ctx or fewer --gpu-layers"
            )
        self.n_ctx = lib.llama_n_ctx(self.ptr)
        self.n_batch = lib.llama_n_batch(self.ptr)
        self.memory = lib.llama_get_memory(self.ptr)
        self._batch = lib.llama_batch_init(self.n_batch, 0, 1)
        self._has_logits = False

    def close(self) -> None:
        if getattr(self, "ptr", None):
            self._lib.llama_batch_free(self._batch)
            self._lib.llama_free(self.ptr)
            self.ptr = None

    def __del__(self) -> None:  # pragma: no cover
        try:
            self.close()
        except Exception:
            pass

    # --- KV cache --------------------------------------------------------
    @contextmanager
    def stoppable(self, cancelled: Callable[[], bool] | None) -> Iterator[None]:
        """Inside, a decode stops mid-graph soon after ``cancelled()`` turns true (where the backend
        has ggml's abort hook: the CPU) and raises :class:`~edgevlm.errors.ComputeCancelled`;
        llama.cpp drops the positions of the batch it stopped in, earlier batches stay. The hook
        reads a flag a watcher thread sets (:mod:`edgevlm.kernels.abort`): no Python per node. The
        error lines llama.cpp logs for a stop it was asked for go to the debug level."""
        lib = self._lib

        def install(hook: int | None, flag: int | None) -> None:
            lib.llama_set_abort_callback(self.ptr, lib.ggml_abort_callback(hook) if hook else
                                         lib.ggml_abort_callback(), flag)

        with stop_hook(install, cancelled) as flag:
            if flag is None:
                yield
                return
            with native.demoted_while(lambda: ctypes.string_at(flag, 1) != b"\0"):
                yield

    def truncate(self, n_pos: int) -> None:
        """Drop every cached position >= n_pos."""
        self._lib.llama_memory_seq_rm(self.memory, self.SEQ, n_pos, -1)
        self._has_logits = False

    def clear(self) -> None:
        self._lib.llama_memory_clear(self.memory, True)
        self._has_logits = False

    def warm_up(self) -> None:
        """Decode one token and forget it (at load): the first request then finds the weights' pages
        mapped, the worker threads started and llama.cpp's first-call set-up done (~one token's time)."""
        self.decode_tokens([0], 0)
        self.clear()
        reset = getattr(self._lib, "llama_perf_context_reset", None)
        if reset is not None:
            reset(self.ptr)

    def check_fits(self, n_cells: int, what: str = "the prompt", detail: str = "", alternative: str = "") -> None:
        """Refuse ``n_cells`` KV cells (text tokens + image embeddings) beyond the context.

        ``detail``: what the cells are (e.g. each image's tokens); ``alternative``: advice
        offered before raising the context (e.g. an image-token budget).
        """
        if n_cells > self.n_ctx:
            raise ContextOverflowError(
                f"{what} needs {n_cells} tokens of context (image embeddings included) but the "
                f"context holds {self.n_ctx}{detail}; {alternative + ', or ' if alternative else ''}"
                f"raise it with --ctx / n_ctx= to at least {n_cells} "
                f"(the model was trained with {self.model.n_ctx_train})"
            )

    def save_state(self) -> bytes:
        """The KV state of the sequence (llama_state_seq_get_data)."""
        size = self._lib.llama_state_seq_get_size(self.ptr, self.SEQ)
        buf = (ctypes.c_uint8 * size)()
        written = self._lib.llama_state_seq_get_data(self.ptr, buf, size, self.SEQ)
        if written != size:
            raise RuntimeFailure(f"llama.cpp saved {written} of {size} state bytes")
        return bytes(buf)

    def restore_state(self, data: bytes) -> bool:
        """Replace the sequence's KV state with ``data``; False if llama.cpp refused it."""
        self.clear()
        buf = (ctypes.c_uint8 * len(data)).from_buffer_copy(data)
        ok = self._lib.llama_state_seq_set_data(self.ptr, buf, len(data), self.SEQ) == len(data)
        if not ok:
            self.clear()
        return ok

    # --- decoding ----------------------------------------------------------
    def decode_tokens(self, tokens: list[int] | tuple[int, ...], start_pos: int, *,
                      logits_last: bool = True, logits_all: bool = False) -> None:
        """Decode ``tokens`` at positions start_pos, start_pos+1, ... in n_batch pieces.

        With ``logits_all`` (one batch only), :meth:`logits_at` reads every position.

        Raises:
            ComputeCancelled: stopped inside a piece (:meth:`stoppable`); its ``decoded``
                tokens, the pieces before, are in the KV cache.
        """
        if logits_all and len(tokens) > self.n_batch:
            raise RuntimeFailure(f"logits_all needs at most n_batch={self.n_batch} tokens")
        self.check_fits(start_pos + len(tokens))
        batch = self._batch
        for offset in range(0, len(tokens), self.n_batch):
            piece = tokens[offset:offset + self.n_batch]
            last_piece = offset + len(piece) == len(tokens)
            batch.n_tokens = len(piece)
            for i, tok in enumerate(piece):
                batch.token[i] = tok
                batch.pos[i] = start_pos + offset + i
                batch.n_seq_id[i] = 1
                batch.seq_id[i][0] = self.SEQ
                batch.logits[i] = 1 if logits_all or (logits_last and last_piece and i == len(piece) - 1) else 0
            try:
                self._run(batch)
            except ComputeCancelled as stop:  # the pieces before this one stay in the KV cache
                raise ComputeCancelled(str(stop), decoded=offset) from None
        self._has_logits = (logits_last or logits_all) and bool(tokens)

    def decode_embeddings(self, embd: np.ndarray, start_pos: int, *, causal: bool = True,
                          logits_last: bool = False) -> None:
        """Decode raw input embeddings (n, n_embd_inp) at consecutive positions.

        Non-causal chunks must fit in one batch (llama.cpp attends within a ubatch).
        """
        embd = np.ascontiguousarray(embd, dtype=np.float32)
        n, width = embd.shape
        if width != self.model.n_embd_inp:
            raise RuntimeFailure(f"embedding width {width} != model input width {self.model.n_embd_inp}")
        self.check_fits(start_pos + n)
        step = n if not causal else self.n_batch
        if not causal and n > self.n_batch:
            raise RuntimeFailure(f"non-causal chunk of {n} embeddings exceeds n_batch={self.n_batch}")
        lib = self._lib
        batch = lib.llama_batch_init(step, width, 1)
        try:
            if not causal:
                lib.llama_set_causal_attn(self.ptr, False)
            for offset in range(0, n, step):
                piece = embd[offset:offset + step]
                m = len(piece)
                batch.n_tokens = m
                ctypes.memmove(batch.embd, piece.ctypes.data, piece.nbytes)
                for i in range(m):
                    batch.pos[i] = start_pos + offset + i
                    batch.n_seq_id[i] = 1
                    batch.seq_id[i][0] = self.SEQ
                    batch.logits[i] = 1 if (logits_last and offset + i == n - 1) else 0
                self._run(batch)
        finally:
            if not causal:
                lib.llama_set_causal_attn(self.ptr, True)
            lib.llama_batch_free(batch)
        self._has_logits = logits_last

    def _run(self, batch: object) -> None:
        rc = self._lib.llama_decode(self.ptr, batch)
        if rc == DECODE_ABORTED:
            self._has_logits = False
            raise ComputeCancelled("the decode was cancelled")
        if rc != 0:
            raise RuntimeFailure(f"llama_decode failed with code {rc} (1 = no KV slot: raise --ctx)")

    def logits(self) -> np.ndarray:
        """A copy of the logits of the last decoded position that asked for them."""
        if not self._has_logits:
            raise RuntimeFailure("no logits available: the last decode did not request them")
        return self.logits_at(-1)

    def logits_at(self, i: int) -> np.ndarray:
        """Logits of the i-th token of the last batch (-1 = last) that computed logits."""
        ptr = self._lib.llama_get_logits_ith(self.ptr, i)
        if not ptr:
            raise RuntimeFailure(f"no logits for batch index {i}")
        return np.ctypeslib.as_array(ptr, shape=(self.model.n_vocab,)).copy()

    # --- timing --------------------------------------------------------------
    def perf(self) -> dict[str, float]:
        data = self._lib.llama_perf_context(self.ptr)
        return {"prompt_ms": data.t_p_eval_ms, "prompt_tokens": data.n_p_eval,
                "eval_ms": data.t_eval_ms, "eval_tokens": data.n_eval}


#: Context size when none is asked for (capped by the model's training context).
DEFAULT_CTX = 4096


def context_size(options: ContextOptions, model: LlamaModel) -> int:
    """The context to create: the asked size, else min(DEFAULT_CTX, the training context).

    Raises:
        InvalidRequestError: more than the model was trained for (its answers
            degrade past it; llama.cpp would only log a line).
    """
    train = int(model.n_ctx_train)
    if options.n_ctx is None:
        return min(DEFAULT_CTX, train) if train > 0 else DEFAULT_CTX
    if options.n_ctx == 0:
        return train if train > 0 else DEFAULT_CTX
    if 0 < train < options.n_ctx:
        raise InvalidRequestError(
            f"a context of {options.n_ctx} tokens is more than the {train} {model.path.name} was trained "
            f"for; use --ctx {train} / n_ctx={train} or less")
    return options.n_ctx


def refuse_unflashed_quantised_kv(kv_type: str, flash_attn: bool | None) -> None:
    """A quantised V cache is read only by flash attention: refuse one with flash attention forced off.

    Raises:
        InvalidRequestError: that combination, with what to change.
    """
    if flash_attn is False and kv_type in QUANTISED_KV_TYPES:
        raise InvalidRequestError(f"a {kv_type} KV cache needs flash attention, which was turned "
                                  "off; use --kv-type f16 or leave flash attention on")


def _flash_attn_type(lib: object, options: ContextOptions) -> int:
    """-1 auto, 0 off, 1 on. CPU default: off, except for a quantised KV cache.

    On the CPU backend flash attention rounds Q and the softmax through f16,
    so a follow-up evaluated on a reused prefix differs from a from-scratch
    evaluation by 1e-3 to 1e-1 (logits); without it the two are bitwise equal. A quantised V
    cache only works with flash attention, so it is turned on for one. On
    GPUs llama.cpp decides.

    Raises:
        InvalidRequestError: a quantised KV cache with flash attention forced off.
    """
    quantised = options.kv_type in QUANTISED_KV_TYPES
    refuse_unflashed_quantised_kv(options.kv_type, options.flash_attn)
    if options.flash_attn is not None:
        return 1 if options.flash_attn else 0
    if quantised:
        LOG.info("flash attention on: a %s KV cache needs it", options.kv_type)
        return 1
    on_gpu = options.n_gpu_layers != 0 and bool(lib.llama_supports_gpu_offload())
    return -1 if on_gpu else 0


class Sampler:
    """A llama.cpp sampler chain: [grammar ->] penalties -> top-k -> top-p -> min-p -> temperature -> dist.

    temperature <= 0 means greedy decoding. ``grammar`` (GBNF text, start
    rule ``root``) restricts every step to the tokens the grammar allows.

    Raises:
        InvalidRequestError: llama.cpp could not parse ``grammar``.
    """

    def __init__(self, model: LlamaModel, *, temperature: float = 0.8, top_k: int = 40,
                 top_p: float = 0.95, min_p: float = 0.05, repeat_penalty: float = 1.0,
                 repeat_last_n: int = 64, seed: int = 0, grammar: str | None = None) -> None:
        lib = native.llama()
        self._lib = lib
        chain = lib.llama_sampler_chain_init(lib.llama_sampler_chain_default_params())
        self.ptr = chain
        self.constrained = grammar is not None
        if grammar is not None:
            rule = lib.llama_sampler_init_grammar(model.vocab, grammar.encode("utf-8"), b"root")
            if not rule:
                self.close()
                raise InvalidRequestError("llama.cpp could not parse the grammar (GBNF with a 'root' rule); "
                                          "check its syntax")
            lib.llama_sampler_chain_add(chain, rule)
        if repeat_penalty != 1.0:
            lib.llama_sampler_chain_add(
                chain, lib.llama_sampler_init_penalties(model.n_vocab, repeat_last_n, repeat_penalty, 0.0, 0.0))
        if temperature <= 0:
            lib.llama_sampler_chain_add(chain, lib.llama_sampler_init_greedy())
            return
        if top_k > 0:
            lib.llama_sampler_chain_add(chain, lib.llama_sampler_init_top_k(top_k))
        if 0 < top_p < 1:
            lib.llama_sampler_chain_add(chain, lib.llama_sampler_init_top_p(top_p, 1))
        if min_p > 0:
            lib.llama_sampler_chain_add(chain, lib.llama_sampler_init_min_p(min_p, 1))
        lib.llama_sampler_chain_add(chain, lib.llama_sampler_init_temp(temperature))
        lib.llama_sampler_chain_add(chain, lib.llama_sampler_init_dist(seed & 0xFFFFFFFF))

    def accept_history(self, tokens: list[int] | tuple[int, ...]) -> None:
        """Feed prompt tokens to the penalty window (as llama.cpp's server does).

        Not with a grammar: the chain would feed them to the grammar too, which
        must see only the reply (llama.cpp aborts on a token it rejects).
        """
        if self.constrained:
            return
        for tok in tokens:
            self._lib.llama_sampler_accept(self.ptr, tok)

    def sample(self, ctx: LlamaContext) -> int:
        # llama_sampler_sample also accepts the token into the chain.
        return int(self._lib.llama_sampler_sample(self.ptr, ctx.ptr, -1))

    def sample_logits(self, logits: np.ndarray) -> int:
        """Sample from ``logits`` (n_vocab,) computed outside llama.cpp, and accept the token.

        The same chain as :meth:`sample` (grammar, penalties, top-k/p, min-p, temperature,
        seeded draw) run on a ``llama_token_data_array`` (``llama_sampler_apply``).
        """
        lib = self._lib
        n = len(logits)
        cells = np.zeros(n, dtype=[("id", np.int32), ("logit", np.float32), ("p", np.float32)])
        cells["id"] = np.arange(n, dtype=np.int32)
        cells["logit"] = logits
        data = cells.ctypes.data_as(ctypes.POINTER(lib.llama_token_data))
        candidates = lib.llama_token_data_array(data, n, -1, False)
        lib.llama_sampler_apply(self.ptr, ctypes.byref(candidates))
        if not 0 <= candidates.selected < candidates.size:
            raise RuntimeFailure("llama.cpp's sampler selected no token")
        token = int(candidates.data[candidates.selected].id)
        lib.llama_sampler_accept(self.ptr, token)
        return token

    def close(self) -> None:
        if getattr(self, "ptr", None):
            self._lib.llama_sampler_free(self.ptr)
            self.ptr = None

    def __del__(self) -> None:  # pragma: no cover
        try:
            self.close()
        except Exception:
            pass
