"""InternVL on llama.cpp against transformers: which engine is right.

Measured on the tiny InternVL-hf fixture (f32 files, CPU):

* One tile through libmtmd vs ``get_image_features``: per-token cosine 1.000000,
  max-abs ~6e-4. It is GELU: ggml's CPU GELU is the tanh form read from an f16
  table, transformers' is erf; with transformers switched to tanh GELU the gap is
  ~4e-4, the rest being the f16 table.
* That holds only because the converter writes the position table CLS-row-last
  (libmtmd appends CLS after the patches). With the table in transformers' order,
  as llama.cpp's own converter writes it, the cosine drops to ~0.45.
* libmtmd's own tiling of images larger than a tile (llava-1.6 "best resolution"
  plus an overview, no tiling at all up to one tile) disagrees with transformers'
  grid for many sizes; feeding libmtmd the tiles of
  :func:`edgevlm.vision.internvl_tiles.tile_images` one by one matches.
* LLM logits of a text prompt: max-abs <= 5e-3 (measured ~2e-6; f32 GGUF, f32 KV).
* Next-token logits of a chat prompt with a 6-tile + thumbnail image, laid out as
  InternVLProcessor does (``<img>``, all views' embeddings, ``</img>``): max-abs
  <= 1e-2 (measured ~6e-4).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from edgevlm.chunks import ImageChunk
from edgevlm.vision.internvl_tiles import plan_tiles, tile_images
from edgevlm.vision.images import load_image
from tests.fixtures.internvl import InternVLSizes, gradient_image, image_processor
from tests.reference import cosine_rows, hf_logits, hf_model

SIZES = InternVLSizes()
FIXED_IDS = [400, 45, 78, 200, 13, 99, 250, 7, 64, 120, 33, 180, 5, 301, 42, 17]


@dataclass
class Mtmd:
    """A loaded LLM + projector pair."""

    llm: object
    encoder: object

    def encode(self, images: list[Image.Image]) -> list[np.ndarray]:
        """Embeddings of each image chunk of a prompt holding ``images``."""
        marker = self.encoder.marker
        chunks = self.encoder.tokenize("a" + marker * len(images) + "b",
                                       [load_image(i) for i in images], add_special=False)
        return [self.encoder.encode(c) for c in chunks if isinstance(c, ImageChunk)]


def _load(folder_or_result) -> Iterator[Mtmd]:
    from edgevlm.llm import LlamaModel
    from edgevlm.vision.mtmd import MtmdEncoder

    llm = LlamaModel(folder_or_result.llm_path, n_gpu_layers=0)
    enc = MtmdEncoder(folder_or_result.mmproj_path, llm, n_threads=2, use_gpu=False)
    yield Mtmd(llm, enc)
    enc.close()
    llm.close()


@pytest.fixture(scope="module")
def mtmd(internvl_f32_result) -> Iterator[Mtmd]:
    yield from _load(internvl_f32_result)



def _hf_features(checkpoint: Path, img: Image.Image, tanh_gelu: bool = False) -> np.ndarray:
    """transformers' projected features of all views of ``img`` (n_views * tokens, width)."""
    import torch
    from transformers.activations import GELUTanh

    model = hf_model(checkpoint)
    pixels = torch.tensor(np.asarray(image_processor(SIZES)(images=[img],
                                                            return_tensors="np")["pixel_values"]))
    acts = [model.model.multi_modal_projector, *(layer.mlp for layer in
                                                 model.model.vision_tower.encoder.layer)]
    saved = [(m, m.act if hasattr(m, "act") else m.activation_fn) for m in acts]
    try:
        if tanh_gelu:
            for m, _ in saved:
                setattr(m, "act" if hasattr(m, "act") else "activation_fn", GELUTanh())
        with torch.no_grad():
            feats = model.get_image_features(pixel_values=pixels).pooler_output
    finally:
        for m, act in saved:
            setattr(m, "act" if hasattr(m, "act") else "activation_fn", act)
    return feats.reshape(-1, feats.shape[-1]).numpy()


def test_one_tile_matches_transformers(mtmd, internvl_checkpoint, record_property):
    img = gradient_image(SIZES.image_size, SIZES.image_size, seed=1)
    (ours,) = mtmd.encode([img])
    ref = _hf_features(internvl_checkpoint, img)
    assert ours.shape == ref.shape == (SIZES.tokens_per_tile, SIZES.text_hidden)
    cos, gap = cosine_rows(ours, ref), float(np.abs(ours - ref).max())
    record_property("internvl_tile_cosine_min", float(cos.min()))
    record_property("internvl_tile_max_abs", gap)
    assert float(np.abs(ref).max()) > 0.3, "degenerate reference features"
    assert cos.min() >= 0.9999, f"min per-token cosine {cos.min():.6f}"
    assert gap <= 2e-3
    # most of the gap is GELU: tanh (as ggml) in transformers shrinks it
    tanh_gap = float(np.abs(ours - _hf_features(internvl_checkpoint, img, tanh_gelu=True)).max())
    record_property("internvl_tile_max_abs_tanh_gelu", tanh_gap)
    print(f"InternVL tile: cosine min {cos.min():.6f}, max-abs {gap:.2e} (erf GELU ref), "
          f"{tanh_gap:.2e} (tanh GELU ref)")
    assert tanh_gap < gap


