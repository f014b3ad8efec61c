"""The mllama vision encoder on ggml against transformers' vision_model + multi_modal_projector.

Also the ggml ops it added (get_rows, pad, masked attention) against numpy, and the
aspect-ratio attention mask against transformers' own.
"""

from __future__ import annotations

import numpy as np
import pytest

from tests.fixtures.internvl import gradient_image

# (width, height) -> (tiles high, tiles wide) for 56-px tiles, at most 4 (MllamaImageProcessor).
LAYOUTS = {(56, 56): (1, 1), (112, 56): (1, 2), (168, 50): (1, 3), (100, 100): (2, 2),
           (40, 150): (3, 1), (300, 90): (1, 4)}
COSINE_MIN = 0.9999
MAX_ABS = 1e-5  # measured 1.2e-6 .. 1.7e-6 (f32 file, CPU)


def _run(builder, out, inputs):
    from edgevlm.kernels.backend import Backend
    from edgevlm.kernels.graph import CompiledGraph

    backend = Backend("cpu", n_threads=1)
    graph = CompiledGraph(backend, builder, out)
    try:
        return graph.run(inputs)
    finally:
        graph.close()
        backend.close()


def test_get_rows_matches_numpy():
    from edgevlm.kernels import ggml
    from edgevlm.kernels.graph import GraphBuilder

    table = np.random.default_rng(0).standard_normal((9, 12)).astype(np.float32)
    b = GraphBuilder(64)
    t = b.input("table", (12, 9))
    ids = b.input("ids", (2,), ggml.GGML_TYPE_I32)
    out = _run(b, b.get_rows(t, ids), {"table": table, "ids": np.array([7, 2], np.int32)})
    np.testing.assert_array_equal(out, table[[7, 2]])


def test_pad_matches_numpy():
    from edgevlm.kernels.graph import GraphBuilder

    x = np.random.default_rng(1).standard_normal((3, 5, 4)).astype(np.float32)  # ne [4, 5, 3]
    b = GraphBuilder(64)
    out = _run(b, b.pad(b.input("x", (4, 5, 3)), 0, 3), {"x": x})
    np.testing.assert_array_equal(out, np.pad(x, ((0, 0), (0, 3), (0, 0))))


@pytest.mark.parametrize("flash", [False, True], ids=["softmax-f32", "flash-f16"])
def test_masked_attention_matches_numpy(flash):
    from edgevlm.kernels import ggml
    from edgevlm.kernels.graph import GraphBuilder

    rng = np.random.default_rng(2)
    d, n, heads = 8, 6, 2
    x = rng.standard_normal((n, d)).astype(np.float32)
    w = {k: (0.5 * rng.standard_normal((d, d))).astype(np.float32) for k in "qkvo"}
    mask = np.where(rng.random((n, n)) < 0.4, -np.inf, 0.0).astype(np.float32)
    np.fill_diagonal(mask, 0.0)
    b = GraphBuilder(256)
    ws = {k: b.input(k, (d, d)) for k in "qkvo"}
    mask_type = ggml.GGML_TYPE_F16 if flash else ggml.GGML_TYPE_F32
    out = b.attention(b.input("x", (d, n)), (ws["q"], None), (ws["k"], None), (ws["v"], None),
                      (ws["o"], None), heads, mask=b.input("mask", (n, n), mask_type), flash=flash)
    got = _run(b, out, {"x": x, "mask": mask.astype(np.float16 if flash else np.float32), **w})
    q, k, v = (x @ w[c].T for c in "qkv")
    dh = d // heads
    ctx = []
    for h in range(heads):
        s = q[:, h * dh:(h + 1) * dh] @ k[:, h * dh:(h + 1) * dh].T / np.sqrt(dh) + mask
        p = np.exp(s - s.max(-1, keepdims=True))
        ctx.append((p / p.sum(-1, keepdims=True)) @ v[:, h * dh:(h + 1) * dh])
    tol = 3e-3 if flash else 1e-5  # flash: K/V rounded to f16
    np.testing.assert_allclose(got, np.concatenate(ctx, 1) @ w["o"].T, rtol=tol, atol=tol)


