"""OmniFusion 1.1 conversion: detection, exact tensors, metadata, llama.cpp parity, errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from edgevlm import constants
from edgevlm.errors import (ConversionError, ModelNotFoundError, UnsafePickleError,
                            UnsupportedModelError)
from tests.fixtures.omnifusion import (ADAPTER, LLM, PROMPT_PREFIX, adapter_forward_numpy,
                                       clip_features, models_module, preprocess,
                                       prompt_token_ids, reference_image_embeddings,
                                       reference_inputs_embeds, reference_prompt_logits,
                                       reference_text_logits, TOWER)
from tests.helpers import assert_gguf_roundtrip, expected_tower, gguf_fields, gguf_tensors

FIXED_IDS = [1, 45, 78, 200, 13, 99, 250, 7, 64, 120, 33, 180, 5, 301, 42, 17]
QUESTION = "What is shown in the picture?"


def _files(folder: Path) -> tuple[Path, Path]:
    mmproj = next(folder.glob(f"{constants.MMPROJ_PREFIX}*.gguf"))
    llm = next(p for p in folder.glob("*.gguf") if p != mmproj)
    return llm, mmproj


def _torch_adapter(release: Path) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """(state dict of projection.pt, special embeddings) as torch reads them, in f32."""
    import torch

    models_module()
    module = torch.load(release / "projection.pt", weights_only=False)
    state = {k: v.float().numpy() for k, v in module.state_dict().items()}
    special = {k: v.float().numpy() for k, v in torch.load(release / "special_embeddings.pt").items()}
    return state, special


def expected_adapter(release: Path) -> dict[str, np.ndarray]:
    """Reference adapter.* and special.* tensors computed with torch from the release."""
    state, special = _torch_adapter(release)
    p, d = "transformer_layer.", TOWER["hidden"]
    out = {f"adapter.attn_{x}.{kind}": state[f"{p}self_attn.in_proj_{kind}"][i * d:(i + 1) * d]
           for kind in ("weight", "bias") for i, x in enumerate("qkv")}
    for ours, theirs in (("attn_out", "self_attn.out_proj"), ("ln1", "norm1"), ("ln2", "norm2"),
                         ("ffn_up", "linear1"), ("ffn_down", "linear2")):
        for kind in ("weight", "bias"):
            out[f"adapter.{ours}.{kind}"] = state[f"{p}{theirs}.{kind}"]
    out["adapter.proj.weight"], out["adapter.proj.bias"] = state["linear.weight"], state["linear.bias"]
    for key, name in constants.SPECIAL_EMBEDDING_TENSORS.items():
        out[name] = special[key]
    return out


def _copy_release(release: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(release, tmp_path / release.name))


def _convert(release: Path, out: Path, **kwargs):
    from edgevlm.convert import convert

    out.mkdir(parents=True, exist_ok=True)
    return convert(release, out, **kwargs)


def _assert_fails(exc_type, needle: str, release: Path, out: Path, **kwargs) -> str:
    """Conversion raises ``exc_type`` naming ``needle``; ``out`` stays empty."""
    with pytest.raises(exc_type) as info:
        _convert(release, out, **kwargs)
    assert needle in str(info.value), str(info.value)
    assert list(out.iterdir()) == []
    return str(info.value)


# --- detection and round trip ------------------------------------------------


def test_family_detected_from_folder_contents(omnifusion_checkpoint, tmp_path):
    from edgevlm.convert import detect_architecture, supported_architectures

    release, _ = omnifusion_checkpoint
    assert "OmniFusion" in supported_architectures()
    assert detect_architecture(release) == "OmniFusion"
    partial = _copy_release(release, tmp_path)
    (partial / "special_embeddings.pt").unlink()
    with pytest.raises(ConversionError, match="config.json"):
        detect_architecture(partial)


def test_projector_tensors_equal_torch(omnifusion_f32, omnifusion_checkpoint):
    release, tower = omnifusion_checkpoint
    _, mmproj = _files(omnifusion_f32)
    expected = expected_adapter(release)
    expected.update(expected_tower(load_file(tower / "model.safetensors"), "", n_keep=2))
    assert "v.class_embd" in expected and "v.blk.1.attn_q.weight" in expected
    assert "v.blk.2.attn_q.weight" not in expected  # feature layer -2 of 3 layers
    assert_gguf_roundtrip(mmproj, expected)
    types = {t.name: t.tensor_type.name for t in gguf_tensors(mmproj).values()}
    assert {types[n] for n in expected if n.startswith(("adapter.", "special."))} == {"F32"}


def test_projector_metadata(omnifusion_f32):
    from edgevlm.gguf_info import describe

    _, mmproj = _files(omnifusion_f32)
    f = gguf_fields(mmproj)
    assert f["general.architecture"] == "clip"
    assert f["clip.projector_type"] == constants.CLIP_PROJECTOR_TYPE_OMNIFUSION
    assert f["clip.has_vision_encoder"] is True and f["clip.use_gelu"] is False
    assert (f["clip.vision.image_size"], f["clip.vision.patch_size"]) == (32, 8)
    assert f["clip.vision.embedding_length"] == 64
    assert f["clip.vision.feed_forward_length"] == 256
    assert f["clip.vision.block_count"] == 2 and f["clip.vision.feature_layer"] == [2]
    assert f["clip.vision.projection_dim"] == LLM["hidden"]
    assert f["clip.vision.image_mean"] == pytest.approx([0.48145466, 0.4578275, 0.40821073])
    assert f["clip.vision.image_std"] == pytest.approx([0.26862954, 0.26130258, 0.27577711])
    assert f[constants.KEY_VISION_FEATURE_LAYER] == -2
    assert f[constants.KEY_VISION_SELECT_STRATEGY] == "default"
    assert f[constants.KEY_VISION_ACTIVATION] == "quick_gelu"
    assert f[constants.KEY_PROJECTOR_KIND] == constants.PROJECTOR_KIND_OMNIFUSION
    assert f[constants.KEY_ADAPTER_HEAD_COUNT] == ADAPTER["heads"]
    assert f[constants.KEY_ADAPTER_LAYER_NORM_EPS] == pytest.approx(1e-5)
    assert f[constants.KEY_ADAPTER_ACTIVATION] == "relu"
    assert f[constants.KEY_ADAPTER_NORM_FIRST] is False
    assert f[constants.KEY_PROMPT_LAYOUT] == constants.PROMPT_LAYOUT_OMNIFUSION
    assert f[constants.KEY_PROMPT_PREFIX] == "This is a dialog with AI assistant.\n"
    assert f[constants.KEY_IMAGE_RESIZE] == "shortest-edge-crop"
    assert f[constants.KEY_SOURCE_ARCHITECTURE] == "OmniFusion"
    assert describe(mmproj)["loadable_by"] == ["edgevlm"]


def test_llm_metadata(omnifusion_f32):
    llm, _ = _files(omnifusion_f32)
    assert llm.name == "omnimistral-v1_1-F32.gguf"
    f = gguf_fields(llm)
    assert f["general.architecture"] == "llama"
    assert (f["llama.embedding_length"], f["llama.block_count"]) == (LLM["hidden"], LLM["layers"])
    assert f["llama.attention.head_count_kv"] == LLM["kv_heads"]
    assert len(f["tokenizer.ggml.tokens"]) == LLM["vocab"] == f["llama.vocab_size"]
    assert f["tokenizer.ggml.model"] == "llama"
    assert (f["tokenizer.ggml.bos_token_id"], f["tokenizer.ggml.eos_token_id"]) == (1, 2)
    assert f[constants.KEY_PROMPT_FAMILY] == constants.PROMPT_LAYOUT_OMNIFUSION
    assert f[constants.KEY_SOURCE_ARCHITECTURE] == "OmniFusion"


@pytest.mark.parametrize("vision_type,matrix,tower", [("f16", "F16", "F16"),
                                                      ("q8_0", "F32", "Q8_0")])
def test_vision_types(omnifusion_checkpoint, tmp_path, vision_type, matrix, tower):
    release, tower_dir = omnifusion_checkpoint
    result = _convert(release, tmp_path / "out", quant="f16", vision_type=vision_type,
                      vision_tower=tower_dir)
    types = {t.name: t.tensor_type.name for t in gguf_tensors(result.mmproj_path).values()}
    assert types["adapter.attn_q.weight"] == types["adapter.proj.weight"] == matrix
    assert types["adapter.attn_q.bias"] == types["adapter.ln1.weight"] == "F32"
    assert types["special.soi"] == "F32" and types["v.blk.0.ffn_up.weight"] == tower
    assert result.mmproj_path.name == f"mmproj-omnimistral-v1_1-{vision_type}.gguf"


def test_full_clipmodel_tower(omnifusion_checkpoint, tmp_path):
    from tests.fixtures.omnifusion import build_clip_tower

    release, _ = omnifusion_checkpoint
    tower = build_clip_tower(tmp_path / "clip-full", seed=5, full_clip=True)
    result = _convert(release, tmp_path / "out", quant="f32", vision_type="f32",
                      vision_tower=tower)
    state = {k[len("vision_model."):]: v for k, v in load_file(tower / "model.safetensors").items()
             if k.startswith("vision_model.")}
    expected = expected_tower(state, "", n_keep=2)
    expected.update(expected_adapter(release))
    assert_gguf_roundtrip(result.mmproj_path, expected)


# --- numerics ----------------------------------------------------------------


def _llama(llm_path: Path):
    from edgevlm.llm import ContextOptions, LlamaContext, LlamaModel

    model = LlamaModel(llm_path, n_gpu_layers=0)
    return model, LlamaContext(model, ContextOptions(n_ctx=256, kv_type="f32", n_threads=2))


def test_llm_logits_match_transformers(omnifusion_f32, omnifusion_checkpoint):
    release, _ = omnifusion_checkpoint
    model, ctx = _llama(_files(omnifusion_f32)[0])
    try:
        ctx.decode_tokens(FIXED_IDS, 0, logits_all=True)
        ours = np.stack([ctx.logits_at(i) for i in range(len(FIXED_IDS))])
    finally:
        ctx.close()
        model.close()
    ref = reference_text_logits(release, FIXED_IDS)
    assert float(np.abs(ref).max()) > 0.5
    assert float(np.abs(ours - ref).max()) <= 5e-3


def test_gguf_adapter_and_prompt_reproduce_the_reference(omnifusion_f32, omnifusion_checkpoint,
                                                         square_image):
    """GGUF tensors + keys suffice to rebuild gen_answer's prompt: adapter in numpy, LLM in llama.cpp."""
    from PIL import Image

    release, tower = omnifusion_checkpoint
    llm_path, mmproj = _files(omnifusion_f32)
    with Image.open(square_image(32, seed=4)) as img:
        pixels = preprocess(tower, img)
    f = gguf_fields(mmproj)
    tensors = {n: np.asarray(t.data, np.float32).reshape(tuple(reversed(t.shape.tolist())))
               for n, t in gguf_tensors(mmproj).items()}
    image = adapter_forward_numpy(
        tensors, clip_features(tower, pixels), n_heads=f[constants.KEY_ADAPTER_HEAD_COUNT],
        eps=f[constants.KEY_ADAPTER_LAYER_NORM_EPS], norm_first=f[constants.KEY_ADAPTER_NORM_FIRST],
        activation=f[constants.KEY_ADAPTER_ACTIVATION])
    np.testing.assert_allclose(image, reference_image_embeddings(release, tower, pixels),
                               atol=2e-5, rtol=1e-5)
    ids = prompt_token_ids(release, QUESTION)
    embd = np.asarray(gguf_tensors(llm_path)["token_embd.weight"].data).reshape(LLM["vocab"], -1)
    special = {k: tensors[v] for k, v in constants.SPECIAL_EMBEDDING_TENSORS.items()}
    assert f[constants.KEY_PROMPT_PREFIX] == PROMPT_PREFIX
    inputs = np.concatenate([embd[list(ids.prefix)], special["SOI"][None], image,
                             special["EOI"][None], special["USER"][None], embd[list(ids.question)],
                             special["BOT"][None]]).astype(np.float32)
    ref_inputs = reference_inputs_embeds(release, tower, pixels, QUESTION)
    np.testing.assert_allclose(inputs, ref_inputs, atol=2e-5, rtol=1e-5)
    model, ctx = _llama(llm_path)
    try:  # llama.cpp's tokenizer gives the reference ids, so a runtime can use it
        assert tuple(model.tokenize(PROMPT_PREFIX, add_special=False)) == ids.prefix
        assert tuple(model.tokenize(QUESTION, add_special=False)) == ids.question
        ctx.decode_embeddings(inputs, 0, logits_last=True)
        ours = ctx.logits()
    finally:
        ctx.close()
        model.close()
    ref = reference_prompt_logits(release, tower, pixels, QUESTION)
    assert float(np.abs(ours - ref).max()) <= 5e-3


