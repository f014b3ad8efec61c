"""``edgevlm bench`` image figures: --image-tokens, --budgets, --tiles grid, --encode-only (tiny fixtures)."""

from __future__ import annotations

import importlib.util
import json

import pytest
from click.testing import CliRunner

import edgevlm
from edgevlm.cli.main import cli


def _bench(*args: str):
    return CliRunner().invoke(cli, ["bench", "--json", "--threads", "2", "--max-tokens", "2",
                                    "--encode-repeats", "1", *args], catch_exceptions=False)


@pytest.fixture(scope="module")
def next_folder(llava_next_f32_result):
    return llava_next_f32_result.llm_path.parent


def _costs(folder, size, budgets, **load):
    with edgevlm.load(folder, n_ctx=4096, n_threads=2, cache=False, **load) as vlm:
        return {b: vlm.image_cost(*size, max_image_tokens=b) for b in budgets}


def test_image_tokens_sets_the_budget_and_views_come_from_image_cost(next_folder, painting):
    costs = _costs(next_folder, (128, 96), [None, 40])
    assert costs[40].tokens < costs[None].tokens and costs[40].views < costs[None].views
    for budget in (None, 40):
        extra = ["--image-tokens", str(budget)] if budget else []
        res = _bench("--model", str(next_folder), "--image", str(painting), "--encode-only", *extra)
        assert res.exit_code == 0, res.output
        report = json.loads(res.output)
        assert report["family"] == "llava-next" and report["vision_engine"] == "kernels"
        assert report["max_image_tokens"] == budget and report["image_size"] == [128, 96]
        assert (report["image_tokens"], report["image_views"]) == (costs[budget].tokens, costs[budget].views)
        assert report["image_embedding_rows"] == report["image_tokens"]
        assert report["image_encode_ms"] > 0 and report["image_encode_first_ms"] > 0
        assert "time_to_first_token_ms" not in report  # --encode-only: no conversation


def test_budgets_report_each_budget_cold(next_folder, painting):
    budgets = [200, 60, 40]
    costs = _costs(next_folder, (128, 96), budgets)
    res = _bench("--model", str(next_folder), "--image", str(painting), "--budgets", ",".join(map(str, budgets + [17])))
    assert res.exit_code == 0, res.output
    report = json.loads(res.output)
    assert "time_to_first_token_ms" in report  # the conversation still runs
    rows = report["budgets"]
    assert [r["max_image_tokens"] for r in rows] == budgets + [17]
    too_small = rows.pop()  # the smallest plan is 36 tokens: a clear error, the other rows still measured
    assert set(too_small) == {"max_image_tokens", "error"} and "at least 36 image tokens" in too_small["error"]
    for row in rows:
        cost = costs[row["max_image_tokens"]]
        assert (row["image_tokens"], row["views"]) == (cost.tokens, cost.views)
        assert row["images_encoded"] == 1, "each budget is measured with empty caches"
        assert row["image_encode_ms"] > 0 and row["ttft_ms"] > 0
        assert row["prompt_tokens"] > row["image_tokens"]
    assert rows[0]["image_tokens"] > rows[-1]["image_tokens"]
    # the prompt differs by exactly the image tokens saved
    assert rows[0]["prompt_tokens"] - rows[-1]["prompt_tokens"] == rows[0]["image_tokens"] - rows[-1]["image_tokens"]


def test_tiles_grid_on_a_single_view_model(clip_f32, painting):
    single = _costs(clip_f32, (128, 96), [None])[None]
    grid = _costs(clip_f32, (128, 96), [None, single.tokens], tiles="grid")
    res = _bench("--model", str(clip_f32), "--image", str(painting), "--encode-only", "--tiles", "grid",
                 "--budgets", str(single.tokens))
    assert res.exit_code == 0, res.output
    report = json.loads(res.output)
    assert report["tiles"] == "grid" and report["image_views"] == grid[None].views > 1
    assert report["image_tokens"] == grid[None].views * single.tokens == report["image_embedding_rows"]
    assert report["budgets"][0]["views"] == 1  # a one-view budget: the overview alone


@pytest.mark.parametrize("value, message", [("abc", "comma-separated"), ("576,0", "positive"), (",", "positive")])
def test_bad_budgets_are_usage_errors(clip_f32, painting, value, message):
    res = _bench("--model", str(clip_f32), "--image", str(painting), "--budgets", value)
    assert res.exit_code == 2 and message in res.output and "Traceback" not in res.output


def test_budgets_need_an_image(clip_f32):
    res = _bench("--model", str(clip_f32), "--budgets", "576")
    assert res.exit_code == 2 and "--image" in res.output


