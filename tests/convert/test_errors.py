"""Registry, validation and atomic-output behaviour."""

from __future__ import annotations

import json
import sys

import pytest

from edgevlm.errors import (ConversionError, ModelNotFoundError, UnsupportedModelError)
from tests.helpers import copy_checkpoint as _copy, edit_config as _edit_config


def test_import_is_light():
    code = ("import sys, edgevlm.convert as c; c.ConversionResult; "
            "assert 'torch' not in sys.modules and 'llama_cpp' not in sys.modules "
            "and 'transformers' not in sys.modules")
    import subprocess

    subprocess.run([sys.executable, "-c", code], check=True)


def test_registry_lists_llava():
    from edgevlm.convert import ARCHITECTURES, supported_architectures

    assert "LlavaForConditionalGeneration" in supported_architectures()
    assert "LlavaForConditionalGeneration" in ARCHITECTURES


def test_unknown_architecture_lists_supported(llava_clip_checkpoint, tmp_path):
    from edgevlm.convert import convert

    folder = _copy(llava_clip_checkpoint, tmp_path / "m")
    _edit_config(folder, architectures=["FancyVLMForEverything"])
    with pytest.raises(UnsupportedModelError, match="LlavaForConditionalGeneration") as info:
        convert(folder, tmp_path / "out")
    assert "FancyVLMForEverything" in str(info.value)
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_bad_quant_lists_valid(llava_clip_checkpoint, tmp_path):
    from edgevlm.convert import convert

    with pytest.raises(ConversionError, match="q4_k_m") as info:
        convert(llava_clip_checkpoint, tmp_path / "out", quant="q3_xyz")
    assert "q3_xyz" in str(info.value)
    with pytest.raises(ConversionError, match="q8_0"):
        convert(llava_clip_checkpoint, tmp_path / "out", vision_type="q4_0")


def test_missing_folder(tmp_path):
    from edgevlm.convert import convert

    with pytest.raises(ModelNotFoundError, match="does not exist"):
        convert(tmp_path / "nope", tmp_path / "out")


def test_missing_config(tmp_path):
    from edgevlm.convert import convert

    (tmp_path / "empty").mkdir()
    with pytest.raises(ConversionError, match="config.json"):
        convert(tmp_path / "empty", tmp_path / "out")


def test_missing_tensor_is_named(llava_clip_checkpoint, tmp_path):
    from safetensors.numpy import load_file, save_file

    from edgevlm.convert import convert

    folder = _copy(llava_clip_checkpoint, tmp_path / "m")
    state = load_file(folder / "model.safetensors")
    victim = next(k for k in state if k.endswith("layers.1.self_attn.k_proj.weight")
                  and "language_model" in k)
    del state[victim]
    save_file(state, folder / "model.safetensors")
    with pytest.raises(ConversionError, match="blk.1.attn_k.weight"):
        convert(folder, tmp_path / "out")
    assert not any((tmp_path / "out").iterdir())


def test_shape_mismatch(llava_clip_checkpoint, tmp_path):
    from edgevlm.convert import convert

    folder = _copy(llava_clip_checkpoint, tmp_path / "m")
    data = json.loads((folder / "config.json").read_text())
    data["text_config"]["intermediate_size"] = 640
    (folder / "config.json").write_text(json.dumps(data))
    with pytest.raises(ConversionError, match="shape"):
        convert(folder, tmp_path / "out")


def test_bad_config_value_names_key(llava_clip_checkpoint, tmp_path):
    from edgevlm.convert import convert

    folder = _copy(llava_clip_checkpoint, tmp_path / "m")
    data = json.loads((folder / "config.json").read_text())
    data["text_config"]["num_attention_heads"] = "four"
    (folder / "config.json").write_text(json.dumps(data))
    with pytest.raises(ConversionError, match="text_config.num_attention_heads"):
        convert(folder, tmp_path / "out")


def test_list_feature_layer_unsupported(llava_clip_checkpoint, tmp_path):
    from edgevlm.convert import convert

    folder = _copy(llava_clip_checkpoint, tmp_path / "m")
    _edit_config(folder, vision_feature_layer=[-2, -5])
    with pytest.raises(UnsupportedModelError, match="vision_feature_layer"):
        convert(folder, tmp_path / "out")


def test_default_strategy_needs_cls(llava_siglip_checkpoint, tmp_path):
    from edgevlm.convert import convert

    folder = _copy(llava_siglip_checkpoint, tmp_path / "m")
    _edit_config(folder, vision_feature_select_strategy="default")
    with pytest.raises(UnsupportedModelError, match="CLS"):
        convert(folder, tmp_path / "out")


@pytest.mark.parametrize("exc", [KeyboardInterrupt, RuntimeError])
@pytest.mark.parametrize("stage", ["llm", "projector"])
def test_interrupt_leaves_no_files(llava_clip_checkpoint, tmp_path, monkeypatch, exc, stage):
    from edgevlm.convert import convert, tensors

    real = tensors.encode
    calls = {"n": 0}
    limit = 5 if stage == "llm" else 30  # the LLM has 21 tensors

    def exploding(array, ggml_type):
        calls["n"] += 1
        if calls["n"] == limit:
            raise exc("boom")
        return real(array, ggml_type)

    monkeypatch.setattr(tensors, "encode", exploding)
    out = tmp_path / "out"
    with pytest.raises(exc):
        convert(llava_clip_checkpoint, out, quant="f16")
    assert calls["n"] == limit
    assert list(out.iterdir()) == []


def test_interrupt_during_quantisation(llava_clip_checkpoint, tmp_path, monkeypatch):
    from edgevlm.convert import convert, llm_writer

    def exploding(src, dst, quant, nthread=None, on_line=None):
        dst.write_bytes(b"half")
        raise KeyboardInterrupt

    monkeypatch.setattr(llm_writer, "llama_quantize", exploding)
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        convert(llava_clip_checkpoint, out, quant="q4_0")
    assert list(out.iterdir()) == []


def test_existing_outputs_survive_failed_run(llava_clip_checkpoint, tmp_path, monkeypatch):
    from edgevlm.convert import convert, tensors

    out = tmp_path / "out"
    first = convert(llava_clip_checkpoint, out, quant="f16")
    before = first.llm_path.read_bytes()
    monkeypatch.setattr(tensors, "encode", lambda *a: (_ for _ in ()).throw(RuntimeError("x")))
    with pytest.raises(RuntimeError):
        convert(llava_clip_checkpoint, out, quant="f16")
    assert first.llm_path.read_bytes() == before
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [first.llm_path.name, first.mmproj_path.name])


def test_detect_architecture(llava_clip_checkpoint):
    from edgevlm.convert import detect_architecture

    assert detect_architecture(llava_clip_checkpoint) == "LlavaForConditionalGeneration"