@pytest.mark.parametrize("n_tiles", [1, 3])
def test_attention_mask_is_transformers_mask(n_tiles):
    import torch
    from transformers.models.mllama.modeling_mllama import _prepare_aspect_ratio_attention_mask

    from edgevlm.kernels.mllama_vision import attention_mask
    from tests.fixtures.mllama import MllamaSizes

    cfg = _config(MllamaSizes())
    ar_mask = torch.zeros(1, 4, dtype=torch.long)
    ar_mask[0, :n_tiles] = 1
    ref = _prepare_aspect_ratio_attention_mask(ar_mask, cfg.n_positions, cfg.n_padded, torch.float32)[0, 0]
    ours = attention_mask(cfg, n_tiles)
    assert ours.shape == tuple(ref.shape) == (4 * 24, 4 * 24)
    np.testing.assert_array_equal(np.isinf(ours), ref.numpy() < -1e30)
    assert np.isinf(ours).any() and not np.isinf(ours).all(1).any()


def _config(sizes):
    from edgevlm.kernels.mllama_vision import MllamaVisionConfig

    return MllamaVisionConfig(
        image_size=sizes.image_size, patch_size=sizes.patch_size, width=sizes.vision_hidden,
        n_head=sizes.vision_heads, n_local=sizes.vision_layers, n_global=sizes.vision_global_layers,
        eps=1e-5, activation="gelu_erf", intermediate=sizes.intermediate_layers,
        max_num_tiles=sizes.max_num_tiles, aspect_ratios=((1, 1),), max_image_tiles=4,
        image_mean=(0.5,) * 3, image_std=(0.5,) * 3, resample="bilinear", output_width=sizes.text_hidden)


@pytest.fixture(scope="module")
def hf_model(mllama_checkpoint):
    from tests.fixtures.mllama import load_model

    return load_model(mllama_checkpoint)


@pytest.fixture(scope="module")
def encoder(mllama_f32_result):
    from edgevlm.kernels.mllama_vision import MllamaVisionEncoder

    enc = MllamaVisionEncoder(mllama_f32_result.mmproj_path, device="cpu", n_threads=1, flash_attn=False)
    yield enc
    enc.close()


def _reference(model, batch):
    import torch

    with torch.no_grad():
        states = model.model.vision_model(
            pixel_values=torch.from_numpy(batch["pixel_values"]),
            aspect_ratio_ids=torch.from_numpy(batch["aspect_ratio_ids"]),
            aspect_ratio_mask=torch.from_numpy(batch["aspect_ratio_mask"])).last_hidden_state
        return model.model.multi_modal_projector(states)[0, 0].numpy()


@pytest.mark.parametrize(("size", "layout"), list(LAYOUTS.items()), ids=lambda v: "x".join(map(str, v)))
def test_encoder_matches_transformers(hf_model, encoder, size, layout):
    from tests.fixtures.mllama import image_processor

    batch = image_processor()(images=[[gradient_image(*size, seed=sum(size))]], return_tensors="np")
    n_tiles = layout[0] * layout[1]
    assert int(batch["aspect_ratio_mask"].sum()) == n_tiles
    ref = _reference(hf_model, batch)                                   # (4, 17, 64)
    got = encoder.encode(batch["pixel_values"][0, 0], int(batch["aspect_ratio_ids"][0, 0]), n_tiles)
    assert got.shape == ref.shape == (4, 17, 64)
    cos = np.sum(got * ref, -1) / (np.linalg.norm(got, axis=-1) * np.linalg.norm(ref, axis=-1))
    max_abs = float(np.abs(got - ref).max())
    print(f"layout {layout}: min cosine {cos.min():.7f}, max-abs {max_abs:.2e}, "
          f"|ref| max {np.abs(ref).max():.2f}")
    assert cos.min() >= COSINE_MIN and max_abs <= MAX_ABS


@pytest.mark.parametrize(("vision_type", "as_file", "cosine_min"),
                         [("f16", False, 0.999), ("f16", True, 0.999), ("q8_0", False, 0.995)])
