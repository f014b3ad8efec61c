"""The Llama-3.2-Vision (mllama) vision encoder and projector on ggml.

Reads the projector GGUF of ``convert/mllama.py`` (``clip.projector_type =
"edgevlm-mllama"``). One image is one graph run over all ``max_num_tiles``
tiles at once (padding tiles included: transformers runs them too, and real
tokens attend to them), following transformers' ``MllamaVisionModel``:

1. patch embedding (no bias) per tile; plus ``tanh(g_pre) * pre_tile[ar_id]``
   (one vector per tile);
2. the class embedding first in every tile; plus ``(1 - tanh(g)) * position``
   and ``tanh(g) * tile_position[ar_id]`` (a vector per tile and token);
3. ``layernorm_pre`` (eps 1e-5), tokens padded with zeros to a multiple of 8
   per tile, then all tiles as one sequence of ``tiles x padded`` tokens;
4. the local layers (pre-norm, GELU-erf MLP, no attention biases) under the
   aspect-ratio mask: a query and a key are hidden from each other only when
   *both* are padding (a padding tile, or a token added for the multiple of 8);
   the outputs of ``intermediate_layers_indices`` are kept;
5. ``layernorm_post``, plus ``tanh(g_post) * post_tile[ar_id]``, the global
   layers (attention and MLP outputs scaled by ``tanh`` of their gates);
6. features ``[global output, intermediates interleaved]``: transformers
   stacks the K intermediate states on a last axis and flattens it, so feature
   ``d * K + k`` is state ``k``'s channel ``d``; padding tokens dropped;
7. the projector ``mm.0`` (one linear layer) to the text width.

Output: ``(max_num_tiles, tokens per tile, text width)``, the cross-attention
states of the image (the text model's cross-attention mask hides the padding
tiles). Gates are read on the host (``tanh`` applied there) and enter the
graph as scale factors.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edgevlm import constants as C
from edgevlm.errors import InvalidModelError, UnsupportedModelError
from edgevlm.gguf_info import GGUFHeader

from . import ggml
from .backend import Backend
from .graph import CompiledGraph, GraphBuilder, RawTensor, Weights
from .tower_weights import LOG, upload_tower
from .vision import HF_ACTIVATIONS, _positive, patchify, read_gguf_tensors

PROJECTOR = "mm.0.weight"  # the projector matrix (an f16 one takes the encoder's states in f16)

LAYER_NORM_EPS = 1e-5  # MllamaVisionModel's layernorm_pre / layernorm_post: nn.LayerNorm defaults
TOKEN_MULTIPLE = 8     # each tile's tokens are padded to a multiple of this
_BLOCK_PARTS = ("attn_q", "attn_k", "attn_v", "attn_out", "ln1", "ln2", "ffn_up", "ffn_down")


@dataclass(frozen=True)
class MllamaVisionConfig:
    """What the encoder graph needs from an mllama projector file."""

    image_size: int
    patch_size: int
    width: int
    n_head: int
    n_local: int
    n_global: int
    eps: float
    activation: str
    intermediate: tuple[int, ...]
    max_num_tiles: int
    aspect_ratios: tuple[tuple[int, int], ...]
    max_image_tiles: int
    image_mean: tuple[float, ...]
    image_std: tuple[float, ...]
    resample: str
    output_width: int

    @property
    def n_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @property
    def n_positions(self) -> int:
        """Tokens per tile handed to the text model (patches + CLS)."""
        return self.n_patches + 1

    @property
    def n_padded(self) -> int:
        """Tokens per tile inside the encoder (a multiple of 8)."""
        return -(-self.n_positions // TOKEN_MULTIPLE) * TOKEN_MULTIPLE


def read_mllama_config(meta: Mapping[str, Any], tensors: Mapping[str, RawTensor]) -> MllamaVisionConfig:
    """Parse an mllama projector's metadata.

    Raises:
        UnsupportedModelError: not an mllama projector, or an unsupported activation.
        InvalidModelError: missing or inconsistent keys.
    """
    if meta.get(C.KEY_PROJECTOR_KIND) != C.PROJECTOR_KIND_MLLAMA:
        raise UnsupportedModelError(f"{C.KEY_PROJECTOR_KIND} is {meta.get(C.KEY_PROJECTOR_KIND)!r}, "
                                    f"not {C.PROJECTOR_KIND_MLLAMA!r}: not an mllama projector")
    p = "clip.vision."
    act = HF_ACTIVATIONS.get(str(meta.get(C.KEY_VISION_ACTIVATION, "gelu")))
    if act is None:
        raise UnsupportedModelError(f"vision activation {meta.get(C.KEY_VISION_ACTIVATION)!r} is not supported")
    flat = [int(x) for x in meta.get(C.KEY_MLLAMA_ASPECT_RATIOS) or []]
    if not flat or len(flat) % 2:
        raise InvalidModelError(f"{C.KEY_MLLAMA_ASPECT_RATIOS} must hold (high, wide) pairs, got {flat!r}")
    n_local = _positive(meta, p + "block_count")
    intermediate = tuple(int(x) for x in meta.get(C.KEY_MLLAMA_INTERMEDIATE_LAYERS) or [])
    if any(not 0 <= i < n_local for i in intermediate):
        raise InvalidModelError(f"{C.KEY_MLLAMA_INTERMEDIATE_LAYERS} {list(intermediate)} must be "
                                f"below the {n_local} local layers")
    if "mm.0.weight" not in tensors:
        raise InvalidModelError("the projector file has no tensor 'mm.0.weight'")
    max_tiles = _positive(meta, C.KEY_MLLAMA_MAX_NUM_TILES)
    return MllamaVisionConfig(
        image_size=_positive(meta, p + "image_size"), patch_size=_positive(meta, p + "patch_size"),
        width=_positive(meta, p + "embedding_length"), n_head=_positive(meta, p + "attention.head_count"),
        n_local=n_local, n_global=int(meta.get(C.KEY_MLLAMA_GLOBAL_BLOCK_COUNT, 0)),
        eps=float(meta.get(p + "attention.layer_norm_epsilon", 1e-5)), activation=act,
        intermediate=intermediate, max_num_tiles=max_tiles,
        aspect_ratios=tuple((flat[i], flat[i + 1]) for i in range(0, len(flat), 2)),
        max_image_tiles=int(meta.get(C.KEY_MLLAMA_MAX_IMAGE_TILES, max_tiles)),
        image_mean=tuple(float(x) for x in meta.get(p + "image_mean", (0.5, 0.5, 0.5))),
        image_std=tuple(float(x) for x in meta.get(p + "image_std", (0.5, 0.5, 0.5))),
        resample=str(meta.get(C.KEY_IMAGE_RESAMPLE, "bilinear")),
        output_width=int(tensors["mm.0.weight"].ne[1]))


def attention_mask(cfg: MllamaVisionConfig, n_tiles: int, dtype: type = np.float32) -> np.ndarray:
    """The encoder's additive mask ``(N, N)``, ``N = max_num_tiles * n_padded``, of ``dtype``
    (built in place: no temporary of another type or of booleans ``N x N``).

    As transformers' ``_prepare_aspect_ratio_attention_mask``: a token is
    *padding* if its tile is past ``n_tiles`` or it is one of the tokens added
    to reach a multiple of 8; -inf where both query and key are padding.
    """
    padding = np.ones((cfg.max_num_tiles, cfg.n_padded), dtype=bool)
    padding[:n_tiles, :cfg.n_positions] = False
    hidden = np.flatnonzero(padding.reshape(-1))
    mask = np.zeros((padding.size, padding.size), dtype)
    mask[np.ix_(hidden, hidden)] = -np.inf
    return mask


def gate_values(tensors: Mapping[str, RawTensor]) -> dict[str, float]:
    """``tanh`` of every gate tensor (names ending in ``gate``), read on the host."""
    out = {}
    for name, raw in tensors.items():
        if name.endswith("gate"):
            value = np.asarray(raw.data, dtype=np.float32).reshape(-1)
            if value.size != 1:
                raise InvalidModelError(f"gate {name} has {value.size} values, expected 1")
            out[name] = float(np.tanh(value[0]))
    return out


def is_encoder_matrix(name: str, ne: tuple[int, ...]) -> bool:
    """Whether a projector tensor is one of the encoder's ``mul_mat`` weights (converted and repacked)."""
    return (len(ne) == 2 and name.endswith(".weight") and name.startswith(("v.blk.", "v.global.blk.", "mm."))
            and "ln" not in name)