@pytest.mark.parametrize("size", [(170, 57), (100, 100), (640, 480), (40, 20)])
def test_our_tiles_fed_one_by_one_match_transformers(mtmd, internvl_checkpoint, size):
    img = gradient_image(*size, seed=2)
    plan = plan_tiles(*size, 1, SIZES.max_tiles, SIZES.image_size)
    ours = np.concatenate(mtmd.encode(tile_images(img, plan)))
    ref = _hf_features(internvl_checkpoint, img)
    assert ours.shape == ref.shape == (plan.n_tiles * SIZES.tokens_per_tile, SIZES.text_hidden)
    assert cosine_rows(ours, ref).min() >= 0.9999


def test_libmtmd_own_tiling_differs_from_transformers(mtmd, record_property):
    """Recorded; fails the day libmtmd's internvl grid follows transformers'."""
    sizes = [(56, 56), (40, 20), (70, 70), (60, 50), (100, 100), (170, 57), (150, 100),
             (640, 480), (300, 60)]
    counts = {}
    for size in sizes:
        plan = plan_tiles(*size, 1, SIZES.max_tiles, SIZES.image_size)
        counts[size] = (len(mtmd.encode([gradient_image(*size)])), plan.n_tiles)
    record_property("internvl_libmtmd_vs_hf_tiles", repr(counts))
    assert counts[(56, 56)] == (1, 1) and counts[(640, 480)] == (13, 13)
    assert any(ours != theirs for ours, theirs in counts.values())


def test_transformers_position_order_would_break_libmtmd(internvl_checkpoint, tmp_path,
                                                         monkeypatch, record_property):
    """Without the CLS-row-last table (llama.cpp's own layout) libmtmd diverges."""
    import edgevlm.convert.internvl as family
    from edgevlm.convert import convert

    monkeypatch.setattr(family, "_cls_last_positions",
                        lambda a: np.ascontiguousarray(a.reshape(a.shape[-2:])))
    result = convert(internvl_checkpoint, tmp_path, quant="f32", vision_type="f32")
    img = gradient_image(SIZES.image_size, SIZES.image_size, seed=1)
    for pair in _load(result):
        (ours,) = pair.encode([img])
    cos = cosine_rows(ours, _hf_features(internvl_checkpoint, img))
    record_property("internvl_hf_order_cosine_min", float(cos.min()))
    assert cos.min() < 0.99


def test_llm_logits_match_transformers(mtmd, internvl_checkpoint):
    from edgevlm.llm import ContextOptions, LlamaContext

    ctx = LlamaContext(mtmd.llm, ContextOptions(n_ctx=256, n_threads=2, n_gpu_layers=0,
                                                kv_type="f32"))
    try:
        ctx.decode_tokens(FIXED_IDS, 0, logits_all=True)
        ours = np.stack([ctx.logits_at(i) for i in range(len(FIXED_IDS))])
    finally:
        ctx.close()
    ref = hf_logits(internvl_checkpoint, FIXED_IDS)
    assert ours.shape == ref.shape
    assert float(np.abs(ref).max()) > 0.5, "degenerate reference logits"
    print(f"InternVL LLM logits max-abs {float(np.abs(ours - ref).max()):.2e}")
    assert float(np.abs(ours - ref).max()) <= 5e-3


def test_multimodal_next_token_logits_match(mtmd, internvl_checkpoint, record_property):
    """The prompt layout of InternVLProcessor, rebuilt from our tiles + libmtmd embeddings.

    Text up to and including ``<img>`` is decoded as tokens, then every view's
    embeddings back to back, then ``</img>`` and the rest of the text.
    """
    import torch
    from edgevlm.llm import ContextOptions, LlamaContext
    from tests.fixtures.internvl import load_processor

    img = gradient_image(150, 100, seed=4)
    proc = load_processor(internvl_checkpoint)
    prompt = "<|im_start|>user\n<IMG_CONTEXT>\nwhat is it?<|im_end|>\n<|im_start|>assistant\n"
    inputs = proc(images=[img], text=[prompt], return_tensors="pt")
    ids = inputs["input_ids"][0].tolist()
    start, end = ids.index(proc.tokenizer.convert_tokens_to_ids("<img>")), ids.index(
        proc.tokenizer.convert_tokens_to_ids("</img>"))
    plan = plan_tiles(150, 100, 1, SIZES.max_tiles, SIZES.image_size)
    embd = np.concatenate(mtmd.encode(tile_images(img, plan)))
    assert len(embd) == end - start - 1
    ctx = LlamaContext(mtmd.llm, ContextOptions(n_ctx=512, n_threads=2, n_gpu_layers=0,
                                                kv_type="f32"))
    try:
        ctx.decode_tokens(ids[:start + 1], 0, logits_last=False)
        ctx.decode_embeddings(embd, start + 1)
        ctx.decode_tokens(ids[end:], end)
        ours = ctx.logits()
    finally:
        ctx.close()
    with torch.no_grad():
        ref = hf_model(internvl_checkpoint)(input_ids=inputs["input_ids"],
                                            pixel_values=inputs["pixel_values"]).logits[0, -1]
    gap = float(np.abs(ours - ref.numpy()).max())
    record_property("internvl_multimodal_logits_max_abs", gap)
    print(f"InternVL multimodal next-token logits max-abs {gap:.2e}")
    assert gap <= 1e-2
