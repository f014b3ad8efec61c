"""Llama-3.2-Vision (mllama): run by :class:`edgevlm.mllama_engine.MllamaEngine`.

llama.cpp has no graph for mllama's cross-attention layers (its loader stops at
"unknown model architecture 'mllama'"), so this family opens its own engine
(:meth:`open_engine`): edgevlm's ggml graphs for the vision encoder and the
text decoder, llama.cpp's vocabulary-only load for the tokenizer and its
sampler chain for sampling. The LLM file alone is refused: the text decoder
needs the images' cross-attention states only the projector file gives.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace
from typing import TYPE_CHECKING

from edgevlm import constants as C
from edgevlm.descriptor import ModelDescriptor
from edgevlm.errors import InvalidRequestError, UnsupportedModelError
from edgevlm.families.base import Family, FamilyOptions, ImageCost, register

if TYPE_CHECKING:  # pragma: no cover
    from edgevlm.engine_protocol import EngineRequest, VLMEngine
    from edgevlm.planner import MemoryPart, PlanRequest, PlanSettings

#: Bytes per value of the engine's self-attention KV cache (the kv types it runs; q8_0: 34 bytes per
#: block of 32 values, q4_0: 18), and of the images' cross-attention K/V (f16 beside a quantised cache).
KV_ELEMENT = {"f32": 4.0, "f16": 2.0, "q8_0": 34 / 32, "q4_0": 18 / 32}
CROSS_KV_ELEMENT = {"f32": 4, "f16": 2, "q8_0": 2, "q4_0": 2}
F32 = 4
#: What loading the engine adds to the process figure besides its buffers: edgevlm's ggml bindings
#: and graph modules, the two graphs' CPU backends, the vocabulary-only llama.cpp model and the
#: image decoders. Measured on the test model's load: 19 MiB above the process figure, 8 MiB of
#: which the planner's RUNTIME_SLACK already counts.
ENGINE_BYTES = 11 << 20
#: llama.cpp's tokenizer tables per vocabulary entry (the engine loads the LLM file's vocabulary alone):
#: measured 56.7 MiB for 128256 tokens with 280147 merges (the 11B's sizes) and 15.6 MiB for 32000 / 60000,
#: as the RSS a vocabulary-only load adds (synthetic GGUFs of those sizes).
VOCAB_BYTES_PER_TOKEN = 470
EMBD = "token_embd.weight"
PAGE = 4096


@dataclass(frozen=True)
class MllamaShape:
    """The sizes memory depends on, from both headers."""

    n_embd: int
    n_layer: int
    n_cross: int
    n_head: int
    kv_width: int  # KV heads x head dim
    n_ctx_train: int
    tiles: int
    n_positions: int  # states per tile the text attends to (patches + CLS)
    n_padded: int  # tokens per tile inside the encoder
    patch_values: int  # patches per tile x 3 x patch^2
    width: int
    n_intermediate: int
    vision_ffn: int

    @classmethod
    def of(cls, model: ModelDescriptor) -> MllamaShape:
        from edgevlm.kernels.mllama_vision import read_mllama_config

        assert model.projector is not None
        proj = model.projector
        vision = read_mllama_config(proj.metadata, {t.name: SimpleNamespace(ne=t.shape) for t in proj.header.tensors})
        n_embd, n_head = int(model.llm_key("embedding_length")), int(model.llm_key("attention.head_count"))
        return cls(n_embd=n_embd, n_layer=int(model.llm_key("block_count")),
                   n_cross=len(model.llm_metadata.get(C.KEY_MLLAMA_CROSS_ATTENTION_LAYERS) or []), n_head=n_head,
                   kv_width=int(model.llm_key("attention.head_count_kv")) * (n_embd // n_head),
                   n_ctx_train=int(model.llm_key("context_length") or 4096), tiles=vision.max_num_tiles,
                   n_positions=vision.n_positions, n_padded=vision.n_padded,
                   patch_values=vision.n_patches * 3 * vision.patch_size ** 2, width=vision.width,
                   n_intermediate=len(vision.intermediate),
                   vision_ffn=int(proj.metadata.get("clip.vision.feed_forward_length") or 4 * vision.width))

    @property
    def image_states(self) -> int:
        """Vision states one image gives the text (every tile the encoder runs, padding tiles included)."""
        return self.tiles * self.n_positions

    def vision_compute(self, output_width: int, kept_half: bool, input_half: bool) -> int:
        """The encoder graph's buffer (flash attention) and ggml's work buffer (copies of a product's
        input in the weight's dot type, priced at 2 bytes a value). The buffer peaks either inside a
        layer (the f16 mask, the MLP's f32 hidden, the residual stream and its neighbours, the kept
        intermediate states: f16 unless the projector is f32, ``kept_half``) or at the projector
        (the kept states' concatenation, its unpadded copy, and an f32 copy of that unless the
        projector is f16 as loaded, ``input_half``: then ggml needs no copy of its input either).

        Measured with ``CompiledGraph.compute_bytes`` at the 11B's geometry (4 x 1608 tokens, width
        1280, FFN 5120) for 2 / 3 / 5 kept layers: f16 kept and projector 344.5 / 360.2 / 375.7 MiB,
        priced 345.4 / 361.1 / 392.5; f16 kept, Q8_0 or BF16 projector 381.5 MiB for 5, priced
        392.5; f32 kept 407.1 / 438.5 / 564.1 MiB, priced 408.2 / 439.6 / 565.3."""
        n, d, k = self.tiles * self.n_padded, self.width, self.n_intermediate
        kept, cat = 2 if kept_half else F32, (k + 1) * d
        layer = n * n * 2 + n * self.vision_ffn * F32 + n * d * (10 + kept * (k + 2))
        projector = 3 * cat * n * kept
        if kept_half and not input_half:
            projector = max(projector, cat * self.image_states * (2 + F32))
        work = 2 * max(n * self.vision_ffn, 0 if input_half else self.image_states * cat)
        return max(layer, projector) + work

    def decoder_compute(self, n_ctx: int, n_batch: int, n_images: int, chunk: int) -> int:
        """One prefill graph of ``n_batch`` tokens (a micro-batch) at a full context: the attention
        scores of every head over the larger of the context and the images' states (f32, softmax in
        place) and their f16 copy for the product with V (ggml's work buffer), for ``chunk`` query
        tokens at a time (``kernels.mllama_text.ATTN_CHUNK``); both masks and a few hidden rows.

        Checked on the bench model (4096 wide, 32 heads, 4096 context, 6404 image states, 256
        tokens): ``CompiledGraph.compute_bytes`` 71.3 MiB (f16 cache; 72.3 with q8_0) + 25 MiB of
        work buffer, 97.3 MiB here (in products of all 256 tokens: 214.4 + 100 MiB, 318.5 priced)."""
        n_img = n_images * self.image_states
        widest = max(n_ctx, n_img)
        return min(n_batch, chunk) * 6 * self.n_head * widest + n_batch * F32 * (n_ctx + n_img + 3 * self.n_embd)

    def cross_kv_compute(self, n_images: int, kv_bytes: int, chunk: int) -> int:
        """Computing the images' cross-attention K/V (graphs of ``chunk`` states per cross layer, each
        uploaded as it comes): a chunk's states, K and V in the graph (f32: projections, norm,
        concatenation) and copied out, and one layer's V on the host before its upload."""
        n_img = n_images * self.image_states
        rows = min(chunk, n_img)
        return rows * F32 * (self.n_embd + 7 * self.kv_width) + n_img * self.kv_width * kv_bytes


