"""Shared test helpers."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np


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
