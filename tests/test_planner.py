"""The memory planner: parts add up, match llama.cpp's own accounting, predict the peak RSS of a one-shot
chat within 15 % on two model sizes, and a budget refuses before anything is loaded."""

from __future__ import annotations

import json
import logging
import subprocess
import sys

import pytest

import edgevlm
from edgevlm.errors import InvalidRequestError, MemoryBudgetError
from edgevlm.planner import parse_size

PEAK = ("import sys, runpy\n"
        "sys.argv = ['edgevlm'] + sys.argv[1:]\n"
        "try:\n    runpy.run_module('edgevlm.cli.main', run_name='__main__')\n"
        "except SystemExit as exc:\n    code = exc.code\n"
        "hwm = [l for l in open('/proc/self/status') if l.startswith('VmHWM')][0]\n"
        "print('PEAK_KB', hwm.split()[1], file=sys.stderr)\n")


def plan_and_peak(model, image, question: str, *chat_options: str) -> tuple[int, int]:
    """(``edgevlm plan --ctx 512`` for a 64x48 image, the peak RSS of a one-shot ``edgevlm chat`` at 512)."""
    planned = subprocess.run([sys.executable, "-m", "edgevlm.cli.main", "plan", "--model", str(model), "--json",
                              "--image", "64x48", "--no-cache", "--ctx", "512"],
                             capture_output=True, text=True, timeout=120)
    assert planned.returncode == 0, planned.stderr
    proc = subprocess.run([sys.executable, "-c", PEAK, "chat", "--model", str(model), "--image", str(image),
                           "-p", question, "--max-tokens", "4", "--no-cache", "--ctx", "512", *chat_options],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "PEAK_KB" in proc.stderr, proc.stderr
    return json.loads(planned.stdout)["ram_bytes"], int(proc.stderr.split("PEAK_KB")[1].split()[0]) * 1024


def _llama_log(model, **kwargs) -> list[str]:
    records: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record.getMessage())

    log = logging.getLogger("edgevlm.llama")
    handler, level = Keep(), log.level
    log.addHandler(handler)
    log.setLevel(logging.DEBUG)
    try:
        edgevlm.load(model, cache=False, n_threads=2, **kwargs).close()
    finally:
        log.removeHandler(handler)
        log.setLevel(level)
    return records


def _mib(records: list[str], what: str) -> float:
    line = next(r for r in records if what in r)
    return float(line.split("=")[1].split("MiB")[0])


def test_parts_add_up_for_every_fixture_model(siglip_f32, clip_f32, omnifusion_f32, qwen2vl_f32_result,
                                              llava_next_f32_result, internvl_f32_result):
    for folder in (siglip_f32, clip_f32, omnifusion_f32, qwen2vl_f32_result.llm_path.parent,
                   llava_next_f32_result.llm_path.parent, internvl_f32_result.llm_path.parent):
        plan = edgevlm.plan(folder)
        assert plan.ram_bytes == sum(p.nbytes for p in plan.parts if p.device == "CPU")
        assert all(p.nbytes >= 0 for p in plan.parts) and plan.vram_bytes == {}
        names = {p.name for p in plan.parts}
        assert {"process", "llm weights", "kv cache", "llm compute", "projector weights",
                "vision compute", "image embeddings"} <= names, folder
        files = sum(f.stat().st_size for f in folder.glob("*.gguf"))
        assert 0.9 * files < plan.by_name("llm weights") + plan.by_name("projector weights") <= files
        assert plan.settings.image_tokens > 0 and plan.fits
        assert plan.as_json()["ram_bytes"] == plan.ram_bytes


@pytest.mark.parametrize("n_ctx, kv_type, flash", [(4096, "f16", None), (1024, "f32", None), (2048, "q8_0", None),
                                                   (4096, "f16", True)])
def test_kv_and_compute_match_llama_cpp(medium_f32, n_ctx, kv_type, flash):
    records = _llama_log(medium_f32, n_ctx=n_ctx, kv_type=kv_type, flash_attn=flash)
    plan = edgevlm.plan(medium_f32, n_ctx=n_ctx, kv_type=kv_type, flash_attn=flash)
    kv, compute = _mib(records, "KV buffer size"), _mib(records, "CPU compute buffer size")
    assert plan.by_name("kv cache") / 2**20 == pytest.approx(kv, rel=0.01)
    assert plan.by_name("llm compute") / 2**20 == pytest.approx(compute, rel=0.08)


def test_text_only_model_has_no_vision_parts(clip_f32):
    llm = next(p for p in clip_f32.glob("*.gguf") if not p.name.startswith("mmproj"))
    plan = edgevlm.plan(llm)
    assert plan.by_name("projector weights") > 0  # the projector beside it is found, as load() does


