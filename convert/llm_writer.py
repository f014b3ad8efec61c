"""Write the language model GGUF (llama architecture, or the converter's ``llm_arch``).

Float types (f32/f16/bf16) are written directly; integer quantisations write
a lossless float GGUF next to the output first and run llama.cpp's quantiser
on it (see :mod:`.quantize`).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edgevlm.errors import ConversionError

from .config import TextConfig
from .quantize import QuantType, llama_quantize
from .tensors import TensorSpec, check_shape, permute_rotary, write_gguf

if TYPE_CHECKING:
    from .base import Converter
    from .progress import Stage

LLAMA_ARCH = "llama"
_SKIP_SUFFIXES = ("rotary_emb.inv_freq",)
_FILE_TYPES = {"F32": "ALL_F32", "F16": "MOSTLY_F16", "BF16": "MOSTLY_BF16", "Q8_0": "MOSTLY_Q8_0",
               "Q4_0": "MOSTLY_Q4_0", "Q6_K": "MOSTLY_Q6_K", "Q5_K_M": "MOSTLY_Q5_K_M",
               "Q4_K_M": "MOSTLY_Q4_K_M"}


def llama_tensor_specs(text_names: Mapping[str, str], reader: Any, cfg: TextConfig,
                       ggml_type: str, *, arch: str = LLAMA_ARCH,
                       interleaved_rope: bool = True) -> list[TensorSpec]:
    """Plan GGUF tensors for HF Llama-style weights (Llama, Mistral, Qwen2...).

    Args:
        text_names: ``model.layers.0...`` / ``lm_head.weight`` -> checkpoint name.
        reader: The :class:`CheckpointReader` (for shapes).
        cfg: Text config (heads for the Q/K permutation, block count for names).
        ggml_type: Type of matrices; 1-D tensors are always F32.
        arch: llama.cpp architecture name whose tensor names to use.
        interleaved_rope: Permute Q/K rows from HF's rotate-half layout to the
            interleaved pairs of llama.cpp's normal RoPE. Architectures whose
            RoPE is NEOX-style (Qwen2, M-RoPE) take the HF layout as is.

    Returns:
        Tensor specs in checkpoint order.

    Raises:
        ConversionError: an unknown tensor, or required tensors are missing.
    """
    import gguf

    model_arch = next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == arch)
    name_map = gguf.TensorNameMap(model_arch, cfg.num_hidden_layers)
    specs = []
    for local, source in text_names.items():
        if local.endswith(_SKIP_SUFFIXES):
            continue
        gguf_name = name_map.get_name(local, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:
            raise ConversionError(f"tensor {source!r} has no llama.cpp equivalent; this "
                                  "text model variant is not supported.")
        shape = tuple(reader.shape(source))
        transform = None
        if interleaved_rope and local.endswith("self_attn.q_proj.weight"):
            transform = _rotary(cfg.num_attention_heads)
        elif interleaved_rope and local.endswith("self_attn.k_proj.weight"):
            transform = _rotary(cfg.num_key_value_heads)
        specs.append(TensorSpec(gguf_name, source, shape,
                                "F32" if len(shape) == 1 else ggml_type, transform))
    _check_llama_shapes(specs, reader, cfg)
    return specs


def _rotary(n_head: int) -> Any:
    def transform(array: Any) -> Any:
        return permute_rotary(array, n_head)
    return transform


def _check_llama_shapes(specs: list[TensorSpec], reader: Any, cfg: TextConfig) -> None:
    """Compare key tensors with the config and require the essential ones."""
    by_name = {s.name: s for s in specs}
    q_dim, kv_dim = cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim
    expected = {"token_embd.weight": (None, cfg.hidden_size), "output_norm.weight": None}
    for i in range(cfg.num_hidden_layers):
        expected.update({
            f"blk.{i}.attn_q.weight": (q_dim, cfg.hidden_size),
            f"blk.{i}.attn_k.weight": (kv_dim, cfg.hidden_size),
            f"blk.{i}.attn_v.weight": (kv_dim, cfg.hidden_size),
            f"blk.{i}.attn_output.weight": (cfg.hidden_size, q_dim),
            f"blk.{i}.ffn_up.weight": (cfg.intermediate_size, cfg.hidden_size),
        })
    for name, shape in expected.items():
        if name not in by_name:
            raise ConversionError(f"tensor for {name!r} is missing from the checkpoint; the "
                                  "download may be incomplete.")
        if shape is not None:
            spec = by_name[name]
            want = tuple(spec.shape[0] if s is None else s for s in shape)
            check_shape(reader, spec, want)


def write_llama_hparams(writer: Any, cfg: TextConfig, n_vocab: int) -> None:
    """Add the ``<arch>.*`` hyper-parameters of a Llama-style text model.

    Args:
        writer: A ``gguf.GGUFWriter`` (its architecture prefixes the keys).
        cfg: Text config.
        n_vocab: Rows of the token embedding.
    """
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_rope_freq_base(cfg.rope_theta)
    writer.add_rope_dimension_count(cfg.head_dim)
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_vocab_size(n_vocab)
    if cfg.head_dim != cfg.hidden_size // cfg.num_attention_heads:
        writer.add_key_length(cfg.head_dim)
        writer.add_value_length(cfg.head_dim)
    _write_rope_scaling(writer, cfg.rope_scaling)


def _write_rope_scaling(writer: Any, scaling: Mapping[str, Any] | None) -> None:
    import gguf

    if not scaling:
        return
    kind = scaling.get("rope_type", scaling.get("type"))
    factor = scaling.get("factor")
    if kind == "linear" and factor:
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(factor))
    elif kind == "yarn" and factor:
        writer.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        writer.add_rope_scaling_factor(float(factor))
        if "original_max_position_embeddings" in scaling:
            writer.add_rope_scaling_orig_ctx_len(int(scaling["original_max_position_embeddings"]))
    elif kind not in (None, "default"):
        raise ConversionError(f"config.json: rope_scaling type {kind!r} is not supported yet "
                              "(supported: linear, yarn).")


def file_type(ggml_type: str) -> int:
    """``general.file_type`` value of a file the converter writes itself (a float type, or a
    family's ``direct_llm_quants`` label)."""
    import gguf

    return int(gguf.LlamaFileType[_FILE_TYPES[ggml_type]])


def fallback_note(specs: list[TensorSpec], quant: QuantType) -> str | None:
    """Describe 2-D weights llama.cpp will store in another type than ``quant``.

    Returns:
        A sentence for :attr:`ConversionResult.notes`, or ``None``.
    """
    if quant.block <= 1:
        return None
    odd = [s.name for s in specs if len(s.shape) == 2 and s.shape[-1] % quant.block]
    if not odd:
        return None
    return (f"{len(odd)} tensors fall back to {quant.fallback} instead of {quant.label} because "
            f"their rows are not multiples of {quant.block} (e.g. {odd[0]}).")


def writes_directly(converter: Converter, quant: QuantType) -> bool:
    """Whether the converter writes ``quant`` itself (float types, and the family's
    ``direct_llm_quants``) rather than through llama.cpp's quantiser."""
    return quant.direct or quant.name in converter.direct_llm_quants


def float_type(converter: Converter, quant: QuantType) -> str:
    """The type the LLM's matrices are written in: ``quant`` itself, or the lossless input of the quantiser."""
    return quant.label if writes_directly(converter, quant) else converter.reader.widest_float()


def plan_llm(converter: Converter, quant: QuantType) -> list[TensorSpec]:
    """The LLM tensors to write for ``quant`` (notes the ones llama.cpp will store in another type).

    Raises:
        ConversionError: from the converter's plan.
    """
    converter.check_llm_quant(quant.name)
    specs = converter.llm_tensors(float_type(converter, quant))
    note = fallback_note(specs, quant)
    if note:
        converter.note(note)
    return specs


def write_llm(converter: Converter, path: Path, quant: QuantType, written: Stage,
              quantised: Stage | None = None) -> int:
    """Write the LLM GGUF of ``converter`` to ``path`` in ``quant``.

    Args:
        converter: A converter for the checkpoint.
        path: Output file; a sibling ``.f-<pid>`` intermediate is used for quantised types.
        quant: Target type.
        written: The tensors (:func:`plan_llm`), reported as each is written.
        quantised: With a quantised type, reported as llama.cpp's quantiser logs each tensor.

    Returns:
        Size of the written file in bytes.

    Raises:
        ConversionError / RuntimeFailure: from writing or quantising.
    """
    import gguf

    direct = writes_directly(converter, quant)
    target = path if direct else path.with_name(f"{path.name}.f-{os.getpid()}")
    writer = gguf.GGUFWriter(None, converter.llm_arch)
    converter.write_llm_metadata(writer)
    writer.add_file_type(file_type(float_type(converter, quant)))
    try:
        write_gguf(target, writer, converter.reader, written.plan, written.tensor)
        if not direct:
            converter.log(f"quantising to {quant.label} with llama.cpp")
            llama_quantize(target, path, quant, on_line=quantised.quantiser_line if quantised else None)
    finally:
        if target != path:
            target.unlink(missing_ok=True)
    return path.stat().st_size
