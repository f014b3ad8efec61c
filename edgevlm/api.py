"""The Python API: :func:`load` and :class:`VLM`."""

from __future__ import annotations

import dataclasses
import logging
import os
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edgevlm import constants as C
from edgevlm import native
from edgevlm.chunks import Chunk
from edgevlm.descriptor import ModelDescriptor, ModelFiles, check_pair, describe_model
from edgevlm.engine import Engine
from edgevlm.engine_protocol import EngineRequest, RuntimeSettings, VLMEngine
from edgevlm.errors import InvalidRequestError, MemoryBudgetError
from edgevlm.families.base import Family, FamilyOptions, ImageCost, family_for
from edgevlm.generation import CancelToken, SamplingOptions, TextStream
from edgevlm.llm import ContextOptions, LlamaContext, LlamaModel, refuse_unflashed_quantised_kv
from edgevlm.planner import (MemoryPlan, PlanRequest, context_for, image_ubatch, largest_image_chunk, parse_budget,
                             plan_memory, projector_non_causal)
from edgevlm.progress import LoadReporter, LoadStage, ProgressCallback
from edgevlm.prompt import normalize_messages
from edgevlm.resolve import resolve
from edgevlm.scoring import ChoiceGeneration, ChoiceScores
from edgevlm.snapshots import SnapshotIdentity
from edgevlm.stats import PrefillStats, Reply
from edgevlm.user_config import resolve_model_name
from edgevlm.vision.encoder import VisionEncoder
from edgevlm.vision.images import ImageInput, load_image

LOG = logging.getLogger("edgevlm")
Messages = Sequence[dict[str, Any]]



