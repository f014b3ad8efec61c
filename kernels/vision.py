"""Vision towers (CLIP / SigLIP ViT) and their projectors on ggml kernels.

Reads the same projector GGUF that libmtmd reads (``clip.vision.*`` keys,
``v.*`` / ``mm.*`` tensors; ours or third-party), plus edgevlm's own
projector kinds (the OmniFusion adapter, ``adapter.*`` tensors).

Unlike llama.cpp's LLaVA graph at the pinned version (which concatenates the
class embedding *after* the patches while positions and patch selection
assume it first, llama.cpp issue 25814), the class embedding goes first, as
in CLIP: ``[CLS, p0, p1, ...] + position_embd``, and the CLS row is dropped
after the feature layer when the select strategy says so.

Which layers run: ``clip.vision.feature_layer`` (deepest entry, as libmtmd)
when present; else all ``block_count`` blocks in files from llama.cpp's legacy
LLaVA converter (it already dropped the last one; see :func:`layers_to_run`),
else ``block_count - 1`` (libmtmd's LLaVA default, i.e. HF
``hidden_states[-2]``). That converter also swaps the FFN names; the swap is
undone from the shapes (:func:`tower_block_params`). ``v.post_ln`` is applied
only when the last block runs (HF towers apply it to the last hidden state
only).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edgevlm import constants as C
from edgevlm.errors import InvalidModelError, UnsupportedModelError
from edgevlm.gguf_info import GGUFHeader, read_header

from .graph import CompiledGraph, GraphBuilder, RawTensor, Weights, shape
from .tower_weights import LOG, upload_tower

# HF hidden_act -> ggml activation (source: transformers ACT2FN; ggml.h).
HF_ACTIVATIONS = {"quick_gelu": "gelu_quick", "gelu": "gelu_erf", "gelu_pytorch_tanh": "gelu",
                  "gelu_new": "gelu", "gelu_fast": "gelu", "relu": "relu"}
LLAVA_PROJECTORS = ("mlp",)


def _positive(meta: Mapping[str, Any], key: str) -> int:
    value = meta.get(key)
    if not isinstance(value, (int, np.integer)) or int(value) <= 0:
        raise InvalidModelError(f"projector metadata {key} must be a positive integer, got {value!r}")
    return int(value)


@dataclass(frozen=True)
class TowerConfig:
    """What the kernels need to run a projector file's tower and projector."""

    image_size: int
    patch_size: int
    width: int
    n_head: int
    block_count: int
    n_layers: int          # blocks to run
    eps: float
    activation: str       # ggml activation of the tower MLP
    has_class: bool
    drop_class: bool
    pre_ln: bool
    post_ln: bool
    image_mean: tuple[float, float, float]
    image_std: tuple[float, float, float]
    resize: str            # one of constants.IMAGE_RESIZE_MODES (+ "squash")
    projector: str         # "mlp" | "omnifusion"
    projector_activation: str
    output_width: int

    @property
    def n_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @property
    def n_tokens(self) -> int:
        """Embeddings per image handed to the LLM."""
        return self.n_patches + (1 if self.has_class and not self.drop_class else 0)

    def __post_init__(self) -> None:
        if self.image_size % self.patch_size:
            raise InvalidModelError(f"clip.vision.image_size {self.image_size} is not a multiple of "
                                    f"clip.vision.patch_size {self.patch_size}")
        if self.width % self.n_head:
            raise InvalidModelError(f"clip.vision.embedding_length {self.width} is not divisible by "
                                    f"clip.vision.attention.head_count {self.n_head}")
        if not 0 <= self.n_layers <= self.block_count:
            raise InvalidModelError(f"clip.vision.feature_layer asks for {self.n_layers} blocks but the "
                                    f"file has {self.block_count}")


#: Tensors the graphs never read, kept on the host for the runtime (learned embeddings the
#: LLM receives directly: OmniFusion's special.*, LLaVA-NeXT's image newline).
HOST_TENSORS = (C.TENSOR_IMAGE_NEWLINE, C.TENSOR_IMAGE_NEWLINE_LEGACY)


def is_host_tensor(name: str) -> bool:
    return name.startswith("special.") or name in HOST_TENSORS


def projector_kind(meta: Mapping[str, Any]) -> str:
    """``"omnifusion"``, ``"mlp"`` or libmtmd's projector type name."""
    kind = meta.get(C.KEY_PROJECTOR_KIND)
    if kind:
        return str(kind)
    return str(meta.get("clip.projector_type") or meta.get("clip.vision.projector_type") or "")


