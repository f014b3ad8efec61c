"""Vision-encoder timings for ``edgevlm bench``: each engine, and PyTorch as the reference.

``--reference torch`` rebuilds the projector file's tower and LLaVA MLP in
PyTorch (transformers' CLIP/SigLIP vision model) from the very tensors in the
GGUF, so both sides run the same weights, and times it in float32 and
bfloat16 with the same thread count. PyTorch is only needed for this option.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np

from edgevlm.api import VLM
from edgevlm.errors import InvalidRequestError, UnsupportedModelError

# GGUF block tensor -> transformers CLIPEncoderLayer parameter (source: our
# projector_writer tables, read in reverse).
_PARTS = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
          "attn_out": "self_attn.out_proj", "ln1": "layer_norm1", "ln2": "layer_norm2",
          "ffn_up": "mlp.fc1", "ffn_down": "mlp.fc2"}


def time_encoder(vlm: VLM, image: str, repeats: int, max_image_tokens: int | None = None) -> float:
    """Median time (ms) of ``repeats`` encodes of ``image`` with the loaded engine (no caches).

    Each encode decodes the image file too (as a request does); ``max_image_tokens``
    is the budget the image is planned under (None: the load default).
    """
    times = []
    for _ in range(max(1, repeats)):
        t0 = time.perf_counter()
        vlm.embed_image(image, cache=False, max_image_tokens=max_image_tokens)
        times.append((time.perf_counter() - t0) * 1e3)
    return round(statistics.median(times), 1)


def _dequantized(tensors: dict[str, Any]) -> dict[str, np.ndarray]:
    from gguf import GGMLQuantizationType, quants

    out = {}
    for name, raw in tensors.items():
        qtype = GGMLQuantizationType(raw.ggml_type)
        data = np.asarray(raw.data)
        if qtype not in (GGMLQuantizationType.F32, GGMLQuantizationType.F16):
            data = quants.dequantize(data, qtype)
        out[name] = np.array(data, dtype=np.float32).reshape(tuple(reversed(raw.ne)))
    return out


def torch_tower(mmproj: Path) -> Any:
    """A PyTorch module (tower + MLP projector) holding the GGUF's weights.

    Raises:
        UnsupportedModelError: not a LLaVA MLP projector, or torch/transformers missing.
    """
    try:
        import torch
        from transformers import CLIPVisionConfig
        from transformers.models.clip.modeling_clip import CLIPEncoderLayer
    except ImportError as exc:
        raise UnsupportedModelError("--reference torch needs torch and transformers "
                                    "(pip install -e '.[test]')") from exc
    from edgevlm.kernels.vision import read_gguf_tensors, read_tower_config

    meta, raw = read_gguf_tensors(mmproj)
    cfg = read_tower_config(meta, set(raw))
    if cfg.projector != "mlp":
        raise UnsupportedModelError("--reference torch times LLaVA MLP projectors only")
    act = {"gelu_quick": "quick_gelu", "gelu_erf": "gelu", "gelu": "gelu_pytorch_tanh"}[cfg.activation]
    hf = CLIPVisionConfig(hidden_size=cfg.width, intermediate_size=raw["v.blk.0.ffn_up.weight"].ne[1],
                          num_attention_heads=cfg.n_head, hidden_act=act, layer_norm_eps=cfg.eps)
    hf._attn_implementation = "sdpa"
    a = {k: torch.from_numpy(v) for k, v in _dequantized(raw).items()}
    model = torch.nn.Module()
    model.conv = torch.nn.Conv2d(3, cfg.width, cfg.patch_size, cfg.patch_size, bias="v.patch_embd.bias" in a)
    model.conv.load_state_dict({"weight": a["v.patch_embd.weight"]} |
                               ({"bias": a["v.patch_embd.bias"]} if "v.patch_embd.bias" in a else {}))
    model.pos = torch.nn.Parameter(a["v.position_embd.weight"])
    model.cls = torch.nn.Parameter(a["v.class_embd"]) if cfg.has_class else None
    model.pre_ln = torch.nn.LayerNorm(cfg.width, eps=cfg.eps) if cfg.pre_ln else None
    if model.pre_ln is not None:
        model.pre_ln.load_state_dict({"weight": a["v.pre_ln.weight"], "bias": a["v.pre_ln.bias"]})
    model.layers = torch.nn.ModuleList(CLIPEncoderLayer(hf) for _ in range(cfg.n_layers))
    for il, layer in enumerate(model.layers):
        layer.load_state_dict({f"{dst}.{kind}": a[f"v.blk.{il}.{part}.{kind}"]
                               for part, dst in _PARTS.items() for kind in ("weight", "bias")})
    model.mlp = torch.nn.Sequential(torch.nn.Linear(*raw["mm.0.weight"].ne[:2]), torch.nn.GELU(),
                                    torch.nn.Linear(*raw["mm.2.weight"].ne[:2]))
    model.mlp.load_state_dict({f"{i}.{k}": a[f"mm.{i}.{k}"] for i in (0, 2) for k in ("weight", "bias")})
    return _TorchEncoder(model.eval(), cfg)


class _TorchEncoder:
    """Forward of :func:`torch_tower`'s module: the same steps as the kernels graph."""

    def __init__(self, model: Any, cfg: Any) -> None:
        self.model, self.cfg = model, cfg

    def to(self, dtype: Any) -> None:
        self.model.to(dtype)

    def __call__(self, pixels: Any) -> Any:
        import torch

        m = self.model
        x = m.conv(pixels).flatten(2).transpose(1, 2)
        if m.cls is not None:
            x = torch.cat([m.cls.expand(x.shape[0], 1, -1), x], dim=1)
        x = x + m.pos[None]
        if m.pre_ln is not None:
            x = m.pre_ln(x)
        for layer in m.layers:
            x = layer(x, None)
            x = x[0] if isinstance(x, tuple) else x
        return m.mlp(x[:, 1:] if self.cfg.drop_class else x)


def torch_reference_times(mmproj: Path, pixels: np.ndarray, threads: int | None,
                          repeats: int) -> dict[str, float]:
    """Median PyTorch encode time (f32 and bf16) of the projector's tower + MLP.

    Raises:
        InvalidRequestError: no projector.
    """
    if mmproj is None:
        raise InvalidRequestError("--reference torch needs a model with a vision projector")
    import torch

    if threads:
        torch.set_num_threads(threads)
    model = torch_tower(mmproj)
    out: dict[str, float] = {}
    x32 = torch.from_numpy(pixels)[None]
    for label, dtype in (("torch_f32_encode_ms", torch.float32), ("torch_bf16_encode_ms", torch.bfloat16)):
        model.to(dtype)
        x = x32.to(dtype)
        times = []
        with torch.inference_mode():
            for _ in range(max(1, repeats) + 1):
                t0 = time.perf_counter()
                model(x)
                times.append((time.perf_counter() - t0) * 1e3)
        out[label] = round(statistics.median(times[1:]), 1)
    return out