def load(model: str | os.PathLike[str] | None = None, *, mmproj: str | os.PathLike[str] | None = None,
         n_ctx: int | None = None, n_batch: int = 512, n_threads: int | None = None,
         n_gpu_layers: int = -1, kv_type: str = "f16", flash_attn: bool | None = None, seed: int = 0,
         chat_template: str | None = None, chat_format: str | None = None,
         quant: str | None = None, revision: str | None = None, cache: bool = True,
         vision_engine: str = "auto", vision_device: str | None = None,
         max_image_tokens: int | None = None, tiles: str = "none",
         memory_budget: int | str | None = None, progress: ProgressCallback | None = None,
         verbose: bool = False) -> VLM:
    """Load a vision-language model.

    Args:
        model: a folder with one LLM GGUF and one projector GGUF, an LLM
            ``.gguf`` (projector via ``mmproj`` or found beside it), or a
            Hugging Face repo id (downloaded into the hub cache). None:
            :func:`edgevlm.resolve_model_name` (``EDGEVLM_MODEL``, then
            ``edgevlm config set model``, then the default model,
            :data:`edgevlm.constants.DEFAULT_MODEL`, downloaded on first use).
        mmproj: the vision projector GGUF (optional with a folder / repo).
        n_ctx: context window in tokens (default: the model's training
            context, at most 4096; more than it was trained for is refused).
        n_batch: prompt batch size (raised automatically for large images).
        n_threads: CPU threads (default: physical cores).
        n_gpu_layers: LLM layers on the GPU (-1 all, 0 none); a positive count
            on a build without a GPU backend is refused.
        kv_type: KV cache type: "f16", "f32", "q8_0", "q4_0", "bf16".
        flash_attn: llama.cpp's flash attention (None: off on the CPU, where
            it makes reused prefixes bitwise equal to fresh ones, except for a
            quantised KV cache, which needs it; llama.cpp's choice on a GPU).
        seed: default sampling seed.
        chat_template: a Jinja chat template overriding the GGUF's.
        chat_format: built-in template when there is no usable one
            ("llava-1.5", "chatml"; default: the model family's).
        quant: pick among several LLM files in a folder / repo.
        revision: hub revision.
        cache: keep image embeddings and KV snapshots of prompt prefixes in the
            on-disk cache (``EDGEVLM_CACHE_DIR`` or the platform cache home), so
            that another process asking about the same image neither runs the
            vision encoder nor re-reads the prompt up to the image.
        vision_engine: who runs the vision tower: "kernels" (edgevlm's own
            ggml graphs), "mtmd" (llama.cpp's libmtmd) or "auto" (the model
            family's choice: kernels for CLIP-tower LLaVA and OmniFusion
            projectors, libmtmd otherwise).
        vision_device: ggml device for the kernels engine ("auto", "cpu",
            "cuda", "metal", or a device name); default "cpu" when
            ``n_gpu_layers == 0``, else "auto".
        max_image_tokens: default image-token budget per image (requests may
            override it): LLaVA-NeXT picks the best grid within it, InternVL
            uses fewer tiles, Qwen2-VL fewer pixels; models trained on one
            view ignore it. None: the model's own choice, capped so that a
            request's images and an answer fit the context.
        tiles: "grid" adds LLaVA-NeXT-style tiles and an overview to models
            trained on one view (LLaVA-1.5, OmniFusion; kernels engine): more
            detail for more image tokens. "none" (default): one view.
        memory_budget: bytes (or "1.5GiB", "800M") the process may take, RAM
            and VRAM together, optionally with each GPU's share ("6GiB,vram=4GiB"):
            the model is priced first (:func:`plan`) and refused, before anything
            is loaded, when it would not fit; GPU layers are fitted to the VRAM
            share; the RAM caches get what the plan leaves.
        progress: called on this thread with a
            :class:`~edgevlm.progress.LoadProgress` at each stage (resolving,
            reading headers, loading the LLM weights with llama.cpp's fraction,
            loading the projector, creating the context, ready) and an overall
            fraction for a progress bar. If it raises, the load stops (the
            weights read so far are freed) and the exception propagates.
        verbose: show edgevlm's and llama.cpp's log lines on stderr, from now
            on, process-wide (otherwise llama.cpp is silent unless logging is
            configured for ``edgevlm.llama``).

    Returns:
        A ready :class:`VLM`.

    Raises:
        ModelNotFoundError, InvalidModelError, IncompatibleModelError,
        UnsupportedModelError, HubError, InvalidRequestError: see the message
        for what to do.
        MemoryBudgetError: the plan does not fit ``memory_budget`` (the message
            has the numbers and the cheapest ways to fit).
    """
    t0 = time.perf_counter()
    if verbose:
        native.show_logs()
    if vision_engine not in C.VISION_ENGINES:
        raise InvalidRequestError(f"unknown vision engine {vision_engine!r}; choose one of "
                                  f"{', '.join(C.VISION_ENGINES)}")
    report = LoadReporter(progress)
    report.report(LoadStage.RESOLVING, 0.0, str(model))
    files = resolve(resolve_model_name(model), mmproj, quant=quant, revision=revision)
    report.report(LoadStage.READING_HEADERS, 0.0, files.llm.name)
    described = describe_model(files)
    report.weigh(_file_bytes(files.llm), _file_bytes(files.mmproj))
    family = family_for(described, FamilyOptions(tiles=tiles))
    engine_name = family.choose_engine(vision_engine) if described.projector is not None else None
    _check_gpu_layers(n_gpu_layers)
    refuse_unflashed_quantised_kv(kv_type, flash_attn)  # before any weight is read
    if memory_budget is not None and family.prices_own_engine:  # refused before any weight is read
        total, vram = parse_budget(memory_budget)
        _refuse_over_budget(_plan(described, family, PlanRequest(
            n_ctx=n_ctx, n_batch=n_batch, kv_type=kv_type, flash_attn=flash_attn, n_gpu_layers=n_gpu_layers,
            max_image_tokens=max_image_tokens, cache=cache, vision_engine=vision_engine, tiles=tiles,
            memory_budget=total, vram_budget=vram), _process_bytes()))
    own = family.open_engine(EngineRequest(
        described=described, n_ctx=n_ctx, n_batch=n_batch, n_threads=n_threads, n_gpu_layers=n_gpu_layers,
        kv_type=kv_type, seed=seed, device=vision_device or ("cpu" if n_gpu_layers == 0 else "auto"),
        chat_template=chat_template, chat_format=chat_format, cache=cache, max_image_tokens=max_image_tokens,
        memory_budget=memory_budget, report=report, flash_attn=flash_attn))
    if own is not None:  # a family running its LLM outside llama.cpp
        return _ready(VLM(own, described, load_ms=(time.perf_counter() - t0) * 1e3), report)
    budget, vram_budget = parse_budget(memory_budget) if memory_budget is not None else (None, None)
    request = PlanRequest(n_ctx=n_ctx, n_batch=n_batch, kv_type=kv_type, flash_attn=flash_attn,
                          n_gpu_layers=n_gpu_layers, max_image_tokens=max_image_tokens, cache=cache,
                          vision_engine=vision_engine, tiles=tiles, memory_budget=budget, vram_budget=vram_budget)
    fitted = _fit_before_loading(described, family, request, vision_device)
    options = ContextOptions(n_ctx=n_ctx, n_batch=n_batch, n_threads=n_threads,
                             n_gpu_layers=fitted.n_gpu_layers, kv_type=kv_type, flash_attn=flash_attn, seed=seed)
    _check_gpu_layers(fitted.n_gpu_layers)
    spec = _EngineSpec(described=described, family=family, engine_name=engine_name, options=options,
                       vision_device=fitted.vision_device or ("cpu" if fitted.n_gpu_layers == 0 else "auto"),
                       chat_template=chat_template, chat_format=chat_format, cache=cache,
                       max_image_tokens=max_image_tokens, image_batch=fitted.image_batch,
                       cache_caps=fitted.cache_caps)
    engine = _open_engine(spec, report)
    return _ready(VLM(engine, described, load_ms=(time.perf_counter() - t0) * 1e3), report)


