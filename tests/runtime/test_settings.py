"""Settings that cannot work together get a clear message instead of llama.cpp's failure or log line."""

from __future__ import annotations

import subprocess
import sys

import pytest

import edgevlm
from edgevlm.errors import InvalidRequestError


def _ask(painting):
    return [{"role": "user", "content": [{"type": "image", "image": str(painting)},
                                         {"type": "text", "text": "Genre?"}]}]


@pytest.mark.parametrize("kv_type", ["q8_0", "q4_0"])
def test_quantised_kv_cache_turns_flash_attention_on(siglip_f32, painting, kv_type):
    with edgevlm.load(siglip_f32, n_ctx=512, n_threads=2, kv_type=kv_type, cache=False) as vlm:
        assert vlm.settings.flash_attn == 1
        assert vlm.chat(_ask(painting), max_tokens=2, temperature=0).completion_tokens >= 1


def test_quantised_kv_cache_without_flash_attention_is_refused(siglip_f32):
    with pytest.raises(InvalidRequestError, match="q4_0 KV cache needs flash attention"):
        edgevlm.load(siglip_f32, n_ctx=512, n_threads=2, kv_type="q4_0", flash_attn=False, cache=False)


def test_context_beyond_training_is_refused(siglip_f32):
    with edgevlm.load(siglip_f32, n_threads=2, cache=False) as vlm:
        trained = vlm.n_ctx  # the default: the training context (4096 for the fixture), at most 4096
    with pytest.raises(InvalidRequestError, match=f"more than the {trained} .* was trained for; use --ctx {trained}"):
        edgevlm.load(siglip_f32, n_ctx=2 * trained, n_threads=2, cache=False)


def test_default_context_is_capped_by_training(omnifusion_f32):
    with edgevlm.load(omnifusion_f32, n_threads=2, cache=False) as vlm:
        assert vlm.n_ctx == 2048  # the OmniFusion fixture was trained with 2048 positions


def test_gpu_layers_on_a_cpu_only_build_is_refused(siglip_f32):
    from edgevlm import native

    if native.llama().llama_supports_gpu_offload():
        pytest.skip("this llama-cpp-python build has a GPU backend")
    with pytest.raises(InvalidRequestError, match="no GPU backend"):
        edgevlm.load(siglip_f32, n_ctx=512, n_threads=2, n_gpu_layers=10, cache=False)


def test_cli_with_a_quantised_kv_cache_answers(siglip_f32, painting):
    proc = subprocess.run([sys.executable, "-m", "edgevlm.cli.main", "chat", "--model", str(siglip_f32),
                           "--image", str(painting), "-p", "Genre?", "--max-tokens", "2", "--kv-type", "q4_0",
                           "--threads", "2", "--no-cache"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip() and proc.stderr == "", proc.stderr
    bad = subprocess.run([sys.executable, "-m", "edgevlm.cli.main", "chat", "--model", str(siglip_f32),
                          "--image", str(painting), "-p", "Genre?", "--ctx", "100000", "--no-cache"],
                         capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "was trained for" in bad.stderr


def test_repeat_penalty_samples(siglip_f32, painting):
    """llama_sampler_init_penalties of the pinned llama.cpp takes n_vocab first; a penalty must work."""
    with edgevlm.load(siglip_f32, n_ctx=512, n_threads=2, cache=False) as vlm:
        reply = vlm.chat(_ask(painting), max_tokens=4, temperature=0.7, repeat_penalty=1.3, seed=1)
        assert reply.completion_tokens >= 1


def test_load_does_the_first_request_s_one_time_work(clip_f32, painting):
    """The one-token warm-up decode and the tower's graph happen at load; nothing of them stays behind:
    the first request evaluates its whole prompt and answers as a later identical one does."""
    with edgevlm.load(clip_f32, n_ctx=512, n_threads=2, cache=False) as vlm:
        assert vlm.vision_engine == "kernels"
        tower = vlm.engine.encoder.tower
        assert tower._graph is not None  # built (and its compute buffer written) at load
        first = vlm.chat(_ask(painting), max_tokens=4, temperature=0)
        assert first.prefill.reused_positions == 0 and first.prefill.evaluated_positions == first.prefill.prompt_positions
        graph = tower._graph
        with vlm.isolated_caches():
            again = vlm.chat(_ask(painting), max_tokens=4, temperature=0)
        assert again.text == first.text and tower._graph is graph


@pytest.mark.parametrize("given, expected", [(None, "passive"), ("active", "active")])
def test_openmp_workers_wait_passively_unless_told(given, expected):
    """Idle OpenMP workers spinning between graphs starved the first request's decode on a busy machine."""
    import os

    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    if given:
        env["OMP_WAIT_POLICY"] = given
    code = "import os; from edgevlm import native; native.llama(); print(os.environ['OMP_WAIT_POLICY'])"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == expected, out.stderr
