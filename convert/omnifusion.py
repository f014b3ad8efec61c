"""OmniFusion 1.1 converter (AIRI-Institute/OmniFusion, folder ``OmniMistral-v1_1``).

The release is a folder without a top-level ``config.json``:

* ``tuned-model/``: a Hugging Face ``MistralForCausalLM`` -> llama GGUF,
  written (and quantised) exactly like the LLaVA text model;
* ``tokenizer/``: the sentencepiece tokenizer, used for the GGUF vocabulary;
* ``projection.pt``: ``torch.save`` of ``models.VisualToGPTMapping`` =
  ``nn.TransformerEncoderLayer(d_model, nhead, batch_first=True)`` followed by
  ``nn.Linear(d_model, llm_width)`` (a plain state dict of it is accepted too);
* ``special_embeddings.pt``: the learned ``SOI``, ``EOI``, ``USER``, ``BOT``
  vectors placed around the image and the question.

The CLIP tower is not part of the release: ``vision_tower=`` /
``--vision-tower`` names a local ``CLIPVisionModel`` or ``CLIPModel`` folder.
OmniFusion feeds the adapter ``hidden_states[-2][:, 1:]``, so the tower is
written as the LLaVA path writes a CLIP tower with feature layer -2.

The projector GGUF (``general.architecture = "clip"``) adds the adapter
(``adapter.*``), the special embeddings (``special.*``) and the ``edgevlm.*``
keys of :mod:`edgevlm.constants`. Its ``clip.projector_type`` is
``"edgevlm-omnifusion"``: libmtmd refuses that type at load instead of
running the tower with a projector it would misread ("mlp" would make it look
for ``mm.0``/``mm.2``); only edgevlm's own kernels run this projector.

The ``.pt`` files are read by :mod:`.torch_pickle`: torch is not needed and
nothing in them is executed.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edgevlm import constants
from edgevlm.errors import ConversionError, ModelNotFoundError, UnsupportedModelError

from .base import Converter, ConverterOption, register, split_names
from .checkpoint import ArrayReader, CheckpointReader, ReaderChain, TensorSource
from .config import TextConfig, VisionConfig, read_config_json
from .llava import SUPPORTED_TEXT
from .llm_writer import llama_tensor_specs, write_llama_hparams
from .projector_writer import (check_tower_shapes, feature_layer_count, image_normalisation,
                               image_processor_config, vision_tower_specs, write_clip_hparams)
from .tensors import TensorSpec, Transform
from .torch_pickle import ModuleStandIn, TorchFunction, load_torch_file, state_dict_of
from .tokenizer import write_vocab

ARCHITECTURE = "OmniFusion"
PROJECTION_FILE = "projection.pt"
SPECIAL_FILE = "special_embeddings.pt"
LLM_DIR = "tuned-model"
TOKENIZER_DIR = "tokenizer"
FEATURE_LAYER = -2
ADAPTER_ACTIVATIONS = ("relu", "gelu")
TORCH_LAYER_NORM_EPS = 1e-5
_TEXT_ARCHS = ("MistralForCausalLM", "LlamaForCausalLM")
_QKV = ("q", "k", "v")

# state-dict name of VisualToGPTMapping -> GGUF name (in_proj: split into q/k/v)
ADAPTER_TENSORS: dict[str, str] = {
    "transformer_layer.self_attn.in_proj_weight": "adapter.attn_{}.weight",
    "transformer_layer.self_attn.in_proj_bias": "adapter.attn_{}.bias",
    "transformer_layer.self_attn.out_proj.weight": "adapter.attn_out.weight",
    "transformer_layer.self_attn.out_proj.bias": "adapter.attn_out.bias",
    "transformer_layer.norm1.weight": "adapter.ln1.weight",
    "transformer_layer.norm1.bias": "adapter.ln1.bias",
    "transformer_layer.linear1.weight": "adapter.ffn_up.weight",
    "transformer_layer.linear1.bias": "adapter.ffn_up.bias",
    "transformer_layer.linear2.weight": "adapter.ffn_down.weight",
    "transformer_layer.linear2.bias": "adapter.ffn_down.bias",
    "transformer_layer.norm2.weight": "adapter.ln2.weight",
    "transformer_layer.norm2.bias": "adapter.ln2.bias",
    "linear.weight": "adapter.proj.weight",
    "linear.bias": "adapter.proj.bias",
}
# AdapterConfig field -> where its value comes from (named in error messages)
_ADAPTER_KEYS = {
    "d_model": "transformer_layer.self_attn.in_proj_weight columns",
    "n_heads": "transformer_layer.self_attn.num_heads (--adapter-heads)",
    "ffn": "transformer_layer.linear1.weight rows",
    "out_width": "linear.weight rows",
    "eps": "transformer_layer.norm1.eps",
    "norm_first": "transformer_layer.norm_first",
    "activation": "transformer_layer.activation",
}


@dataclass(frozen=True)
class AdapterConfig:
    """The OmniFusion adapter: one ``nn.TransformerEncoderLayer`` plus a ``Linear``.

    Attributes:
        d_model: Width of the tower features it takes (and of the layer).
        n_heads: Attention heads of the layer.
        ffn: ``dim_feedforward`` of the layer.
        out_width: Width of its output (the LLM's hidden size).
        eps: Epsilon of both layer norms.
        norm_first: Pre-norm (``True``) or post-norm (``False``, OmniFusion 1.1).
        activation: ``"relu"`` (OmniFusion 1.1) or ``"gelu"``.
        source: The file it came from, for error messages.
    """

    d_model: int
    n_heads: int
    ffn: int
    out_width: int
    eps: float
    norm_first: bool
    activation: str
    source: str = field(default=PROJECTION_FILE, compare=False)

    def __post_init__(self) -> None:
        for key in ("d_model", "n_heads", "ffn", "out_width"):
            value = getattr(self, key)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                self._fail(key, f"must be a positive integer, got {value!r}")
        if self.d_model % self.n_heads:
            self._fail("n_heads", f"({self.n_heads}) does not divide d_model ({self.d_model})")
        if isinstance(self.eps, bool) or not isinstance(self.eps, (int, float)) or \
                not 0 < self.eps < 1:
            self._fail("eps", f"must be a small positive number, got {self.eps!r}")
        object.__setattr__(self, "eps", float(self.eps))
        if not isinstance(self.norm_first, bool):
            self._fail("norm_first", f"must be True or False, got {self.norm_first!r}")
        if self.activation not in ADAPTER_ACTIVATIONS:
            raise UnsupportedModelError(
                f"{self.source}: {_ADAPTER_KEYS['activation']} {self.activation!r} is not "
                f"supported; supported: {', '.join(ADAPTER_ACTIVATIONS)}.")

    def _fail(self, key: str, problem: str) -> None:
        raise ConversionError(f"{self.source}: adapter {key} ({_ADAPTER_KEYS[key]}) {problem}.")

    def tensor_shapes(self) -> dict[str, tuple[int, ...]]:
        """Expected ``state-dict name -> shape`` of the adapter's tensors."""
        d, f, o = self.d_model, self.ffn, self.out_width
        matrices = {"transformer_layer.self_attn.in_proj": (3 * d, d),
                    "transformer_layer.self_attn.out_proj": (d, d),
                    "transformer_layer.norm1": (d,), "transformer_layer.norm2": (d,),
                    "transformer_layer.linear1": (f, d), "transformer_layer.linear2": (d, f),
                    "linear": (o, d)}
        shapes = {}
        for name in ADAPTER_TENSORS:
            stem, kind = name.replace("in_proj_", "in_proj.").rsplit(".", 1)
            shape = matrices[stem]
            shapes[name] = shape if kind == "weight" else shape[:1]
        return shapes


@dataclass(frozen=True)
class OmniFusionConfig:
    """Everything the OmniFusion converter reads: LLM, tower and adapter settings."""

    text: TextConfig
    vision: VisionConfig
    adapter: AdapterConfig
    architecture: str = ARCHITECTURE


def _activation(value: Any, source: str) -> str:
    """Name the activation of a pickled TransformerEncoderLayer."""
    if isinstance(value, TorchFunction):
        return value.activation
    if isinstance(value, ModuleStandIn):
        kind = value.qualified_name.rsplit(".", 1)[-1]
        if kind == "ReLU":
            return "relu"
        if kind == "GELU" and value.state.get("approximate", "none") == "none":
            return "gelu"
    raise UnsupportedModelError(f"{source}: {_ADAPTER_KEYS['activation']} {value!r} is not "
                                f"supported; supported: {', '.join(ADAPTER_ACTIVATIONS)}.")


def _child(module: ModuleStandIn, name: str, kind: str, source: str) -> ModuleStandIn:
    child = module.child(name)
    if not isinstance(child, ModuleStandIn) or not child.qualified_name.endswith("." + kind):
        raise UnsupportedModelError(
            f"{source}: {module.qualified_name} has no nn.{kind} named {name!r}; only "
            "OmniFusion 1.1's VisualToGPTMapping (transformer_layer + linear) is supported.")
    return child


def module_settings(root: ModuleStandIn, source: str) -> dict[str, Any]:
    """Read heads, eps, norm order and activation from a pickled VisualToGPTMapping.

    Args:
        root: The stand-in of the pickled module.
        source: File name for messages.

    Returns:
        ``n_heads``, ``eps``, ``norm_first``, ``activation`` for :class:`AdapterConfig`.

    Raises:
        UnsupportedModelError: a layer variant the runtime does not implement.
    """
    layer = _child(root, "transformer_layer", "TransformerEncoderLayer", source)
    attn = _child(layer, "self_attn", "MultiheadAttention", source).state
    if attn.get("batch_first") is not True:
        raise UnsupportedModelError(
            f"{source}: the adapter's attention has batch_first={attn.get('batch_first')!r}; "
            "it would attend across images instead of patches. Only batch_first=True "
            "(OmniFusion 1.1) is supported.")
    if attn.get("bias_k") is not None or attn.get("bias_v") is not None or \
            attn.get("add_zero_attn") or attn.get("_qkv_same_embed_dim") is False:
        raise UnsupportedModelError(f"{source}: the adapter's attention uses add_bias_kv, "
                                    "add_zero_attn or separate kdim/vdim; not supported.")
    eps = {_child(layer, n, "LayerNorm", source).state.get("eps") for n in ("norm1", "norm2")}
    if len(eps) != 1:
        raise UnsupportedModelError(f"{source}: norm1 and norm2 have different eps {eps}; "
                                    "the GGUF stores one.")
    return {"n_heads": attn.get("num_heads"), "eps": eps.pop(),
            "norm_first": layer.state.get("norm_first"),
            "activation": _activation(layer.state.get("activation", layer.child("activation")),
                                      source)}


def load_adapter(path: Path, heads: int | None) -> tuple[AdapterConfig, dict[str, np.ndarray],
                                                         str | None]:
    """Read ``projection.pt``: the adapter's settings and tensors.

    Args:
        path: ``projection.pt`` (a pickled module or its plain state dict).
        heads: ``--adapter-heads``; required for a plain state dict, checked otherwise.

    Returns:
        ``(config, state-dict name -> array, note or None)``.

    Raises:
        UnsafePickleError: the pickle asks for a global edgevlm refuses.
        ConversionError / UnsupportedModelError: unreadable file, missing or
            extra tensors, wrong shapes, missing or conflicting head count.
    """
    obj = load_torch_file(path)
    source = str(path)
    state = state_dict_of(obj, source)
    _check_names(state, source)
    note = None
    if isinstance(obj, ModuleStandIn):
        settings = module_settings(obj, source)
        if heads is not None and heads != settings["n_heads"]:
            raise ConversionError(f"--adapter-heads {heads} contradicts {source}, whose "
                                  f"adapter has {settings['n_heads']} heads; drop the option.")
    elif heads is None:
        raise ConversionError(
            f"{source} is a plain state dict, which does not record the adapter's attention "
            "heads; pass --adapter-heads N (adapter_heads=N), the nhead it was trained with.")
    else:
        settings = {"n_heads": heads, "eps": TORCH_LAYER_NORM_EPS, "norm_first": False,
                    "activation": "relu"}
        note = (f"{path.name} is a plain state dict: assumed post-norm, ReLU and layer-norm eps "
                f"{TORCH_LAYER_NORM_EPS} (nn.TransformerEncoderLayer's defaults, as OmniFusion "
                "1.1 uses them).")
    cfg = _adapter_config(state, settings, source)
    return cfg, state, note


def _check_names(state: Mapping[str, np.ndarray], source: str) -> None:
    missing = [n for n in ADAPTER_TENSORS if n not in state]
    extra = [n for n in state if n not in ADAPTER_TENSORS]
    if missing:
        raise ConversionError(f"{source}: adapter tensor {missing[0]!r} is missing; expected "
                              "OmniFusion 1.1's VisualToGPTMapping (transformer_layer + linear).")
    if extra:
        raise UnsupportedModelError(f"{source}: tensor {extra[0]!r} is not part of OmniFusion "
                                    "1.1's adapter; this adapter variant is not supported.")


def _adapter_config(state: Mapping[str, np.ndarray], settings: Mapping[str, Any],
                    source: str) -> AdapterConfig:
    in_proj = state["transformer_layer.self_attn.in_proj_weight"]
    ffn = state["transformer_layer.linear1.weight"]
    out = state["linear.weight"]
    for name, array in (("in_proj_weight", in_proj), ("linear1.weight", ffn),
                        ("linear.weight", out)):
        if array.ndim != 2:
            raise ConversionError(f"{source}: {name} has shape {list(array.shape)}, expected "
                                  "a matrix.")
    cfg = AdapterConfig(d_model=int(in_proj.shape[1]), ffn=int(ffn.shape[0]),
                        out_width=int(out.shape[0]), source=source, **settings)
    for name, shape in cfg.tensor_shapes().items():
        if tuple(state[name].shape) != shape:
            raise ConversionError(f"{source}: {name} has shape {list(state[name].shape)}, "
                                  f"expected {list(shape)} for d_model {cfg.d_model}.")
        if state[name].dtype.kind != "f":
            raise ConversionError(f"{source}: {name} has dtype {state[name].dtype}, expected "
                                  "floating point.")
    return cfg


def load_special_embeddings(path: Path, width: int) -> dict[str, np.ndarray]:
    """Read ``special_embeddings.pt``: exactly SOI, EOI, USER, BOT of length ``width``.

    Args:
        path: The file.
        width: The LLM's hidden size.

    Returns:
        ``name -> float32 vector``, in :data:`SPECIAL_EMBEDDING_TENSORS` order.

    Raises:
        UnsafePickleError: the pickle asks for a refused global.
        ConversionError: unreadable file, other keys, wrong shapes.
    """
    obj = load_torch_file(path)
    want = list(constants.SPECIAL_EMBEDDING_TENSORS)
    if not isinstance(obj, Mapping):
        raise ConversionError(f"{path} must hold a dict of {', '.join(want)} tensors, not "
                              f"{type(obj).__name__}.")
    missing = [k for k in want if k not in obj]
    extra = [str(k) for k in obj if k not in want]
    if missing or extra:
        problem = f"misses {', '.join(missing)}" if missing else f"has extra {', '.join(extra)}"
        raise ConversionError(f"{path} {problem}; it must hold exactly {', '.join(want)} "
                              "(OmniFusion 1.1's special embeddings).")
    out = {}
    for key in want:
        value = obj[key]
        if not isinstance(value, np.ndarray) or value.dtype.kind != "f" or \
                value.shape != (width,):
            shape = list(getattr(value, "shape", [])) or type(value).__name__
            raise ConversionError(f"{path}: {key} is {shape}, expected a float vector of "
                                  f"length {width} (the LLM's hidden size); release files "
                                  "do not belong together.")
        out[key] = value.astype(np.float32)
    return out


def _rows(start: int, stop: int) -> Transform:
    def transform(array: np.ndarray) -> np.ndarray:
        return array[start:stop]
    return transform


def adapter_specs(cfg: AdapterConfig, vision_type: str) -> list[TensorSpec]:
    """Plan the ``adapter.*`` tensors, splitting ``in_proj`` rows into q, k, v.

    Args:
        cfg: The adapter.
        vision_type: ``f32``, ``f16`` or ``q8_0``; matrices are F16 under ``f16``
            and F32 otherwise, vectors always F32.

    Returns:
        Specs whose sources are ``projection.pt:<state-dict name>``.
    """
    shapes = cfg.tensor_shapes()
    d = cfg.d_model
    specs = []
    for local, name in ADAPTER_TENSORS.items():
        shape = shapes[local]
        kind = "F16" if vision_type == "f16" and len(shape) == 2 else "F32"
        source = f"{PROJECTION_FILE}:{local}"
        if "in_proj" not in local:
            specs.append(TensorSpec(name, source, shape, kind))
            continue
        for i, part in enumerate(_QKV):
            specs.append(TensorSpec(name.format(part), source, (d, *shape[1:]), kind,
                                    _rows(i * d, (i + 1) * d)))
    return specs


def _check_image_processor(folder: Path, cfg: VisionConfig) -> None:
    """Require CLIP's shortest-edge resize + centre crop to the tower's image size."""
    data = image_processor_config(folder)
    size, crop = data.get("size"), data.get("crop_size")
    edge = size.get("shortest_edge") if isinstance(size, dict) else size
    crops = set(crop.values()) if isinstance(crop, dict) else {crop}
    for what, values in (("size.shortest_edge", {edge}), ("crop_size", crops)):
        if values - {None, cfg.image_size}:
            raise UnsupportedModelError(
                f"{folder}/preprocessor_config.json: {what} {sorted(values - {None})} differs "
                f"from the tower's image_size {cfg.image_size}; edgevlm resizes the shortest "
                "edge to image_size and centre-crops a square of that size.")


def _open_tower(path: Any) -> tuple[Path, VisionConfig, CheckpointReader]:
    """Open the ``--vision-tower`` folder (CLIPVisionModel or CLIPModel)."""
    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise ModelNotFoundError(f"vision tower folder {folder} does not exist; pass the local "
                                 "folder of the CLIP model OmniFusion was trained with "
                                 "(openai/clip-vit-large-patch14-336).")
    raw = read_config_json(folder)
    data = raw.get("vision_config", raw) if raw.get("model_type") != "clip_vision_model" else raw
    if not isinstance(data, Mapping):
        raise ConversionError(f"{folder}/config.json: vision_config must be an object.")
    try:
        cfg = VisionConfig.from_dict(data)
    except ConversionError as exc:
        raise ConversionError(f"vision tower {folder}: {exc}") from exc
    if not cfg.has_cls_token:
        raise UnsupportedModelError(f"vision tower {folder} is a {cfg.model_type}; OmniFusion "
                                    "uses a CLIP tower (it drops the CLS token).")
    _check_image_processor(folder, cfg)
    return folder, cfg, CheckpointReader(folder)


@register(ARCHITECTURE)
class OmniFusionConverter(Converter):
    """OmniFusion 1.1: Mistral LLM, external CLIP tower, transformer-layer adapter."""

    prompt_family = constants.PROMPT_LAYOUT_OMNIFUSION
    text_prefixes = (("model.", "model."), ("lm_head.", "lm_head."))
    # CLIPModel and transformers-4 CLIPVisionModel: vision_model.*; transformers 5
    # saves a CLIPVisionModel without the prefix.
    vision_prefixes = (("vision_model.", ""), ("embeddings.", "embeddings."),
                       ("pre_layrnorm.", "pre_layrnorm."), ("encoder.", "encoder."),
                       ("post_layernorm.", "post_layernorm."))
    options = (ConverterOption("vision_tower", "path",
                               "local CLIP folder for releases shipped without their tower"),
               ConverterOption("adapter_heads", "int",
                               "attention heads of an adapter saved as a plain state dict"))
    config: OmniFusionConfig

    @classmethod
    def detect(cls, folder: Path) -> bool:
        """An OmniFusion release: projection.pt, special_embeddings.pt and tuned-model/."""
        folder = Path(folder)
        return ((folder / PROJECTION_FILE).is_file() and (folder / SPECIAL_FILE).is_file()
                and (folder / LLM_DIR).is_dir())

    def open(self) -> None:
        """Read the LLM, the tower, the adapter and the special embeddings.

        Raises:
            ConversionError: no ``--vision-tower``, or any part is missing or malformed.
            UnsafePickleError: a ``.pt`` file asks for a refused global.
        """
        if self.settings.get("vision_tower") is None:
            raise ConversionError(
                f"{self.folder} is an OmniFusion release, which does not include its vision "
                "tower; pass --vision-tower path/to/clip-vit-large-patch14-336 "
                "(vision_tower= in Python).")
        text = self._open_llm()
        self.tower_folder, vision, self.tower_reader = _open_tower(self.settings["vision_tower"])
        self.vision_names = split_names(self.tower_reader.names(), self.vision_prefixes)
        if not self.vision_names:
            raise ConversionError(f"{self.tower_folder} has no CLIP vision tensors; pass a "
                                  "CLIPVisionModel or CLIPModel folder as --vision-tower.")
        self.n_vision_layers = feature_layer_count(vision, FEATURE_LAYER)
        adapter, adapter_state, note = load_adapter(self.folder / PROJECTION_FILE,
                                                    self.settings.get("adapter_heads"))
        if note:
            self.note(note)
        self.special = load_special_embeddings(self.folder / SPECIAL_FILE, text.hidden_size)
        self.config = OmniFusionConfig(text, vision, adapter)
        arrays = {f"{PROJECTION_FILE}:{k}": v for k, v in adapter_state.items()}
        arrays.update({f"{SPECIAL_FILE}:{k}": v for k, v in self.special.items()})
        self._projector_reader = ReaderChain([self.tower_reader,
                                              ArrayReader(arrays, str(self.folder))])

    def _open_llm(self) -> TextConfig:
        folder = self.folder / LLM_DIR
        self.raw_config = read_config_json(folder)
        arch = (self.raw_config.get("architectures") or ["?"])[0]
        kind = self.raw_config.get("model_type")
        if arch not in _TEXT_ARCHS or kind not in SUPPORTED_TEXT:
            raise UnsupportedModelError(
                f"{folder}/config.json: {arch} ({kind}) is not supported; OmniFusion's LLM "
                f"must be one of {', '.join(_TEXT_ARCHS)}.")
        try:
            text = TextConfig.from_dict(self.raw_config)
        except ConversionError as exc:
            raise ConversionError(f"{LLM_DIR}/{exc}") from exc
        window = self.raw_config.get("sliding_window")
        if isinstance(window, int) and 0 < window < text.max_position_embeddings:
            self.note(f"sliding_window {window} is not applied by llama.cpp's llama architecture;"
                      f" prompts longer than {window} tokens are attended in full.")
        self.reader = CheckpointReader(folder)
        self.text_names = split_names(self.reader.names(), self.text_prefixes)
        self.projector_names: dict[str, str] = {}
        return text

    def validate(self) -> None:
        """Check that tower, adapter, special embeddings and LLM widths agree.

        Raises:
            ConversionError: naming the file and both widths.
        """
        cfg = self.config
        if cfg.adapter.d_model != cfg.vision.hidden_size:
            raise ConversionError(
                f"{cfg.adapter.source}: the adapter takes {cfg.adapter.d_model}-wide features "
                f"but the vision tower {self.tower_folder} outputs {cfg.vision.hidden_size}; pass "
                "the CLIP tower OmniFusion was trained with as --vision-tower.")
        if cfg.adapter.out_width != cfg.text.hidden_size:
            raise ConversionError(
                f"{cfg.adapter.source}: the adapter outputs {cfg.adapter.out_width}-wide "
                f"embeddings but {LLM_DIR} has hidden size {cfg.text.hidden_size}; the release "
                "files do not belong together.")

    @property
    def tokenizer_folder(self) -> Path:
        """``tokenizer/`` of the release, else ``tuned-model/`` if it has tokenizer files.

        Raises:
            ConversionError: neither holds ``tokenizer.model`` or ``tokenizer.json``.
        """
        for folder in (self.folder / TOKENIZER_DIR, self.folder / LLM_DIR):
            if (folder / "tokenizer.model").is_file() or (folder / "tokenizer.json").is_file():
                return folder
        raise ConversionError(f"{self.folder} has no {TOKENIZER_DIR}/tokenizer.model (nor "
                              f"tokenizer files in {LLM_DIR}/); the release is incomplete.")

    @property
    def projector_reader(self) -> TensorSource:
        """Tower safetensors plus the tensors read from the ``.pt`` files."""
        return self._projector_reader

    # --- LLM ---------------------------------------------------------------
    def llm_tensors(self, ggml_type: str) -> list[TensorSpec]:
        """Plan the llama tensors of ``tuned-model/``."""
        return llama_tensor_specs(self.text_names, self.reader, self.config.text, ggml_type)

    def write_llm_metadata(self, writer: Any) -> None:
        """Write llama hparams, the ``tokenizer/`` vocabulary and edgevlm keys."""
        writer.add_name(self.folder.name)
        write_llama_hparams(writer, self.config.text, self.vocab_rows())
        write_vocab(writer, self.tokenizer_folder, self.vocab_rows(), self.log,
                    config_folder=self.folder / LLM_DIR)
        self.write_edgevlm_keys(writer, ARCHITECTURE)

    # --- projector -----------------------------------------------------------
    def projector_tensors(self, vision_type: str) -> list[TensorSpec]:
        """Plan tower (``hidden_states[-2]``), adapter and special-embedding tensors."""
        cfg = self.config
        specs = vision_tower_specs(self.vision_names, self.tower_reader, self.n_vision_layers,
                                   vision_type)
        check_tower_shapes({s.name: s for s in specs}, cfg.vision, self.n_vision_layers)
        specs += adapter_specs(cfg.adapter, vision_type)
        specs += [TensorSpec(name, f"{SPECIAL_FILE}:{key}", (cfg.text.hidden_size,), "F32")
                  for key, name in constants.SPECIAL_EMBEDDING_TENSORS.items()]
        return specs

    def write_projector_metadata(self, writer: Any) -> None:
        """Write the ``clip.*`` tower keys and the ``edgevlm.*`` adapter/prompt keys."""
        cfg, c = self.config, constants
        mean, std = image_normalisation(self.tower_folder, cfg.vision)
        writer.add_name(f"mmproj-{self.folder.name}")
        write_clip_hparams(writer, cfg.vision, n_layers=self.n_vision_layers,
                           projection_dim=cfg.text.hidden_size, image_mean=mean, image_std=std,
                           projector_type=c.CLIP_PROJECTOR_TYPE_OMNIFUSION)
        self.write_edgevlm_keys(writer, ARCHITECTURE)
        writer.add_int32(c.KEY_VISION_FEATURE_LAYER, FEATURE_LAYER)
        writer.add_string(c.KEY_VISION_SELECT_STRATEGY, "default")
        writer.add_string(c.KEY_VISION_ACTIVATION, cfg.vision.hidden_act)
        writer.add_string(c.KEY_PROJECTOR_KIND, c.PROJECTOR_KIND_OMNIFUSION)
        writer.add_uint32(c.KEY_ADAPTER_HEAD_COUNT, cfg.adapter.n_heads)
        writer.add_float32(c.KEY_ADAPTER_LAYER_NORM_EPS, cfg.adapter.eps)
        writer.add_string(c.KEY_ADAPTER_ACTIVATION, cfg.adapter.activation)
        writer.add_bool(c.KEY_ADAPTER_NORM_FIRST, cfg.adapter.norm_first)
        writer.add_string(c.KEY_PROMPT_LAYOUT, c.PROMPT_LAYOUT_OMNIFUSION)
        writer.add_string(c.KEY_PROMPT_PREFIX, c.OMNIFUSION_PROMPT_PREFIX)
        writer.add_string(c.KEY_IMAGE_RESIZE, c.IMAGE_RESIZE_MODES[0])