# --- options and notes ---------------------------------------------------------


def _save_state_dict(release: Path) -> None:
    import torch

    models_module()
    module = torch.load(release / "projection.pt", weights_only=False)
    torch.save(module.state_dict(), release / "projection.pt")


def test_plain_state_dict_needs_adapter_heads(omnifusion_checkpoint, tmp_path):
    release, tower = omnifusion_checkpoint
    copy = _copy_release(release, tmp_path)
    _save_state_dict(copy)
    message = _assert_fails(ConversionError, "--adapter-heads", copy, tmp_path / "a",
                            vision_tower=tower)
    assert "projection.pt" in message
    message = _assert_fails(ConversionError, "n_heads", copy, tmp_path / "b",
                            vision_tower=tower, adapter_heads=3)
    assert "does not divide d_model (64)" in message and "projection.pt" in message
    result = _convert(copy, tmp_path / "c", quant="f32", vision_type="f32", vision_tower=tower,
                      adapter_heads=ADAPTER["heads"])
    assert_gguf_roundtrip(result.mmproj_path, expected_adapter(release), allow_extra=True)
    assert any("plain state dict" in note for note in result.notes)


def test_adapter_heads_must_agree_with_the_module(omnifusion_checkpoint, tmp_path):
    release, tower = omnifusion_checkpoint
    _assert_fails(ConversionError, "contradicts", release, tmp_path / "out",
                  vision_tower=tower, adapter_heads=8)