@register
class MllamaFamily(Family):
    name = "mllama"
    describes = "Llama-3.2-Vision (mllama), run on edgevlm's kernels (cross-attention text decoder)"
    priority = 10
    engines = (C.VISION_ENGINE_KERNELS,)
    prices_own_engine = True

    @classmethod
    def matches(cls, model: ModelDescriptor) -> bool:
        proj = model.projector
        return model.llm_architecture == C.LLM_ARCH_MLLAMA or (
            proj is not None and proj.metadata.get(C.KEY_PROJECTOR_KIND) == C.PROJECTOR_KIND_MLLAMA)

    def __init__(self, model: ModelDescriptor, options: FamilyOptions | None = None) -> None:
        if model.projector is None or model.llm_architecture != C.LLM_ARCH_MLLAMA:
            raise UnsupportedModelError(
                f"{model.files.llm.name} is part of a Llama-3.2-Vision (mllama) model: edgevlm runs it from "
                "the pair (the mllama LLM GGUF and its edgevlm-mllama projector GGUF; llama.cpp cannot run "
                "its cross-attention layers alone); give both files (model=folder, or mmproj=...)")
        super().__init__(model, options)

    def planned_image_cost(self, width: int, height: int, max_tokens: int | None,
                           engine: str) -> ImageCost | None:
        """Any image: one context token; the text attends to all its tiles' states (the encoder runs
        every tile, padding included)."""
        shape = MllamaShape.of(self.model)
        return ImageCost(tokens=shape.image_states, positions=1, cells=1, views=shape.tiles)

    def own_memory_plan(self, request: PlanRequest,
                        process_bytes: int) -> tuple[list[MemoryPart], PlanSettings] | None:
        """The mllama engine's memory, from both headers (README "Fit the machine").

        Raises:
            InvalidRequestError: a KV type or context the engine does not run.
        """
        from edgevlm.kernels.mllama_text import check_kv_type
        from edgevlm.planner import DEFAULT_CTX, PlanSettings

        shape = MllamaShape.of(self.model)
        check_kv_type(request.kv_type, shape.n_embd // shape.n_head)
        n_ctx = request.n_ctx or min(shape.n_ctx_train, DEFAULT_CTX)
        if n_ctx > shape.n_ctx_train:
            raise InvalidRequestError(f"n_ctx={n_ctx} is more than the {shape.n_ctx_train} tokens the model "
                                      "was trained for")
        parts = _memory_parts(self.model, shape, request, n_ctx, process_bytes)
        settings = PlanSettings(n_ctx=n_ctx, n_batch=_prefill_batch(n_ctx), n_ubatch=_micro_batch(n_ctx),
                                kv_type=request.kv_type, flash_attn=request.kv_type in C.QUANTISED_KV_TYPES,
                                n_gpu_layers=-1 if _device(request) != "CPU" else 0,
                                image_tokens=shape.image_states, image_views=shape.tiles,
                                vision_device=C.VISION_ENGINE_KERNELS, cache=request.cache)
        return parts, settings

    def open_engine(self, request: EngineRequest) -> VLMEngine:
        """The mllama engine on edgevlm's kernels (see :mod:`edgevlm.mllama_engine`)."""
        from edgevlm.mllama_engine import open_mllama_engine

        return open_mllama_engine(self, request)


def _device(request: PlanRequest) -> str:
    """Where the engine's graphs go: the GPU unless no layer may go there (as the engine opens them)."""
    return request.gpu if request.gpu and request.n_gpu_layers != 0 else "CPU"


def _prefill_batch(n_ctx: int) -> int:
    from edgevlm.mllama_engine import PREFILL_BATCH

    return min(PREFILL_BATCH, n_ctx)


def _micro_batch(n_ctx: int) -> int:
    """Tokens per decoder graph (the engine reads its prefill batches in graphs of this many)."""
    from edgevlm.kernels.mllama_text import UBATCH

    return min(UBATCH, n_ctx)


def _vocab_size(model: ModelDescriptor) -> int:
    """Rows of the token embeddings (the vocabulary and the image token)."""
    embd = next((t for t in model.llm.tensors if t.name == EMBD), None)
    return int(embd.shape[1]) if embd is not None and len(embd.shape) > 1 else 0


def _projector_types(model: ModelDescriptor, dev: str) -> tuple[bool, bool]:
    """Whether the encoder keeps its intermediate states in f16 (a projector matrix other than f32) and
    feeds them to the projector as they are (one that is f16 as loaded: on the CPU, unless ``auto``
    converts the encoder's f16 matrices, see :func:`edgevlm.planner.loaded_tower_bytes`)."""
    from gguf import GGMLQuantizationType

    from edgevlm.kernels.mllama_vision import PROJECTOR, is_encoder_matrix
    from edgevlm.planner import loaded_tower_choice

    assert model.projector is not None
    tensors = model.projector.header.tensors
    file_type = next((t.ggml_type for t in tensors if t.name == PROJECTOR), GGMLQuantizationType.F32)
    if file_type != GGMLQuantizationType.F16:
        return file_type != GGMLQuantizationType.F32, False
    return True, dev != "CPU" or loaded_tower_choice(tensors, is_encoder_matrix).weight_type == "as-file"


def _mapped_embeddings(model: ModelDescriptor, dev: str, n_ctx: int) -> list[MemoryPart]:
    """On the CPU the token embeddings are read in place from the mapped file: resident are the
    pages of the tokens seen, at most a row and a page per context position."""
    from edgevlm.planner import MemoryPart, tensor_bytes

    table = next((t for t in model.llm.tensors if t.name == EMBD), None)
    if dev != "CPU" or table is None:
        return []
    total = tensor_bytes(table)
    resident = min(total, n_ctx * (total // table.shape[-1] + PAGE))
    return [MemoryPart("token embeddings", "CPU", resident,
                       f"read in place from the file ({total >> 20} MiB): the rows of up to {n_ctx} tokens")]


def _memory_parts(model: ModelDescriptor, shape: MllamaShape, request: PlanRequest, n_ctx: int,
                  process_bytes: int) -> list[MemoryPart]:
    """Process, weights, KV cache and one image's vision states, held throughout; the encoder's buffer
    while an image is encoded ("encode" phase: freed after it); the image's cross-attention K/V and the
    decoder's buffer after it ("decode" phase)."""
    from edgevlm.kernels.mllama_text import ATTN_CHUNK, CROSS_KV_CHUNK
    from edgevlm.kernels.mllama_vision import is_encoder_matrix
    from edgevlm.planner import RUNTIME_SLACK, MemoryPart, projector_weight_bytes, tensor_bytes

    assert model.projector is not None
    dev, kv, cross = _device(request), KV_ELEMENT[request.kv_type], CROSS_KV_ELEMENT[request.kv_type]
    kept_half, input_half = _projector_types(model, dev)
    n_self, out_width, ubatch = shape.n_layer - shape.n_cross, shape.n_embd, _micro_batch(n_ctx)
    states = shape.image_states * shape.n_embd * F32
    decoder = shape.decoder_compute(n_ctx, ubatch, 1, ATTN_CHUNK)
    cross_kv = shape.cross_kv_compute(1, cross, CROSS_KV_CHUNK)
    w, h = request.image_size or (4096, 3072)
    scale = min(1.0, 4096 / max(w, h))
    return [
        MemoryPart("process", "CPU", process_bytes + RUNTIME_SLACK, "interpreter and libraries, measured"),
        MemoryPart("engine", "CPU", ENGINE_BYTES, "graph modules, backends, image decoders"),
        MemoryPart("vocabulary", "CPU", VOCAB_BYTES_PER_TOKEN * _vocab_size(model),
                   "llama.cpp's tokenizer tables (a vocabulary-only load)"),
        MemoryPart("llm weights", dev, sum(tensor_bytes(t) for t in model.llm.tensors if dev != "CPU" or t.name != EMBD),
                   f"{shape.n_layer} layers ({shape.n_cross} cross-attention), in backend buffers"),
        *_mapped_embeddings(model, dev, n_ctx),
        MemoryPart("kv cache", dev, int(n_self * n_ctx * shape.kv_width * 2 * kv),
                   f"{n_self} self-attention layers x {n_ctx} cells, {request.kv_type}"),
        MemoryPart("projector weights", dev, projector_weight_bytes(model, C.VISION_ENGINE_KERNELS, on_cpu=dev == "CPU",
                                                                    is_matrix=is_encoder_matrix),
                   "vision encoder + projector, as loaded"),
        MemoryPart("image embeddings", "CPU", states,
                   f"f32 vision states (one copy: the RAM tier); +{states >> 20} MiB per further image, up to 4"),
        MemoryPart("image decode", "CPU", int(w * scale) * int(h * scale) * 3 * 2
                   + 2 * shape.tiles * shape.patch_values * F32, f"{int(w * scale)}x{int(h * scale)} RGB + tiles"),
        MemoryPart("vision compute", dev, shape.vision_compute(out_width, kept_half, input_half),
                   f"{shape.tiles} tiles x {shape.n_padded} tokens, flash attention, kept states "
                   f"{'f16' if kept_half else 'f32'}, + work buffer; freed after each image",
                   phase="encode"),
        MemoryPart("image cross kv", dev, shape.n_cross * shape.image_states * shape.kv_width * 2 * cross,
                   f"{shape.n_cross} cross layers x {shape.tiles} tiles x {shape.n_positions} states, "
                   f"{'f32' if cross == F32 else 'f16'}; per image in the conversation", phase="decode"),
        MemoryPart("llm compute", dev, max(decoder, cross_kv),
                   f"prefill graphs of {ubatch} tokens, attention scores of {ATTN_CHUNK} at a time over "
                   f"max({n_ctx}, {shape.image_states}) (cross K/V of an image: {cross_kv >> 20} MiB)", phase="decode"),
    ]
