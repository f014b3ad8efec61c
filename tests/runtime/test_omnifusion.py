"""OmniFusion 1.1 converted to GGUF and run: adapter on the kernels, special embeddings in the context.

Reference: the release README's ``gen_answer`` forward in PyTorch (float32),
from tests/fixtures/omnifusion.py. Tolerances (f32 GGUF, f32 KV cache):
image embeddings after the adapter per-token cosine >= 0.9999; next-token
logits of the whole OmniFusion prompt max-abs <= 5e-3.
"""

from __future__ import annotations

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

import edgevlm
from edgevlm.chunks import EmbeddingChunk, ImageChunk, TextChunk
from tests.cache_helpers import assert_cached_matches_full
from tests.fixtures import omnifusion as ref
from tests.reference import cosine_rows

QUESTION = "What is the genre of this painting?"


@pytest.fixture(scope="module")
def omni(omnifusion_f32):
    vlm = edgevlm.load(omnifusion_f32, n_ctx=1024, kv_type="f32", n_threads=2, cache=False)
    yield vlm
    vlm.close()


@pytest.fixture(scope="module")
def wide_image(tmp_path_factory):
    """Non-square, so CLIPImageProcessor's resize + centre crop is exercised."""
    rng = np.random.default_rng(4)
    path = tmp_path_factory.mktemp("omni_img") / "wide.png"
    Image.fromarray(rng.integers(0, 256, (45, 70, 3), dtype=np.uint8)).save(path)
    return path


def _ask(image, text=QUESTION):
    return [{"role": "user", "content": [{"type": "image", "image": str(image)}, {"type": "text", "text": text}]}]


def test_loads_on_the_kernels_engine(omni):
    assert omni.vision_engine == "kernels"
    assert omni.engine.layout is not None and omni.engine.layout.name == "omnifusion-1.1"


def test_adapter_embeddings_match_pytorch(omni, omnifusion_checkpoint, wide_image):
    release, tower = omnifusion_checkpoint
    with Image.open(wide_image) as img:
        pixels = ref.preprocess(tower, img)
    expected = ref.reference_image_embeddings(release, tower, pixels)
    ours = omni.embed_image(wide_image)
    assert ours.shape == expected.shape
    cos = cosine_rows(ours, expected)
    print(f"OmniFusion adapter embeddings vs PyTorch: cosine min {cos.min():.7f}, "
          f"max-abs {np.abs(ours - expected).max():.2e}")
    assert cos.min() >= 0.9999, f"min per-token cosine {cos.min():.6f}"


def test_prompt_layout_is_the_releases(omni, omnifusion_checkpoint, wide_image):
    release, _ = omnifusion_checkpoint
    chunks = omni.prompt_chunks(_ask(wide_image))
    kinds = [type(c).__name__ for c in chunks]
    assert kinds == ["TextChunk", "EmbeddingChunk", "ImageChunk", "EmbeddingChunk", "EmbeddingChunk",
                     "TextChunk", "EmbeddingChunk"]
    labels = [c.key.split("/")[0] for c in chunks if isinstance(c, EmbeddingChunk)]
    assert labels == ["SOI", "EOI", "USER", "BOT"]
    ids = ref.prompt_token_ids(release, QUESTION)
    texts = [c.tokens for c in chunks if isinstance(c, TextChunk)]
    assert texts == [ids.prefix, ids.question]  # no BOS, no special tokens
    assert "<SOI>" in omni.prompt_text(_ask(wide_image))


def test_prompt_logits_match_pytorch(omni, omnifusion_checkpoint, wide_image):
    release, tower = omnifusion_checkpoint
    with Image.open(wide_image) as img:
        pixels = ref.preprocess(tower, img)
    expected = ref.reference_prompt_logits(release, tower, pixels, QUESTION)
    ours = omni.next_token_logits(_ask(wide_image))
    assert float(np.abs(expected).max()) > 0.5, "degenerate reference logits"
    print(f"OmniFusion prompt logits vs PyTorch: max-abs {np.abs(ours - expected).max():.2e}")
    assert float(np.abs(ours - expected).max()) <= 5e-3