@pytest.mark.parametrize("as_module", [False, True])
def test_gelu_adapter(omnifusion_checkpoint, tmp_path, as_module):
    import torch

    release, tower = omnifusion_checkpoint
    copy = _copy_release(release, tmp_path)
    models_module()
    mapping = torch.load(copy / "projection.pt", weights_only=False)
    layer = mapping.transformer_layer
    layer.activation = torch.nn.GELU() if as_module else torch.nn.functional.gelu
    layer.activation_relu_or_gelu = 2
    torch.save(mapping, copy / "projection.pt")
    result = _convert(copy, tmp_path / "out", quant="f32", vision_type="f32", vision_tower=tower)
    f = gguf_fields(result.mmproj_path)
    assert f[constants.KEY_ADAPTER_ACTIVATION] == "gelu"
    tensors = {n: np.asarray(t.data).reshape(tuple(reversed(t.shape.tolist())))
               for n, t in gguf_tensors(result.mmproj_path).items()}
    features = np.random.default_rng(1).standard_normal((16, TOWER["hidden"])).astype(np.float32)
    with torch.no_grad():
        ref = mapping.eval()(torch.from_numpy(features)[None])[0].numpy()
    ours = adapter_forward_numpy(tensors, features, n_heads=4, eps=1e-5, activation="gelu")
    np.testing.assert_allclose(ours, ref, atol=2e-5, rtol=1e-5)


