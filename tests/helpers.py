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