def _upload(device: str, n_threads: int, tensors: dict[str, RawTensor], matmul: set[str],
            progress: Callable[[float], None] | None) -> Weights:
    """The encoder's weights on a new backend; on the CPU, f16 matrices as ``auto`` converts a tower's
    (Q8_0 for ggml's AMX tile kernels where they are usable: :func:`tower_weights.choose_weight_type`)."""
    weights, choice = upload_tower(device, n_threads, tensors, "auto", matmul, progress=progress)
    LOG.info("mllama vision encoder on %s: matrices %s, %s", weights.backend.name, choice.weight_type, choice.reason)
    return weights


class MllamaVisionEncoder:
    """An mllama projector GGUF on a ggml backend: tiles in, cross-attention states out.

    Args:
        path: The projector GGUF.
        device: ggml device ("auto", "cpu", "cuda", "metal", or a name).
        n_threads: CPU threads.
        flash_attn: ggml's fused attention (f16 K/V and mask, f32 accumulation): the
            ``heads x N x N`` score matrix is never stored (N = tiles x padded tokens:
            6432 for the 11B, 2.6 GB of f32 scores otherwise); False: f32 softmax(QK^T)V.
        keep_graph: keep the graph and its compute buffer between images (539 MiB on the 11B);
            False (the default) frees them after each :meth:`encode`, so the buffer is never
            held beside the text decoder's (a graph build costs milliseconds; an encode, seconds).
        header: the file's header when already read (the model descriptor's); read otherwise.
        progress: called with the fraction of the weights uploaded; raising stops the load.

    Raises:
        InvalidModelError, UnsupportedModelError, KernelsUnavailableError.
    """

    def __init__(self, path: str | Path, *, device: str = "auto", n_threads: int = 4,
                 flash_attn: bool = True, keep_graph: bool = False, header: GGUFHeader | None = None,
                 progress: Callable[[float], None] | None = None) -> None:
        self.path = Path(path)
        self.flash_attn, self.keep_graph = flash_attn, keep_graph
        self.meta, tensors = read_gguf_tensors(self.path, header)
        self.config = read_mllama_config(self.meta, tensors)
        self.gates = gate_values(tensors)
        device_tensors = {n: t for n, t in tensors.items() if n not in self.gates}
        matmul = {n for n, t in device_tensors.items() if is_encoder_matrix(n, t.ne)}
        self.weights = _upload(device, n_threads, device_tensors, matmul, progress)
        self.backend = self.weights.backend
        self._graph: CompiledGraph | None = None
        self._scratch: Backend | None = None  # the backend the graph runs on

    @property
    def device(self) -> str:
        return self.backend.name

    @property
    def compute_bytes(self) -> int:
        """Bytes of the compute buffer held now (0 between images unless ``keep_graph``)."""
        return self._graph.compute_bytes if self._graph is not None else 0

    def encode(self, pixels: np.ndarray, aspect_ratio_id: int, n_tiles: int, *,
               cancelled: Callable[[], bool] | None = None) -> np.ndarray:
        """Run the encoder and projector on one image's tiles.

        Args:
            pixels: ``(max_num_tiles, 3, S, S)`` normalised tiles (zeros past ``n_tiles``).
            aspect_ratio_id: ``1 +`` the tile arrangement's index in the supported list.
            n_tiles: The image's real tiles.
            cancelled: asked between the graph's nodes on the CPU (seconds to minutes of
                work for the 11B's four tiles); True stops the encode.

        Returns:
            float32 ``(max_num_tiles, n_positions, output_width)``.

        Raises:
            InvalidModelError: wrong pixel shape, id or tile count.
            ComputeCancelled: ``cancelled`` stopped it.
        """
        cfg = self.config
        want = (cfg.max_num_tiles, 3, cfg.image_size, cfg.image_size)
        if pixels.shape != want:
            raise InvalidModelError(f"pixels of shape {pixels.shape}; the encoder takes {want}")
        if not 1 <= aspect_ratio_id <= len(cfg.aspect_ratios):
            raise InvalidModelError(f"aspect_ratio_id {aspect_ratio_id} is outside 1..{len(cfg.aspect_ratios)}")
        if not 1 <= n_tiles <= cfg.max_num_tiles:
            raise InvalidModelError(f"n_tiles {n_tiles} is outside 1..{cfg.max_num_tiles}")
        try:
            graph = self._graph = self._graph or self._build()
            graph.set_inputs({"patches": np.stack([patchify(t.astype(np.float32), cfg.patch_size) for t in pixels]),
                              "aspect_ratio_id": np.array([aspect_ratio_id], np.int32),
                              "mask": attention_mask(cfg, n_tiles, np.float16)})  # host copies dropped here
            graph.compute(cancelled)
            out = graph.output_array()
        finally:
            if not self.keep_graph:
                self.release()
        return out.reshape(cfg.max_num_tiles, cfg.n_positions, cfg.output_width)

    def release(self) -> None:
        """Free the graph, its compute buffer and (on the CPU) the scratch backend it ran on, whose
        work buffer ggml keeps at its largest; the next :meth:`encode` builds them again."""
        if self._graph is not None:
            self._graph.close()
            self._graph = None
        if self._scratch is not None:
            self.backend.close_scratch(self._scratch)
            self._scratch = None

    def _build(self) -> CompiledGraph:
        b = GraphBuilder()
        try:
            out, first = build_encoder(b, self.weights, self.config, self.gates, flash=self.flash_attn)
            self._scratch = self.backend if self.keep_graph else self.backend.scratch()
            return CompiledGraph(self._scratch, b, out, before=first)
        except Exception:
            b.close()
            raise

    def close(self) -> None:
        self.release()
        if getattr(self, "weights", None) is not None:
            self.weights.close()
            self.weights = None
        if getattr(self, "backend", None) is not None:
            self.backend.close()
            self.backend = None


