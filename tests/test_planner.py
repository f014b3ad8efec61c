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
        "import edgevlm.api\n"
        "print('BASE_B', edgevlm.api._process_bytes(), file=sys.stderr)\n"
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


#: Predicted vs measured RSS above the process (the plan without its "process" part against the peak
#: minus the RSS before loading; measured: tiny +-2 %, medium +6 %).
TOLERANCE_ABOVE_PROCESS = {"tiny": 0.2, "medium": 0.2}


@pytest.mark.parametrize("which", ["tiny", "medium"])
def test_prediction_within_15_percent_of_a_one_shot_chat(which, siglip_f32, medium_f32, painting):
    """The plan is for a full context: the chat's prompt (an image and a long question) fills most of it."""
    model = siglip_f32 if which == "tiny" else medium_f32
    question = " ".join(["Describe the painting, its colours, its shapes and its light."] * 30)
    planned = subprocess.run([sys.executable, "-m", "edgevlm.cli.main", "plan", "--model", str(model), "--json",
                              "--image", "64x48", "--no-cache", "--ctx", "512"],
                             capture_output=True, text=True, timeout=120)
    assert planned.returncode == 0, planned.stderr
    plan = json.loads(planned.stdout)
    predicted = plan["ram_bytes"]
    process = next(p["nbytes"] for p in plan["parts"] if p["name"] == "process")
    proc = subprocess.run([sys.executable, "-c", PEAK, "chat", "--model", str(model), "--image", str(painting),
                           "-p", question, "--max-tokens", "4", "--threads", "2", "--no-cache",
                           "--ctx", "512"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "PEAK_KB" in proc.stderr, proc.stderr
    measured = int(proc.stderr.split("PEAK_KB")[1].split()[0]) * 1024
    baseline = int(proc.stderr.split("BASE_B")[1].split()[0])
    print(f"plan vs one-shot chat ({which}): predicted {predicted / 2**20:.0f} MiB, "
          f"measured {measured / 2**20:.0f} MiB ({predicted / measured - 1:+.1%}); above the process: "
          f"predicted {(predicted - process) / 2**20:.1f} MiB, measured {(measured - baseline) / 2**20:.1f} MiB")
    assert abs(predicted / measured - 1) <= 0.15
    # the measured process dominates a tiny model's total: what the model adds must match on its own
    assert abs((predicted - process) / (measured - baseline) - 1) <= TOLERANCE_ABOVE_PROCESS[which]


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


def test_context_above_training_refused_from_the_header(siglip_f32, monkeypatch):
    """load() and plan refuse it before any weights are read; `edgevlm plan --ctx 100000` exits 2."""
    import edgevlm.api

    def forbidden(*args, **kwargs):
        raise AssertionError("weights were loaded although the context is refused")

    monkeypatch.setattr(edgevlm.api, "LlamaModel", forbidden)
    train = edgevlm.plan(siglip_f32, n_ctx=0).settings.n_ctx
    with pytest.raises(InvalidRequestError, match=f"more than the {train} .* was trained for; use --ctx {train}"):
        edgevlm.load(siglip_f32, n_ctx=100000)
    with pytest.raises(InvalidRequestError, match="was trained for"):
        edgevlm.plan(siglip_f32, n_ctx=100000)
    cli = subprocess.run([sys.executable, "-m", "edgevlm.cli.main", "plan", "--model", str(siglip_f32),
                          "--ctx", "100000"], capture_output=True, text=True, timeout=120)
    assert cli.returncode == 2 and "was trained for" in cli.stderr and cli.stdout == ""


def test_non_causal_ubatch_is_the_largest_image_chunk(siglip_f32, monkeypatch):
    """One rule for plan and load: a non-causal projector's ubatch is its largest image chunk, not 2048."""
    import edgevlm.planner
    from edgevlm.descriptor import describe_model
    from edgevlm.families import family_for
    from edgevlm.planner import image_ubatch
    from edgevlm.resolve import resolve

    assert image_ubatch(512, 4096, 256, non_causal=True) == 512
    assert image_ubatch(64, 4096, 576, non_causal=True) == 576
    assert image_ubatch(64, 4096, 576, non_causal=False) == 64
    assert image_ubatch(64, 256, 576, non_causal=True) == 256  # never above the context
    causal = edgevlm.plan(siglip_f32, n_ctx=512, n_batch=8)
    assert causal.settings.n_ubatch == 8
    model = describe_model(resolve(siglip_f32))
    monkeypatch.setattr(edgevlm.planner, "NON_CAUSAL_PROJECTOR_TYPES", (model.projector.projector_type,))
    plan = edgevlm.plan(siglip_f32, n_ctx=512, n_batch=8)
    tokens = plan.settings.image_tokens
    assert tokens > 8 and plan.settings.n_ubatch == plan.settings.n_batch == tokens
    assert plan.by_name("llm compute") > causal.by_name("llm compute")
    assert family_for(model).choose_engine("auto")  # the family plans the chunk from the headers
    vlm = edgevlm.load(siglip_f32, n_ctx=512, n_batch=8, n_threads=2, cache=False)
    try:
        assert vlm.settings.n_batch == tokens
    finally:
        vlm.close()


def test_refusal_names_ram_and_vram_apart(medium_f32):
    """With a (pretend) GPU the refusal says how much RAM and how much VRAM, not "of RAM" for both."""
    from edgevlm.descriptor import describe_model
    from edgevlm.families import family_for
    from edgevlm.planner import PlanRequest, plan_memory
    from edgevlm.resolve import resolve

    model = describe_model(resolve(medium_f32))
    plan = plan_memory(model, family_for(model), PlanRequest(n_ctx=2048, gpu="CUDA0", image_size=(640, 480),
                                                             memory_budget=1 << 20), 50 << 20)
    assert not plan.fits and plan.vram_bytes["CUDA0"] > 0
    line = plan.refusal()
    ram, vram = line.split(" of RAM")[0], line.split(" of VRAM on CUDA0")[0]
    assert ram.startswith("needs ") and " and " in vram and "(RAM and VRAM together)" in line
    from edgevlm.planner import gib
    assert gib(plan.ram_bytes) in ram and gib(plan.vram_bytes["CUDA0"]) in vram


def test_gpu_fit_respects_the_memory_budget(medium_f32):
    """A VRAM share of the budget below the free VRAM limits the layers and the projector to it."""
    import dataclasses

    from edgevlm.descriptor import describe_model
    from edgevlm.families import family_for
    from edgevlm.planner import LLMShape, PlanRequest, fit_gpu, parse_budget, plan_memory
    from edgevlm.resolve import resolve

    assert parse_budget("6GiB,vram=4GiB") == (6 << 30, 4 << 30) and parse_budget("vram=1G") == (None, 1 << 30)
    assert parse_budget(123) == (123, None)
    model = describe_model(resolve(medium_f32))
    family = family_for(model)
    request = PlanRequest(n_ctx=2048, gpu="CUDA0", image_size=(640, 480))
    n_layer = LLMShape.of(model).n_layer
    free = 64 << 30
    everything = fit_gpu(model, family, request, free, 50 << 20)
    assert everything.n_gpu_layers == n_layer + 1 and everything.projector_on_gpu
    half = plan_memory(model, family, dataclasses.replace(request, n_gpu_layers=n_layer // 2), 50 << 20)
    share = sum(half.vram_bytes.values())
    some = fit_gpu(model, family, dataclasses.replace(request, vram_budget=share), free, 50 << 20)
    assert some.n_gpu_layers == n_layer // 2 and not some.projector_on_gpu and some.vram_bytes <= share
    starved = fit_gpu(model, family, dataclasses.replace(request, vram_budget=1 << 20), free, 50 << 20)
    assert starved.n_gpu_layers == 0 and starved.vram_bytes == 0
    over = plan_memory(model, family, dataclasses.replace(request, vram_budget=share), 50 << 20)
    assert not over.fits and "the VRAM budget is" in over.refusal() and "--gpu-layers" in over.refusal()
    total = everything.vram_bytes + plan_memory(model, family, request, 50 << 20).ram_bytes
    assert fit_gpu(model, family, dataclasses.replace(request, memory_budget=total), free, 50 << 20) == everything


def test_budget_caps_the_ram_caches_and_shows_them(siglip_f32):
    """With a budget the embedding LRU and the parked states get what the plan leaves, shown as parts."""
    from edgevlm.embeddings import DEFAULT_RAM_BYTES
    from edgevlm.parking import DEFAULT_PARK_BYTES

    free = edgevlm.plan(siglip_f32, n_ctx=512)
    assert free.by_name("embedding cache") == free.by_name("parked states") == 0  # no budget: not priced
    room = 40 << 20
    capped = edgevlm.plan(siglip_f32, n_ctx=512, memory_budget=free.ram_bytes + room)
    left = capped.budget_bytes - sum(p.nbytes for p in capped.parts if p.name not in ("embedding cache",
                                                                                      "parked states"))
    assert capped.fits and 0 < left <= room  # (the process is measured again: it may have grown)
    assert capped.by_name("embedding cache") == left // 4 and capped.by_name("parked states") == left - left // 4
    assert capped.ram_bytes == capped.budget_bytes
    names = [p["name"] for p in capped.as_json()["parts"]]
    assert "embedding cache" in names and "parked states" in names
    roomy = edgevlm.plan(siglip_f32, n_ctx=512, memory_budget="64GiB")
    assert roomy.by_name("embedding cache") == DEFAULT_RAM_BYTES and roomy.by_name("parked states") == DEFAULT_PARK_BYTES
    vlm = edgevlm.load(siglip_f32, n_ctx=512, n_threads=2, cache=False, memory_budget=free.ram_bytes + room)
    try:
        engine = vlm.engine  # the process measured again at load: the room is about the same
        emb, parked = engine.embeddings.ram.max_bytes, engine.kv.parked.max_bytes
        assert 0 < emb < DEFAULT_RAM_BYTES and 0 < parked < DEFAULT_PARK_BYTES
        assert parked == 3 * emb or parked == 3 * emb + 1 or abs(parked - 3 * emb) <= 3
        assert emb + parked <= room + (8 << 20)  # RSS moves a little between the two measurements
    finally:
        vlm.close()