def _ready(vlm: VLM, report: LoadReporter) -> VLM:
    """Report the load's end; a callback raising there closes the model again."""
    try:
        report.report(LoadStage.READY, 1.0, vlm.files.llm.name)
    except BaseException:
        vlm.close()
        raise
    return vlm


@dataclass(frozen=True)
class _EngineSpec:
    """What :func:`load` decided before reading any weights."""

    described: ModelDescriptor
    family: Family
    engine_name: str | None  # the vision engine, None without a projector
    options: ContextOptions
    vision_device: str
    chat_template: str | None
    chat_format: str | None
    cache: bool
    max_image_tokens: int | None
    image_batch: int  # the batch a non-causal projector needs (planner.image_ubatch)
    cache_caps: tuple[int, int] | None  # RAM embedding cache and parked states, when a budget caps them


@dataclass(frozen=True)
class _Fitted:
    """What :func:`_fit_before_loading` decided from the headers."""

    n_gpu_layers: int
    vision_device: str | None
    image_batch: int
    cache_caps: tuple[int, int] | None


def _fit_before_loading(described: ModelDescriptor, family: Family, request: PlanRequest,
                        vision_device: str | None) -> _Fitted:
    """From the headers alone: the context check, GPU layers, the image batch, the budget and cache caps.

    Raises:
        InvalidRequestError: a context above the training context.
        MemoryBudgetError: the plan does not fit the budget.
    """
    n_ctx = context_for(described, request.n_ctx)
    n_gpu_layers = request.n_gpu_layers
    if n_gpu_layers < 0 and (gpu := _gpu_device()) is not None:
        n_gpu_layers, vision_device = _fit_gpu(described, family, gpu, request, vision_device)
    chunk = (largest_image_chunk(described, family, n_ctx, request.max_image_tokens, request.vision_engine)
             if described.projector is not None else 0)
    caps = None
    if request.memory_budget is not None or request.vram_budget is not None:
        plan = _plan(described, family, dataclasses.replace(request, n_gpu_layers=n_gpu_layers), _process_bytes())
        _refuse_over_budget(plan)
        caps = plan.cache_caps()
    return _Fitted(n_gpu_layers, vision_device, image_ubatch(request.n_batch, n_ctx, chunk, True), caps)