def _pair(w: Weights, prefix: str) -> tuple[object, object | None]:
    return w[f"{prefix}.weight"], w.get(f"{prefix}.bias")


def _embed_tiles(b: GraphBuilder, w: Weights, cfg: MllamaVisionConfig, gates: Mapping[str, float]) -> object:
    """Steps 1-3 of the module docstring: ``[width, n_padded, tiles]``."""
    k, d, tiles = 3 * cfg.patch_size ** 2, cfg.width, cfg.max_num_tiles
    patches = b.input("patches", (k, cfg.n_patches, tiles))
    ar_id = b.input("aspect_ratio_id", (1,), ggml.GGML_TYPE_I32)
    x = b.linear(patches, b.reshape_2d(w["v.patch_embd.weight"], k, d))   # [d, patches, tiles]
    pre = b.reshape_3d(b.get_rows(w["v.pre_tile_position_embd.weight"], ar_id), d, 1, tiles)
    x = b.add(x, b.scale(pre, gates["v.pre_tile_position_embd.gate"]))
    cls = b.repeat(b.reshape_2d(w["v.class_embd"], d, 1), b.rows(x, 0, 1))  # [d, 1, tiles]
    x = b.concat(cls, x, 1)
    gate = gates["v.position_embd.gate"]
    x = b.add(x, b.scale(w["v.position_embd.weight"], 1.0 - gate))
    tile_pos = b.get_rows(w["v.tile_position_embd.weight"], ar_id)
    x = b.add(x, b.scale(b.reshape_3d(tile_pos, d, cfg.n_positions, tiles), gate))
    x = b.layer_norm(x, *_pair(w, "v.pre_ln"), LAYER_NORM_EPS)
    return b.pad(x, 0, cfg.n_padded - cfg.n_positions)