def layers_to_run(meta: Mapping[str, Any], names: set[str], block_count: int) -> int:
    """Tower blocks to run: the deepest ``feature_layer``, else what the file's layout implies.

    llama.cpp's legacy LLaVA converter (``clip.has_llava_projector``, no ``v.post_ln``, no
    ``feature_layer``) already dropped the last block and wrote the blocks it kept as
    ``block_count``: all of them run. Files holding every block (ours, or with ``v.post_ln``)
    run ``block_count - 1`` (HF ``hidden_states[-2]``, libmtmd's LLaVA default).
    """
    layers = meta.get("clip.vision.feature_layer")
    if layers:
        return max(int(x) for x in layers)
    if meta.get("clip.has_llava_projector") and "v.post_ln.weight" not in names:
        return block_count
    return block_count - 1


def read_tower_config(meta: Mapping[str, Any], names: set[str]) -> TowerConfig:
    """Build a :class:`TowerConfig` from GGUF metadata and tensor names.

    Raises:
        UnsupportedModelError: a projector kind the kernels do not implement.
        InvalidModelError: missing or inconsistent keys.
    """
    kind = projector_kind(meta)
    if kind not in LLAVA_PROJECTORS + C.PROJECTOR_KINDS:
        raise UnsupportedModelError(
            f"the kernels vision engine runs LLaVA MLP and OmniFusion projectors, not {kind!r}; "
            "use vision_engine='mtmd'")
    p = "clip.vision."
    block_count = _positive(meta, p + "block_count")
    n_layers = layers_to_run(meta, names, block_count)
    has_class = "v.class_embd" in names
    strategy = meta.get(C.KEY_VISION_SELECT_STRATEGY, "default")
    hf_act = meta.get(C.KEY_VISION_ACTIVATION)
    act = HF_ACTIVATIONS.get(str(hf_act)) if hf_act else ("gelu" if meta.get("clip.use_gelu") else "gelu_quick")
    if act is None:
        raise UnsupportedModelError(f"vision activation {hf_act!r} is not supported by the kernels engine")
    if kind == C.PROJECTOR_KIND_OMNIFUSION:
        proj_act = str(meta.get(C.KEY_ADAPTER_ACTIVATION, "relu"))
        graph_needs = ("adapter.proj.weight",)
    else:
        proj_act = HF_ACTIVATIONS.get(str(meta.get(C.KEY_PROJECTOR_ACTIVATION, "gelu")), "gelu_erf")
        graph_needs = ("mm.0.weight", "mm.2.weight")
    missing = [name for name in graph_needs if name not in names]
    if missing:
        raise InvalidModelError(f"the projector file has no tensor {missing[0]!r}")
    resize = meta.get(C.KEY_IMAGE_RESIZE) or ("shortest-edge-crop" if has_class else "squash")
    return TowerConfig(
        image_size=_positive(meta, p + "image_size"), patch_size=_positive(meta, p + "patch_size"),
        width=_positive(meta, p + "embedding_length"), n_head=_positive(meta, p + "attention.head_count"),
        block_count=block_count, n_layers=n_layers,
        eps=float(meta.get(p + "attention.layer_norm_epsilon", 1e-5)), activation=act,
        has_class=has_class, drop_class=has_class and strategy != "full",
        pre_ln="v.pre_ln.weight" in names, post_ln="v.post_ln.weight" in names and n_layers == block_count,
        image_mean=tuple(float(x) for x in meta.get(p + "image_mean", C.CLIP_MEAN)),
        image_std=tuple(float(x) for x in meta.get(p + "image_std", C.CLIP_STD)),
        resize=str(resize), projector=kind if kind in C.PROJECTOR_KINDS else "mlp",
        projector_activation=proj_act, output_width=-1)


