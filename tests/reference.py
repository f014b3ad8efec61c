"""PyTorch/transformers reference computations for parity tests."""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np


@functools.lru_cache(maxsize=4)
def hf_model(checkpoint: Path):
    import torch
    from transformers import LlavaForConditionalGeneration

    model = LlavaForConditionalGeneration.from_pretrained(checkpoint, dtype=torch.float32)
    return model.eval()


def hf_pixel_values(checkpoint: Path, image_path: Path):
    from PIL import Image
    from transformers import AutoImageProcessor

    processor = AutoImageProcessor.from_pretrained(checkpoint)
    with Image.open(image_path) as img:
        return processor(images=img.convert("RGB"), return_tensors="pt")["pixel_values"]


def hf_image_embeddings(checkpoint: Path, image_path: Path) -> np.ndarray:
    """Projected image features (n_tokens, n_embd) as LlavaForConditionalGeneration computes them."""
    import torch

    model = hf_model(checkpoint)
    with torch.no_grad():
        out = model.get_image_features(pixel_values=hf_pixel_values(checkpoint, image_path))
    feats = getattr(out, "pooler_output", out)
    if isinstance(feats, (list, tuple)):
        feats = feats[0]
    return feats.reshape(-1, feats.shape[-1]).float().numpy()


def hf_logits(checkpoint: Path, input_ids: list[int], image_path: Path | None = None) -> np.ndarray:
    """Logits (len(input_ids), n_vocab) of the full reference forward."""
    import torch

    model = hf_model(checkpoint)
    kwargs = {}
    if image_path is not None:
        kwargs["pixel_values"] = hf_pixel_values(checkpoint, image_path)
    with torch.no_grad():
        out = model(input_ids=torch.tensor([input_ids]), **kwargs)
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