def test_sliding_window_is_noted(omnifusion_checkpoint, tmp_path):
    release, tower = omnifusion_checkpoint
    copy = _copy_release(release, tmp_path)
    config = copy / "tuned-model" / "config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "sliding_window": 64}))
    result = _convert(copy, tmp_path / "out", vision_tower=tower)
    assert any("sliding_window 64" in note for note in result.notes)


# --- errors: each names the file, nothing is written ---------------------------


def test_missing_vision_tower(omnifusion_checkpoint, tmp_path):
    release, _ = omnifusion_checkpoint
    _assert_fails(ConversionError, "--vision-tower", release, tmp_path / "out")
    _assert_fails(ModelNotFoundError, "nowhere", release, tmp_path / "out",
                  vision_tower=tmp_path / "nowhere")


def test_vision_tower_option_rejected_for_llava(llava_clip_checkpoint, omnifusion_checkpoint,
                                                tmp_path):
    _assert_fails(ConversionError, "does not apply", llava_clip_checkpoint, tmp_path / "out",
                  vision_tower=omnifusion_checkpoint[1])


def test_adapter_width_must_match_tower(omnifusion_checkpoint, tmp_path):
    import torch

    release, tower = omnifusion_checkpoint
    copy = _copy_release(release, tmp_path)
    mapping = models_module().VisualToGPTMapping(32, LLM["hidden"], 16, 4, 96)
    torch.save(mapping, copy / "projection.pt")
    message = _assert_fails(ConversionError, "projection.pt", copy, tmp_path / "out",
                            vision_tower=tower)
    assert "32-wide" in message and "outputs 64" in message


