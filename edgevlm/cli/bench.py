"""``edgevlm bench``: options in, the benchmark workloads (:mod:`edgevlm.benchmarks`) run, JSON out."""

from __future__ import annotations

import json
from typing import Any

import click

from edgevlm.cli.options import load_from_options, load_kwargs, model_options


@click.command()
@model_options
@click.option("-i", "--image", "image", type=click.Path(), default=None, help="Image to use.")
@click.option("-p", "--prompt", default="Describe this image in one sentence.", show_default=True)
@click.option("--follow-up", default="What colours dominate?", show_default=True)
@click.option("--max-tokens", type=click.IntRange(min=1), default=32, show_default=True)
@click.option("--compare", type=click.Choice(["llama-cpp-python"]), default=None,
              help="Also run the workloads through llama-cpp-python's multimodal chat handler.")
@click.option("--batch-size", type=click.IntRange(min=1), default=20, show_default=True,
              help="With --compare: images in the batch workload.")
@click.option("--prefix-tokens", type=click.IntRange(min=1), default=200, show_default=True,
              help="With --compare: length of the batch's fixed instruction prefix.")
@click.option("--restart-rounds", type=click.IntRange(min=1), default=2, show_default=True,
              help="With --compare: cold/restart process pairs (the best of each is reported).")
@click.option("--encode-repeats", type=click.IntRange(min=1), default=3, show_default=True,
              help="Timed image encodes after the first (image_encode_ms is their median).")
@click.option("--reference", type=click.Choice(["torch"]), default=None,
              help="Also time the projector's tower + MLP in PyTorch (f32 and bf16, same weights).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON only.")
def bench(image: str | None, prompt: str, follow_up: str, max_tokens: int, compare: str | None,
          batch_size: int, prefix_tokens: int, restart_rounds: int, encode_repeats: int,
          reference: str | None, as_json: bool, **params: Any) -> None:
    """Measure one two-turn conversation (greedy decoding), cache effects, optionally a comparison."""
    from edgevlm.benchmarks.conversation import probe_spec, run_bench

    vlm = load_from_options(params)
    spec = probe_spec(params["model"], load_kwargs(params))
    report = run_bench(vlm, image, prompt, follow_up, max_tokens, load_spec=spec,
                       encode_repeats=encode_repeats)
    report["threads"] = params["n_threads"]
    if reference and image is not None and vlm.mmproj_path is not None:
        from edgevlm.benchmarks.vision import reference_pixels, torch_reference_times

        report.update(torch_reference_times(vlm.mmproj_path, reference_pixels(vlm.mmproj_path, image),
                                            vlm.settings.n_threads_batch, encode_repeats))
    if compare:
        from edgevlm.benchmarks.compare import run_compare

        report["compare"] = run_compare(vlm, spec, image=image, prompt=prompt, follow_up=follow_up,
                                        max_tokens=max_tokens, batch_size=batch_size,
                                        prefix_tokens=prefix_tokens, restart_rounds=restart_rounds)
    if as_json:
        click.echo(json.dumps(report, indent=2))
        return
    for key, value in report.items():
        click.echo(f"{key:36s} {value}")
