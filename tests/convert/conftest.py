"""Session fixtures: tiny llava checkpoints and their conversions."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.fixtures.checkpoints import build_llava_checkpoint


@pytest.fixture(scope="session")
def llava_clip_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny llava-1.5 checkpoint with a CLIP tower (feature layer -2)."""
    return build_llava_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny-llava-clip")


@pytest.fixture(scope="session")
def llava_siglip_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny llava checkpoint with a SigLIP tower (feature layer -1, strategy full)."""
    return build_llava_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny-llava-siglip",
                                  tower="siglip", seed=1)


@pytest.fixture(scope="session")
def llava_odd_ffn_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A checkpoint whose text FFN (320) is not a multiple of 256 (K-quant fallback)."""
    return build_llava_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny-llava-odd",
                                  text_ffn=320, seed=2)


@pytest.fixture(scope="session")
def clip_f32_result(llava_clip_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory):
    """f32/f32 conversion of the CLIP checkpoint."""
    from edgevlm.convert import convert

    return convert(llava_clip_checkpoint, tmp_path_factory.mktemp("out-clip"), quant="f32",
                   vision_type="f32")


@pytest.fixture(scope="session")
def siglip_f32_result(llava_siglip_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory):
    """f32/f32 conversion of the SigLIP checkpoint."""
    from edgevlm.convert import convert

    return convert(llava_siglip_checkpoint, tmp_path_factory.mktemp("out-siglip"),
                   quant="f32", vision_type="f32")
