"""PyTorch/transformers reference computations for parity tests.

The model class is the checkpoint's ``config.json`` architecture (LLaVA,
Qwen2-VL...); images go through the checkpoint's own image processor.
"""

from __future__ import annotations

import functools
import inspect
import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np

ImagePaths = Path | Sequence[Path] | None


@functools.lru_cache(maxsize=4)
def hf_model(checkpoint: Path):
    import torch
    import transformers

    arch = json.loads((Path(checkpoint) / "config.json").read_text())["architectures"][0]
    model = getattr(transformers, arch).from_pretrained(checkpoint, dtype=torch.float32)
    return model.eval()


def hf_image_inputs(checkpoint: Path, images: ImagePaths) -> dict:
    """The model's image keyword arguments (``pixel_values``, ``image_grid_thw``...)."""
    from PIL import Image
    from transformers import AutoImageProcessor

    if images is None:
        return {}
    paths = [images] if isinstance(images, (str, Path)) else list(images)
    pictures = []
    for path in paths:
        with Image.open(path) as img:
            pictures.append(img.convert("RGB"))
    out = AutoImageProcessor.from_pretrained(checkpoint)(images=pictures, return_tensors="pt")
    return {k: v for k, v in out.items() if k in ("pixel_values", "image_grid_thw", "image_sizes")}


def hf_pixel_values(checkpoint: Path, image_path: Path):
    """``pixel_values`` of one image as the checkpoint's image processor makes them."""
    return hf_image_inputs(checkpoint, image_path)["pixel_values"]


def hf_image_embeddings(checkpoint: Path, image_path: Path) -> np.ndarray:
    """Projected image features (n_tokens, n_embd) as the HF model computes them."""
    import torch

    model = hf_model(checkpoint)
    with torch.no_grad():
        out = model.get_image_features(**hf_image_inputs(checkpoint, image_path))
    feats = getattr(out, "pooler_output", out)
    if isinstance(feats, (list, tuple)):
        feats = torch.cat(list(feats))
    return feats.reshape(-1, feats.shape[-1]).float().numpy()


def hf_logits(checkpoint: Path, input_ids: list[int], images: ImagePaths = None,
              image_token_id: int | None = None) -> np.ndarray:
    """Logits (len(input_ids), n_vocab) of the full reference forward.

    Models with M-RoPE (Qwen2-VL) need ``image_token_id`` to mark the image
    tokens (``mm_token_type_ids``) from which they derive the 3-D positions.
    """
    import torch

    model = hf_model(checkpoint)
    ids = torch.tensor([input_ids])
    kwargs = hf_image_inputs(checkpoint, images)
    if kwargs and "mm_token_type_ids" in inspect.signature(model.forward).parameters:
        kwargs["mm_token_type_ids"] = (ids == image_token_id).int()
    with torch.no_grad():
        out = model(input_ids=ids, **kwargs)
    return out.logits[0].float().numpy()


def reference_ids(chunks, image_token_id: int) -> list[int]:
    """Token ids for the reference: our text chunk tokens, image chunks as image tokens."""
    from edgevlm.chunks import ImageChunk, TextChunk

    ids: list[int] = []
    for chunk in chunks:
        if isinstance(chunk, TextChunk):
            ids.extend(chunk.tokens)
        elif isinstance(chunk, ImageChunk):
            ids.extend([image_token_id] * chunk.n_tokens)
        else:
            raise TypeError(type(chunk))
    return ids


def cosine_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    b = b / np.linalg.norm(b, axis=1, keepdims=True)
    return (a * b).sum(axis=1)
