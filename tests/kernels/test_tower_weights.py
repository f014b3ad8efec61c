"""Tower weight storage: repacked CPU buffers, the AMX guard, bf16 matrices.

Tolerances: a tower with its matrices in ggml's repacking buffer types gives
the plain-buffer embeddings within max-abs 1e-3 and per-token cosine
>= 0.9999 (f16, q8_0 and q4_0 matrices). f16 matrices converted to bf16 at
load keep per-token cosine >= 0.999 against the f32 file on the same device
(CLIP and SigLIP test towers); the f32 file itself matches transformers to
0.9999 (tests/kernels/test_vision.py).
"""

from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from edgevlm import amx_guard, native
from edgevlm.errors import InvalidRequestError
from edgevlm.kernels import ggml
from edgevlm.kernels.backend import Backend, BufferType
from edgevlm.kernels.tower_weights import MATMUL_WEIGHT, choose_weight_type
from edgevlm.kernels.vision import VisionTower, read_gguf_tensors
from tests.reference import cosine_rows

_TYPES = {"f16": 1, "q8_0": 8, "q4_0": 2}  # gguf.GGMLQuantizationType values


def mmproj_of(folder: Path) -> Path:
    return next(folder.glob("mmproj-*.gguf"))


def requantise(src: Path, out: Path, kind: str) -> Path:
    """``src`` with its ``mul_mat`` matrices stored as ``kind`` (everything else as it is)."""
    import gguf

    reader = gguf.GGUFReader(str(src))
    writer = gguf.GGUFWriter(str(out), arch="clip")
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture":
            continue
        sub = field.types[-1] if field.types[0] == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(key, field.contents(), field.types[0], sub_type=sub)
    qtype = gguf.GGMLQuantizationType(_TYPES[kind])
    for t in reader.tensors:
        data = np.asarray(t.data)
        if MATMUL_WEIGHT.match(t.name) and len(t.shape) == 2:
            data = gguf.quants.quantize(data.astype(np.float32).reshape(data.shape), qtype)
            writer.add_tensor(t.name, data, raw_shape=data.shape, raw_dtype=qtype)
        else:
            writer.add_tensor(t.name, data, raw_shape=data.shape, raw_dtype=t.tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out


@pytest.fixture(scope="module")
def clip_variants(tmp_path_factory, clip_f32) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("tower_variants")
    src = mmproj_of(clip_f32)
    return {"f32": src, **{kind: requantise(src, folder / f"mmproj-{kind}.gguf", kind) for kind in _TYPES}}


def _pixels(tower: VisionTower, seed: int = 0) -> np.ndarray:
    size = tower.config.image_size
    return np.random.default_rng(seed).standard_normal((3, size, size)).astype(np.float32)


def _encode(path: Path, **kwargs) -> tuple[np.ndarray, dict[str, str]]:
    tower = VisionTower(path, device="cpu", n_threads=2, **kwargs)
    try:
        return tower.encode(_pixels(tower)), dict(tower.weights.placement)
    finally:
        tower.close()


def _repacks(kind: str) -> bool:
    """Whether ggml's CPU_REPACK type has a kernel for ``kind`` matrices on this CPU (ggml-cpu/repack.cpp)."""
    info = native.system_info()
    if "REPACK = 1" not in info or native.cpu_has_amx():
        return False  # an AMX build places them in its AMX buffer type first
    arm_dot = "NEON = 1" in info and ("DOTPROD = 1" in info or "MATMUL_INT8 = 1" in info)
    return {"q4_0": "AVX2 = 1" in info or arm_dot, "q8_0": arm_dot}.get(kind, False)


@pytest.mark.parametrize("kind", ["f16", "q8_0", "q4_0"])
def test_repacked_buffers_give_the_plain_buffer_embeddings(clip_variants, kind):
    if amx_guard.amx_guard_active() and kind != "f16":
        # Forcing the extra types where the guard is on puts quantised matrices in a broken AMX path, which
        # dies with SIGILL: the reason for the guard tested below.
        pytest.skip("the AMX guard is on: quantised matrices never go to the extra buffer types here")
    plain, plain_at = _encode(clip_variants[kind], weight_type="as-file", extra_buffers=False)
    packed, packed_at = _encode(clip_variants[kind], weight_type="as-file", extra_buffers=True)
    assert set(plain_at.values()) == {"CPU"}
    repacked = {name for name, where in packed_at.items() if where != "CPU"}
    assert all(MATMUL_WEIGHT.match(name) for name in repacked)  # norms, embeddings, patch kernel stay plain
    if native.cpu_has_amx() and kind != "f16":
        places = {packed_at[name] for name in repacked}  # ggml's int8 tile kernels, where their shapes fit
        assert "AMX" in places and places <= {"AMX", "CPU_REPACK"}
    elif _repacks(kind):
        assert {packed_at[name] for name in repacked} == {"CPU_REPACK"}
        assert len(repacked) == sum(1 for name in packed_at if MATMUL_WEIGHT.match(name))
    print(f"{kind}: {len(repacked)} matrices repacked, placement {Counter(packed_at.values())}, "
          f"max-abs {np.abs(packed - plain).max():.2e}, cosine {cosine_rows(packed, plain).min():.7f}")
    assert np.abs(packed - plain).max() <= 1e-3
    assert cosine_rows(packed, plain).min() >= 0.9999


def test_the_amx_guard_keeps_every_weight_in_the_plain_buffer(clip_variants, monkeypatch):
    monkeypatch.setattr(amx_guard, "amx_guard_active", lambda: True)
    backend = Backend("cpu", n_threads=1)
    try:
        assert backend.extra_buffer_types() == []
    finally:
        backend.close()
    _, placement = _encode(clip_variants["q4_0"], weight_type="as-file")
    assert set(placement.values()) == {"CPU"}


def test_other_builds_offer_the_repack_buffer_type(monkeypatch):
    if "REPACK = 1" not in native.system_info():
        pytest.skip("this llama.cpp build has no CPU repack buffer type")
    monkeypatch.setattr(amx_guard, "amx_guard_active", lambda: False)
    backend = Backend("cpu", n_threads=1)
    try:
        assert "CPU_REPACK" in [b.name for b in backend.extra_buffer_types()]
        assert backend.extra_buffer_types(allow=False) == []
    finally:
        backend.close()


@pytest.mark.parametrize("fixture", ["clip_f32", "siglip_f32"])
@pytest.mark.parametrize("weight_type", ["bf16", "q8_0"])
def test_converted_matrices_keep_accuracy(request, tmp_path, fixture, weight_type):
    """f16 matrices converted at load (bf16; Q8_0 by ggml's quantiser, in the AMX buffer type where it is
    usable) against the f32 file."""
    src = mmproj_of(request.getfixturevalue(fixture))
    f16 = requantise(src, tmp_path / "mmproj-f16.gguf", "f16")
    reference, _ = _encode(src, weight_type="as-file")
    tower = VisionTower(f16, device="cpu", n_threads=2, weight_type=weight_type)
    try:
        ours = tower.encode(_pixels(tower))
        types = {name: tower.weights[name].contents.type for name in tower.weights.placement}
        placement = dict(tower.weights.placement)
    finally:
        tower.close()
    wanted = ggml.GGML_TYPE_BF16 if weight_type == "bf16" else ggml.GGML_TYPE_Q8_0
    matrices = {name: t for name, t in types.items() if MATMUL_WEIGHT.match(name)}
    assert wanted in set(matrices.values()) and set(matrices.values()) <= {wanted, ggml.GGML_TYPE_F16}
    assert wanted not in {t for name, t in types.items() if not MATMUL_WEIGHT.match(name)}
    cos = cosine_rows(ours, reference)
    print(f"{fixture} {weight_type} matrices vs f32 file: per-token cosine min {cos.min():.6f}; "
          f"placement {Counter(placement.values())}")
    assert cos.min() >= 0.999


def test_weight_type_choice(clip_variants, monkeypatch, caplog):
    backend = Backend("cpu", n_threads=1)
    try:
        tensors = {k: read_gguf_tensors(clip_variants[k])[1] for k in ("f32", "f16", "q8_0")}
        has_bf16 = bool(backend.g.ggml_cpu_has_avx512_bf16())
        assert choose_weight_type("auto", tensors["f16"], backend).weight_type == ("bf16" if has_bf16 else "as-file")
        amx = [BufferType(0, "AMX")]
        choice = choose_weight_type("auto", tensors["f16"], backend, amx)
        assert choice.weight_type == "q8_0" and "AMX" in choice.reason
        assert choose_weight_type("auto", tensors["f32"], backend, amx).weight_type == "as-file"
        assert choose_weight_type("q8_0", tensors["f32"], backend).weight_type == "q8_0"
        assert choose_weight_type("q8_0", tensors["q8_0"], backend).weight_type == "as-file"
        assert choose_weight_type("auto", tensors["f32"], backend).weight_type == "as-file"
        assert choose_weight_type("auto", tensors["q8_0"], backend).weight_type == "as-file"
        assert choose_weight_type("bf16", tensors["q8_0"], backend).weight_type == "as-file"
        assert choose_weight_type("bf16", tensors["f32"], backend).weight_type == "bf16"
        monkeypatch.setattr(backend.g, "ggml_cpu_has_avx512_bf16", lambda: 0)
        choice = choose_weight_type("auto", tensors["f16"], backend)
        assert choice.weight_type == "as-file" and "AVX512-BF16" in choice.reason
        with pytest.raises(InvalidRequestError, match="weight_type must be one of"):
            choose_weight_type("fp8", tensors["f16"], backend)
    finally:
        backend.close()
    with caplog.at_level(logging.INFO, logger="edgevlm"):
        _encode(clip_variants["f16"], weight_type="as-file")
    assert "matrices as-file, as requested (file matrices f16)" in caplog.text


@pytest.mark.parametrize("kind", ["f32", *_TYPES])
def test_tensor_data_from_the_parsed_header_matches_gguf_reader(clip_variants, kind):
    """read_gguf_tensors (the header parsed once by gguf_info, data memory-mapped) reads what GGUFReader reads."""
    import gguf

    path = clip_variants[kind]
    meta, ours = read_gguf_tensors(path)
    reader = gguf.GGUFReader(str(path))
    theirs = {t.name: t for t in reader.tensors}
    assert meta["general.architecture"] == "clip" and set(ours) == set(theirs)
    for name, raw in ours.items():
        ref = theirs[name]
        assert raw.ggml_type == int(ref.tensor_type) and raw.ne == tuple(int(x) for x in ref.shape)
        assert raw.data.dtype == ref.data.dtype and raw.data.shape == ref.data.shape, name
        assert raw.data.tobytes() == ref.data.tobytes(), name
