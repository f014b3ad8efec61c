"""Shared fixtures: isolated home/cache dirs, tiny checkpoints, converted models.

Checkpoints are random, tiny (hidden 64-256, 2-3 layers) and built with
transformers at session start; conversion uses edgevlm's own converters.
Nothing is downloaded.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"


os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# transformers' hub kernels download code at load time; tests are offline.
os.environ.setdefault("USE_HUB_KERNELS", "NO")


@pytest.fixture(autouse=True)
def isolated_dirs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Point every home and cache directory at the test's tmp_path."""
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("XDG_CACHE_HOME", str(home / ".cache"))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(home / ".config"))
    monkeypatch.delenv("EDGEVLM_CONFIG_DIR", raising=False)
    monkeypatch.delenv("EDGEVLM_MODEL", raising=False)
    monkeypatch.setenv("HF_HOME", str(home / ".cache" / "huggingface"))
    monkeypatch.setenv("EDGEVLM_CACHE_DIR", str(home / ".cache" / "edgevlm"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return home


@pytest.fixture
def hf_cache(isolated_dirs: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """huggingface_hub's import-time paths in the test's HF_HOME; returns the hub cache folder."""
    from tests.fakehub import use_test_hub_cache

    return use_test_hub_cache(monkeypatch)


def _build(factory: pytest.TempPathFactory, name: str, **kwargs: object) -> Path:
    from tests.fixtures.checkpoints import build_llava_checkpoint

    return build_llava_checkpoint(factory.mktemp(name) / "hf", **kwargs)


def _convert(factory: pytest.TempPathFactory, source: Path, name: str, **kwargs: object) -> Path:
    from edgevlm.convert import convert

    out = factory.mktemp(name)
    convert(source, out, **kwargs)
    return out


@pytest.fixture(scope="session")
def llava_clip_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """llava-hf checkpoint: CLIP tower (CLS, feature layer -2), Llama LLM of width 256."""
    return _build(tmp_path_factory, "llava_clip", tower="clip")


@pytest.fixture(scope="session")
def llava_siglip_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """llava-hf checkpoint: SigLIP tower (no CLS, feature layer -1, 'full')."""
    return _build(tmp_path_factory, "llava_siglip", tower="siglip")


@pytest.fixture(scope="session")
def clip_f32(tmp_path_factory: pytest.TempPathFactory, llava_clip_checkpoint: Path) -> Path:
    return _convert(tmp_path_factory, llava_clip_checkpoint, "clip_f32", quant="f32", vision_type="f32")


@pytest.fixture(scope="session")
def siglip_f32(tmp_path_factory: pytest.TempPathFactory, llava_siglip_checkpoint: Path) -> Path:
    return _convert(tmp_path_factory, llava_siglip_checkpoint, "siglip_f32", quant="f32", vision_type="f32")


@pytest.fixture(scope="session")
def siglip_q8(tmp_path_factory: pytest.TempPathFactory, llava_siglip_checkpoint: Path) -> Path:
    return _convert(tmp_path_factory, llava_siglip_checkpoint, "siglip_q8", quant="q8_0", vision_type="q8_0")


@pytest.fixture(scope="session")
def siglip_q4km(tmp_path_factory: pytest.TempPathFactory, llava_siglip_checkpoint: Path) -> Path:
    return _convert(tmp_path_factory, llava_siglip_checkpoint, "siglip_q4km", quant="q4_k_m")


@pytest.fixture(scope="session")
def siglip_vlm(siglip_f32: Path):
    """A loaded f32 model with an f32 KV cache (for numerics), shared by tests.

    Without the disk cache: a session fixture is set up before the per-test
    ``isolated_dirs``, so its store would be the real user cache, and a KV
    snapshot restored from it would make "evaluated from scratch" untrue.
    """
    import edgevlm

    vlm = edgevlm.load(siglip_f32, n_ctx=1024, kv_type="f32", n_threads=2, cache=False)
    yield vlm
    vlm.close()


@pytest.fixture(scope="session")
def painting(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A deterministic 'painting': smooth gradients and a few shapes (PNG)."""
    import numpy as np
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(7)
    yy, xx = np.mgrid[0:96, 0:128]
    rgb = np.stack([(xx * 2) % 256, (yy * 2.5) % 256, ((xx + yy) * 1.3) % 256], axis=-1)
    img = Image.fromarray((rgb + rng.integers(0, 20, rgb.shape)).clip(0, 255).astype("uint8"))
    draw = ImageDraw.Draw(img)
    draw.ellipse((20, 20, 60, 70), fill=(200, 30, 40))
    draw.rectangle((70, 10, 120, 50), fill=(20, 60, 180))
    path = tmp_path_factory.mktemp("images") / "painting.png"
    img.save(path)
    return path


@pytest.fixture(scope="session")
def square_image(tmp_path_factory: pytest.TempPathFactory):
    """Factory: a random RGB PNG of exactly size x size pixels (no resize ambiguity).

    ``height`` makes it a size (wide) x height rectangle instead.
    """
    import numpy as np
    from PIL import Image

    folder = tmp_path_factory.mktemp("square")

    def make(size: int, seed: int = 0, height: int | None = None) -> Path:
        rng = np.random.default_rng(seed)
        rows = size if height is None else height
        path = folder / f"sq{size}x{rows}_{seed}.png"
        if not path.exists():
            Image.fromarray(rng.integers(0, 256, (rows, size, 3), dtype=np.uint8)).save(path)
        return path

    return make


@pytest.fixture(scope="session")
def medium_f32(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A LLaVA-1.5-shaped model big enough for its parts to matter (LLM 512 wide, 4 layers; ~60 MB)."""
    src = _build(tmp_path_factory, "llava_medium", tower="clip", text_hidden=512, text_ffn=1376,
                 text_layers=4, text_heads=8, text_kv_heads=8)
    return _convert(tmp_path_factory, src, "medium_f32", quant="f32", vision_type="f32")


@pytest.fixture(scope="session")
def clip_narrow(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A converted model whose LLM is 128 wide (projector width mismatch tests)."""
    src = _build(tmp_path_factory, "llava_narrow", tower="clip", text_hidden=128, text_ffn=256)
    return _convert(tmp_path_factory, src, "clip_narrow", quant="f16")


@pytest.fixture(scope="session")
def omnifusion_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A tiny OmniFusion 1.1 release and its CLIP tower: ``(release_dir, tower_dir)``.

    See tests/fixtures/omnifusion.py for the sizes and the torch reference.
    """
    from tests.fixtures.omnifusion import build_omnifusion_checkpoint

    return build_omnifusion_checkpoint(tmp_path_factory.mktemp("omnifusion"))


@pytest.fixture(scope="session")
def omnifusion_f32(tmp_path_factory: pytest.TempPathFactory,
                   omnifusion_checkpoint: tuple[Path, Path]) -> Path:
    """Folder with the f32 LLM GGUF and f32 projector GGUF of the OmniFusion checkpoint."""
    release, tower = omnifusion_checkpoint
    return _convert(tmp_path_factory, release, "omnifusion_f32", quant="f32", vision_type="f32",
                    vision_tower=tower)


@pytest.fixture(scope="session")
def qwen2vl_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Qwen2-VL checkpoint: Qwen2 LLM of width 128 (M-RoPE 4/6/6), 2-block ViT of width 48."""
    from tests.fixtures.qwen2vl import build_qwen2vl_checkpoint

    return build_qwen2vl_checkpoint(tmp_path_factory.mktemp("qwen2vl") / "tiny-qwen2-vl")


@pytest.fixture(scope="session")
def qwen2vl_f32_result(tmp_path_factory: pytest.TempPathFactory, qwen2vl_checkpoint: Path):
    """f32/f32 conversion of the Qwen2-VL checkpoint (a ConversionResult)."""
    from edgevlm.convert import convert

    return convert(qwen2vl_checkpoint, tmp_path_factory.mktemp("qwen2vl_f32"), quant="f32",
                   vision_type="f32")


@pytest.fixture(scope="session")
def qwen2vl_vlm(qwen2vl_f32_result):
    """The f32 Qwen2-VL pair loaded with an f32 KV cache, shared by tests (no disk cache,
    like ``siglip_vlm``)."""
    import edgevlm

    vlm = edgevlm.load(qwen2vl_f32_result.llm_path.parent, n_ctx=1024, kv_type="f32",
                       n_threads=2, cache=False)
    yield vlm
    vlm.close()


@pytest.fixture(scope="session")
def llava_next_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """LLaVA-NeXT checkpoint: CLIP tower of 32-px tiles (patch 8), Llama LLM of width 128,
    pinpoints scaled to the tile (tests/fixtures/llava_next.py)."""
    from tests.fixtures.llava_next import build_llava_next_checkpoint

    return build_llava_next_checkpoint(tmp_path_factory.mktemp("llava_next") / "tiny-llava-next")


@pytest.fixture(scope="session")
def llava_next_f32_result(tmp_path_factory: pytest.TempPathFactory, llava_next_checkpoint: Path):
    """f32/f32 conversion of the LLaVA-NeXT checkpoint (a ConversionResult)."""
    from edgevlm.convert import convert

    return convert(llava_next_checkpoint, tmp_path_factory.mktemp("llava_next_f32"), quant="f32",
                   vision_type="f32")


# --- InternVL (transformers-native InternVLForConditionalGeneration) --------------------
@pytest.fixture(scope="session")
def internvl_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """InternVL-hf checkpoint: InternViT (56-px tiles, 7-px patches, width 48, 2 layers),
    pixel shuffle 0.5, Qwen2 LLM of width 64 (see tests/fixtures/internvl.py)."""
    from tests.fixtures.internvl import build_internvl_checkpoint

    return build_internvl_checkpoint(tmp_path_factory.mktemp("internvl") / "tiny-internvl-hf")


@pytest.fixture(scope="session")
def internvl_f32_result(tmp_path_factory: pytest.TempPathFactory, internvl_checkpoint: Path):
    """f32/f32 conversion of the InternVL checkpoint (a ConversionResult)."""
    from edgevlm.convert import convert

    return convert(internvl_checkpoint, tmp_path_factory.mktemp("internvl_f32"), quant="f32",
                   vision_type="f32")


@pytest.fixture(scope="session")
def mllama_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Llama-3.2-Vision checkpoint: 56-px tiles (up to 4), 3 local + 2 global vision
    layers, a 5-layer text model with cross-attention at layers 1 and 3 (tests/fixtures/mllama.py)."""
    from tests.fixtures.mllama import build_mllama_checkpoint

    return build_mllama_checkpoint(tmp_path_factory.mktemp("mllama") / "tiny-mllama")


@pytest.fixture(scope="session")
def mllama_f32_result(tmp_path_factory: pytest.TempPathFactory, mllama_checkpoint: Path):
    """f32/f32 conversion of the mllama checkpoint."""
    from edgevlm.convert import convert

    return convert(mllama_checkpoint, tmp_path_factory.mktemp("mllama_f32"), quant="f32",
                   vision_type="f32")