def _open_engine(spec: _EngineSpec, report: LoadReporter) -> Engine:
    """Load the weights, the projector and the context; what was opened is closed again on failure."""
    llm_path = spec.described.files.llm
    report.report(LoadStage.LOADING_LLM, 0.0, llm_path.name)
    llm = LlamaModel(llm_path, n_gpu_layers=spec.options.n_gpu_layers,
                     progress=report.stage_callback(LoadStage.LOADING_LLM, llm_path.name))
    opened: list[LlamaModel | LlamaContext | VisionEncoder] = [llm]
    try:
        check_pair(spec.described, llm.n_embd_inp)
        encoder = None
        if spec.engine_name is not None and spec.described.files.mmproj is not None:
            report.report(LoadStage.LOADING_PROJECTOR, 0.0, spec.described.files.mmproj.name)
            encoder = _open_encoder(spec.engine_name, spec.described, spec.family, llm, spec.vision_device,
                                    spec.options.threads()[1])
            opened.append(encoder)
        options = spec.options
        if encoder is not None and (encoder.non_causal or projector_non_causal(spec.described)):
            # Images attended bidirectionally (Gemma 3, ...): the largest chunk must fit in one ubatch.
            options = dataclasses.replace(options, n_batch=spec.image_batch)
        report.report(LoadStage.CREATING_CONTEXT, 0.0, llm_path.name)
        ctx = LlamaContext(llm, options)
        opened.append(ctx)
        ctx.warm_up()  # one-time costs belong to load, not to the first request
        template = spec.chat_template if spec.chat_template is not None else llm.chat_template()
        layout = spec.family.prompt_layout(llm, encoder, template, spec.chat_format)
        store = snapshots = None
        if spec.cache:
            from edgevlm.cache import EmbeddingStore
            from edgevlm.snapshots import SnapshotStore

            store = EmbeddingStore() if encoder is not None else None
            snapshots = SnapshotStore(_snapshot_identity(spec.described.files, ctx, encoder))
        engine = Engine(llm, ctx, spec.family, encoder, layout, embedding_store=store, snapshots=snapshots,
                        max_image_tokens=spec.max_image_tokens)
        if spec.cache_caps is not None:
            engine.cap_ram_caches(*spec.cache_caps)
        return engine
    except BaseException:
        for part in reversed(opened):
            part.close()
        native.release_free_memory()
        raise


def _file_bytes(path: Path | None) -> int:
    try:
        return path.stat().st_size if path is not None else 0
    except OSError:
        return 0


def plan(model: str | os.PathLike[str] | None = None, *, mmproj: str | os.PathLike[str] | None = None,
         quant: str | None = None, revision: str | None = None, n_ctx: int | None = None,
         n_batch: int = 512, kv_type: str = "f16", flash_attn: bool | None = None, n_gpu_layers: int = -1,
         image_size: tuple[int, int] | None = None, max_image_tokens: int | None = None, cache: bool = True,
         vision_engine: str = "auto", tiles: str = "none",
         memory_budget: int | str | None = None) -> MemoryPlan:
    """Price a model before loading it: the bytes each part takes, where, and the totals.

    Args:
        model, mmproj, quant, revision: as in :func:`load` (a hub repo id,
            or the default model, downloads the files; nothing is loaded).
        n_ctx, n_batch, kv_type, flash_attn, n_gpu_layers, max_image_tokens,
        cache, vision_engine, tiles: as in :func:`load`.
        image_size: the largest image (width, height) to price; None: the
            largest the budget and the context allow.
        memory_budget: bytes (or "1.5GiB") to check the plan against.

    Returns:
        A :class:`~edgevlm.planner.MemoryPlan` (``ram_bytes``, ``vram_bytes``,
        ``parts``, ``settings``, ``fits``, ``suggestions``).

    Raises:
        ModelNotFoundError, InvalidModelError, UnsupportedModelError, InvalidRequestError.
    """
    process = _process_bytes()
    described = describe_model(resolve(resolve_model_name(model), mmproj, quant=quant, revision=revision))
    family = family_for(described, FamilyOptions(tiles=tiles))
    budget, vram_budget = parse_budget(memory_budget) if memory_budget is not None else (None, None)
    request = PlanRequest(n_ctx=n_ctx, n_batch=n_batch, kv_type=kv_type, flash_attn=flash_attn,
                          n_gpu_layers=n_gpu_layers, image_size=image_size, max_image_tokens=max_image_tokens,
                          cache=cache, vision_engine=vision_engine, tiles=tiles, memory_budget=budget,
                          vram_budget=vram_budget)
    return _plan(described, family, request, process)


def _process_bytes() -> int:
    """This process's resident memory with llama.cpp and libmtmd loaded (what a load starts from)."""
    import psutil

    native.llama()
    native.mtmd()
    return int(psutil.Process().memory_info().rss)


