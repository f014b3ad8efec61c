"""GGUF keys, enums and file-naming conventions edgevlm adds.

Keys llama.cpp already defines are used through the ``gguf`` package's
``Keys`` tables; what edgevlm invents lives here, namespaced ``edgevlm.*``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

# --- keys edgevlm writes into the files it produces ------------------------
KEY_EDGEVLM_VERSION = "edgevlm.version"            # str: edgevlm version that wrote the file
KEY_SOURCE_ARCHITECTURE = "edgevlm.source.architecture"  # str: config.json architectures[0]
KEY_PROMPT_FAMILY = "edgevlm.prompt.family"         # str: a key of edgevlm.prompt.CHAT_FORMATS (or a layout)
KEY_VISION_FEATURE_LAYER = "edgevlm.vision.feature_layer"  # int: HF vision_feature_layer (as given)
KEY_VISION_SELECT_STRATEGY = "edgevlm.vision.select_strategy"  # str: "default" (drop CLS) | "full"
KEY_VISION_ACTIVATION = "edgevlm.vision.activation"  # str: HF hidden_act of the tower
KEY_PROJECTOR_ACTIVATION = "edgevlm.projector.activation"  # str: HF projector_hidden_act
KEY_POSITION_LAYOUT = "edgevlm.vision.position_layout"  # str: row order of v.position_embd ("cls-last": CLS row moved to the end)

# --- file naming inside a converted model folder -----------------------------
MMPROJ_PREFIX = "mmproj-"          # projector files start with this (llama.cpp convention)
GGUF_SUFFIX = ".gguf"

# --- runtime settings shared by the API, the CLI and the kernels -------------
#: KV cache element types -> ggml_type values (ggml.h of the pinned llama.cpp).
KV_TYPES = {"f32": 0, "f16": 1, "q8_0": 8, "q4_0": 2, "bf16": 30}
#: KV types llama.cpp stores quantised; a quantised V cache needs flash attention.
QUANTISED_KV_TYPES = ("q8_0", "q4_0")
#: Who runs a vision tower: edgevlm's ggml graphs, llama.cpp's libmtmd, or the family's choice.
VISION_ENGINE_AUTO = "auto"
VISION_ENGINE_KERNELS = "kernels"
VISION_ENGINE_MTMD = "mtmd"
VISION_ENGINES = (VISION_ENGINE_AUTO, VISION_ENGINE_KERNELS, VISION_ENGINE_MTMD)
#: The media marker libmtmd (and edgevlm's prompts) put where an image goes.
MEDIA_MARKER = "<__media__>"
#: OpenAI CLIP's image normalisation (CLIPImageProcessor defaults).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
#: The projector tensor whose rows are the LLM-ready width, per projector layout, in the
#: order they are looked for (LLaVA MLP: mm.2, single-linear projectors: mm.0, OmniFusion:
#: its adapter's final linear map).
PROJECTOR_OUTPUT_TENSORS = ("mm.2.weight", "mm.0.weight", "adapter.proj.weight")


def projector_output_width(shapes: Mapping[str, Sequence[int]]) -> int | None:
    """The width of the embeddings a projector produces (what the LLM must take).

    ``shapes`` maps the projector's tensor names to their ggml shapes (ne);
    the width is ne[1] of the first matrix of :data:`PROJECTOR_OUTPUT_TENSORS`
    the file has (``clip.vision.projection_dim`` is not reliable: old
    conversions stored CLIP's own). None when it has none of them.
    """
    for name in PROJECTOR_OUTPUT_TENSORS:
        shape = shapes.get(name)
        if shape is not None and len(shape) > 1:
            return int(shape[1])
    return None

# --- the model used when none is given ----------------------------------------
#: Environment variable naming the model to use when ``--model`` / ``load(model)`` is not given.
ENV_MODEL = "EDGEVLM_MODEL"
#: Environment variable overriding the folder of edgevlm's config file.
ENV_CONFIG_DIR = "EDGEVLM_CONFIG_DIR"


@dataclass(frozen=True)
class HubModel:
    """A GGUF pair at a fixed revision of a Hugging Face repo.

    Attributes:
        name: what it is called in messages.
        repo_id: ``owner/name`` on the hub.
        revision: the commit the file names and sizes below were read from.
        llm_file, llm_bytes: the language model GGUF and its size.
        mmproj_file, mmproj_bytes: the vision projector GGUF and its size.
    """

    name: str
    repo_id: str
    revision: str
    llm_file: str
    llm_bytes: int
    mmproj_file: str
    mmproj_bytes: int


#: Downloaded into the Hugging Face cache on first use when no model is given:
#: HuggingFaceTB's SmolVLM2-2.2B-Instruct (Apache-2.0; SmolLM2-1.7B + SigLIP so400m,
#: idefics3 projector, run by libmtmd) as converted by ggml-org, Q4_K_M LLM and
#: Q8_0 projector, 1.71 GB in all. Sizes: the hub's LFS sizes at that commit.
DEFAULT_MODEL = HubModel(
    name="SmolVLM2-2.2B-Instruct",
    repo_id="ggml-org/SmolVLM2-2.2B-Instruct-GGUF",
    revision="1bc3c9f74ceafd4c8d4411cc9cf188bba3798f91",
    llm_file="SmolVLM2-2.2B-Instruct-Q4_K_M.gguf",
    llm_bytes=1_112_602_656,
    mmproj_file="mmproj-SmolVLM2-2.2B-Instruct-Q8_0.gguf",
    mmproj_bytes=592_523_200,
)

# --- quantisation names accepted by `edgevlm convert` -----------------------
LLM_QUANT_TYPES = ("f32", "f16", "bf16", "q8_0", "q6_k", "q5_k_m", "q4_k_m", "q4_0")
VISION_QUANT_TYPES = ("f32", "f16", "bf16", "q8_0")

# --- edgevlm projector files (general.architecture = "clip", read by edgevlm.kernels) ---
# A projector libmtmd cannot run (OmniFusion) keeps the CLIP tower under the
# usual clip.vision.* keys and v.* tensor names, and adds the following.
KEY_PROJECTOR_KIND = "edgevlm.projector.kind"       # str: one of PROJECTOR_KINDS
# clip.projector_type of such files: libmtmd rejects an unknown type at load
# instead of running the tower with a projector it misreads ("mlp" would send
# it looking for mm.0/mm.2), and edgevlm inspect lists "edgevlm-*" types as
# loadable by edgevlm only.
CLIP_PROJECTOR_TYPE_OMNIFUSION = "edgevlm-omnifusion"
PROJECTOR_KIND_OMNIFUSION = "omnifusion"
PROJECTOR_KINDS = (PROJECTOR_KIND_OMNIFUSION,)
KEY_ADAPTER_HEAD_COUNT = "edgevlm.adapter.head_count"        # u32: attention heads of the adapter layer
KEY_ADAPTER_LAYER_NORM_EPS = "edgevlm.adapter.layer_norm_epsilon"  # f32
KEY_ADAPTER_ACTIVATION = "edgevlm.adapter.activation"        # str: "relu" | "gelu"
KEY_ADAPTER_NORM_FIRST = "edgevlm.adapter.norm_first"        # bool: pre-norm (True) or post-norm
KEY_PROMPT_LAYOUT = "edgevlm.prompt.layout"         # str: one of PROMPT_LAYOUTS
PROMPT_LAYOUT_OMNIFUSION = "omnifusion-1.1"
PROMPT_LAYOUTS = (PROMPT_LAYOUT_OMNIFUSION,)
KEY_PROMPT_PREFIX = "edgevlm.prompt.prefix"         # str: text before the first image
OMNIFUSION_PROMPT_PREFIX = "This is a dialog with AI assistant.\n"  # KEY_PROMPT_PREFIX of OmniFusion 1.1
KEY_IMAGE_RESIZE = "edgevlm.image.resize"           # str: "shortest-edge-crop" (CLIPImageProcessor) | "pad-square"
IMAGE_RESIZE_MODES = ("shortest-edge-crop", "pad-square")
# Adapter tensors (source: torch.nn.TransformerEncoderLayer + nn.Linear of
# OmniFusion's VisualToGPTMapping; in_proj split into q/k/v):
#   adapter.attn_{q,k,v,out}.{weight,bias}  self_attn in_proj / out_proj
#   adapter.ln1.{weight,bias}               norm1
#   adapter.ffn_up.{weight,bias}            linear1
#   adapter.ffn_down.{weight,bias}          linear2
#   adapter.ln2.{weight,bias}               norm2
#   adapter.proj.{weight,bias}              VisualToGPTMapping.linear
# (in_proj rows [0,d) -> q, [d,2d) -> k, [2d,3d) -> v; head h owns rows
# [h*d/H, (h+1)*d/H) of each, as in torch. 2-D weights are F32, or F16 in an
# f16 projector; biases, norms and special.* are always F32.)
# Learned embeddings injected into the LLM (1-D, LLM width):
SPECIAL_EMBEDDING_TENSORS = {"SOI": "special.soi", "EOI": "special.eoi",
                             "USER": "special.user", "BOT": "special.bot"}

# --- LLaVA-NeXT (anyres) projectors ---------------------------------------------
# Keys and tensors llama.cpp itself uses for llava-v1.6 (source: the vendored
# llama.cpp of llama-cpp-python 0.3.36, tools/mtmd/clip-impl.h and
# legacy-models/convert_image_encoder_to_gguf.py):
KEY_IMAGE_GRID_PINPOINTS = "clip.vision.image_grid_pinpoints"  # [i32]: HF (height, width) pairs, flattened
KEY_MM_PATCH_MERGE_TYPE = "clip.vision.mm_patch_merge_type"    # str: "spatial_unpad" (llava-1.6) | "flat"
PATCH_MERGE_SPATIAL_UNPAD = "spatial_unpad"
TENSOR_IMAGE_NEWLINE = "v.image_newline"           # (LLM width,): clip.cpp's TN_IMAGE_NEWLINE
TENSOR_IMAGE_NEWLINE_LEGACY = "model.image_newline"  # what llama.cpp's legacy llava-1.6 converter wrote

# --- Llama-3.2-Vision (mllama): a file pair only edgevlm loads ---------------------
# llama.cpp has no graph for mllama's cross-attention layers, so the LLM file says
# general.architecture = "mllama" (llama.cpp refuses it at load, "unknown model
# architecture") and the projector clip.projector_type = "edgevlm-mllama" (libmtmd
# refuses it); `edgevlm inspect` lists both as loadable by edgevlm only.
LLM_ARCH_MLLAMA = "mllama"
EDGEVLM_ONLY_LLM_ARCHS = (LLM_ARCH_MLLAMA,)   # general.architecture values llama.cpp cannot load
CLIP_PROJECTOR_TYPE_MLLAMA = "edgevlm-mllama"
PROJECTOR_KIND_MLLAMA = "mllama"              # KEY_PROJECTOR_KIND of mllama projectors
# LLM file (mllama.* holds the usual llama hyper-parameters; Q/K rows keep HF's
# rotate-half layout, i.e. NEOX-style RoPE):
KEY_MLLAMA_CROSS_ATTENTION_LAYERS = "edgevlm.mllama.cross_attention_layers"  # [i32]: text_config.cross_attention_layers
KEY_MLLAMA_IMAGE_TOKEN_ID = "edgevlm.mllama.image_token_id"  # u32: config.json image_token_index (<|image|>)
KEY_ROPE_FREQ_FACTORS = "edgevlm.rope.freq_factors"  # [f32] head_dim/2 divisors of the RoPE frequencies (llama3 scaling; ggml_rope_ext's freq_factors)
# Projector file (clip.vision.* as usual; block_count = the local layers):
KEY_MLLAMA_GLOBAL_BLOCK_COUNT = "edgevlm.mllama.vision.global_block_count"    # u32: num_global_layers
KEY_MLLAMA_INTERMEDIATE_LAYERS = "edgevlm.mllama.vision.intermediate_layers"  # [i32]: intermediate_layers_indices
KEY_MLLAMA_MAX_NUM_TILES = "edgevlm.mllama.vision.max_num_tiles"              # u32: tiles per image the encoder runs
KEY_MLLAMA_ASPECT_RATIOS = "edgevlm.mllama.vision.aspect_ratios"  # [i32]: supported_aspect_ratios flattened (tiles high, tiles wide); aspect_ratio_id = index + 1
KEY_MLLAMA_MAX_IMAGE_TILES = "edgevlm.mllama.image.max_tiles"     # u32: the image processor's max_image_tiles
KEY_IMAGE_RESAMPLE = "edgevlm.image.resample"       # str: PIL filter of the processor's resize ("bilinear", "bicubic")
# Tensors: text blk.N.* as llama, plus in cross-attention layers blk.N.cross_attn_{q,k,v,o}_proj,
# blk.N.cross_attn_{q,k}_norm, blk.N.cross_attn_{attn,mlp}_gate (1 value, before tanh); vision
# v.*, v.global.blk.N.* (with attn_gate / ffn_gate), v.{,tile_,pre_tile_,post_tile_}position_embd
# (+ .gate, before tanh), mm.0 (see convert/mllama.py for the checkpoint names).