def read_tensor_data(header: GGUFHeader) -> dict[str, RawTensor]:
    """The tensors of a GGUF file whose header is already read, memory-mapped (the header is not parsed again).

    Raises:
        InvalidModelError: the header was read without its tensor infos, a
            tensor type is unknown, or the file is shorter than its tensors.
    """
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, quant_shape_to_byte_shape

    if header.tensors and not header.data_offset:
        raise InvalidModelError(f"{header.path}: the header was read without its tensor infos")
    try:
        data = np.memmap(header.path, mode="r")
        out = {}
        for info in header.tensors:
            qtype = GGMLQuantizationType(info.ggml_type)
            block, type_size = GGML_QUANT_SIZES[qtype]
            n_elems = int(np.prod(info.shape, dtype=np.int64))
            start = header.data_offset + info.offset
            dtype = _PLAIN_TYPES.get(qtype)
            np_shape = tuple(reversed(info.shape))
            if dtype is None:
                dtype, np_shape = np.uint8, quant_shape_to_byte_shape(np_shape, qtype)
                count = n_elems * type_size // block
            else:
                count = n_elems
            end = start + count * np.dtype(dtype).itemsize
            if end > len(data):
                raise InvalidModelError(f"{header.path} is truncated (tensor {info.name} ends past the file)")
            array = data[start:end].view(dtype).reshape(np_shape)
            out[info.name] = RawTensor(int(qtype), tuple(int(x) for x in info.shape), array)
        return out
    except ValueError as exc:  # an unknown ggml type, a shape that does not fit its blocks
        raise InvalidModelError(f"{header.path}: unreadable tensor data ({exc})") from exc


_PLAIN_TYPES = {0: np.float32, 1: np.float16, 24: np.int8, 25: np.int16, 26: np.int32, 27: np.int64,
                28: np.float64}
"""ggml types stored as plain numpy items (F32, F16, I8, I16, I32, I64, F64); others as bytes."""


def read_gguf_tensors(path: Path, header: GGUFHeader | None = None) -> tuple[dict[str, Any], dict[str, RawTensor]]:
    """Metadata and tensors (memory-mapped) of a GGUF file (``header``: its header when already read).

    Raises:
        ModelNotFoundError, InvalidModelError: not a readable GGUF file.
    """
    if header is None or not header.data_offset:
        header = read_header(path)
    return dict(header.metadata), read_tensor_data(header)