def test_text_output_shows_the_budget_table(clip_f32, painting):
    res = CliRunner().invoke(cli, ["bench", "--model", str(clip_f32), "--image", str(painting), "--threads", "2",
                                   "--encode-only", "--encode-repeats", "1", "--budgets", "576"],
                             catch_exceptions=False)
    assert res.exit_code == 0, res.output
    assert "image_views" in res.output and "budget  tokens  views" in res.output


def test_bench_reference_transformers(siglip_f32, llava_siglip_checkpoint, painting, tmp_path):
    """The first turn through transformers f32 and bf16 beside edgevlm's own, on the checkpoint kept next to
    the model (as make_bench_model.py --keep-checkpoint keeps it in OUT/hf) when --hf is not given."""
    import json

    from click.testing import CliRunner

    from edgevlm.cli.main import cli

    model = tmp_path / "model"
    model.mkdir()
    for gguf in siglip_f32.glob("*.gguf"):
        (model / gguf.name).symlink_to(gguf)
    (model / "hf").symlink_to(llava_siglip_checkpoint, target_is_directory=True)
    res = CliRunner().invoke(cli, ["bench", "--model", str(model), "--image", str(painting), "--json",
                                   "--max-tokens", "2", "--threads", "2", "--no-cache",
                                   "--encode-repeats", "1", "--reference", "transformers"], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    report = json.loads(res.output)
    for key in ("transformers_f32_ttft_ms", "transformers_bf16_ttft_ms", "transformers_f32_ttft_first_ms",
                "edgevlm_ttft_ms", "first_request_ttft_ms", "time_to_first_token_ms", "edgevlm_prepare_ms",
                "edgevlm_prepared_ttft_ms"):
        assert report[key] > 0, key
    for label in ("f32", "bf16"):
        assert report[f"edgevlm_vs_transformers_{label}"] == pytest.approx(
            report["edgevlm_ttft_ms"] / report[f"transformers_{label}_ttft_ms"], abs=0.01)
    for who in ("edgevlm", "transformers_f32", "transformers_bf16"):  # one round: the parts add up
        assert 0 < report[f"{who}_image_ms"] < report[f"{who}_ttft_ms"], who
        assert report[f"{who}_image_ms"] + report[f"{who}_prompt_ms"] == pytest.approx(
            report[f"{who}_ttft_ms"], abs=0.2), who
    missing = CliRunner().invoke(cli, ["bench", "--model", str(siglip_f32), "--image", str(painting),
                                       "--reference", "transformers"])
    assert missing.exit_code == 2 and "--hf" in missing.output


@pytest.mark.skipif(importlib.util.find_spec("torchvision") is not None, reason="torchvision is installed here")
def test_bench_reference_that_cannot_run_stops_before_loading(qwen2vl_f32_result, qwen2vl_checkpoint, painting,
                                                              monkeypatch):
    """transformers' Qwen2-VL processor needs torchvision: without it `bench --reference transformers` says so
    in one line, exit 2, before the model is loaded or anything measured."""
    import edgevlm.api

    def forbidden(*args, **kwargs):
        raise AssertionError("the model was loaded although the reference cannot run")

    monkeypatch.setattr(edgevlm.api, "LlamaModel", forbidden)
    res = CliRunner().invoke(cli, ["bench", "--model", str(qwen2vl_f32_result.llm_path.parent), "--image",
                                   str(painting), "--hf", str(qwen2vl_checkpoint), "--reference", "transformers"])
    assert res.exit_code == 2, res.output
    lines = res.output.strip().splitlines()
    assert len(lines) == 1 and "torchvision" in lines[0] and str(qwen2vl_checkpoint) in lines[0], res.output


def test_bench_memory_budget_refuses_before_loading(siglip_f32, painting, monkeypatch):
    """`bench --memory-budget` too small: exit 2, one line with the numbers, no weights loaded."""
    import edgevlm.api

    def forbidden(*args, **kwargs):
        raise AssertionError("the model was loaded although the budget refused it")

    monkeypatch.setattr(edgevlm.api, "LlamaModel", forbidden)
    res = CliRunner().invoke(cli, ["bench", "--model", str(siglip_f32), "--image", str(painting), "--json",
                                   "--threads", "2", "--memory-budget", "20MiB"])
    assert res.exit_code == 2, res.output
    assert res.stdout == ""
    line = res.stderr.strip()
    assert line.count("\n") == 0 and "needs" in line and "of RAM" in line and "budget is 20 MiB" in line