def test_multi_turn_reuses_the_image_and_matches_full(omni, wide_image):
    first = _ask(wide_image)
    follow = first + [{"role": "assistant", "content": "Impressionism."},
                      {"role": "user", "content": "Who might have painted it?"}]
    chunks = omni.prompt_chunks(follow)
    assert sum(isinstance(c, ImageChunk) for c in chunks) == 1
    labels = [c.key.split("/")[0] for c in chunks if isinstance(c, EmbeddingChunk)]
    assert labels == ["SOI", "EOI", "USER", "BOT", "USER", "BOT"]
    assert_cached_matches_full(omni, first, follow)
    calls = omni.encoder_calls
    omni.next_token_logits(first)
    omni.next_token_logits(follow)
    assert omni.encoder_calls == calls
    assert omni.engine.last_prefill.images_encoded == 0


def test_chat_and_stream_generate(omni, wide_image):
    reply = omni.chat(_ask(wide_image), max_tokens=8, temperature=0)
    assert reply.completion_tokens > 0 or reply.finish_reason == "stop"
    pieces = list(omni.stream(_ask(wide_image), max_tokens=8, temperature=0))
    assert "".join(pieces).strip() == reply.text


def test_text_only_conversation(omni):
    chunks = omni.prompt_chunks([{"role": "user", "content": "Hello"}])
    assert [type(c).__name__ for c in chunks] == ["TextChunk", "EmbeddingChunk", "TextChunk", "EmbeddingChunk"]
    assert np.isfinite(omni.next_token_logits([{"role": "user", "content": "Hello"}])).all()


def test_second_process_reuses_disk_embeddings(omnifusion_f32, wide_image):
    with edgevlm.load(omnifusion_f32, n_ctx=512, kv_type="f32", n_threads=2) as vlm:
        first = vlm.next_token_logits(_ask(wide_image))
    with edgevlm.load(omnifusion_f32, n_ctx=512, kv_type="f32", n_threads=2) as vlm:
        again = vlm.next_token_logits(_ask(wide_image, "And the colours?"))
        assert vlm.encoder_calls == 0
        assert vlm.engine.last_prefill.snapshot_restored or vlm.engine.last_prefill.images_from_cache == 1
    assert np.isfinite(first).all() and np.isfinite(again).all()


def test_mtmd_engine_is_refused_with_a_clear_error(omnifusion_f32):
    with pytest.raises(edgevlm.EdgeVLMError, match="libmtmd cannot run omnifusion"):
        edgevlm.load(omnifusion_f32, n_threads=1, vision_engine="mtmd")


def test_cli_chat_one_shot(omnifusion_f32, wide_image):
    from edgevlm.cli.main import cli

    result = CliRunner().invoke(cli, ["chat", "-m", str(omnifusion_f32), "--image", str(wide_image),
                                      "-p", QUESTION, "--max-tokens", "4", "--temperature", "0",
                                      "--threads", "2", "--no-cache"])
    assert result.exit_code == 0, result.output


def test_grid_tiles_sit_between_one_soi_and_eoi(omnifusion_f32, wide_image):
    """tiles='grid': the overview and the tiles' embeddings, all inside one SOI ... EOI."""
    with edgevlm.load(omnifusion_f32, n_ctx=2048, n_threads=2, cache=False, tiles="grid") as grid, \
            edgevlm.load(omnifusion_f32, n_ctx=2048, n_threads=2, cache=False) as plain:
        chunks = grid.prompt_chunks(_ask(wide_image))
        kinds = [type(c).__name__ for c in chunks]
        assert kinds == ["TextChunk", "EmbeddingChunk", "ImageChunk", "EmbeddingChunk", "EmbeddingChunk",
                         "TextChunk", "EmbeddingChunk"]
        image = chunks[2]
        one = plain.embed_image(wide_image)
        assert image.n_views > 1 and image.n_tokens == image.n_views * one.shape[0]
        assert grid.image_cost(70, 45).tokens == image.n_tokens + 2  # SOI and EOI count
        tiled = grid.embed_image(wide_image)
        np.testing.assert_allclose(tiled[:one.shape[0]], one, atol=1e-4)  # the overview first
        assert grid.chat(_ask(wide_image), max_tokens=2, temperature=0).completion_tokens >= 1