def test_quantised_projectors_stay_close(hf_model, mllama_checkpoint, tmp_path, monkeypatch, vision_type, as_file,
                                         cosine_min):
    """f16 / q8_0 encoders (f16 kept states); ``as_file``: the f16 matrices kept as they are (a CPU where
    ``auto`` does not convert them), so the f16 projector takes the f16 states directly."""
    import edgevlm.kernels.mllama_vision as mv
    import edgevlm.kernels.tower_weights as tw
    from edgevlm.convert import convert
    from edgevlm.kernels import ggml
    from tests.fixtures.mllama import image_processor

    if as_file:
        monkeypatch.setattr(tw, "choose_weight_type", lambda *args, **kwargs: tw.WeightChoice("as-file", "test"))
    result = convert(mllama_checkpoint, tmp_path, quant="f16", vision_type=vision_type)
    batch = image_processor()(images=[[gradient_image(100, 100)]], return_tensors="np")
    ref = _reference(hf_model, batch)
    enc = mv.MllamaVisionEncoder(result.mmproj_path, device="cpu", n_threads=1)
    try:
        assert not as_file or enc.weights[mv.PROJECTOR].contents.type == ggml.GGML_TYPE_F16
        got = enc.encode(batch["pixel_values"][0, 0], int(batch["aspect_ratio_ids"][0, 0]), 4)
    finally:
        enc.close()
    cos = np.sum(got * ref, -1) / (np.linalg.norm(got, axis=-1) * np.linalg.norm(ref, axis=-1))
    print(f"{vision_type}{' as file' if as_file else ''}: min cosine {cos.min():.6f}, "
          f"max-abs {np.abs(got - ref).max():.2e}")
    assert cos.min() >= cosine_min


@pytest.mark.parametrize("size", [(56, 56), (300, 90)], ids=["1-tile", "4-tile"])
def test_flash_attention_stays_close(hf_model, mllama_f32_result, size):
    """ggml's fused attention (f16 K/V and mask) against transformers' f32 encoder."""
    from edgevlm.kernels.mllama_vision import MllamaVisionEncoder
    from tests.fixtures.mllama import image_processor

    batch = image_processor()(images=[[gradient_image(*size)]], return_tensors="np")
    ref = _reference(hf_model, batch)
    enc = MllamaVisionEncoder(mllama_f32_result.mmproj_path, device="cpu", n_threads=1, flash_attn=True)
    try:
        got = enc.encode(batch["pixel_values"][0, 0], int(batch["aspect_ratio_ids"][0, 0]),
                         int(batch["aspect_ratio_mask"].sum()))
    finally:
        enc.close()
    cos = np.sum(got * ref, -1) / (np.linalg.norm(got, axis=-1) * np.linalg.norm(ref, axis=-1))
    print(f"flash {size}: min cosine {cos.min():.7f}, max-abs {np.abs(got - ref).max():.2e}")
    assert cos.min() >= COSINE_MIN


def test_the_aspect_ratio_matters(encoder):
    """Same pixels, another aspect-ratio id or tile count: other states (the embeddings are used)."""
    pixels = np.random.default_rng(3).standard_normal((4, 3, 56, 56)).astype(np.float32)
    base = encoder.encode(pixels, 1, 1)
    assert np.abs(encoder.encode(pixels, 2, 1) - base).max() > 1e-2
    assert np.abs(encoder.encode(pixels, 1, 2) - base).max() > 1e-2


def test_bad_inputs_are_refused(encoder):
    from edgevlm.errors import InvalidModelError

    pixels = np.zeros((4, 3, 56, 56), np.float32)
    with pytest.raises(InvalidModelError, match="pixels of shape"):
        encoder.encode(pixels[:2], 1, 1)
    with pytest.raises(InvalidModelError, match="aspect_ratio_id 9"):
        encoder.encode(pixels, 9, 1)
    with pytest.raises(InvalidModelError, match="n_tiles 5"):
        encoder.encode(pixels, 1, 5)


def test_the_compute_buffer_is_freed_after_encoding(mllama_f32_result):
    """The encoder's graph and compute buffer live only while an image is encoded (keep_graph keeps
    them); the states are the same either way."""
    from edgevlm.kernels.mllama_vision import MllamaVisionEncoder

    pixels = np.random.default_rng(3).standard_normal((4, 3, 56, 56)).astype(np.float32)
    transient = MllamaVisionEncoder(mllama_f32_result.mmproj_path, device="cpu", n_threads=1)
    kept = MllamaVisionEncoder(mllama_f32_result.mmproj_path, device="cpu", n_threads=1, keep_graph=True)
    try:
        assert transient.compute_bytes == kept.compute_bytes == 0
        a = transient.encode(pixels, 1, 1)
        b = kept.encode(pixels, 1, 1)
        assert transient.compute_bytes == 0 and transient._graph is None
        assert kept.compute_bytes > 0
        np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(transient.encode(pixels, 1, 1), a)
    finally:
        transient.close()
        kept.close()
