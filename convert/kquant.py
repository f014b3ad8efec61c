"""K-quant mixes (Q4_K_M, Q5_K_M, Q6_K) for a LLaMA-family text model the converter writes itself.

A family whose architecture llama.cpp's quantiser cannot load (mllama) picks
each tensor's type here, then :func:`edgevlm.convert.quantize.quantize_rows`
(ggml's own quantiser) writes it. The choices are the facts of llama.cpp's
``llama_tensor_get_type`` (``src/llama-quant.cpp`` of the llama.cpp that
llama-cpp-python 0.3.36 vendors) for a dense model (no experts), without an
importance matrix or per-tensor overrides:

* Base type (``llama_ftype_get_default_type``): Q4_K_M -> Q4_K, Q5_K_M -> Q5_K, Q6_K -> Q6_K.
* ``output.weight``: Q8_0 when its rows are not whole blocks of the base type, else Q6_K.
* ``token_embd.weight``: the base type (embeddings not tied to ``output.weight``; the
  caller passes role ``"output"`` for a tied table).
* V projections (``category_is_attn_v``) and ``ffn_down``: Q6_K at Q4_K_M and Q5_K_M on
  the layers :func:`use_more_bits` picks.
* Every other quantised tensor (2-D, ``*.weight``, not ``*_norm.weight``): the base type.
* ``tensor_type_fallback``: rows that are not whole blocks of the chosen type take
  Q4_K -> Q5_0, Q5_K -> Q5_1, Q6_K -> Q8_0, and F16 when even that does not fit.

llama.cpp's other rules do not apply to these mixes on a dense Llama (they are
for Q2_K/Q3_K/IQ types, 8-expert models, Falcon, and ``LLM_TYPE_70B``'s attn_v).
"""

from __future__ import annotations

K_MIXES: dict[str, str] = {"Q4_K_M": "Q4_K", "Q5_K_M": "Q5_K", "Q6_K": "Q6_K"}
"""Mix label -> base ggml type."""
FALLBACK: dict[str, str] = {"Q4_K": "Q5_0", "Q5_K": "Q5_1", "Q6_K": "Q8_0"}
"""A 256-block type -> the 32-block type used when rows do not fit (``tensor_type_fallback``)."""
ROLES = ("output", "attn_v", "ffn_down", "other")


def block_size(ggml_type: str) -> int:
    """Elements per block of ``ggml_type`` (256 for K-quants, 32 for Q8_0/Q5_0..., 1 for floats)."""
    import gguf

    return int(gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[ggml_type]][0])


def use_more_bits(i_layer: int, n_layers: int) -> bool:
    """llama.cpp's ``use_more_bits``: the first and last eighth of the layers, and every third between."""
    return (i_layer < n_layers // 8 or i_layer >= 7 * n_layers // 8
            or (i_layer - n_layers // 8) % 3 == 2)


def fit(ggml_type: str, n_per_row: int) -> str:
    """``ggml_type``, or its fallback when rows of ``n_per_row`` are not whole blocks of it."""
    if n_per_row % block_size(ggml_type):
        ggml_type = FALLBACK.get(ggml_type, ggml_type)
        if n_per_row % block_size(ggml_type):
            ggml_type = "F16"
    return ggml_type


def mix_type(mix: str, role: str, n_per_row: int, layer: int = 0, n_layers: int = 1) -> str:
    """The type of one quantised matrix in ``mix``.

    Args:
        mix: a :data:`K_MIXES` label.
        role: one of :data:`ROLES` (``"output"``: ``output.weight``; ``"attn_v"``: a V
            projection; ``"ffn_down"``; ``"other"``: the rest, token embeddings included).
        n_per_row: row length (the numpy shape's last axis, ggml's ``ne[0]``).
        layer: the tensor's layer index (``blk.N``), for ``attn_v`` / ``ffn_down``.
        n_layers: the layers counted by :func:`use_more_bits`.

    Returns:
        A ``gguf.GGMLQuantizationType`` name.

    Raises:
        ValueError: an unknown mix or role (a programming error).
    """
    if mix not in K_MIXES or role not in ROLES:
        raise ValueError(f"unknown K-quant mix {mix!r} or role {role!r}")
    base = K_MIXES[mix]
    if role == "output":
        chosen = "Q8_0" if n_per_row % block_size(base) else "Q6_K"
    elif role in ("attn_v", "ffn_down") and mix != "Q6_K" and use_more_bits(layer, n_layers):
        chosen = "Q6_K"
    else:
        chosen = base
    return fit(chosen, n_per_row)