def test_adapter_output_must_match_llm(omnifusion_checkpoint, tmp_path):
    import torch

    release, tower = omnifusion_checkpoint
    copy = _copy_release(release, tmp_path)
    torch.save(models_module().VisualToGPTMapping(64, 96, 16, 4, 96), copy / "projection.pt")
    message = _assert_fails(ConversionError, "projection.pt", copy, tmp_path / "out",
                            vision_tower=tower)
    assert "96-wide" in message and "hidden size 128" in message


@pytest.mark.parametrize("change,needle", [("drop USER", "USER"), ("short BOT", "length 128"),
                                           ("extra", "EXTRA")])
def test_special_embeddings_checked(omnifusion_checkpoint, tmp_path, change, needle):
    import torch

    release, tower = omnifusion_checkpoint
    copy = _copy_release(release, tmp_path)
    special = torch.load(copy / "special_embeddings.pt")
    if change == "drop USER":
        del special["USER"]
    elif change == "short BOT":
        special["BOT"] = special["BOT"][:64]
    else:
        special["EXTRA"] = special["BOT"]
    torch.save(special, copy / "special_embeddings.pt")
    message = _assert_fails(ConversionError, needle, copy, tmp_path / "out", vision_tower=tower)
    assert "special_embeddings.pt" in message


def test_malicious_projection_is_refused(omnifusion_checkpoint, tmp_path):
    import os

    import torch

    class Evil:
        def __reduce__(self):
            return os.system, (f"touch {tmp_path / 'pwned'}",)

    release, tower = omnifusion_checkpoint
    copy = _copy_release(release, tmp_path)
    torch.save({"linear.weight": Evil()}, copy / "projection.pt")
    message = _assert_fails(UnsafePickleError, "os.system", copy, tmp_path / "out",
                            vision_tower=tower)
    assert "projection.pt" in message and "not executed" in message
    assert not (tmp_path / "pwned").exists()


def test_unsupported_adapter_variant(omnifusion_checkpoint, tmp_path):
    import torch

    release, tower = omnifusion_checkpoint
    copy = _copy_release(release, tmp_path)
    mapping = models_module().VisualToGPTMapping(64, LLM["hidden"], 16, 4, 96)
    mapping.transformer_layer.self_attn.batch_first = False
    torch.save(mapping, copy / "projection.pt")
    _assert_fails(UnsupportedModelError, "batch_first", copy, tmp_path / "out",
                  vision_tower=tower)


def test_preprocessor_crop_must_match_tower(omnifusion_checkpoint, tmp_path):
    release, tower = omnifusion_checkpoint
    copy = Path(shutil.copytree(tower, tmp_path / "tower"))
    path = copy / "preprocessor_config.json"
    data = json.loads(path.read_text())
    data["crop_size"] = {"height": 24, "width": 24}
    path.write_text(json.dumps(data))
    _assert_fails(UnsupportedModelError, "crop_size", release, tmp_path / "out",
                  vision_tower=copy)