def _plan(model: ModelDescriptor, family: Family, request: PlanRequest, process: int) -> MemoryPlan:
    """The plan with the process's measured footprint and this build's GPU, if any."""
    import dataclasses

    gpu = _gpu_device() if request.n_gpu_layers != 0 else None
    return plan_memory(model, family, dataclasses.replace(request, gpu=gpu), process)


def _fit_gpu(model: ModelDescriptor, family: Family, gpu: str, request: PlanRequest,
             vision_device: str | None) -> tuple[int, str | None]:
    """GPU layers and the projector's device that fit the GPU's free memory (as llama-server's --fit)
    and, with a memory budget, the share of it the host memory leaves."""
    from edgevlm.kernels.backend import available_devices
    from edgevlm.planner import fit_gpu

    free = next((d.free_bytes for d in available_devices() if d.name == gpu), 0)
    fit = fit_gpu(model, family, dataclasses.replace(request, gpu=gpu), free, _process_bytes())
    LOG.info("%s: %d MiB free; %d layers and the projector on %s (%d MiB)", gpu, free >> 20,
             fit.n_gpu_layers, gpu if fit.projector_on_gpu else "the CPU", fit.vram_bytes >> 20)
    return fit.n_gpu_layers, vision_device or ("auto" if fit.projector_on_gpu else "cpu")


def _gpu_device() -> str | None:
    """The first GPU device of this build (None on CPU-only builds)."""
    if not native.llama().llama_supports_gpu_offload():
        return None
    try:
        from edgevlm.kernels.backend import available_devices

        return next((d.name for d in available_devices() if d.kind in ("gpu", "igpu")), "GPU")
    except Exception:  # noqa: BLE001 - the kernels are optional for planning
        return "GPU"


def _refuse_over_budget(plan: MemoryPlan) -> None:
    """Raise the one-line refusal of a plan over its budget.

    Raises:
        MemoryBudgetError: with the numbers and the cheapest ways to fit.
    """
    if not plan.fits:
        raise MemoryBudgetError(plan.refusal())


def _check_gpu_layers(n_gpu_layers: int) -> None:
    """Refuse GPU layers asked of a build without a GPU backend (llama.cpp would ignore them).

    Raises:
        InvalidRequestError: saying how to get a GPU build.
    """
    if n_gpu_layers > 0 and not native.llama().llama_supports_gpu_offload():
        raise InvalidRequestError(
            f"--gpu-layers {n_gpu_layers}: this llama-cpp-python build has no GPU backend; reinstall it "
            "with CMAKE_ARGS=\"-DGGML_CUDA=on\" (or -DGGML_METAL=on), see the README, or drop --gpu-layers")


def _open_encoder(engine: str, model: ModelDescriptor, family: Family, llm: LlamaModel, device: str,
                  n_threads: int) -> VisionEncoder:
    """The vision encoder ``engine`` (chosen by the family) for the model's projector."""
    mmproj = model.files.mmproj
    assert mmproj is not None and model.projector is not None
    if engine == C.VISION_ENGINE_KERNELS:
        from edgevlm.vision.kernels_encoder import KernelsEncoder

        return KernelsEncoder(model.projector, llm, pipeline=family.kernels_pipeline, n_threads=n_threads,
                              device=device)
    from edgevlm.vision.mtmd import MtmdEncoder

    return MtmdEncoder(mmproj, llm, meta=model.projector.metadata, n_threads=n_threads,
                       use_gpu=device != "cpu")


def _snapshot_identity(files: ModelFiles, ctx: LlamaContext, encoder: VisionEncoder | None) -> SnapshotIdentity:
    import llama_cpp

    from edgevlm.cache import file_identity

    return SnapshotIdentity(model=file_identity(files.llm),
                            projector=encoder.identity if encoder is not None else "none",
                            build=f"{llama_cpp.__version__} {native.system_info()}",
                            n_ctx=ctx.n_ctx, kv_type=ctx.options.kv_type,
                            flash_attn=ctx.flash_attn_type)


