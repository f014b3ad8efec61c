"""The memory planner: what a model, its context and its largest image will take, before loading.

Everything comes from the GGUF headers (:mod:`edgevlm.descriptor`) and the
model family: LLM weights (per layer, per device), the KV cache, llama.cpp's
compute and output buffers, the projector's weights, the vision encoder's
compute for the largest image the budget allows, the image itself while it is
decoded, its embeddings, the KV copies a snapshot or a parked conversation
takes, and the process (interpreter + libraries, measured in this process).

The formulas were fitted to what llama.cpp 0.3.36's own logs report and to
peak RSS measured on the CPU (see README "Fit the machine"):

* KV cache: ``n_layer * n_ctx * (n_embd_k + n_embd_v) * bytes(kv_type)``;
* compute buffer: the larger of the attention phase (without flash attention
  the KQ scores ``n_head * n_ctx * n_ubatch`` f32, plus an FFN and a few
  hidden states per ubatch row) and the output phase (``n_vocab`` logits per
  ubatch row);
* vision compute per view (flash attention, as both engines run it):
  ``T * (n_ff + 4 * width)`` f32 for ``T`` tokens; batched views add up.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from edgevlm import constants as C
from edgevlm.chunks import answer_reserve
from edgevlm.descriptor import ModelDescriptor
from edgevlm.embeddings import DEFAULT_RAM_BYTES
from edgevlm.errors import InvalidRequestError
from edgevlm.gguf_info import TensorInfo
from edgevlm.parking import DEFAULT_PARK_BYTES

if TYPE_CHECKING:  # pragma: no cover
    from edgevlm.families.base import Family
    from edgevlm.kernels.tower_weights import WeightChoice

MiB = 1 << 20
#: Bytes per KV element by type (ggml block sizes: q8_0 34 B / 32, q4_0 18 B / 32).
KV_BYTES = {"f32": 4.0, "f16": 2.0, "bf16": 2.0, "q8_0": 34 / 32, "q4_0": 18 / 32}
#: Context llama.cpp creates when none is asked for (see edgevlm.llm.DEFAULT_CTX).
DEFAULT_CTX = 4096
#: The RAM caches' parts (capped by a memory budget, else at their defaults and not priced).
CACHE_PARTS = ("embedding cache", "parked states")
#: Threads' stacks, allocator slack and small buffers not counted elsewhere (measured: 5-10 MiB).
RUNTIME_SLACK = 8 * MiB


@dataclass(frozen=True)
class MemoryPart:
    """One consumer of memory.

    Attributes:
        name: what it is ("llm weights", "kv cache", ...).
        device: where ("CPU", or a GPU device name).
        nbytes: how much.
        detail: how it was computed, for people.
        phase: "" for memory held throughout; else the phase it is held in (say "encode" or
            "decode"): parts of different phases are never held together, so a plan's total
            counts only its largest phase (:func:`peak_bytes`).
    """

    name: str
    device: str
    nbytes: int
    detail: str = ""
    phase: str = ""


def peak_bytes(parts: Sequence[MemoryPart]) -> int:
    """What ``parts`` hold at their peak: those held throughout plus the largest phase's."""
    phases: dict[str, int] = {}
    for part in parts:
        phases[part.phase] = phases.get(part.phase, 0) + part.nbytes
    held = phases.pop("", 0)
    return held + max(phases.values(), default=0)


@dataclass(frozen=True)
class PlanSettings:
    """What the plan assumed (the settings a load with it uses)."""

    n_ctx: int
    n_batch: int
    n_ubatch: int
    kv_type: str
    flash_attn: bool
    n_gpu_layers: int
    image_tokens: int
    image_views: int
    vision_device: str
    cache: bool


