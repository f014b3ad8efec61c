"""Draw a small labelled image set for ``edgevlm eval``: shapes in colours, items.csv, choices.txt.

Usage::

    python examples/eval_demo/make_demo.py demo            # 36 images, in about a second
    edgevlm eval --model out/llava --data demo/items.csv --choices demo/choices.txt \
        --prompt "Which shape is the {colour} figure: {choices}? Answer with the shape only." --out demo/run

The label is the shape (circle, square, triangle); the ``colour`` column can
be used in the prompt as ``{colour}``. Positions, sizes and backgrounds vary
with a fixed seed, so the set is the same on every machine.
"""

from __future__ import annotations

import argparse
import csv
import random
from pathlib import Path

from PIL import Image, ImageDraw

SHAPES = ("circle", "square", "triangle")
COLOURS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 70, 220)}
SIZE = 96


def draw(shape: str, colour: tuple[int, int, int], rng: random.Random) -> Image.Image:
    """One image: a light background with one shape of the colour."""
    grey = rng.randint(215, 250)
    img = Image.new("RGB", (SIZE, SIZE), (grey, grey, grey))
    pen = ImageDraw.Draw(img)
    half = rng.randint(18, 32)
    cx, cy = rng.randint(half + 4, SIZE - half - 4), rng.randint(half + 4, SIZE - half - 4)
    box = (cx - half, cy - half, cx + half, cy + half)
    if shape == "circle":
        pen.ellipse(box, fill=colour)
    elif shape == "square":
        pen.rectangle(box, fill=colour)
    else:
        pen.polygon([(cx, cy - half), (cx - half, cy + half), (cx + half, cy + half)], fill=colour)
    return img


def make(out: Path, per_pair: int = 4, seed: int = 0) -> Path:
    """Write ``per_pair`` images of each shape and colour, items.csv and choices.txt into ``out``.

    Returns:
        The items CSV.
    """
    rng = random.Random(seed)
    (out / "images").mkdir(parents=True, exist_ok=True)
    rows = []
    for shape in SHAPES:
        for name, colour in COLOURS.items():
            for k in range(per_pair):
                rel = f"images/{shape}_{name}_{k}.png"
                draw(shape, colour, rng).save(out / rel)
                rows.append({"image": rel, "label": shape, "colour": name})
    rng.shuffle(rows)
    with (out / "items.csv").open("w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=["image", "label", "colour"])
        writer.writeheader()
        writer.writerows(rows)
    (out / "choices.txt").write_text("\n".join(SHAPES) + "\n", encoding="utf-8")
    return out / "items.csv"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="folder to write the set into")
    parser.add_argument("--per-pair", type=int, default=4, help="images per shape and colour (default 4: 36 images)")
    args = parser.parse_args()
    csv_path = make(args.out, args.per_pair)
    print(f"wrote {csv_path} and {args.out / 'choices.txt'}")


if __name__ == "__main__":
    main()
