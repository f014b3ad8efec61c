"""Shared test helpers."""

from __future__ import annotations

import json
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np


LLAMA_PARTS = {
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
}
"""HF Llama/Qwen2 decoder-layer module -> llama.cpp tensor name part."""


def checkpoint_state(folder: Path) -> dict[str, np.ndarray]:
    """All tensors of a checkpoint folder's safetensors files, as numpy arrays."""
    from safetensors.numpy import load_file

    state = {}
    for path in sorted(Path(folder).glob("*.safetensors")):
        state.update(load_file(path))
    return state


_TEXT_PREFIXES = ("model.language_model.", "language_model.model.", "language_model.", "model.")
_NOT_TEXT = ("visual.", "model.visual.", "vision_tower.", "model.vision_tower.",
             "multi_modal_projector.", "model.multi_modal_projector.")


def rope_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's interleaved layout: rows (head, pair, half) -> (head, half, pair)."""
    out = np.empty_like(w)
    head_dim = w.shape[0] // n_head
    half = head_dim // 2
    for h in range(n_head):
        for i in range(half):
            out[h * head_dim + 2 * i] = w[h * head_dim + i]
            out[h * head_dim + 2 * i + 1] = w[h * head_dim + half + i]
    return out


def expected_llm_tensors(folder: Path, n_head: int = 4, n_kv: int = 2, *,
                         interleaved: bool = True) -> dict[str, np.ndarray]:
    """Reference LLM GGUF tensors computed from a checkpoint's text model.

    ``interleaved``: Q/K rows permuted for llama.cpp's normal RoPE (llama);
    NEOX-style architectures (qwen2vl) keep the HF layout.
    """
    out = {}
    for name, value in checkpoint_state(folder).items():
        if name.startswith(_NOT_TEXT):
            continue
        local = next((name[len(p):] for p in _TEXT_PREFIXES if name.startswith(p)), name)
        if local == "embed_tokens.weight":
            out["token_embd.weight"] = value
        elif local == "norm.weight":
            out["output_norm.weight"] = value
        elif local == "lm_head.weight":
            out["output.weight"] = value
        elif local.startswith("layers."):
            _, idx, rest = local.split(".", 2)
            part, kind = rest.rsplit(".", 1)
            heads = {"self_attn.q_proj": n_head, "self_attn.k_proj": n_kv}.get(part)
            if interleaved and heads and kind == "weight":
                value = rope_permute(value, heads)
            out[f"blk.{idx}.{LLAMA_PARTS[part]}.{kind}"] = value
    return out


def as_f16_matrices(expected: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Reference tensors as an F16 file stores them: matrices rounded to f16, 1-D kept F32."""
    return {k: v.astype(np.float16).astype(np.float32) if v.ndim > 1 else v
            for k, v in expected.items()}


def copy_checkpoint(src: Path, dst: Path) -> Path:
    """Copy a checkpoint folder (to edit it) and return the copy."""
    shutil.copytree(src, dst)
    return dst


def edit_config(folder: Path, **changes: Any) -> None:
    """Change top-level ``config.json`` keys; a dict value is merged into that section."""
    path = folder / "config.json"
    data = json.loads(path.read_text())
    for key, value in changes.items():
        if isinstance(value, dict) and isinstance(data.get(key), dict):
            value = {**data[key], **value}
        data[key] = value
    path.write_text(json.dumps(data))


def gguf_tensors(gguf_path: Path) -> dict[str, Any]:
    """Return ``name -> ReaderTensor`` of a GGUF file."""
    import gguf

    return {t.name: t for t in gguf.GGUFReader(str(gguf_path)).tensors}


def gguf_fields(gguf_path: Path) -> dict[str, Any]:
    """Return ``key -> decoded value`` of a GGUF file's metadata (arrays as lists)."""
    import gguf

    reader = gguf.GGUFReader(str(gguf_path))
    return {name: field.contents() for name, field in reader.fields.items()}


def assert_gguf_roundtrip(gguf_path: Path, expected: Mapping[str, np.ndarray], *,
                          exact: bool = True, rtol: float = 0.0, atol: float = 0.0,
                          allow_extra: bool = False) -> None:
    """Check that a GGUF holds exactly the ``expected`` tensors.

    Args:
        gguf_path: File to read with ``gguf.GGUFReader``.
        expected: GGUF tensor name -> reference array in numpy (row-major) order,
            already transformed the way the converter must transform it.
        exact: Compare values (float tensors only); otherwise names and shapes only.
        rtol, atol: Tolerances for the value comparison (0 = bit-exact for F32).
        allow_extra: Do not fail on tensors in the file that are not in ``expected``.
    """
    tensors = gguf_tensors(gguf_path)
    missing = sorted(set(expected) - set(tensors))
    assert not missing, f"{gguf_path.name}: missing tensors {missing}"
    if not allow_extra:
        extra = sorted(set(tensors) - set(expected))
        assert not extra, f"{gguf_path.name}: unexpected tensors {extra}"
    for name, ref in expected.items():
        tensor = tensors[name]
        shape = tuple(int(x) for x in reversed(tensor.shape.tolist()))
        assert shape == tuple(ref.shape), f"{name}: shape {shape} != {tuple(ref.shape)}"
        if exact and tensor.tensor_type.name in ("F32", "F16"):
            data = np.asarray(tensor.data, dtype=np.float32).reshape(ref.shape)
            np.testing.assert_allclose(data, ref.astype(np.float32), rtol=rtol, atol=atol,
                                       err_msg=name)


_TOWER_STATIC = {"embeddings.class_embedding": "v.class_embd",
                 "embeddings.patch_embedding.weight": "v.patch_embd.weight",
                 "embeddings.patch_embedding.bias": "v.patch_embd.bias",
                 "embeddings.position_embedding.weight": "v.position_embd.weight",
                 "pre_layrnorm.weight": "v.pre_ln.weight", "pre_layrnorm.bias": "v.pre_ln.bias"}
_TOWER_PARTS = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
                "self_attn.v_proj": "attn_v", "self_attn.out_proj": "attn_out",
                "layer_norm1": "ln1", "layer_norm2": "ln2", "mlp.fc1": "ffn_up",
                "mlp.fc2": "ffn_down"}


