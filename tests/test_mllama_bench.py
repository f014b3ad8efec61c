"""The mllama benchmark path: ``edgevlm bench --reference transformers-speed`` and
examples/bench_mllama.py run on the tiny fixture (no timing assertions)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def _example(name: str):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bench_with_the_transformers_speed_reference(mllama_f32_result, mllama_checkpoint, painting):
    from click.testing import CliRunner

    from edgevlm.cli.main import cli

    folder = mllama_f32_result.llm_path.parent
    res = CliRunner().invoke(cli, ["bench", "--model", str(folder), "--image", str(painting), "--threads", "1",
                                   "--gpu-layers", "0", "--max-tokens", "3", "--encode-repeats", "1", "--no-cache",
                                   "--reference", "transformers-speed", "--hf", str(mllama_checkpoint), "--json"],
                             catch_exceptions=False)
    assert res.exit_code == 0, res.output
    report = json.loads(res.output)
    assert report["family"] == "mllama" and report["image_views"] == 4
    for key in ("text_prefill_tokens_per_s", "decode_tokens_per_s", "image_encode_ms", "copy_bandwidth_gbs",
                "decode_bound_tokens_per_s"):
        assert report[key] > 0, key
    for dtype in ("f32", "bf16"):
        ref = report[f"transformers_{dtype}"]
        assert ref["prompt_tokens"] > 0 and min(ref["image_encode_ms"], ref["prefill_tokens_per_s"],
                                                ref["decode_tokens_per_s"]) > 0
    from edgevlm.benchmarks.speeds import decode_bytes_per_token

    weights = decode_bytes_per_token(mllama_f32_result.llm_path)
    image_kv = 2 * 4 * 17 * 32 * 2 * 2  # 2 cross layers x 68 states x KV width 32 x (K, V) x f16
    assert report["decode_bytes_per_token"] == weights + image_kv
    assert weights < mllama_f32_result.llm_path.stat().st_size


def test_bench_example_sizes_and_table():
    sizes = _example("make_mllama_bench_model").bench_sizes()
    assert (sizes.text_hidden, sizes.text_heads, sizes.text_kv_heads, sizes.text_ffn) == (4096, 32, 8, 14336)
    assert (sizes.vision_hidden, sizes.vision_ffn, sizes.image_size, sizes.tokens_per_tile) == (1280, 5120, 560, 1601)
    lines = _example("bench_mllama").table([("edgevlm q4_0", {"prefill": 10.0, "decode": 2.0, "encode": 900.0,
                                                              "decode_bound_tokens_per_s": 4.0,
                                                              "decode_fraction_of_bound": 0.5})])
    assert lines[2] == "| edgevlm q4_0 | 10.0 | 2.00 | 900 | 4.0 (50%) |"