class VisionTower:
    """A projector GGUF on a ggml backend: pixels in, LLM-ready embeddings out.

    Args:
        path: the projector GGUF.
        header: its header when already read (the model descriptor's); read otherwise.
            Only the tensor data is read here.
        device: ggml device ("auto", "cpu", "cuda", "metal", or a device name).
        n_threads: CPU threads.
        flash_attn: fused flash attention (f16 K/V, f32 accumulation; libmtmd's
            default too) instead of f32 softmax(QK^T)V. Measured on a 2-core
            AVX-512 CPU, ViT-L/14-336: 8-25 % faster, per-token cosine against
            transformers unchanged (0.9999999 on the test towers).
        weight_type: the matrices' type on the backend: "as-file", "bf16" or
            "q8_0" (f32/f16 matrices converted at load), or "auto" (for f16
            files on the CPU: Q8_0 where ggml's AMX buffer type is usable, else
            bf16 on a CPU with AVX512-BF16; see
            :func:`edgevlm.kernels.tower_weights.choose_weight_type`).
        extra_buffers: put matrices in the CPU's repacking buffer types where
            ggml takes them; None = yes unless the AMX guard is on (as the LLM).

    Raises:
        InvalidModelError, UnsupportedModelError, KernelsUnavailableError,
        InvalidRequestError (an unknown ``weight_type``).
    """

    def __init__(self, path: str | Path, *, header: GGUFHeader | None = None, device: str = "auto",
                 n_threads: int = 4, flash_attn: bool = True, weight_type: str = "auto",
                 extra_buffers: bool | None = None) -> None:
        self.path = Path(path)
        self.flash_attn = flash_attn
        header = header if header is not None else read_header(self.path)
        self.meta: Mapping[str, Any] = header.metadata
        tensors = read_tensor_data(header)
        cfg = read_tower_config(self.meta, set(tensors))
        width = C.projector_output_width({name: t.ne for name, t in tensors.items()})
        self.config = dataclasses.replace(cfg, output_width=-1 if width is None else width)
        self.special = {name: np.asarray(t.data, dtype=np.float32).reshape(-1)
                        for name, t in tensors.items() if is_host_tensor(name)}
        device_tensors = {n: t for n, t in tensors.items() if not is_host_tensor(n)}
        self.weights, self.weight_choice = upload_tower(device, n_threads, device_tensors, weight_type,
                                                        allow_extra=extra_buffers)
        self.backend = self.weights.backend
        LOG.info("kernels tower %s on %s: matrices %s, %s; weight buffers %s", self.path.name,
                 self.backend.name, self.weight_choice.weight_type, self.weight_choice.reason,
                 ", ".join(f"{k} {v / 2**20:.0f} MiB" for k, v in self.weights.buffer_bytes().items()))
        self._graph: CompiledGraph | None = None
        self._batch_graphs: dict[int, CompiledGraph] = {}
        self._cancelled: Callable[[], bool] | None = None

    @property
    def device(self) -> str:
        return self.backend.name

    @contextmanager
    def cancellable(self, cancelled: Callable[[], bool] | None) -> Iterator[None]:
        """Inside, :meth:`encode` and :meth:`encode_views` stop inside their graph soon after
        ``cancelled()`` turns true (on the CPU) and raise :class:`~edgevlm.errors.ComputeCancelled`
        (for the family pipelines that call them; the caller serialises encodes)."""
        self._cancelled = cancelled
        try:
            yield
        finally:
            self._cancelled = None

    def encode(self, pixels: np.ndarray) -> np.ndarray:
        """Run tower + projector on normalised pixels (3, S, S): (n_tokens, output_width) float32."""
        cfg = self.config
        if pixels.shape != (3, cfg.image_size, cfg.image_size):
            raise InvalidModelError(f"pixels of shape {pixels.shape}; the tower takes "
                                    f"(3, {cfg.image_size}, {cfg.image_size})")
        if self._graph is None:
            self._graph = self._build()
        return self._graph.run({"patches": patchify(pixels.astype(np.float32), cfg.patch_size)}, self._cancelled)

    def prepare(self) -> None:
        """Build the one-image graph and write its compute buffer now (load time), not in the first encode."""
        if self._graph is None:
            self._graph = self._build()
            self._graph.touch()

    def encode_views(self, pixels: np.ndarray) -> np.ndarray:
        """Run tower + projector on a batch of views in one graph.

        Args:
            pixels: Normalised pixels ``(n, 3, S, S)`` (e.g. LLaVA-NeXT's base view and tiles).

        Returns:
            float32 ``(n, n_tokens, output_width)``; view ``i`` equals ``encode(pixels[i])``
            up to float rounding (attention never crosses views).

        Raises:
            InvalidModelError: wrong pixel shape.
        """
        cfg = self.config
        if pixels.ndim != 4 or pixels.shape[1:] != (3, cfg.image_size, cfg.image_size) or not len(pixels):
            raise InvalidModelError(f"pixels of shape {pixels.shape}; the tower takes "
                                    f"(n, 3, {cfg.image_size}, {cfg.image_size}) with n >= 1")
        n = int(pixels.shape[0])
        graph = self._batch_graphs.get(n)
        if graph is None:
            for old in self._batch_graphs.values():  # keep one batched graph: its buffer is large
                old.close()
            self._batch_graphs = {n: self._build(n)}
            graph = self._batch_graphs[n]
        patches = np.stack([patchify(p.astype(np.float32), cfg.patch_size) for p in pixels])
        return graph.run({"patches": patches}, self._cancelled).reshape(n, cfg.n_tokens, cfg.output_width)

    def _build(self, n_views: int = 0) -> CompiledGraph:
        """The tower graph for one image (``n_views == 0``) or a batch of ``n_views``."""
        b = GraphBuilder()
        try:
            x = build_tower(b, self.weights, self.config, flash=self.flash_attn, n_views=n_views)
            if self.config.projector == "mlp":
                x = b.mlp(x, _pair(self.weights, "mm.0"), _pair(self.weights, "mm.2"),
                          self.config.projector_activation)
            else:
                x = build_omnifusion_adapter(b, self.weights, x, self.meta, flash=self.flash_attn)
            return CompiledGraph(self.backend, b, x)
        except Exception:
            b.close()
            raise

    def close(self) -> None:
        if self._graph is not None:
            self._graph.close()
            self._graph = None
        for graph in getattr(self, "_batch_graphs", {}).values():
            graph.close()
        self._batch_graphs = {}
        if getattr(self, "weights", None) is not None:
            self.weights.close()
        if getattr(self, "backend", None) is not None:
            self.backend.close()


def _pair(w: Weights, prefix: str) -> tuple[object, object | None]:
    return w[f"{prefix}.weight"], w.get(f"{prefix}.bias")


def _layer_params(w: Weights, prefix: str) -> dict[str, tuple[object, object | None]]:
    parts = ("attn_q", "attn_k", "attn_v", "attn_out", "ln1", "ln2", "ffn_up", "ffn_down")
    return {part: _pair(w, f"{prefix}.{part}") for part in parts}