class VLM:
    """A loaded vision-language model. Thread-safe: calls are serialised.

    Every call takes the whole conversation (OpenAI style); the engine keeps
    the KV cache of the longest common prefix, so a follow-up only evaluates
    the new turn and never re-encodes an image already in the context. Other
    conversations' states are parked in RAM (1 GiB LRU), so alternating
    between conversations evaluates only each one's new turn.
    """

    def __init__(self, engine: VLMEngine, model: ModelDescriptor, *, load_ms: float = 0.0) -> None:
        self.engine = engine
        self.model = model
        self.load_ms = load_ms

    # ----------------------------------------------------------------- info
    @property
    def files(self) -> ModelFiles:
        return self.model.files

    @property
    def model_path(self) -> Path:
        return self.model.files.llm

    @property
    def mmproj_path(self) -> Path | None:
        return self.model.files.mmproj

    @property
    def family(self) -> str:
        """The runtime family running the model ("llava", "qwen2vl", ...)."""
        return self.engine.family.name

    @property
    def n_ctx(self) -> int:
        return self.engine.n_ctx

    @property
    def n_vocab(self) -> int:
        return self.engine.n_vocab

    @property
    def vision_engine(self) -> str | None:
        """"kernels" or "mtmd" (None without a projector)."""
        return self.engine.vision_engine

    @property
    def encoder_calls(self) -> int:
        """How many times the vision encoder ran (cache hits do not count)."""
        return self.engine.encoder_calls

    @property
    def caching(self) -> bool:
        """Whether the on-disk caches (embeddings, KV snapshots) are on."""
        return self.engine.caching

    @property
    def last_prefill(self) -> PrefillStats:
        """What the most recent prefill (a request's, or a :meth:`prepare`) reused, encoded and evaluated."""
        return self.engine.last_prefill

    @property
    def settings(self) -> RuntimeSettings:
        return self.engine.settings()

    def tokenize(self, text: str) -> list[int]:
        """The LLM's tokens for ``text`` (no special tokens added)."""
        return self.engine.tokenize(text)

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` was called."""
        return self.engine.closed

    def close(self) -> None:
        """Free the weights, context, projector and RAM caches now; idempotent.

        Waits for a request in progress. The native memory goes back to the
        system (the process's RSS returns near its level before the load);
        later calls raise :class:`~edgevlm.errors.InvalidRequestError`. Also
        done on garbage collection and by ``with edgevlm.load(...) as vlm:``.
        """
        self.engine.close()

    def __enter__(self) -> VLM:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ----------------------------------------------------------------- chat
    def chat(self, messages: Messages, *, max_tokens: int = 512, temperature: float = 0.2,
             top_p: float = 0.95, top_k: int = 40, min_p: float = 0.05,
             repeat_penalty: float = 1.0, seed: int | None = None,
             stop: str | Sequence[str] | None = None, max_image_tokens: int | None = None,
             cancel: CancelToken | None = None, grammar: str | None = None,
             logprobs: int | None = None) -> Reply:
        """Answer the conversation ``messages``.

        Args:
            messages: OpenAI / transformers style messages; image parts are
                ``{"type": "image", "image": path | bytes | PIL.Image}`` or
                ``{"type": "image_url", "image_url": {"url": "data:..."}}``.
            max_tokens, temperature, top_p, top_k, min_p, repeat_penalty, seed,
            stop: sampling options as in the OpenAI API (temperature 0 = greedy).
            max_image_tokens: this request's image-token budget per image
                (overrides the one given to :func:`load`).
            cancel: a :class:`threading.Event` (anything with ``is_set()``, which is
                asked from a watcher thread too, so it must be thread-safe);
                setting it, from any thread, stops the prefill before its next
                chunk or, on the CPU, within about 20 ms inside the
                chunk being read (the LLM's graph; mllama's encoder too), and
                the reply before its next token (finish reason "cancelled";
                the engine keeps the chunks evaluated before for reuse).
            grammar: GBNF text (start rule ``root``) the reply must follow,
                e.g. :func:`edgevlm.json_grammar` of a JSON schema.
            logprobs: None, or how many alternatives to report per token
                (0-20): ``Reply.logprobs`` then holds each generated token's
                log-probability under the model and its most likely alternatives.

        Returns:
            A :class:`Reply` (``str(reply)`` is the text; it also carries
            ``finish_reason``, token counts, timings and ``logprobs``).

        Raises:
            InvalidRequestError, ImageError, ContextOverflowError.
        """
        return self.stream(messages, max_tokens=max_tokens, temperature=temperature, top_p=top_p,
                           top_k=top_k, min_p=min_p, repeat_penalty=repeat_penalty, seed=seed,
                           stop=stop, max_image_tokens=max_image_tokens, cancel=cancel, grammar=grammar,
                           logprobs=logprobs).reply()

    def stream(self, messages: Messages, *, max_tokens: int = 512, temperature: float = 0.2,
               top_p: float = 0.95, top_k: int = 40, min_p: float = 0.05,
               repeat_penalty: float = 1.0, seed: int | None = None,
               stop: str | Sequence[str] | None = None, max_image_tokens: int | None = None,
               cancel: CancelToken | None = None, grammar: str | None = None,
               logprobs: int | None = None) -> TextStream:
        """Like :meth:`chat`, yielding the reply piece by piece.

        Returns:
            A :class:`~edgevlm.generation.TextStream`: iterate it for text
            pieces; its ``stats`` (token counts, timings, what the prefill
            reused) are set once it has finished, its ``logprobs`` grow with
            the tokens. ``cancel.set()`` (any thread) or ``close()`` stops
            decoding within one token; the stream then ends with finish
            reason "cancelled". The model serves no other request until the
            stream has ended or been closed.

        Raises:
            InvalidRequestError, ImageError (at once, once a call running in
            another thread has ended); ContextOverflowError (when iterated).
        """
        stops = (stop,) if isinstance(stop, str) else tuple(stop or ())
        options = SamplingOptions(max_tokens=max_tokens, temperature=temperature, top_p=top_p,
                                  top_k=top_k, min_p=min_p, repeat_penalty=repeat_penalty, seed=seed,
                                  stop=stops, grammar=grammar, logprobs=logprobs)
        return self.engine.generate(normalize_messages(messages), options, max_image_tokens=max_image_tokens,
                                    cancel=cancel)

    def prepare(self, messages: Messages, *, max_image_tokens: int | None = None,
                cancel: CancelToken | None = None) -> PrefillStats:
        """Encode the images and read the prompt of a turn whose question is not written yet.

        Call it when the user attaches an image (``messages`` ends with the
        user message holding it, text optional), e.g. from a worker thread
        while they type: the images are encoded and everything up to where the
        question goes is evaluated, so the :meth:`chat` / :meth:`stream` call
        with the question only reads the question. Nothing is generated; a
        request that arrives meanwhile waits for it, and reuses what it did.

        Args:
            messages: the conversation so far, ending with the user's images.
            max_image_tokens: the image-token budget (as in :meth:`chat`).
            cancel: as in :meth:`chat`; stops before the next chunk, or inside one.

        Returns:
            What the prefill reused, encoded and evaluated
            (:class:`~edgevlm.stats.PrefillStats`).

        Raises:
            InvalidRequestError, ImageError, ContextOverflowError: as :meth:`chat` would.
        """
        stop = cancel.is_set if cancel is not None else None
        return self.engine.prepare(normalize_messages(messages), max_image_tokens=max_image_tokens,
                                   cancelled=lambda: self.engine.closed or bool(stop and stop()))

    # ----------------------------------------------------------------- analysis
    def prompt_chunks(self, messages: Messages, *, add_generation_prompt: bool = True,
                      max_image_tokens: int | None = None) -> list[Chunk]:
        """The chunks (text tokens, image chunks) the model sees for ``messages``."""
        return self.engine.prompt_chunks(normalize_messages(messages), gen=add_generation_prompt,
                                         max_image_tokens=max_image_tokens)

    def prompt_text(self, messages: Messages, *, add_generation_prompt: bool = True) -> str:
        """The rendered prompt, images shown as the media marker."""
        return self.engine.prompt_text(normalize_messages(messages), gen=add_generation_prompt)

    def next_token_logits(self, messages: Messages, *, add_generation_prompt: bool = True,
                          max_image_tokens: int | None = None) -> np.ndarray:
        """Logits (n_vocab,) of the token after the prompt (generation prompt added)."""
        return self.engine.next_token_logits(normalize_messages(messages), gen=add_generation_prompt,
                                             max_image_tokens=max_image_tokens)

    def score_choices(self, messages: Messages, choices: Sequence[str], *,
                      max_image_tokens: int | None = None) -> ChoiceScores:
        """How likely each of ``choices`` is as the reply to ``messages``: the answer is always one of them.

        The prompt is prefilled once (with the usual prefix reuse); each
        choice's tokens are then evaluated after it and dropped again. A
        choice's log-probability sums its tokens' log-softmax; see
        :mod:`edgevlm.scoring` for tokenisation and choices that extend others.

        Args:
            messages: the conversation (as in :meth:`chat`), ending with the question.
            choices: at least two distinct answers.
            max_image_tokens: this request's image-token budget (as in :meth:`chat`).

        Returns:
            A :class:`~edgevlm.scoring.ChoiceScores` (``choice``, ``probabilities``,
            ``logprobs``, ``next_logprobs``, ``prefill``).

        Raises:
            InvalidRequestError: fewer than two, empty or repeated choices.
            ImageError, ContextOverflowError: as :meth:`chat`.
        """
        return self.engine.score_choices(normalize_messages(messages), choices, max_image_tokens=max_image_tokens)

    def generate_choice(self, messages: Messages, choices: Sequence[str], *,
                        max_image_tokens: int | None = None) -> ChoiceGeneration:
        """Greedy decoding under a grammar that admits only ``choices`` (the alternative to scoring).

        Returns:
            A :class:`~edgevlm.scoring.ChoiceGeneration` (``choice``, ``index``, ``tokens``).

        Raises:
            InvalidRequestError, ImageError, ContextOverflowError: as :meth:`score_choices`.
        """
        return self.engine.generate_choice(normalize_messages(messages), choices,
                                           max_image_tokens=max_image_tokens)

    @property
    def identity(self) -> str:
        """A stable identity of the model files (LLM and projector: sizes and content hashes)."""
        from edgevlm.cache import file_identity

        parts = [file_identity(self.files.llm)]
        if self.files.mmproj is not None:
            parts.append(file_identity(self.files.mmproj))
        return "/".join(parts)

    def embed_image(self, image: ImageInput, *, cache: bool = True, max_image_tokens: int | None = None) -> np.ndarray:
        """The projected image embeddings the LLM receives: (n_image_tokens, n_embd).

        Args:
            image: a path, bytes, data URL or PIL image.
            cache: look the embeddings up in (and add them to) the caches;
                False runs the vision encoder every time (for timing it).
            max_image_tokens: the image-token budget (as in :meth:`chat`).

        Raises:
            UnsupportedModelError: the model has no projector.
            ImageError: the image cannot be read.
        """
        return self.engine.embed_image(load_image(image), cache=cache, max_image_tokens=max_image_tokens)

    def image_cost(self, width: int, height: int, *, max_image_tokens: int | None = None) -> ImageCost:
        """What an image of ``width`` x ``height`` pixels costs in the context, before encoding it.

        Args:
            width, height: the image's size.
            max_image_tokens: the budget (as in :meth:`chat`; None: the load default).

        Raises:
            UnsupportedModelError: the model has no projector.
        """
        return self.engine.image_cost(width, height, max_image_tokens)

    def tower_pixels(self, image: ImageInput) -> np.ndarray:
        """``image`` preprocessed as the projector file declares, as one vision-tower view: (3, S, S) float32.

        What a reference implementation of the tower is fed (``edgevlm bench
        --reference torch``); read from the projector's header, whichever engine runs it.

        Raises:
            UnsupportedModelError: no projector, or one the kernels engine cannot describe.
            ImageError: the image cannot be read.
        """
        return self.engine.tower_pixels(load_image(image))

    def reset(self) -> None:
        """Forget the cached conversations (the next call evaluates from scratch)."""
        self.engine.reset()

    @contextmanager
    def isolated_caches(self) -> Iterator[Path]:
        """Run with empty caches on a temporary cache directory (yielded); yours are untouched.

        For cold measurements: the RAM caches, the parked conversations and
        the KV cache start empty, and disk entries go to a temporary folder
        removed afterwards. The block holds the model's lock: calls from other
        threads wait until it ends, so do not wait in it for a thread that uses
        the model.
        """
        with tempfile.TemporaryDirectory(prefix="edgevlm-isolated-") as tmp:
            with self.engine.isolated_caches(Path(tmp)):
                yield Path(tmp)
