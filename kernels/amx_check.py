"""The AMX probe: one Q8_0 matrix product in ggml's AMX buffer type, checked against numpy.

Run as a child process by :func:`edgevlm.amx_guard.run_probe`
(``python -m edgevlm.kernels.amx_check``): on a build whose AMX kernels are
miscompiled the product stops the process with SIGILL, which the parent reads
as "keep the guard on". Exit status 0: the product ran in the AMX buffer type
and matched; 3: wrong numbers; 4: no AMX buffer type (or ggml would not place
the matrix in it).
"""

from __future__ import annotations

import sys

import numpy as np

#: Weight rows x columns and activation rows: big enough for ggml's tile path
#: (the AMX kernels use AVX-512 VNNI for a handful of rows and tiles above).
N_OUT, N_IN, N_ROWS = 64, 256, 64
#: Activations are quantised to Q8 for the product: a relative error of ~1e-2 is expected.
TOLERANCE = 0.05


def check_product() -> int:
    """Compute ``x @ w.T`` with ``w`` Q8_0 in the AMX buffer type; the process exit status."""
    from gguf import GGMLQuantizationType, quants

    from . import ggml
    from .backend import Backend
    from .graph import RawTensor, Weights, linear_once

    rng = np.random.default_rng(0)
    w = rng.standard_normal((N_OUT, N_IN)).astype(np.float32)
    x = rng.standard_normal((N_ROWS, N_IN)).astype(np.float32)
    q = quants.quantize(w, GGMLQuantizationType.Q8_0)
    backend = Backend("cpu", n_threads=2)
    try:
        amx = [b for b in backend.extra_buffer_types(allow=True) if b.name == "AMX"]
        if not amx:
            return 4
        weights = Weights(backend, {"w": RawTensor(ggml.GGML_TYPE_Q8_0, (N_IN, N_OUT), q)}, matmul={"w"}, extra=amx)
        try:
            if weights.placement.get("w") != "AMX":
                return 4
            out = linear_once(backend, weights["w"], x)
        finally:
            weights.close()
    finally:
        backend.close()
    ref = x @ quants.dequantize(q, GGMLQuantizationType.Q8_0).reshape(N_OUT, N_IN).T
    error = float(np.abs(out - ref).max() / max(1.0, float(np.abs(ref).max())))
    return 0 if error <= TOLERANCE else 3


if __name__ == "__main__":
    sys.exit(check_product())