@pytest.mark.parametrize("which", ["tiny", "medium"])
def test_prediction_within_15_percent_of_a_one_shot_chat(which, siglip_f32, medium_f32, painting):
    """The plan is for a full context: the chat's prompt (an image and a long question) fills most of it."""
    model = siglip_f32 if which == "tiny" else medium_f32
    question = " ".join(["Describe the painting, its colours, its shapes and its light."] * 30)
    predicted, measured = plan_and_peak(model, painting, question, "--threads", "2")
    print(f"plan vs one-shot chat ({which}): predicted {predicted / 2**20:.0f} MiB, "
          f"measured {measured / 2**20:.0f} MiB ({predicted / measured - 1:+.1%})")
    assert abs(predicted / measured - 1) <= 0.15


def test_refused_budget_loads_nothing(siglip_f32, monkeypatch):
    import edgevlm.api

    def forbidden(*args, **kwargs):
        raise AssertionError("the model was loaded although the budget refused it")

    monkeypatch.setattr(edgevlm.api, "LlamaModel", forbidden)
    with pytest.raises(MemoryBudgetError, match=r"needs \d+ MiB of RAM \(.*\); the memory budget is 20 MiB"):
        edgevlm.load(siglip_f32, memory_budget="20MiB")


def test_cli_budget_refusal_and_fit(siglip_f32, painting):
    base = [sys.executable, "-m", "edgevlm.cli.main", "chat", "--model", str(siglip_f32), "--image",
            str(painting), "-p", "Genre?", "--max-tokens", "2", "--threads", "2", "--no-cache"]
    refused = subprocess.run(base + ["--memory-budget", "20M"], capture_output=True, text=True, timeout=300)
    assert refused.returncode == 2 and refused.stdout == ""
    line = refused.stderr.strip()
    assert line.count("\n") == 0 and "needs" in line and "budget is 20 MiB" in line and "try" in line
    fits = subprocess.run(base + ["--memory-budget", "2GiB"], capture_output=True, text=True, timeout=300)
    assert fits.returncode == 0 and fits.stdout.strip()
    planned = subprocess.run([sys.executable, "-m", "edgevlm.cli.main", "plan", "--model", str(siglip_f32),
                              "--json", "--image", "4000x3072"], capture_output=True, text=True, timeout=120)
    assert planned.returncode == 0 and '"ram_bytes"' in planned.stdout


@pytest.mark.parametrize("text, value", [("800M", 800 << 20), ("1.5GiB", int(1.5 * (1 << 30))), ("4G", 4 << 30),
                                         ("123456", 123456), ("2 gb", 2 * 10**9)])
def test_sizes(text, value):
    assert parse_size(text) == value


@pytest.mark.parametrize("text", ["", "lots", "-5M", "3 parsecs"])
def test_bad_sizes(text):
    with pytest.raises(InvalidRequestError, match="not a memory size"):
        parse_size(text)


def test_gpu_fit_puts_layers_first_then_the_projector(medium_f32):
    """Pure planning with a pretend GPU: the most layers that fit, the projector only beside them."""
    from edgevlm.descriptor import describe_model
    from edgevlm.families import family_for
    from edgevlm.planner import LLMShape, PlanRequest, fit_gpu, plan_memory
    from edgevlm.resolve import resolve

    model = describe_model(resolve(medium_f32))
    family = family_for(model)
    request = PlanRequest(n_ctx=2048, gpu="CUDA0", image_size=(640, 480))
    n_layer = LLMShape.of(model).n_layer
    everything = plan_memory(model, family, PlanRequest(n_ctx=2048, gpu="CUDA0", image_size=(640, 480),
                                                        projector_on_gpu=True), 50 << 20)
    assert set(everything.vram_bytes) == {"CUDA0"} and everything.by_name("kv cache") > 0
    roomy = fit_gpu(model, family, request, free_bytes=(8 << 30), process_bytes=50 << 20)
    assert roomy.n_gpu_layers == n_layer + 1 and roomy.projector_on_gpu
    assert roomy.vram_bytes == sum(everything.vram_bytes.values())
    all_layers = fit_gpu(model, family, request, free_bytes=(1 << 30) + roomy.vram_bytes - 1, process_bytes=50 << 20)
    assert all_layers.n_gpu_layers == n_layer + 1 and not all_layers.projector_on_gpu
    half = plan_memory(model, family, PlanRequest(n_ctx=2048, gpu="CUDA0", n_gpu_layers=n_layer // 2,
                                                  image_size=(640, 480)), 50 << 20)
    some = fit_gpu(model, family, request, free_bytes=(1 << 30) + sum(half.vram_bytes.values()), process_bytes=50 << 20)
    assert 0 < some.n_gpu_layers < n_layer and not some.projector_on_gpu
    none = fit_gpu(model, family, request, free_bytes=(1 << 30), process_bytes=50 << 20)
    assert none.n_gpu_layers == 0 and none.vram_bytes == 0