def tower_block_params(w: Weights, prefix: str, width: int) -> dict[str, tuple[object, object | None]]:
    """A tower block's parameters, ``ffn_up`` / ``ffn_down`` swapped back where the file swapped them.

    llama.cpp's legacy converters store CLIP's ``fc1`` as ``ffn_down`` and ``fc2`` as
    ``ffn_up``. As clip.cpp does, the swap is seen in the shapes: the up projection takes
    ``width`` inputs (ggml ``ne[0] == width``), the down projection the MLP's width. When
    both are ``width`` wide the names are taken as written.
    """
    params = _layer_params(w, prefix)
    up, down = params["ffn_up"], params["ffn_down"]
    if shape(down[0])[0] == width and shape(up[0])[0] != width:
        params["ffn_up"], params["ffn_down"] = down, up
    return params


def patchify(pixels: np.ndarray, patch: int) -> np.ndarray:
    """(3, S, S) -> (n_patches, 3*patch*patch), rows in raster order, columns (c, y, x).

    That column order is the flattening of the conv kernel ``v.patch_embd.weight``
    (ggml ne = [kw, kh, c, out]), so patch embedding is one matrix product.
    """
    c, h, w = pixels.shape
    gy, gx = h // patch, w // patch
    grid = pixels.reshape(c, gy, patch, gx, patch).transpose(1, 3, 0, 2, 4)
    return np.ascontiguousarray(grid.reshape(gy * gx, c * patch * patch))


def build_tower(b: GraphBuilder, w: Weights, cfg: TowerConfig, *, flash: bool = False,
                n_views: int = 0) -> object:
    """Patch embedding, [CLS first], positions, pre-LN, ``n_layers`` blocks, [post-LN], CLS drop.

    ``n_views == 0``: one image, input ``patches`` [k, n_patches] -> [width, n_tokens].
    ``n_views >= 1``: a batch, input [k, n_patches, n_views] -> [width, n_tokens, n_views].
    """
    k = 3 * cfg.patch_size ** 2
    patches = b.input("patches", (k, cfg.n_patches, n_views) if n_views else (k, cfg.n_patches))
    x = b.linear(patches, b.reshape_2d(w["v.patch_embd.weight"], k, cfg.width), w.get("v.patch_embd.bias"))
    if cfg.has_class:
        cls = b.reshape_2d(w["v.class_embd"], cfg.width, 1)
        if n_views:
            cls = b.repeat(cls, b.rows(x, 0, 1))  # [width, 1, n_views]
        x = b.concat(cls, x, 1)
    n_pos = cfg.n_patches + (1 if cfg.has_class else 0)
    pos = w["v.position_embd.weight"]
    if tuple(pos.contents.ne[:2]) != (cfg.width, n_pos):
        raise InvalidModelError(f"v.position_embd.weight has {pos.contents.ne[1]} positions; "
                                f"{cfg.image_size}px images need {n_pos}")
    x = b.add(x, pos)
    if cfg.pre_ln:
        x = b.layer_norm(x, *_pair(w, "v.pre_ln"), cfg.eps)
    for il in range(cfg.n_layers):
        x = b.transformer_layer(x, tower_block_params(w, f"v.blk.{il}", cfg.width), n_head=cfg.n_head,
                                eps=cfg.eps,
                                act=cfg.activation, norm_first=True, flash=flash)
    if cfg.post_ln:
        x = b.layer_norm(x, *_pair(w, "v.post_ln"), cfg.eps)
    if cfg.drop_class:
        x = b.rows(x, 1, cfg.n_patches)
    return x


def build_omnifusion_adapter(b: GraphBuilder, w: Weights, x: object, meta: Mapping[str, Any], *,
                             flash: bool = False) -> object:
    """OmniFusion's VisualToGPTMapping: one nn.TransformerEncoderLayer, then a linear map."""
    heads = meta.get(C.KEY_ADAPTER_HEAD_COUNT)
    if not isinstance(heads, (int, np.integer)) or heads <= 0:
        raise InvalidModelError(f"{C.KEY_ADAPTER_HEAD_COUNT} must be a positive integer, got {heads!r}")
    act = str(meta.get(C.KEY_ADAPTER_ACTIVATION, "relu"))
    x = b.transformer_layer(x, _layer_params(w, "adapter"), n_head=int(heads),
                            eps=float(meta.get(C.KEY_ADAPTER_LAYER_NORM_EPS, 1e-5)),
                            act=HF_ACTIVATIONS.get(act, act),
                            norm_first=bool(meta.get(C.KEY_ADAPTER_NORM_FIRST, False)), flash=flash)
    return b.linear(x, *_pair(w, "adapter.proj"))
