"""Vision towers on the kernels engine against transformers and libmtmd.

Tolerances (f32 GGUF, f32 KV): image embeddings per-token cosine >= 0.9999
against transformers for CLIP (CLS first, as the reference) and SigLIP
towers; kernels vs libmtmd on a SigLIP tower cosine >= 0.9999; multimodal
next-token logits max-abs <= 1e-2.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

import edgevlm
from edgevlm.errors import InvalidRequestError, UnsupportedModelError
from edgevlm.families import family_for
from tests.helpers import synthetic_descriptor
from tests.cache_helpers import assert_cached_matches_full
from tests.reference import cosine_rows, hf_image_embeddings, hf_logits, hf_pixel_values, reference_ids


@pytest.fixture(scope="module")
def clip_kernels(clip_f32):
    vlm = edgevlm.load(clip_f32, n_ctx=1024, kv_type="f32", n_threads=2, cache=False)
    yield vlm
    vlm.close()


def _image_token_id(checkpoint: Path) -> int:
    cfg = json.loads((checkpoint / "config.json").read_text())
    return int(cfg.get("image_token_id", cfg.get("image_token_index")))


def _ask(image: Path, text: str = "What is shown here?") -> list[dict]:
    return [{"role": "user", "content": [{"type": "image", "image": str(image)}, {"type": "text", "text": text}]}]


def test_auto_picks_kernels_for_clip_towers(clip_kernels, siglip_vlm):
    assert clip_kernels.vision_engine == "kernels"
    assert siglip_vlm.vision_engine == "mtmd"


@pytest.mark.parametrize("size", [(32, 32), (61, 45), (40, 96)])
def test_clip_tower_embeddings_match_transformers(clip_kernels, llava_clip_checkpoint, tmp_path, size):
    from PIL import Image

    rng = np.random.default_rng(sum(size))
    path = tmp_path / "img.png"
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(path)
    ours = clip_kernels.embed_image(path)
    ref = hf_image_embeddings(llava_clip_checkpoint, path)
    assert ours.shape == ref.shape == (16, 256)
    cos = cosine_rows(ours, ref)
    print(f"CLIP tower (kernels) {size}: cosine min {cos.min():.7f}")
    assert cos.min() >= 0.9999, f"min per-token cosine {cos.min():.6f}"
    # the preprocessing is CLIPImageProcessor's (resize shortest edge, centre crop)
    pixels = clip_kernels.engine.encoder.pixels(edgevlm.vision.images.load_image(path))
    np.testing.assert_allclose(pixels, hf_pixel_values(llava_clip_checkpoint, path)[0].numpy(), atol=1e-5)


def test_clip_multimodal_logits_match_transformers(clip_kernels, llava_clip_checkpoint, square_image):
    image = square_image(32, seed=3)
    messages = _ask(image)
    ids = reference_ids(clip_kernels.prompt_chunks(messages), _image_token_id(llava_clip_checkpoint))
    ours = clip_kernels.next_token_logits(messages)
    ref = hf_logits(llava_clip_checkpoint, ids, image)[-1]
    print(f"CLIP LLaVA (kernels) multimodal logits max-abs {np.abs(ours - ref).max():.2e}")
    assert float(np.abs(ref).max()) > 0.5
    assert float(np.abs(ours - ref).max()) <= 1e-2


def test_siglip_tower_kernels_mtmd_and_transformers_agree(siglip_f32, siglip_vlm, llava_siglip_checkpoint,
                                                           square_image):
    image = square_image(32, seed=11)
    with edgevlm.load(siglip_f32, n_ctx=512, kv_type="f32", n_threads=2, vision_engine="kernels",
                      cache=False) as vlm:
        assert vlm.vision_engine == "kernels"
        kernels = vlm.embed_image(image)
    mtmd = siglip_vlm.embed_image(image)
    ref = hf_image_embeddings(llava_siglip_checkpoint, image)
    print(f"SigLIP kernels vs HF {cosine_rows(kernels, ref).min():.7f}, vs libmtmd "
          f"{cosine_rows(kernels, mtmd).min():.7f}, libmtmd vs HF {cosine_rows(mtmd, ref).min():.7f}")
    assert cosine_rows(kernels, ref).min() >= 0.9999
    assert cosine_rows(kernels, mtmd).min() >= 0.9999


def test_text_chunks_equal_libmtmd_tokenisation(clip_f32, clip_kernels, painting):
    messages = _ask(painting, "Describe <this> painting, please.")
    with edgevlm.load(clip_f32, n_ctx=512, n_threads=2, vision_engine="mtmd", cache=False) as mtmd:
        theirs = mtmd.prompt_chunks(messages)
    ours = clip_kernels.prompt_chunks(messages)
    assert [type(c) for c in ours] == [type(c) for c in theirs]
    assert [getattr(c, "tokens", c.n_pos) for c in ours] == [getattr(c, "tokens", c.n_pos) for c in theirs]


def test_kernels_engine_prefix_reuse_and_cache(clip_kernels, painting, square_image):
    second = square_image(32, seed=21)
    first = _ask(painting)
    follow = first + [{"role": "assistant", "content": "A painting."},
                      {"role": "user", "content": "And the colours?"}]
    assert_cached_matches_full(clip_kernels, first, follow)
    two = [{"role": "user", "content": [{"type": "text", "text": "Compare"}, {"type": "image", "image": str(painting)},
                                        {"type": "text", "text": "with"}, {"type": "image", "image": str(second)}]}]
    assert_cached_matches_full(clip_kernels, two, two + [{"role": "assistant", "content": "Same."},
                                                         {"role": "user", "content": "Why?"}])
    calls = clip_kernels.encoder_calls
    clip_kernels.reset()
    clip_kernels.next_token_logits(follow)  # KV gone, embeddings still in the RAM cache
    assert clip_kernels.encoder_calls == calls
    assert clip_kernels.engine.last_prefill.images_from_cache == 1


def choose_engine(requested: str, meta: dict, names: frozenset[str]) -> str:
    """The engine the family of a projector with ``meta`` and tensors ``names`` picks."""
    return family_for(synthetic_descriptor(meta, names)).choose_engine(requested)


def test_engine_choice_rules():
    clip = {"clip.projector_type": "mlp", "clip.has_vision_encoder": True}
    with_cls, without = frozenset({"v.class_embd"}), frozenset()
    assert choose_engine("auto", clip, with_cls) == "kernels"
    assert choose_engine("auto", clip, without) == "mtmd"
    assert choose_engine("kernels", clip, without) == "kernels"
    assert choose_engine("mtmd", clip, with_cls) == "mtmd"
    qwen = {"clip.projector_type": "qwen2vl_merger"}
    assert choose_engine("auto", qwen, without) == "mtmd"
    with pytest.raises(UnsupportedModelError, match="does not implement"):
        choose_engine("kernels", qwen, without)
    omni = {"edgevlm.projector.kind": "omnifusion"}
    assert choose_engine("auto", omni, with_cls) == "kernels"
    with pytest.raises(UnsupportedModelError, match="libmtmd cannot run"):
        choose_engine("mtmd", omni, with_cls)
    with pytest.raises(InvalidRequestError, match="auto, kernels, mtmd"):
        choose_engine("cuda", clip, with_cls)


def test_unknown_engine_is_a_clear_error(clip_f32):
    with pytest.raises(InvalidRequestError, match="unknown vision engine"):
        edgevlm.load(clip_f32, n_threads=1, vision_engine="fast")


@pytest.mark.parametrize("vision_type", ["f16", "bf16", "q8_0"])
def test_every_projector_type_runs_on_both_engines(vision_type, llava_siglip_checkpoint, siglip_vlm,
                                                   square_image, tmp_path):
    """Reduced-precision towers track the f32 one (cosine >= 0.99) on both engines."""
    from edgevlm.convert import convert
    from tests.helpers import gguf_tensors

    result = convert(llava_siglip_checkpoint, tmp_path, quant="f16", vision_type=vision_type)
    assert gguf_tensors(result.mmproj_path)["v.blk.0.attn_q.weight"].tensor_type.name == vision_type.upper()
    image = square_image(32, seed=2)
    f32 = siglip_vlm.embed_image(image)
    for engine in ("kernels", "mtmd"):
        with edgevlm.load(tmp_path, n_ctx=256, n_threads=2, vision_engine=engine, cache=False) as vlm:
            cos = cosine_rows(vlm.embed_image(image), f32)
        assert cos.min() >= 0.99, f"{engine} {vision_type}: cosine {cos.min():.5f}"


def test_torch_reference_of_the_bench_is_the_same_model(clip_f32, llava_clip_checkpoint, square_image):
    """``bench --reference torch`` rebuilds the tower from the GGUF: it must equal transformers."""
    import torch

    from edgevlm.benchmarks.vision import torch_tower

    image = square_image(32, seed=13)
    mmproj = next(clip_f32.glob("mmproj-*.gguf"))
    with edgevlm.load(clip_f32, n_ctx=512, n_threads=2, cache=False) as vlm:
        pixels = vlm.tower_pixels(image)
    with torch.no_grad():
        ours = torch_tower(mmproj)(torch.from_numpy(pixels)[None])[0].numpy()
    assert cosine_rows(ours, hf_image_embeddings(llava_clip_checkpoint, image)).min() >= 0.9999


def test_bench_reports_both_engines_and_the_torch_reference(clip_f32, square_image):
    from click.testing import CliRunner

    from edgevlm.cli.main import cli

    image = square_image(32, seed=14)
    for engine in ("kernels", "mtmd"):
        result = CliRunner().invoke(cli, ["bench", "-m", str(clip_f32), "--image", str(image), "--json",
                                          "--max-tokens", "2", "--threads", "1", "--vision-engine", engine,
                                          "--reference", "torch", "--encode-repeats", "1"])
        assert result.exit_code == 0, result.output
        report = json.loads(result.output)
        assert report["vision_engine"] == engine
        for key in ("image_encode_ms", "image_encode_first_ms", "torch_f32_encode_ms", "torch_bf16_encode_ms"):
            assert report[key] > 0, key


def test_a_request_cancelled_inside_the_tower_stops_there_and_caches_nothing(clip_kernels, painting, monkeypatch):
    """The cancel is set as the tower's encode starts (no timing involved): its graph stops at the
    first node, the request ends "cancelled" with the text before the image read, no embeddings are
    kept, and asking again encodes the image and reads on from the text."""
    import threading

    from edgevlm.kernels.vision import VisionTower

    messages = _ask(painting, "Which colours, before the stop?")
    with clip_kernels.isolated_caches():
        expected = clip_kernels.chat(messages, max_tokens=4, temperature=0).text
        clip_kernels.reset()
        clip_kernels.engine.embeddings.ram.clear()
        calls, text_before = clip_kernels.engine.encoder_calls, clip_kernels.prompt_chunks(messages)[0]
        cancel, real_encode = threading.Event(), VisionTower.encode

        def encode_after_cancel(self, pixels):
            cancel.set()
            return real_encode(self, pixels)

        monkeypatch.setattr(VisionTower, "encode", encode_after_cancel)
        reply = clip_kernels.chat(messages, max_tokens=4, temperature=0, cancel=cancel)
        monkeypatch.undo()
        assert reply.finish_reason == "cancelled" and reply.prefill.images_encoded == 0
        assert clip_kernels.engine.encoder_calls == calls, "the tower's graph ran to its end"
        assert reply.prefill.evaluated_positions == len(text_before.tokens)
        again = clip_kernels.chat(messages, max_tokens=4, temperature=0)
        assert again.prefill.images_encoded == 1 and again.prefill.reused_positions == len(text_before.tokens)
        assert again.text == expected