@dataclass(frozen=True)
class MemoryPlan:
    """Bytes per part and device, and the totals."""

    parts: tuple[MemoryPart, ...]
    settings: PlanSettings
    budget_bytes: int | None = None
    suggestions: tuple[str, ...] = field(default=())
    vram_budget_bytes: int | None = None

    @property
    def ram_bytes(self) -> int:
        """Host memory the process peaks at (the largest phase counted, see :func:`peak_bytes`)."""
        return peak_bytes([p for p in self.parts if p.device == "CPU"])

    @property
    def vram_bytes(self) -> dict[str, int]:
        """Device memory per GPU device (at its largest phase)."""
        devices = dict.fromkeys(p.device for p in self.parts if p.device != "CPU")
        return {d: peak_bytes([p for p in self.parts if p.device == d]) for d in devices}

    @property
    def fits(self) -> bool:
        total_ok = self.budget_bytes is None or self.ram_bytes + sum(self.vram_bytes.values()) <= self.budget_bytes
        return total_ok and (self.vram_budget_bytes is None
                             or all(n <= self.vram_budget_bytes for n in self.vram_bytes.values()))

    def cache_caps(self) -> tuple[int, int]:
        """(RAM embedding cache, parked states) byte caps: their defaults, or what the budget leaves.

        Without a budget the defaults (:data:`DEFAULT_RAM_BYTES`, :data:`DEFAULT_PARK_BYTES`); with one,
        the room left after the other parts, a quarter of it to embeddings and the rest to parking.
        """
        if self.budget_bytes is None:
            return DEFAULT_RAM_BYTES, DEFAULT_PARK_BYTES
        # the caches live in RAM: what the budget leaves after every other part, RAM or VRAM
        fixed = [p for p in self.parts if p.name not in CACHE_PARTS]
        room = max(self.budget_bytes - peak_bytes(fixed), 0)
        embeddings = min(DEFAULT_RAM_BYTES, room // 4)
        return embeddings, min(DEFAULT_PARK_BYTES, room - embeddings)

    def by_name(self, name: str) -> int:
        return sum(p.nbytes for p in self.parts if p.name == name)

    def as_json(self) -> dict[str, object]:
        """The plan as JSON-able data (``edgevlm plan --json``)."""
        from dataclasses import asdict

        return {"ram_bytes": self.ram_bytes, "vram_bytes": self.vram_bytes, "fits": self.fits,
                "budget_bytes": self.budget_bytes, "vram_budget_bytes": self.vram_budget_bytes, "parts": [asdict(p) for p in self.parts],
                "settings": asdict(self.settings), "suggestions": list(self.suggestions)}

    def refusal(self) -> str:
        """The one-line refusal of a plan over its budget: the numbers and the cheapest ways to fit."""
        tries = ", ".join(self.suggestions)
        total = " (RAM and VRAM together)" if self.vram_bytes else ""
        budgets = [f"the memory budget is {gib(self.budget_bytes)}{total}"] if self.budget_bytes is not None else []
        if self.vram_budget_bytes is not None:
            budgets.append(f"the VRAM budget is {gib(self.vram_budget_bytes)}")
        return (f"{self.summary()}; {', '.join(budgets)}"
                + (f"; try {tries}" if tries else ""))

    def table(self) -> list[str]:
        """Human-readable lines: settings, parts (largest first), totals."""
        s = self.settings
        lines = [f"context {s.n_ctx} ({s.kv_type} KV), batch {s.n_batch}, largest image {s.image_tokens} "
                 f"tokens in {s.image_views} view(s) on {s.vision_device}"]
        lines += [f"  {p.name:20s} {p.device:6s} {gib(p.nbytes):>10s}  "
                  + (f"[{p.phase} phase] " if p.phase else "") + p.detail
                  for p in sorted(self.parts, key=lambda p: -p.nbytes)]
        if any(p.phase for p in self.parts):
            lines.append("  (parts of different phases are not held together: the largest phase counts)")
        lines.append(f"RAM {gib(self.ram_bytes)}" + "".join(f", {d} {gib(n)}" for d, n in self.vram_bytes.items()))
        return lines

    def summary(self) -> str:
        """One line: RAM and each device's VRAM, and the main parts (for refusals)."""
        order = sorted(self.parts, key=lambda p: -p.nbytes)[:5]
        parts = ", ".join(f"{p.name}{'' if p.device == 'CPU' else ' on ' + p.device} {gib(p.nbytes)}"
                          for p in order)
        vram = "".join(f" and {gib(n)} of VRAM on {d}" for d, n in self.vram_bytes.items())
        return f"needs {gib(self.ram_bytes)} of RAM{vram} ({parts})"


def gib(n: int) -> str:
    return f"{n / (1 << 30):.2f} GiB" if n >= 1 << 30 else f"{n / MiB:.0f} MiB"


def parse_budget(budget: int | str) -> tuple[int | None, int | None]:
    """A memory budget -> (total bytes, VRAM bytes per GPU): ``"6GiB"``, ``"6GiB,vram=4GiB"``, ``"vram=4GiB"``.

    Raises:
        InvalidRequestError: not a size.
    """
    if not isinstance(budget, str):
        return int(budget), None
    total = vram = None
    for item in (part.strip() for part in budget.split(",") if part.strip()):
        if item.lower().startswith("vram="):
            vram = parse_size(item[5:])
        else:
            total = parse_size(item)
    if total is None and vram is None:
        raise InvalidRequestError(f"{budget!r} is not a memory size; write e.g. 800MiB, 1.5GiB or 6GiB,vram=4GiB")
    return total, vram


def tensor_bytes(info: TensorInfo) -> int:
    """Bytes a tensor of this ggml type and shape takes."""
    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

    block, size = GGML_QUANT_SIZES[GGMLQuantizationType(info.ggml_type)]
    return math.prod(info.shape) // block * size


def parse_size(text: str) -> int:
    """``"300MiB"``, ``"1.5G"``, ``"2GiB"``, ``"800M"``, ``"123456"`` -> bytes.

    Raises:
        InvalidRequestError: not a size.
    """
    units = {"": 1, "b": 1, "k": 1 << 10, "kb": 1000, "kib": 1 << 10, "m": MiB, "mb": 10**6,
             "mib": MiB, "g": 1 << 30, "gb": 10**9, "gib": 1 << 30, "t": 1 << 40, "tib": 1 << 40}
    raw = text.strip().lower().replace(" ", "")
    number = raw.rstrip("abcdefghijklmnopqrstuvwxyz")
    unit = raw[len(number):]
    try:
        value = float(number)
    except ValueError:
        value = -1.0
    if unit not in units or value <= 0:
        raise InvalidRequestError(f"{text!r} is not a memory size; write e.g. 800MiB, 1.5GiB or 4G")
    return int(value * units[unit])


@dataclass(frozen=True)
class LLMShape:
    """The LLM's sizes that memory depends on (from its header)."""

    n_layer: int
    n_embd: int
    n_ff: int
    n_head: int
    n_head_kv: int
    head_dim_k: int
    head_dim_v: int
    n_vocab: int
    n_ctx_train: int

    @classmethod
    def of(cls, model: ModelDescriptor) -> LLMShape:
        def key(name: str, default: int = 0) -> int:
            value = model.llm_key(name)
            if isinstance(value, list):  # per-layer arrays (hybrid models): the largest
                value = max(value) if value else default
            return int(value) if value is not None else default

        n_embd, n_head = key("embedding_length"), max(key("attention.head_count", 1), 1)
        head_dim = n_embd // n_head
        tokens = model.llm_metadata.get("tokenizer.ggml.tokens")
        n_vocab = getattr(tokens, "length", None) or (len(tokens) if isinstance(tokens, list) else 0)
        return cls(n_layer=key("block_count"), n_embd=n_embd, n_ff=key("feed_forward_length"),
                   n_head=n_head, n_head_kv=key("attention.head_count_kv", n_head),
                   head_dim_k=key("attention.key_length", head_dim), head_dim_v=key("attention.value_length", head_dim),
                   n_vocab=int(n_vocab), n_ctx_train=key("context_length"))

    def kv_bytes_per_position(self, kv_type: str) -> float:
        return self.n_layer * self.n_head_kv * (self.head_dim_k + self.head_dim_v) * KV_BYTES[kv_type]


def _layer_of(name: str) -> int | None:
    if name.startswith("blk."):
        try:
            return int(name.split(".")[1])
        except ValueError:
            return None
    return None


def llm_weight_parts(model: ModelDescriptor, shape: LLMShape, n_gpu_layers: int, gpu: str | None) -> list[MemoryPart]:
    """Weights per device: the last ``n_gpu_layers`` blocks (and the output layer when all are) on the GPU."""
    offloaded = 0 if gpu is None else (shape.n_layer + 1 if n_gpu_layers < 0 else min(n_gpu_layers, shape.n_layer + 1))
    first_gpu = shape.n_layer - min(offloaded, shape.n_layer)
    cpu = dev = 0
    for info in model.llm.tensors:
        layer = _layer_of(info.name)
        on_gpu = gpu is not None and ((layer is not None and layer >= first_gpu)
                                      or (info.name.startswith("output") and offloaded > shape.n_layer))
        if on_gpu:
            dev += tensor_bytes(info)
        else:
            cpu += tensor_bytes(info)
    parts = [MemoryPart("llm weights", "CPU", cpu, f"{shape.n_layer - min(offloaded, shape.n_layer)} of "
                        f"{shape.n_layer} layers, token embeddings (memory-mapped)")]
    if dev:
        parts.append(MemoryPart("llm weights", gpu or "GPU", dev, f"{min(offloaded, shape.n_layer)} layers"))
    return parts


def llm_compute_bytes(shape: LLMShape, n_ctx: int, n_ubatch: int, flash_attn: bool) -> int:
    """llama.cpp's CPU compute buffer for one ubatch: the larger of its attention and output phases.

    Fitted to llama.cpp 0.3.36's ``compute buffer size`` log lines (0.5B- and
    tiny-shaped Llamas, contexts 512-4096, ubatches 256-2048: within 3 %):
    without flash attention the KQ scores and the f32 mask (``n_head + 1``
    f32 per row and cell) plus 7 hidden rows; with it an f16 mask plus 12
    hidden rows (or the FFN's, if wider); the output phase holds the logits
    of every row of the ubatch.
    """
    f32 = 4
    if flash_attn:
        attention = n_ubatch * n_ctx * 2 + n_ubatch * max(12 * shape.n_embd, 2 * shape.n_ff + 2 * shape.n_embd) * f32
    else:
        attention = n_ubatch * n_ctx * (shape.n_head + 1) * f32 + n_ubatch * 7 * shape.n_embd * f32
    output = n_ubatch * (shape.n_vocab + 2 * shape.n_embd) * f32
    return int(max(attention, output))


@dataclass(frozen=True)
class PlanRequest:
    """What to plan for.

    Attributes:
        n_ctx: context (None: the training context, at most 4096).
        n_batch: prompt batch (ubatch = batch).
        kv_type: KV cache type.
        flash_attn: None: llama.cpp's CPU default (off, on for a quantised KV cache).
        n_gpu_layers: layers offloaded (-1 all; ignored without a GPU).
        image_size: the largest image (w, h); None: the largest the budget allows.
        max_image_tokens: the image-token budget.
        cache: disk caches on (snapshots copy the KV state).
        vision_engine: "auto", "kernels" or "mtmd".
        tiles: "none" or "grid".
        memory_budget: bytes the process may take, RAM and VRAM together (None: no limit).
        vram_budget: bytes each GPU may take (None: its free memory less a margin).
        gpu: the GPU device name when the build has one and layers go there.
        projector_on_gpu: the vision tower runs on that GPU.
    """

    n_ctx: int | None = None
    n_batch: int = 512
    kv_type: str = "f16"
    flash_attn: bool | None = None
    n_gpu_layers: int = -1
    image_size: tuple[int, int] | None = None
    max_image_tokens: int | None = None
    cache: bool = True
    vision_engine: str = C.VISION_ENGINE_AUTO
    tiles: str = "none"
    memory_budget: int | None = None
    vram_budget: int | None = None
    gpu: str | None = None
    projector_on_gpu: bool = False


#: Images tried when no size is given: the largest plan over these is priced.
LARGEST_IMAGES = ((4096, 4096), (4096, 2048), (2048, 4096), (4096, 1024), (1024, 4096), (4096, 3072))
#: Positions of text around an image counted for KV copies (snapshots, parking).
TEXT_AROUND_IMAGE = 256


def plan_memory(model: ModelDescriptor, family: Family, request: PlanRequest,
                process_bytes: int) -> MemoryPlan:
    """Price a model, its context and its largest image, without loading weights.

    Args:
        model: both headers.
        family: the model's family (views and image tokens).
        request: the settings.
        process_bytes: the interpreter and libraries (measured by the caller).

    Returns:
        The plan (``fits`` against ``request.memory_budget``).
    """
    own = family.own_memory_plan(request, process_bytes)
    parts, settings = own if own is not None else _llama_cpp_parts(model, family, request, process_bytes)
    plan = MemoryPlan(tuple(parts), settings, request.memory_budget, vram_budget_bytes=request.vram_budget)
    if not plan.fits:
        return MemoryPlan(plan.parts, settings, request.memory_budget,
                          tuple(suggest(model, family, request, process_bytes, plan)), request.vram_budget)
    if request.memory_budget is None or own is not None:
        return plan
    embeddings, parked = plan.cache_caps()  # the RAM caches get what the budget leaves, and are shown
    return MemoryPlan(plan.parts + (
        MemoryPart(CACHE_PARTS[0], "CPU", embeddings if model.projector is not None else 0,
                   "RAM LRU of image embeddings, capped by the budget"),
        MemoryPart(CACHE_PARTS[1], "CPU", parked, "RAM LRU of parked conversations, capped by the budget")),
        settings, request.memory_budget, vram_budget_bytes=request.vram_budget)


def _llama_cpp_parts(model: ModelDescriptor, family: Family, request: PlanRequest,
                     process_bytes: int) -> tuple[list[MemoryPart], PlanSettings]:
    """The parts of a model run by llama.cpp (+ a vision engine), and the settings they assume."""
    shape = LLMShape.of(model)
    n_ctx = context_for(model, request.n_ctx)
    flash = request.flash_attn if request.flash_attn is not None else request.kv_type in C.QUANTISED_KV_TYPES
    gpu = request.gpu if request.n_gpu_layers != 0 else None
    parts = [MemoryPart("process", "CPU", process_bytes, "interpreter and libraries, measured"),
             MemoryPart("runtime", "CPU", RUNTIME_SLACK, "threads' stacks, allocator slack, small buffers")]
    parts += llm_weight_parts(model, shape, request.n_gpu_layers, gpu)
    kv = int(shape.kv_bytes_per_position(request.kv_type) * n_ctx)
    on_gpu = 0 if gpu is None else (shape.n_layer if request.n_gpu_layers < 0 else min(request.n_gpu_layers, shape.n_layer))
    for device, layers in (("CPU", shape.n_layer - on_gpu), (gpu, on_gpu)):
        if layers and device:  # each layer's KV lives with the layer
            parts.append(MemoryPart("kv cache", device, kv * layers // max(shape.n_layer, 1),
                                    f"{layers} layers x {n_ctx} cells, {request.kv_type}"))
    cost, views, engine = _image_plan(model, family, request, n_ctx)
    n_ubatch = image_ubatch(request.n_batch, n_ctx, cost, projector_non_causal(model))
    parts.append(MemoryPart("llm compute", gpu or "CPU", llm_compute_bytes(shape, n_ctx, n_ubatch, flash),
                            f"ubatch {n_ubatch}, flash attention {'on' if flash else 'off'}"))
    parts.append(MemoryPart("llm output", "CPU", shape.n_vocab * 4, "logits of one position"))
    if model.projector is not None:
        parts += _vision_parts(model, shape, request, cost, views, engine)
    settings = PlanSettings(n_ctx=n_ctx, n_batch=n_ubatch, n_ubatch=n_ubatch, kv_type=request.kv_type,
                            flash_attn=flash, n_gpu_layers=request.n_gpu_layers if gpu else 0,
                            image_tokens=cost, image_views=views, vision_device=engine, cache=request.cache)
    return parts, settings


def context_for(model: ModelDescriptor, n_ctx: int | None) -> int:
    """The context a load creates: ``n_ctx``, else min(DEFAULT_CTX, the training context); 0: the training one.

    Checked from the GGUF header, before any weights are read.

    Raises:
        InvalidRequestError: more than the model was trained for (its answers
            degrade past it; llama.cpp would only log a line).
    """
    value = model.llm_key("context_length")
    train = int(value) if isinstance(value, int) and value > 0 else 0
    if not n_ctx:
        return (train or DEFAULT_CTX) if n_ctx == 0 else (min(DEFAULT_CTX, train) if train else DEFAULT_CTX)
    if 0 < train < n_ctx:
        raise InvalidRequestError(
            f"a context of {n_ctx} tokens is more than the {train} {model.files.llm.name} was trained "
            f"for; use --ctx {train} / n_ctx={train} or less")
    return n_ctx


#: Projector types whose image tokens attend to each other (libmtmd's ``mtmd_decode_use_non_causal``).
NON_CAUSAL_PROJECTOR_TYPES = ("gemma3", "gemma3nv", "gemma4v", "gemma4uv")


def projector_non_causal(model: ModelDescriptor) -> bool:
    """Whether the projector's image chunks are decoded non-causally (one chunk per ubatch)."""
    return model.projector is not None and model.projector.projector_type in NON_CAUSAL_PROJECTOR_TYPES


def image_ubatch(n_batch: int, n_ctx: int, largest_chunk: int, non_causal: bool) -> int:
    """The batch (= ubatch) a context needs: ``n_batch``, raised to the largest image chunk when
    image tokens attend to each other (such a chunk must be decoded in one ubatch); at most ``n_ctx``.

    The one rule :func:`plan_memory` prices and :func:`edgevlm.load` creates the context with.
    """
    if not non_causal:
        return n_batch
    return max(n_batch, min(largest_chunk, n_ctx))


def largest_image_chunk(model: ModelDescriptor, family: Family, n_ctx: int, max_image_tokens: int | None,
                        vision_engine: str) -> int:
    """Tokens of the largest image the budget allows (headers only; what :func:`plan_memory` prices)."""
    request = PlanRequest(n_ctx=n_ctx, max_image_tokens=max_image_tokens, vision_engine=vision_engine)
    return _image_plan(model, family, request, n_ctx)[0]


def _image_plan(model: ModelDescriptor, family: Family, request: PlanRequest, n_ctx: int) -> tuple[int, int, str]:
    """(image tokens, views, engine) of the largest image the request allows."""
    if model.projector is None:
        return 0, 0, "none"
    engine = family.choose_engine(request.vision_engine)
    cap = max(1, n_ctx - answer_reserve(n_ctx))
    budget = min(request.max_image_tokens, cap) if request.max_image_tokens else cap
    sizes = [request.image_size] if request.image_size else list(LARGEST_IMAGES)
    best: tuple[int, int] | None = None
    for width, height in sizes:
        cost = family.planned_image_cost(width, height, budget, engine)
        if cost is not None and (best is None or cost.tokens > best[0]):
            best = (cost.tokens, cost.views)
    if best is None:  # libmtmd plans it: price the budget, in views of the tower's size
        per_view = _tower_tokens(model)
        tokens = budget if family.single_view is False else per_view
        if model.projector.projector_type == "gemma3":  # one pooled view (256 tokens at 896 px)
            scale = int(model.projector.metadata.get("clip.vision.projector.scale_factor", 4))
            per_view = tokens = max(1, per_view // max(scale, 1) ** 2)
        best = (tokens, max(1, math.ceil(tokens / max(per_view, 1))))
    return best[0], best[1], engine


def projector_weight_bytes(model: ModelDescriptor, engine: str, *, on_cpu: bool,
                           is_matrix: Callable[[str, tuple[int, ...]], bool] | None = None) -> int:
    """The projector's weights as loaded (see :func:`loaded_tower_bytes`; libmtmd loads the file's types).

    ``is_matrix`` names the kernels engine's converted ``mul_mat`` weights (default: the CLIP/SigLIP
    towers', :data:`edgevlm.kernels.tower_weights.MATMUL_WEIGHT`; mllama passes its encoder's rule).
    """
    assert model.projector is not None
    tensors = model.projector.header.tensors
    if engine != C.VISION_ENGINE_KERNELS or not on_cpu:
        return sum(tensor_bytes(t) for t in tensors)
    if is_matrix is None:
        from edgevlm.kernels.tower_weights import MATMUL_WEIGHT

        def is_matrix(name: str, shape: tuple[int, ...]) -> bool:
            return bool(MATMUL_WEIGHT.match(name)) and len(shape) == 2
    return loaded_tower_bytes(tensors, is_matrix)


def loaded_tower_choice(tensors: Sequence[TensorInfo], is_matrix: Callable[[str, tuple[int, ...]], bool]) -> WeightChoice:
    """What ``auto`` does to a kernels-engine tower's matrices on the CPU at load (a ``WeightChoice``:
    :func:`edgevlm.kernels.tower_weights.auto_weight_type`)."""
    from edgevlm import amx_guard, native
    from edgevlm.kernels.tower_weights import auto_weight_type

    amx = amx_guard.amx_status()
    return auto_weight_type({t.ggml_type for t in tensors if is_matrix(t.name, t.shape)},
                            amx=amx.built and amx.usable, avx512_bf16="AVX512_BF16 = 1" in native.system_info())


def loaded_tower_bytes(tensors: Sequence[TensorInfo], is_matrix: Callable[[str, tuple[int, ...]], bool]) -> int:
    """A kernels-engine tower's weights on the CPU as loaded: ``auto`` converts f16 matrices at load (Q8_0
    where ggml's AMX path is usable: :func:`edgevlm.kernels.tower_weights.auto_weight_type`)."""
    from edgevlm.kernels.tower_weights import loaded_matrix_bytes

    matrices = [t for t in tensors if is_matrix(t.name, t.shape)]
    choice = loaded_tower_choice(tensors, is_matrix)
    names = {t.name for t in matrices}
    return (sum(tensor_bytes(t) for t in tensors if t.name not in names)
            + sum(loaded_matrix_bytes(t.shape, t.ggml_type, choice) for t in matrices))


def _tower_tokens(model: ModelDescriptor) -> int:
    meta = model.projector.metadata if model.projector else {}
    size, patch = int(meta.get("clip.vision.image_size", 336)), int(meta.get("clip.vision.patch_size", 14))
    return max(1, (size // max(patch, 1)) ** 2)


def _vision_parts(model: ModelDescriptor, shape: LLMShape, request: PlanRequest, tokens: int, views: int,
                  engine: str) -> list[MemoryPart]:
    """Projector weights, the tower's compute for ``views`` views, the image and its embeddings."""
    assert model.projector is not None
    meta = model.projector.metadata
    device = request.gpu if request.projector_on_gpu and request.gpu else "CPU"
    weights = projector_weight_bytes(model, engine, on_cpu=device == "CPU")
    width = int(meta.get("clip.vision.embedding_length", 1024))
    n_ff = int(meta.get("clip.vision.feed_forward_length", 4 * width))
    per_view = (_tower_tokens(model) + 1) * (n_ff + 4 * width) * 4
    w, h = request.image_size or (4096, 3072)
    scale = min(1.0, 4096 / max(w, h))
    pixels = int(w * scale) * int(h * scale)
    embd = tokens * shape.n_embd * 4 * (2 if request.cache else 1)
    kv_copies = int(shape.kv_bytes_per_position(request.kv_type) * (tokens + TEXT_AROUND_IMAGE)) * 2
    parts = [MemoryPart("projector weights", device, weights, f"{engine} engine"),
             MemoryPart("vision compute", device, per_view * views, f"{views} view(s) of the tower"),
             MemoryPart("image decode", "CPU", pixels * 3 * 2, f"{int(w * scale)}x{int(h * scale)} RGB"),
             MemoryPart("image embeddings", "CPU", embd, f"{tokens} tokens")]
    if request.cache:
        parts.append(MemoryPart("kv snapshot copies", "CPU", kv_copies, "the image prefix's KV state, saved once"))
    return parts


def suggest(model: ModelDescriptor, family: Family, request: PlanRequest, process_bytes: int,
            plan: MemoryPlan) -> list[str]:
    """The cheapest changes that would fit the budget (each tried alone), cheapest first."""
    import dataclasses

    if request.memory_budget is None:
        return ["fewer GPU layers (--gpu-layers N)"] if request.vram_budget is not None else []
    tries: list[tuple[str, PlanRequest]] = []
    for n_ctx in (2048, 1024, 512):
        if n_ctx < plan.settings.n_ctx:
            tries.append((f"--ctx {n_ctx}", dataclasses.replace(request, n_ctx=n_ctx)))
    if plan.settings.image_tokens > 576:
        tries.append(("--image-tokens 576", dataclasses.replace(request, max_image_tokens=576)))
    if request.kv_type in ("f16", "f32", "bf16"):
        tries.append(("--kv-type q8_0", dataclasses.replace(request, kv_type="q8_0")))
    if request.cache:
        tries.append(("--no-cache", dataclasses.replace(request, cache=False)))
    out = []
    for label, changed in tries:
        try:
            candidate = plan_memory(model, family, dataclasses.replace(changed, memory_budget=None), process_bytes)
        except InvalidRequestError:  # a setting this family cannot run
            continue
        if candidate.ram_bytes + sum(candidate.vram_bytes.values()) <= request.memory_budget:
            out.append(label)
    weights = plan.by_name("llm weights")
    if weights > 0.3 * request.memory_budget:
        out.append(f"a {family.smallest_quant} file (`edgevlm convert ... --quant {family.smallest_quant}`)")
    return out[:3] or [f"a smaller model or a {family.smallest_quant} file"]


#: Device memory left free when layers are fitted (llama-server's --fit keeps 1 GiB too).
GPU_MARGIN = 1 << 30


@dataclass(frozen=True)
class GpuFit:
    """How much of a model goes to the GPU: layers, and whether the projector fits beside them."""

    n_gpu_layers: int
    projector_on_gpu: bool
    vram_bytes: int


def fit_gpu(model: ModelDescriptor, family: Family, request: PlanRequest, free_bytes: int,
            process_bytes: int, margin: int = GPU_MARGIN) -> GpuFit:
    """The most LLM layers that fit ``free_bytes - margin`` of ``request.gpu``, then the projector if it fits too.

    Layers come first (they decide generation speed); the projector goes on
    the GPU only when it fits beside them, otherwise it runs on the CPU.
    With ``request.vram_budget`` (the VRAM share of ``--memory-budget``) the GPU
    gets no more than it, and with ``request.memory_budget`` no more than what
    the plan's RAM leaves of the total.
    """
    import dataclasses

    shape = LLMShape.of(model)

    def fits(layers: int, projector: bool) -> bool:
        changed = dataclasses.replace(request, n_gpu_layers=layers, projector_on_gpu=projector, memory_budget=None,
                                      vram_budget=None)
        plan = plan_memory(model, family, changed, process_bytes)
        share = free_bytes - margin
        if request.vram_budget is not None:
            share = min(share, request.vram_budget)
        if request.memory_budget is not None:
            share = min(share, request.memory_budget - plan.ram_bytes)
        return sum(plan.vram_bytes.values()) <= max(share, 0)

    def vram(layers: int, projector: bool) -> int:
        changed = dataclasses.replace(request, n_gpu_layers=layers, projector_on_gpu=projector, memory_budget=None)
        return sum(plan_memory(model, family, changed, process_bytes).vram_bytes.values())

    layers = shape.n_layer + 1
    while layers > 0 and not fits(layers, False):
        layers -= 1
    projector = model.projector is not None and fits(layers, True)
    return GpuFit(layers, projector, vram(layers, projector))