def expected_tower(state: Mapping[str, np.ndarray], prefix: str,
                   n_keep: int) -> dict[str, np.ndarray]:
    """Reference ``v.*`` tensors of a CLIP/SigLIP tower: first ``n_keep`` blocks, no post-LN.

    Args:
        state: Checkpoint tensors.
        prefix: Prefix of the tower's names in ``state`` (``""`` for a bare tower);
            names without it are ignored.
        n_keep: Blocks the converter keeps.
    """
    out = {}
    for name, value in state.items():
        if not name.startswith(prefix):
            continue
        local = name[len(prefix):]
        if local in _TOWER_STATIC:
            out[_TOWER_STATIC[local]] = value
        elif local.startswith("encoder.layers."):
            _, _, idx, rest = local.split(".", 3)
            part, kind = rest.rsplit(".", 1)
            if int(idx) < n_keep:
                out[f"v.blk.{idx}.{_TOWER_PARTS[part]}.{kind}"] = value
    return out


def synthetic_descriptor(projector_meta: Mapping[str, Any] | None,
                         tensor_names: frozenset[str] = frozenset()) -> Any:
    """A ModelDescriptor for families to match: an LLM header and a projector with this metadata."""
    from edgevlm.descriptor import ModelDescriptor, ModelFiles, ProjectorInfo
    from edgevlm.gguf_info import GGUFHeader, TensorInfo

    llm = GGUFHeader(Path("llm.gguf"), 3, {"general.architecture": "llama"}, ())
    if projector_meta is None:
        return ModelDescriptor(ModelFiles(Path("llm.gguf"), None), llm, None)
    tensors = tuple(TensorInfo(name, (1,), 0) for name in sorted(tensor_names))
    header = GGUFHeader(Path("mmproj.gguf"), 3, {"general.architecture": "clip", **projector_meta}, tensors)
    return ModelDescriptor(ModelFiles(Path("llm.gguf"), Path("mmproj.gguf")), llm, ProjectorInfo(header))


def run_with_stderr_on_a_terminal(cmd: list[str], *, timeout: float = 300,
                                  width: int = 100) -> tuple[int, str, bytes]:
    """Run ``cmd`` with stderr on a pseudo-terminal (``width`` columns) and stdout piped.

    Returns:
        (exit status, stdout text, everything written to the terminal).
    """
    import fcntl
    import os
    import pty
    import struct
    import subprocess
    import termios
    import threading

    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, width, 0, 0))
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=slave, text=True)
    os.close(slave)
    seen: list[bytes] = []

    def drain() -> None:  # read the terminal while the process runs, so it never blocks on a full pty
        while True:
            try:
                chunk = os.read(master, 4096)
            except OSError:
                return
            if not chunk:
                return
            seen.append(chunk)

    reader = threading.Thread(target=drain, daemon=True)
    reader.start()
    out, _ = proc.communicate(timeout=timeout)
    reader.join(timeout=10)
    os.close(master)
    return proc.returncode, out, b"".join(seen)
