"""Build a random Llama-3.2-Vision (mllama) checkpoint with the 11B's layer shapes, fewer layers, and
its GGUF pairs (nothing downloaded).

Usage (from a source checkout, with the test extras installed):
    python examples/make_mllama_bench_model.py OUT_DIR [--quants q4_0,q8_0,f16] [--tiny]

Shapes (:data:`BENCH_SIZES`): the 11B's text layer (hidden 4096, 32 heads, 8 KV heads, FFN 14336)
in 4 layers, the last a cross-attention layer (the 11B has 32 self + 8 cross of these); its vision
layer (width 1280, 16 heads, FFN 5120, 560-px tiles of 14-px patches, up to 4 tiles: 4 x 1601
states) in 2 local + 1 global layer (the 11B: 32 + 8), intermediate layers (0, 1) (the 11B: 5 of
them, so its projector input is 7680 wide, here 3840). The vocabulary is the test tokenizer's
(~400 pieces, the 11B's 128256): the output layer's cost is not represented.

Writes ``OUT_DIR/hf`` (the transformers checkpoint, f32) and ``OUT_DIR/<quant>`` (the LLM at
that type, the projector f16) for each quant. ``--tiny`` uses the test fixture's sizes.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def bench_sizes(tiny: bool = False):  # -> tests.fixtures.mllama.MllamaSizes
    """The benchmark model's sizes (``tiny``: the test fixture's)."""
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    from tests.fixtures.mllama import MllamaSizes

    if tiny:
        return MllamaSizes()
    return MllamaSizes(image_size=560, patch_size=14, max_num_tiles=4, vision_hidden=1280, vision_heads=16,
                       vision_ffn=5120, vision_layers=2, vision_global_layers=1, intermediate_layers=(0, 1),
                       text_hidden=4096, text_heads=32, text_kv_heads=8, text_ffn=14336, text_layers=4,
                       cross_attention_layers=(3,))


def build(out_dir: Path, quants: list[str], tiny: bool = False) -> dict[str, Path]:
    """Build the checkpoint (once) and its GGUF pairs; returns quant -> pair folder."""
    sizes = bench_sizes(tiny)
    from edgevlm.convert import convert
    from tests.fixtures.mllama import build_mllama_checkpoint

    hf = out_dir / "hf"
    if not (hf / "config.json").exists():
        build_mllama_checkpoint(hf, sizes)
    out = {}
    for quant in quants:
        folder = out_dir / quant
        if not any(folder.glob("*.gguf")):
            convert(hf, folder, quant=quant, vision_type="f16", name=f"mllama-bench-{quant}")
        out[quant] = folder
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--quants", default="q4_0,q8_0,f16")
    parser.add_argument("--tiny", action="store_true", help="The test fixture's sizes (seconds, for tests).")
    args = parser.parse_args(argv)
    for quant, folder in build(args.out_dir, [q for q in args.quants.split(",") if q], args.tiny).items():
        print(quant, folder)


if __name__ == "__main__":
    main()
