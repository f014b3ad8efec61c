"""Options shared by the commands: loading a model, sampling, the logging switch."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any, Callable

import click

from edgevlm import native
from edgevlm.constants import DEFAULT_MODEL, ENV_MODEL, KV_TYPES, VISION_ENGINES

if TYPE_CHECKING:  # pragma: no cover
    from edgevlm import VLM, LoadProgress


def _model_name(_ctx: click.Context, _param: click.Parameter, value: str | None) -> str:
    import edgevlm

    return edgevlm.resolve_model_name(value)


#: ``-m/--model``, resolved as everywhere (--model > EDGEVLM_MODEL > `edgevlm config` > the default).
model_option = click.option(
    "-m", "--model", default=None, callback=_model_name,
    help=f"Model folder, LLM .gguf file, or Hugging Face repo id (default: ${ENV_MODEL}, else `edgevlm "
         f"config set model`, else {DEFAULT_MODEL.repo_id}, downloaded on first use).")


def model_options(func: Callable[..., Any]) -> Callable[..., Any]:
    """--model/--mmproj/--quant/--ctx/--threads/--gpu-layers/--kv-type/--flash-attn/--no-cache/
    --vision-engine/--vision-device/--image-tokens/--tiles."""
    decorators = [
        model_option,
        click.option("--mmproj", type=click.Path(dir_okay=False), default=None,
                     help="Vision projector .gguf (when --model is a file)."),
        click.option("--quant", default=None, help="Pick the LLM file whose name contains this."),
        click.option("--ctx", "n_ctx", type=click.IntRange(min=0), default=None,
                     help="Context size in tokens (default: the model's training context, at most 4096)."),
        click.option("--threads", "n_threads", type=click.IntRange(min=1), default=None,
                     help="CPU threads (default: physical cores)."),
        click.option("--gpu-layers", "n_gpu_layers", type=int, default=-1, show_default=True,
                     help="LLM layers offloaded to the GPU (-1 = all)."),
        click.option("--kv-type", type=click.Choice(list(KV_TYPES)),
                     default="f16", show_default=True, help="KV cache element type."),
        click.option("--flash-attn/--no-flash-attn", "flash_attn", default=None,
                     help="llama.cpp's flash attention (default: off on the CPU, where a reused prompt prefix "
                          "then equals a fresh one bitwise, on for a quantised KV cache; llama.cpp's choice on "
                          "a GPU). On the CPU it reads long prompts faster."),
        click.option("--no-cache", is_flag=True, help="Do not use the on-disk embedding cache."),
        click.option("--vision-engine", type=click.Choice(VISION_ENGINES), default="auto",
                     show_default=True,
                     help="Who runs the vision tower: edgevlm's ggml graphs (kernels), libmtmd, or "
                          "auto (kernels for CLIP-tower LLaVA and OmniFusion, libmtmd otherwise)."),
        click.option("--vision-device", default=None,
                     help="ggml device for the kernels engine (auto, cpu, cuda, metal, CUDA0, ...)."),
        click.option("--image-tokens", "max_image_tokens", type=click.IntRange(min=1), default=None,
                     help="Image-token budget per image: tiled models use fewer tiles or pixels "
                          "(default: the model's own, capped to fit the context)."),
        click.option("--memory-budget", default=None,
                     help="Refuse, before loading, a model that would take more, RAM and VRAM together (e.g. 1.5GiB, 800M; a GPU share: 6GiB,vram=4GiB)."),
        click.option("--tiles", type=click.Choice(["none", "grid"]), default="none", show_default=True,
                     help="grid: add tiles + an overview to models trained on one view "
                          "(LLaVA-1.5, OmniFusion): more detail, more image tokens."),
    ]
    for deco in reversed(decorators):
        func = deco(func)
    return func


def sampling_options(func: Callable[..., Any]) -> Callable[..., Any]:
    """--max-tokens/--temperature/--top-p/--top-k/--min-p/--repeat-penalty/--seed/--stop."""
    decorators = [
        click.option("--max-tokens", type=click.IntRange(min=0), default=512, show_default=True),
        click.option("--temperature", type=click.FloatRange(min=0), default=0.2, show_default=True,
                     help="0 = greedy."),
        click.option("--top-p", type=click.FloatRange(0, 1, min_open=True), default=0.95, show_default=True),
        click.option("--top-k", type=click.IntRange(min=0), default=40, show_default=True),
        click.option("--min-p", type=click.FloatRange(0, 1), default=0.05, show_default=True),
        click.option("--repeat-penalty", type=click.FloatRange(min=0, min_open=True), default=1.0,
                     show_default=True),
        click.option("--seed", type=int, default=None, help="Sampling seed."),
        click.option("--stop", multiple=True, help="Stop string (repeatable)."),
    ]
    for deco in reversed(decorators):
        func = deco(func)
    return func


def load_kwargs(params: dict[str, Any]) -> dict[str, Any]:
    """The keyword arguments of :func:`edgevlm.load` given by :func:`model_options` (``model`` aside)."""
    return {"mmproj": params["mmproj"], "quant": params["quant"], "n_ctx": params["n_ctx"],
            "n_threads": params["n_threads"], "n_gpu_layers": params["n_gpu_layers"],
            "kv_type": params["kv_type"], "flash_attn": params.get("flash_attn"), "cache": not params["no_cache"],
            "vision_engine": params.get("vision_engine") or "auto",
            "vision_device": params.get("vision_device"),
            "max_image_tokens": params.get("max_image_tokens"), "tiles": params.get("tiles") or "none",
            "memory_budget": params.get("memory_budget")}


def load_from_options(params: dict[str, Any], progress: Callable[[LoadProgress], None] | None = None) -> VLM:
    """edgevlm.load() with the values of :func:`model_options` (and ``progress``, its load callback)."""
    import edgevlm

    return edgevlm.load(params["model"], progress=progress, **load_kwargs(params))


def sampling_kwargs(params: dict[str, Any]) -> dict[str, Any]:
    keys = ("max_tokens", "temperature", "top_p", "top_k", "min_p", "repeat_penalty", "seed")
    out = {k: params[k] for k in keys}
    out["stop"] = list(params.get("stop") or ())
    return out


def setup_logging(verbose: bool) -> None:
    """Silent by default; --verbose shows edgevlm's and llama.cpp's logs on stderr."""
    if verbose:
        native.show_logs()
        return
    logging.getLogger("edgevlm").setLevel(logging.WARNING)
    logging.getLogger("edgevlm.llama").setLevel(logging.CRITICAL)