def _layer(b: GraphBuilder, w: Weights, prefix: str, x: object, mask: object, cfg: MllamaVisionConfig,
           gates: Mapping[str, float] | None, flash: bool) -> object:
    """One encoder layer (pre-norm); a global layer scales both branches by its gates."""
    p = {part: _pair(w, f"{prefix}.{part}") for part in _BLOCK_PARTS}
    h = b.attention(b.layer_norm(x, *p["ln1"], cfg.eps), p["attn_q"], p["attn_k"], p["attn_v"],
                    p["attn_out"], cfg.n_head, mask=mask, flash=flash)
    if gates is not None:
        h = b.scale(h, gates[f"{prefix}.attn_gate"])
    x = b.add(x, h)
    h = b.mlp(b.layer_norm(x, *p["ln2"], cfg.eps), p["ffn_up"], p["ffn_down"], cfg.activation)
    if gates is not None:
        h = b.scale(h, gates[f"{prefix}.ffn_gate"])
    return b.add(x, h)


def build_encoder(b: GraphBuilder, w: Weights, cfg: MllamaVisionConfig, gates: Mapping[str, float], *,
                  flash: bool = False) -> tuple[object, list[object]]:
    """The whole encoder + projector graph: ``[output_width, n_positions, tiles]`` (mask input f16),
    and the nodes to compute first.

    Unless the projector is f32, the kept intermediate states and their concatenation are f16, each
    copied as soon as its layer is done (the nodes returned), so its f32 state is freed; an f16
    projector takes that input as it is (what ggml would convert an f32 input to for that product),
    another type an f32 copy of it. On the 11B's geometry (CompiledGraph.compute_bytes): f16
    projector 564 -> 376 MiB (and ggml's work buffer loses its 94 MiB f16 copy of the input)."""
    d, tiles, n = cfg.width, cfg.max_num_tiles, cfg.max_num_tiles * cfg.n_padded
    x = b.reshape_2d(_embed_tiles(b, w, cfg, gates), d, n)
    mask = b.input("mask", (n, n), ggml.GGML_TYPE_F16)
    projector = w[PROJECTOR].contents.type
    half = projector != ggml.GGML_TYPE_F32

    def keep(t: object) -> object:
        return b.g.ggml_cast(b.ctx, t, ggml.GGML_TYPE_F16) if half else t

    kept = []
    for il in range(cfg.n_local):
        x = _layer(b, w, f"v.blk.{il}", x, mask, cfg, None, flash)
        if il in cfg.intermediate:
            kept.append(keep(x))
    x = b.layer_norm(x, *_pair(w, "v.post_ln"), LAYER_NORM_EPS)
    post = b.reshape_3d(b.get_rows(w["v.post_tile_position_embd.weight"], b.inputs["aspect_ratio_id"]), d, 1, tiles)
    x = b.add(b.reshape_3d(x, d, cfg.n_padded, tiles), b.scale(post, gates["v.post_tile_position_embd.gate"]))
    x = b.reshape_2d(x, d, n)
    for il in range(cfg.n_global):
        x = _layer(b, w, f"v.global.blk.{il}", x, mask, cfg, gates, flash)
    if kept:
        stacked = b.reshape_3d(kept[0], 1, d, n)
        for state in kept[1:]:
            stacked = b.concat(stacked, b.reshape_3d(state, 1, d, n), 0)  # [K, d, n]: feature d*K + k
        x = b.concat(keep(x), b.reshape_2d(stacked, d * len(kept), n), 0)
    width = d * (1 + len(kept))
    x = b.rows(b.reshape_3d(x, width, cfg.n_padded, tiles), 0, cfg.n_positions)  # a contiguous copy:
    if half and projector != ggml.GGML_TYPE_F16:
        x = b.g.ggml_cast(b.ctx, x, ggml.GGML_TYPE_F32)
    out = b.linear(b.reshape_2d(x, width, cfg.n_positions * tiles), *_pair(w, "mm.0"))  # one product
    return b.reshape_3d(out, cfg.output_width, cfg.n_positions, tiles), kept if half else []
