"""Build a realistically sized random LLaVA or LLaVA-NeXT GGUF pair for `edgevlm bench` (nothing downloaded).

Usage (from a source checkout, with the test extras installed):
    python examples/make_bench_model.py OUT_DIR [--family llava|llava-next] [--tower ...] [--keep-checkpoint]
    python examples/make_bench_model.py --photo photo.jpg   # a 4000x3072 photo-like JPEG

The llava-hf checkpoint has random weights in the shapes that decide speed:
a CLIP ViT-B/16 tower (hidden 768, 12 layers, 12 heads, 224 px, 196 image
tokens) and a 0.5B-shaped Llama (hidden 896, 24 layers, 14 heads, 2 KV
heads, FFN 4864, 32000-piece sentencepiece vocabulary). It is converted with
edgevlm's converter: Q8_0 LLM, f16 projector. The answers are gibberish; the
timings are those of a real model of that shape. (llama.cpp's CLIP graph
mis-orders the class token; that changes numbers, not speed.)

``--family llava-next`` builds a ``LlavaNextForConditionalGeneration`` instead:
the CLIP ViT-L/14 tower at 336 px (as ``--tower clip-l14-336``), llava-v1.6's
grid pinpoints (:data:`NEXT_PINPOINTS`: up to 4 tiles + the overview, 2880
image tokens before unpadding) and the same Llama, converted by
``convert/llava_next.py``.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]

#: Shapes of the bench model (keyword arguments of build_llava_checkpoint).
BENCH_SHAPE: dict[str, Any] = dict(
    tower="clip", vision_hidden=768, vision_layers=12, vision_heads=12, vision_ffn=3072,
    image_size=224, patch_size=16, text_hidden=896, text_layers=24, text_heads=14,
    text_kv_heads=2, text_ffn=4864, vocab_size=32000, torch_dtype="float16")


#: Tower variants (``--tower``): the default ViT-B/16, and ViT-L/14 at 336 px as in
#: LLaVA-1.5 (576 image tokens); ``siglip-l14-336`` times vision engines on a SigLIP tower.
TOWERS: dict[str, dict[str, Any]] = {
    "clip-b16-224": {},
    "clip-l14-336": dict(tower="clip", vision_hidden=1024, vision_layers=24, vision_heads=16,
                         vision_ffn=4096, image_size=336, patch_size=14),
    "siglip-l14-336": dict(tower="siglip", vision_hidden=1024, vision_layers=24, vision_heads=16,
                           vision_ffn=4096, image_size=336, patch_size=14),
}

#: llava-v1.6's ``image_grid_pinpoints`` (llava-hf/llava-v1.6-*-hf config.json).
NEXT_PINPOINTS = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]

#: Checkpoint builders per ``--family``: (tests.fixtures module, function, default tower).
FAMILIES: dict[str, tuple[str, str, str]] = {
    "llava": ("tests.fixtures.checkpoints", "build_llava_checkpoint", "clip-b16-224"),
    "llava-next": ("tests.fixtures.llava_next", "build_llava_next_checkpoint", "clip-l14-336"),
}


def family_shape(family: str, tower: str | None = None) -> dict[str, Any]:
    """The builder keyword arguments of ``family``'s bench model with ``tower`` (default: the family's).

    Raises:
        ValueError: unknown family or tower, or a tower the family cannot use (LLaVA-NeXT: CLIP only).
    """
    if family not in FAMILIES:
        raise ValueError(f"family must be one of {', '.join(FAMILIES)}, not {family!r}")
    tower = tower or FAMILIES[family][2]
    if tower not in TOWERS:
        raise ValueError(f"tower must be one of {', '.join(TOWERS)}, not {tower!r}")
    shape = {**BENCH_SHAPE, **TOWERS[tower]}
    if family == "llava-next":
        if shape.pop("tower") != "clip":
            raise ValueError("the llava-next bench model has a CLIP tower; use --tower clip-l14-336")
        shape["pinpoints"] = [list(p) for p in NEXT_PINPOINTS]
    return shape


def make_bench_model(out_dir: Path, *, shape: dict[str, Any] | None = None, quant: str = "q8_0",
                     vision_type: str = "f16", keep_checkpoint: bool = False,
                     family: str = "llava") -> Path:
    """Build the random checkpoint and convert it into ``out_dir``.

    Args:
        out_dir: Folder for the GGUF pair (created).
        shape: Keyword arguments for the family's builder (default :func:`family_shape`).
        quant: LLM quantisation.
        vision_type: Projector matrix type.
        keep_checkpoint: Keep the Hugging Face folder in ``out_dir/hf``.
        family: ``"llava"`` (``build_llava_checkpoint``) or ``"llava-next"``
            (``build_llava_next_checkpoint``).

    Returns:
        ``out_dir``, holding one LLM GGUF and one ``mmproj-*.gguf``.

    Raises:
        ValueError: unknown family.
    """
    import importlib

    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    from edgevlm.convert import convert

    if family not in FAMILIES:
        raise ValueError(f"family must be one of {', '.join(FAMILIES)}, not {family!r}")
    module, builder, _ = FAMILIES[family]
    build = getattr(importlib.import_module(module), builder)
    out_dir = Path(out_dir)
    checkpoint = build(out_dir / "hf", **(shape if shape is not None else family_shape(family)))
    convert(checkpoint, out_dir, quant=quant, vision_type=vision_type, name=f"bench-{family}")
    if not keep_checkpoint:
        shutil.rmtree(checkpoint)
    return out_dir


def make_photo(path: Path, width: int = 4000, height: int = 3072, seed: int = 0, quality: int = 90) -> Path:
    """Write a photo-like JPEG (smooth colour gradients, a few soft blobs, sensor-like noise).

    Its JPEG size and decode time are those of a 12-megapixel camera picture
    (a few MB); the content does not matter to the timings.

    Returns:
        ``path``.
    """
    import numpy as np
    from PIL import Image, ImageFilter

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    u, v = xx / width, yy / height
    rgb = np.stack([200 * u + 40 * np.sin(7 * v), 60 + 150 * v * (1 - u), 90 + 120 * np.cos(3 * u + 2 * v)], -1)
    for _ in range(6):  # soft blobs
        cx, cy, r = rng.uniform(0, width), rng.uniform(0, height), rng.uniform(0.05, 0.2) * width
        blob = np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * r * r))[..., None]
        rgb = rgb * (1 - 0.6 * blob) + 0.6 * blob * rng.uniform(0, 255, 3)
    rgb += rng.normal(0, 12, rgb.shape)
    img = Image.fromarray(rgb.clip(0, 255).astype(np.uint8)).filter(ImageFilter.GaussianBlur(0.6))
    img.save(path, quality=quality)
    return Path(path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", type=Path, nargs="?")
    parser.add_argument("--photo", type=Path, default=None,
                        help="Also (or only, without OUT_DIR) write a 4000x3072 photo-like JPEG here.")
    parser.add_argument("--keep-checkpoint", action="store_true")
    parser.add_argument("--family", choices=sorted(FAMILIES), default="llava")
    parser.add_argument("--tower", choices=sorted(TOWERS), default=None,
                        help="Vision tower shape (default: clip-b16-224 for llava, clip-l14-336 for llava-next).")
    parser.add_argument("--vision-type", choices=("f32", "f16", "bf16", "q8_0"), default="f16")
    args = parser.parse_args(argv)
    if args.photo is not None:
        print(f"{make_photo(args.photo)}  {args.photo.stat().st_size / 2**20:.1f} MiB")
    if args.out_dir is None:
        if args.photo is None:
            parser.error("give OUT_DIR (the model folder) and/or --photo PATH")
        return 0
    try:
        shape = family_shape(args.family, args.tower)
    except ValueError as exc:
        parser.error(str(exc))
    out = make_bench_model(args.out_dir, shape=shape, vision_type=args.vision_type,
                           keep_checkpoint=args.keep_checkpoint, family=args.family)
    for path in sorted(out.glob("*.gguf")):
        print(f"{path}  {path.stat().st_size / 2**20:.0f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
