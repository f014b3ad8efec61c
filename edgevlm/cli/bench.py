"""``edgevlm bench``: options in, the benchmark workloads (:mod:`edgevlm.benchmarks`) run, JSON out."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import click

from edgevlm.cli.options import load_from_options, load_kwargs, model_options


def parse_budgets(ctx: click.Context, param: click.Parameter, value: str | None) -> list[int]:
    """``--budgets 2880,1152,576`` -> [2880, 1152, 576] (positive integers, in the given order)."""
    if not value:
        return []
    try:
        budgets = [int(part) for part in value.split(",") if part.strip()]
    except ValueError:
        raise click.BadParameter(f"{value!r} is not a comma-separated list of token counts "
                                 "(e.g. 2880,1152,576)") from None
    if not budgets or min(budgets) < 1:
        raise click.BadParameter(f"{value!r}: each budget must be a positive number of image tokens")
    return budgets


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
@click.option("--budgets", callback=parse_budgets, default=None, metavar="N,N,...",
              help="Image-token budgets (e.g. 2880,1152,576): for each, the image's tokens, views, "
                   "encode time and a cold first turn's TTFT (needs --image).")
@click.option("--encode-only", is_flag=True,
              help="Image figures (and --budgets) only: skip the two-turn conversation.")
@click.option("--reference", type=click.Choice(["torch", "transformers", "transformers-speed"]), default=None,
              help="torch: also time the projector's tower + MLP in PyTorch (f32 and bf16, same weights); "
                   "transformers: the first turn's TTFT through transformers f32/bf16 beside edgevlm's; "
                   "transformers-speed: prefill/decode tokens/s and image encode ms through transformers "
                   "f32/bf16, and the decode's memory-bandwidth bound (both on --hf, or the model's hf/ folder).")
@click.option("--hf", "hf_checkpoint", type=click.Path(file_okay=False), default=None,
              help="With --reference transformers: the Hugging Face checkpoint the GGUF pair came from "
                   "(default: the hf/ folder next to the model, as make_bench_model.py --keep-checkpoint keeps).")
@click.option("--server", "via_server", is_flag=True,
              help="Also measure the conversation and the batch through `edgevlm serve` over HTTP, and through "
                   "llama-cpp-python's OpenAI server when its server extra is installed.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON only.")
def bench(image: str | None, prompt: str, follow_up: str, max_tokens: int, compare: str | None,
          batch_size: int, prefix_tokens: int, restart_rounds: int, encode_repeats: int,
          budgets: list[int], encode_only: bool, reference: str | None, hf_checkpoint: str | None,
          via_server: bool, as_json: bool, **params: Any) -> None:
    """Measure one two-turn conversation (greedy decoding), cache effects, optionally a comparison."""
    from edgevlm.benchmarks.conversation import probe_spec, run_bench

    checkpoint = None
    if (budgets or encode_only or reference) and image is None:
        raise click.UsageError("--budgets, --encode-only and --reference measure an image: give one with --image")
    if reference in ("transformers", "transformers-speed"):
        from edgevlm.benchmarks.transformers_ref import check_reference, find_checkpoint

        checkpoint = find_checkpoint(params["model"], hf_checkpoint)
        if checkpoint is None:
            raise click.UsageError("--reference transformers needs the checkpoint folder: --hf PATH "
                                   "(or an hf/ folder next to the model)")
        check_reference(checkpoint)  # its errors before the model loads and the bench runs
    vlm = load_from_options(params)
    spec = probe_spec(params["model"], load_kwargs(params))
    stages = StageBar(["conversation", *(["budgets"] if budgets else []), *(["reference"] if reference else []),
                       *(["compare"] if compare else []), *(["server"] if via_server else [])])
    with stages.step("conversation"):
        report = run_bench(vlm, image, prompt, follow_up, max_tokens, load_spec=spec,
                           encode_repeats=encode_repeats, with_conversation=not encode_only)
    report["threads"] = params["n_threads"]
    report["max_image_tokens"] = params["max_image_tokens"]
    report["tiles"] = params["tiles"]
    if budgets and image is not None:
        from edgevlm.benchmarks.budgets import budget_sweep

        with stages.step("budgets"):
            report["budgets"] = budget_sweep(vlm, image, budgets, prompt, max_tokens, encode_repeats)
    if reference and image is not None:
        with stages.step("reference"):
            report.update(_reference(vlm, reference, checkpoint, image, prompt, encode_repeats,
                                     decode_tps=report.get("decode_tokens_per_s", 0.0), new_tokens=max_tokens))
    if compare:
        from edgevlm.benchmarks.compare import run_compare

        with stages.step("compare"):
            report["compare"] = run_compare(vlm, spec, image=image, prompt=prompt, follow_up=follow_up,
                                            max_tokens=max_tokens, batch_size=batch_size,
                                            prefix_tokens=prefix_tokens, restart_rounds=restart_rounds)
    if via_server:
        from edgevlm.benchmarks.server import run_server_bench

        with stages.step("server"):
            report["server"] = run_server_bench(vlm, serve_args(params), image=image, prompt=prompt,
                                                follow_up=follow_up, max_tokens=max_tokens, batch_size=batch_size,
                                                prefix_tokens=prefix_tokens)
    stages.close()
    if as_json:
        click.echo(json.dumps(report, indent=2))
        return
    _echo_text(report)


def _echo_text(report: dict[str, Any]) -> None:
    """The report as aligned ``key value`` lines; the budget sweep as a small table."""
    for key, value in report.items():
        if key != "budgets":
            click.echo(f"{key:36s} {value}")
    if report.get("budgets"):
        click.echo(f"\n{'budget':>8s} {'tokens':>7s} {'views':>6s} {'encode ms':>10s} {'TTFT ms':>9s}")
        for row in report["budgets"]:
            if "error" in row:
                click.echo(f"{row['max_image_tokens']:8d} {row['error']}")
                continue
            click.echo(f"{row['max_image_tokens']:8d} {row['image_tokens']:7d} {row['views']:6d} "
                       f"{row['image_encode_ms']:10.1f} {row['ttft_ms']:9.1f}")


def serve_args(params: dict[str, Any]) -> list[str]:
    """``edgevlm serve`` options that load the model as ``params`` (the bench's options) do."""
    args = ["--model", params["model"], "--gpu-layers", str(params["n_gpu_layers"]), "--kv-type", params["kv_type"],
            "--vision-engine", params.get("vision_engine") or "auto", "--tiles", params.get("tiles") or "none"]
    optional = {"--mmproj": params["mmproj"], "--quant": params["quant"], "--ctx": params["n_ctx"],
                "--threads": params["n_threads"], "--vision-device": params.get("vision_device"),
                "--image-tokens": params.get("max_image_tokens")}
    for flag, value in optional.items():
        if value is not None:
            args += [flag, str(value)]
    if params.get("flash_attn") is not None:
        args.append("--flash-attn" if params["flash_attn"] else "--no-flash-attn")
    return args


def _reference(vlm: Any, reference: str, hf_checkpoint: str | None, image: str, prompt: str,
               encode_repeats: int, *, decode_tps: float = 0.0, new_tokens: int = 8) -> dict[str, Any]:
    """The --reference figures: transformers' first turn or speeds, or the torch rebuild of the vision tower."""
    if reference == "transformers-speed" and hf_checkpoint is not None:
        return _speed_reference(vlm, hf_checkpoint, image, prompt, encode_repeats, decode_tps, new_tokens)
    if reference == "transformers" and hf_checkpoint is not None:
        from edgevlm.benchmarks.transformers_ref import transformers_first_turn

        return transformers_first_turn(hf_checkpoint, image, prompt, vlm.settings.n_threads_batch, encode_repeats,
                                       vlm=vlm)
    if reference == "torch" and vlm.mmproj_path is not None:
        from edgevlm.benchmarks.vision import torch_reference_times

        return torch_reference_times(vlm.mmproj_path, vlm.tower_pixels(image), vlm.settings.n_threads_batch,
                                     encode_repeats)
    return {}


def _speed_reference(vlm: Any, hf_checkpoint: str, image: str, prompt: str, repeats: int, decode_tps: float,
                     new_tokens: int) -> dict[str, Any]:
    """transformers' speeds on the checkpoint, and edgevlm's decode against the memory-bandwidth bound."""
    import edgevlm
    from edgevlm.benchmarks.speeds import decode_bound, transformers_speeds

    settings = vlm.settings
    plan = edgevlm.plan(vlm.files.llm, mmproj=vlm.files.mmproj, n_ctx=settings.n_ctx, kv_type=settings.kv_type,
                        n_gpu_layers=0, cache=False)
    out: dict[str, Any] = transformers_speeds(hf_checkpoint, image, prompt, settings.n_threads_batch,
                                              new_tokens, repeats)
    out.update(decode_bound(vlm.files.llm, plan.by_name("image cross kv"), decode_tps))
    return out


class StageBar:
    """Which bench stage runs, with elapsed time, as a tqdm bar on a terminal; nothing when stderr is piped."""

    def __init__(self, names: list[str]) -> None:
        self.bar = None
        if sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=len(names), unit="stage", file=sys.stderr, desc="bench", leave=False,
                            bar_format="{desc}: {n_fmt}/{total_fmt} stages [{elapsed}]")

    @contextmanager
    def step(self, name: str) -> Iterator[None]:
        if self.bar is not None:
            self.bar.set_description(f"bench: {name}")
        yield
        if self.bar is not None:
            self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
