"""Benchmark Llama-3.2-Vision (mllama) in edgevlm against transformers: prefill and decode tokens/s,
image encode ms, decode against the memory-bandwidth bound; prints the README's markdown table.

Usage (from a source checkout, with the test extras installed):
    python examples/make_mllama_bench_model.py out/mllama-bench
    python examples/bench_mllama.py out/mllama-bench --image painting.png [--quants q4_0,q8_0,f16] [--threads 2]

Each quant runs ``edgevlm bench --json`` in its own process (the first also with ``--reference
transformers-speed --hf OUT/hf``: transformers f32 and bf16 on the checkpoint the pairs came from,
same image, prompt and threads); the bound is computed for each LLM file.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

#: The benchmark's prompt (the same for every engine): about 200 tokens with the bench vocabulary.
PROMPT = "Describe this image in detail: " + " ".join(["the colours, the shapes and the light."] * 12)


def run_edgevlm(folder: Path, image: str, threads: int, max_tokens: int, reference_hf: Path | None) -> dict[str, Any]:
    """``edgevlm bench --json`` on one pair (with the transformers reference when ``reference_hf``)."""
    cmd = [sys.executable, "-m", "edgevlm.cli.main", "bench", "--model", str(folder), "--image", image,
           "-p", PROMPT, "--threads", str(threads), "--gpu-layers", "0", "--max-tokens", str(max_tokens),
           "--encode-repeats", "1", "--json"]
    if reference_hf is not None:
        cmd += ["--reference", "transformers-speed", "--hf", str(reference_hf)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=False, cwd=os.path.expanduser("~"))
    if out.returncode:
        raise SystemExit(f"edgevlm bench failed on {folder}:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout)


def table(rows: list[tuple[str, dict[str, Any]]]) -> list[str]:
    """Markdown rows: engine, prefill tok/s, decode tok/s, encode ms, bound."""
    lines = ["| engine | text prefill tok/s | decode tok/s | image encode ms | decode bound tok/s (share) |",
             "|---|---|---|---|---|"]
    for name, r in rows:
        bound = (f"{r['decode_bound_tokens_per_s']:.1f} ({r['decode_fraction_of_bound']:.0%})"
                 if "decode_bound_tokens_per_s" in r else "")
        lines.append(f"| {name} | {r['prefill']:.1f} | {r['decode']:.2f} | {r['encode']:.0f} | {bound} |")
    return lines


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--image", required=True)
    parser.add_argument("--quants", default="q4_0,q8_0,f16")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--max-tokens", type=int, default=8)
    args = parser.parse_args(argv)
    rows: list[tuple[str, dict[str, Any]]] = []
    reference: dict[str, Any] = {}
    for i, quant in enumerate(q for q in args.quants.split(",") if q):
        folder = args.out_dir / quant
        report = run_edgevlm(folder, os.path.abspath(args.image), args.threads, args.max_tokens,
                             args.out_dir / "hf" if i == 0 else None)
        reference = reference or report
        bound = _bound(folder, report)
        rows.append((f"edgevlm {quant} text, f16 vision", {
            "prefill": report["text_prefill_tokens_per_s"], "decode": report["decode_tokens_per_s"],
            "encode": report["image_encode_ms"], **{k: bound[k] for k in bound if k.startswith("decode_")}}))
        print(json.dumps(report), file=sys.stderr)
    for dtype in ("f32", "bf16"):
        ref = reference.get(f"transformers_{dtype}")
        if ref:
            rows.append((f"transformers {dtype}", {"prefill": ref["prefill_tokens_per_s"],
                                                   "decode": ref["decode_tokens_per_s"],
                                                   "encode": ref["image_encode_ms"]}))
    print(f"copy bandwidth {reference.get('copy_bandwidth_gbs')} GB/s; threads {args.threads}; "
          f"prompt {reference.get('prompt_tokens')} tokens")
    print("\n".join(table(rows)))


def _bound(folder: Path, report: dict[str, Any]) -> dict[str, Any]:
    """The decode's memory-bandwidth bound for this pair (its LLM weights + one image's cross K/V)."""
    import edgevlm
    from edgevlm.benchmarks.speeds import decode_bound

    image_kv = edgevlm.plan(folder, n_gpu_layers=0, cache=False).by_name("image cross kv")
    return decode_bound(report["model"], image_kv, report["decode_tokens_per_s"])


if __name__ == "__main__":
    main()
