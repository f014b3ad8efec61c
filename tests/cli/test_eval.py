"""edgevlm classify / edgevlm eval end to end on the tiny fixture model (CliRunner and real subprocesses)."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from edgevlm.cli.main import cli

DEMO = Path(__file__).resolve().parents[2] / "examples" / "eval_demo" / "make_demo.py"
PROMPT = "Each picture shows one shape: {choices}. Answer with the name of the shape only. What shape is the {colour} one?"
SHAPES = ["circle", "square", "triangle"]


def _run(*args: str):
    return CliRunner().invoke(cli, list(args), catch_exceptions=False)


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> Path:
    """The demo set with one image per shape and colour (9 items)."""
    out = tmp_path_factory.mktemp("demo")
    subprocess.run([sys.executable, str(DEMO), str(out), "--per-pair", "1"], check=True, capture_output=True)
    return out


def _eval_args(model: Path, demo: Path, out: Path, *extra: str) -> list[str]:
    return ["eval", "--model", str(model), "--data", str(demo / "items.csv"), "--choices", str(demo / "choices.txt"),
            "--prompt", PROMPT, "--out", str(out), "--threads", "2", "--no-cache", *extra]


def _records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]


def test_classify_answers_one_of_the_choices(siglip_f32, painting):
    prose = "Tell me a long story about this painting and its painter, with every detail you can think of."
    args = ["classify", "--model", str(siglip_f32), "--image", str(painting), "--threads", "2", "--no-cache",
            "-p", prose]
    plain = _run(*args, "--choice", "portrait", "--choice", "landscape", "--choice", "still life")
    assert plain.exit_code == 0, plain.output
    assert plain.output.strip() in ("portrait", "landscape", "still life")
    res = _run(*args, "--choice", "portrait", "--choice", "landscape", "--choice", "still life", "--json")
    report = json.loads(res.output)
    assert report["choice"] == plain.output.strip()
    assert math.isclose(sum(report["probabilities"].values()), 1.0, abs_tol=1e-9)
    grammar = _run(*args, "--choice", "portrait", "--choice", "landscape", "--method", "grammar")
    assert grammar.exit_code == 0 and grammar.output.strip() in ("portrait", "landscape")
    for wrong in ([], ["--choice", "a", "--choices", str(painting)], ["--choice", "a"]):
        bad = _run(*args, *wrong)
        assert bad.exit_code == 2 and bad.output.startswith("edgevlm: error: ") and bad.output.count("\n") == 1


def test_eval_writes_predictions_metrics_and_pictures(siglip_f32, demo, tmp_path):
    from PIL import Image

    from edgevlm.evaluate.plots import DPI, figure_size

    out = tmp_path / "run"
    res = _run(*_eval_args(siglip_f32, demo, out, "--json"))
    assert res.exit_code == 0, res.output
    summary = json.loads(res.output)
    records = _records(out)
    assert len(records) == summary["items"] == 9 and summary["malformed"] == 0
    for r in records:
        assert r["prediction"] in SHAPES and r["label"] in SHAPES and r["fields"].keys() == {"colour"}
        assert math.isclose(sum(r["probabilities"].values()), 1.0, abs_tol=1e-9)
        assert r["prediction"] == max(r["probabilities"], key=r["probabilities"].get)
    metrics = json.loads((out / "metrics.json").read_text())
    _check_metrics_recomputed(records, metrics)
    # the shared head is evaluated once: every later item reuses it
    assert all(r["reused_positions"] > 20 for r in records[1:])
    assert metrics["tokens"]["reused"] == sum(r["reused_positions"] for r in records) > 0
    with Image.open(out / "confusion.png") as img:
        width, height = figure_size(3)
        assert img.size == (round(width * DPI), round(height * DPI))
    assert (out / "f1.png").stat().st_size > 1000


def _check_metrics_recomputed(records: list[dict], metrics: dict) -> None:
    """metrics.json against a plain recomputation from predictions.jsonl."""
    assert metrics["items"] == len(records)
    assert metrics["accuracy"] == pytest.approx(sum(r["prediction"] == r["label"] for r in records) / len(records))
    f1s = []
    for shape in SHAPES:
        tp = sum(r["label"] == shape and r["prediction"] == shape for r in records)
        predicted = sum(r["prediction"] == shape for r in records)
        support = sum(r["label"] == shape for r in records)
        p = tp / predicted if predicted else 0.0
        rec = tp / support if support else 0.0
        f1 = 2 * p * rec / (p + rec) if p + rec else 0.0
        got = metrics["per_class"][shape]
        assert (got["precision"], got["recall"], got["f1"], got["support"]) == (
            pytest.approx(p), pytest.approx(rec), pytest.approx(f1), support)
        if support or predicted:
            f1s.append(f1)
    assert metrics["macro_f1"] == pytest.approx(sum(f1s) / len(f1s))
    confusion = [[sum(r["label"] == a and r["prediction"] == b for r in records) for b in SHAPES] for a in SHAPES]
    assert metrics["confusion"] == confusion and metrics["malformed"] == 0


def test_limit_then_resume_never_redoes_or_rewrites(siglip_f32, demo, tmp_path):
    out = tmp_path / "run"
    first = _run(*_eval_args(siglip_f32, demo, out, "--limit", "3", "--json"))
    assert first.exit_code == 0, first.output
    assert json.loads(first.output)["remaining"] == 6 and len(_records(out)) == 3
    head = (out / "predictions.jsonl").read_bytes()
    second = _run(*_eval_args(siglip_f32, demo, out, "--json"))
    summary = json.loads(second.output)
    assert (summary["new"], summary["before"], summary["items"]) == (6, 3, 9)
    assert (out / "predictions.jsonl").read_bytes().startswith(head)
    rows = [r["row"] for r in _records(out)]
    assert sorted(rows) == list(range(2, 11))
    again = json.loads(_run(*_eval_args(siglip_f32, demo, out, "--json")).output)
    assert again["new"] == 0 and again["items"] == 9


def test_sigint_stops_cleanly_and_the_run_resumes(siglip_f32, demo, tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "edgevlm.cli.main", *_eval_args(siglip_f32, demo, out, "--cot", "--cot-tokens", "24")]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=os.environ.copy())
    predictions = out / "predictions.jsonl"
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and proc.poll() is None:
        if predictions.exists() and predictions.read_text().count("\n") >= 2:
            break
        time.sleep(0.05)
    assert proc.poll() is None, proc.communicate()
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "run the same command to resume" in err and "Traceback" not in err
    head = predictions.read_bytes()
    done = head.count(b"\n")
    assert 2 <= done < 9 and head.endswith(b"\n")
    assert json.loads((out / "metrics.json").read_text())["items"] == done  # written on the way out
    rerun = subprocess.run(cmd + ["--json"], capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    assert json.loads(rerun.stdout)["before"] == done
    assert predictions.read_bytes().startswith(head)
    records = _records(out)
    assert sorted(r["row"] for r in records) == list(range(2, 11))
    assert all(r["prediction"] in SHAPES and isinstance(r["reasoning"], str) for r in records)


def test_a_different_run_in_the_same_folder_is_refused(siglip_f32, demo, tmp_path):
    out = tmp_path / "run"
    assert _run(*_eval_args(siglip_f32, demo, out, "--limit", "1")).exit_code == 0
    other = _eval_args(siglip_f32, demo, out, "--limit", "1")
    other[other.index("--prompt") + 1] = "Which shape: {choices}?"
    res = _run(*other)
    assert res.exit_code != 0 and res.output.count("\n") == 1
    assert "holds another run (different prompt)" in res.output and "--restart" in res.output
    assert len(_records(out)) == 1
    assert _run(*other, "--restart").exit_code == 0
    assert json.loads((out / "manifest.json").read_text())["prompt"] == "Which shape: {choices}?"


def test_bad_rows_name_the_row_and_the_rest_is_kept(siglip_f32, demo, tmp_path):
    rows = (demo / "items.csv").read_text().splitlines()
    image, _, colour = rows[3].split(",")
    bad_label = demo / "labels.csv"
    bad_label.write_text("\n".join(rows[:3] + [f"{image},hexagon,{colour}"]) + "\n")
    args = _eval_args(tmp_path / "no-model-needed", demo, tmp_path / "a")  # refused before loading
    args[args.index("--data") + 1] = str(bad_label)
    res = _run(*args)
    assert res.exit_code == 2 and "labels.csv row 4: label 'hexagon' is not one of the choices" in res.output
    assert not (tmp_path / "a").exists()
    missing = demo / "items_missing.csv"
    missing.write_text("\n".join(rows[:3] + ["images/gone.png,circle,red"] + rows[3:5]) + "\n")
    out = tmp_path / "b"
    args = _eval_args(siglip_f32, demo, out)
    args[args.index("--data") + 1] = str(missing)
    res = _run(*args)
    assert res.exit_code == 2
    assert "1 item(s) could not be evaluated: items_missing.csv row 4 (images/gone.png)" in res.output.splitlines()[-1]
    assert sorted(r["row"] for r in _records(out)) == [2, 3, 5, 6]
    assert json.loads((out / "errors.jsonl").read_text())["row"] == 4
    assert json.loads((out / "metrics.json").read_text())["errors"] == 1


def test_compare_two_quantisations(siglip_f32, siglip_q8, siglip_q4km, demo, tmp_path):
    reports = {}
    for name, other in (("q8_0", siglip_q8), ("q4_k_m", siglip_q4km)):
        res = _run(*_eval_args(siglip_f32, demo, tmp_path / name, "--compare", str(other), "--json", "--limit", "4"))
        assert res.exit_code == 0, res.output
        reports[name] = json.loads(res.output)["compare"]
        report = reports[name]
        assert report["items"] == 4 and 0 <= report["mean_kl"] <= report["max_kl"]
        assert 0 <= report["top1_agreement"] <= 1 and 0 <= report["answer_agreement"] <= 1
        records = _records(tmp_path / name)
        assert report["mean_kl"] == pytest.approx(sum(r["compare"]["kl"] for r in records) / 4)
        assert all(r["compare"]["prediction"] in SHAPES for r in records)
    assert reports["q8_0"]["mean_kl"] < reports["q4_k_m"]["mean_kl"]


def test_a_progress_bar_on_a_terminal(siglip_f32, demo, tmp_path):
    from tests.helpers import run_with_stderr_on_a_terminal

    cmd = [sys.executable, "-m", "edgevlm.cli.main", *_eval_args(siglip_f32, demo, tmp_path / "run", "--limit", "2")]
    code, out, seen = run_with_stderr_on_a_terminal(cmd)
    assert code == 0 and out.startswith("accuracy ")
    assert b"2/2" in seen and b"item" in seen  # tqdm's bar: count, rate, ETA


def _one_line_error(res, words: str) -> None:
    assert res.exit_code == 2, res.output
    assert res.output.startswith("edgevlm: error: ") and res.output.count("\n") == 1, res.output
    assert words in res.output, res.output


def test_cot_with_the_direct_answer_too(siglip_f32, demo, tmp_path):
    out = tmp_path / "run"
    args = _eval_args(siglip_f32, demo, out, "--cot", "--cot-tokens", "8", "--direct-too")
    first = _run(*args, "--limit", "2", "--json")
    assert first.exit_code == 0, first.output
    res = _run(*args, "--limit", "4")  # resumes: the mode is part of the run's identity
    assert res.exit_code == 0, res.output
    assert res.output.startswith("accuracy (CoT) ") and "\naccuracy (direct) " in res.output
    records = _records(out)
    assert [r["row"] for r in records] == [2, 3, 4, 5]
    for r in records:
        assert r["prediction"] in SHAPES and r["direct_prediction"] in SHAPES and isinstance(r["reasoning"], str)
        assert r["direct_correct"] == (r["direct_prediction"] == r["label"])
        assert math.isclose(sum(r["direct_probabilities"].values()), 1.0, abs_tol=1e-9)
    metrics = json.loads((out / "metrics.json").read_text())
    _check_metrics_recomputed(records, metrics)
    direct = [{**r, "prediction": r["direct_prediction"]} for r in records]
    assert metrics["direct_accuracy"] == pytest.approx(sum(r["direct_correct"] for r in records) / 4)
    _check_metrics_recomputed(direct, {**metrics, "accuracy": metrics["direct_accuracy"],
                                       "macro_f1": metrics["direct_macro_f1"], "per_class": metrics["direct_per_class"],
                                       "confusion": metrics["direct_confusion"]})
    assert json.loads((out / "manifest.json").read_text())["direct"] is True
    # the direct answer is what a run without --cot answers
    plain = json.loads(_run(*_eval_args(siglip_f32, demo, tmp_path / "plain", "--limit", "4", "--json")).output)
    assert [r["prediction"] for r in _records(tmp_path / "plain")] == [r["direct_prediction"] for r in records]
    assert plain["accuracy"] == metrics["direct_accuracy"]
    mixed = _run(*_eval_args(siglip_f32, demo, out, "--cot", "--cot-tokens", "8"))
    assert mixed.exit_code != 0 and "holds another run (different direct)" in mixed.output
    _one_line_error(_run(*_eval_args(tmp_path / "no-model", demo, tmp_path / "x", "--direct-too")), "add --cot")


def test_eval_beside_transformers_generate(siglip_f32, llava_siglip_checkpoint, demo, tmp_path):
    out = tmp_path / "run"
    res = _run(*_eval_args(siglip_f32, demo, out, "--limit", "4", "--reference", "transformers",
                           "--hf", str(llava_siglip_checkpoint), "--reference-limit", "3", "--json"))
    assert res.exit_code == 0, res.output
    ref = json.loads(res.output)["reference"]
    assert ref == json.loads((out / "metrics.json").read_text())["reference"]
    assert (ref["engine"], ref["method"], ref["dtype"], ref["items"], ref["rows"]) == (
        "transformers", "generate", "float32", 3, [2, 3, 4])
    assert ref["items_per_s"] > 0 and ref["edgevlm_items_per_s"] > 0 and len(ref["answers"]) == 3
    assert ref["speedup"] == pytest.approx(ref["edgevlm_items_per_s"] / ref["items_per_s"])
    print(f"\nitems/s on the tiny model: edgevlm {ref['edgevlm_items_per_s']:.1f}, "
          f"transformers generate {ref['items_per_s']:.1f}")
    text = _run(*_eval_args(siglip_f32, demo, out, "--limit", "4", "--reference", "transformers",
                            "--hf", str(llava_siglip_checkpoint), "--reference-limit", "2"))
    assert text.exit_code == 0 and "transformers generate (float32, first 2 items)" in text.output
    no_model = tmp_path / "no-model"  # refused before a model is loaded
    _one_line_error(_run(*_eval_args(no_model, demo, tmp_path / "a", "--reference", "transformers")), "--hf PATH")
    _one_line_error(_run(*_eval_args(no_model, demo, tmp_path / "a", "--reference", "transformers",
                                     "--hf", str(tmp_path))), "no config.json")
    _one_line_error(_run(*_eval_args(no_model, demo, tmp_path / "a", "--reference", "transformers", "--cot",
                                     "--hf", str(llava_siglip_checkpoint))), "without --cot")


def test_an_edited_label_is_refused_on_resume(siglip_f32, demo, tmp_path):
    rows = (demo / "items.csv").read_text().splitlines()
    data = demo / "edited.csv"
    data.write_text("\n".join(rows) + "\n")
    out = tmp_path / "run"
    args = _eval_args(siglip_f32, demo, out, "--limit", "2")
    args[args.index("--data") + 1] = str(data)
    assert _run(*args).exit_code == 0
    image, label, colour = rows[1].split(",")
    other = next(s for s in SHAPES if s != label)
    data.write_text("\n".join([rows[0], f"{image},{other},{colour}"] + rows[2:]) + "\n")
    res = _run(*args[:-2])
    assert res.exit_code != 0 and res.output.count("\n") == 1, res.output
    assert f"the CSV changed under the run: row 2 now has label '{other}' (was '{label}')" in res.output
    assert len(_records(out)) == 2


def test_refused_before_any_model_loads(demo, tmp_path, painting):
    no_model = tmp_path / "no-model"
    _one_line_error(_run(*_eval_args(no_model, demo, tmp_path / "a", "--compare", str(no_model), "--method",
                                     "grammar")), "--compare needs the score method")
    _one_line_error(_run(*_eval_args(no_model, demo, tmp_path / "a", "--compare-mmproj", str(no_model),
                                     "--method", "grammar")), "--compare needs the score method")
    _one_line_error(_run(*_eval_args(no_model, demo, tmp_path / "a", "--limit", "0")),
                    "--limit must be at least 1, got 0")
    _one_line_error(_run(*_eval_args(no_model, demo, tmp_path / "a", "--limit", "-3")), "got -3")
    res = _run("classify", "--model", str(no_model), "--image", str(painting), "--choice", "red", "--choice", "blue",
               "-p", "Is it {colour}?")
    _one_line_error(res, "classifying one image fills in only {choices}")
    assert "column" not in res.output.split(":", 2)[2].split(";")[0].split(",")[0]
    assert not (tmp_path / "a").exists()


def test_compare_another_projector_with_the_same_llm(siglip_f32, siglip_q8, demo, tmp_path):
    (projector,) = siglip_q8.glob("mmproj-*.gguf")
    out = tmp_path / "run"
    res = _run(*_eval_args(siglip_f32, demo, out, "--compare-mmproj", str(projector), "--limit", "3", "--json"))
    assert res.exit_code == 0, res.output
    report = json.loads(res.output)["compare"]
    (llm,) = [p for p in siglip_f32.glob("*.gguf") if "mmproj" not in p.name]
    assert report["model"] == f"{llm} + {projector}" and report["items"] == 3
    assert 0 < report["max_kl"]  # another projector: other image embeddings, another distribution
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["compare"] != manifest["model"]
    assert manifest["compare"].split("/")[0] == manifest["model"].split("/")[0]  # the same LLM file


def test_a_failing_reference_keeps_the_metrics(siglip_f32, demo, tmp_path, monkeypatch):
    from edgevlm.errors import UnsupportedModelError
    from edgevlm.evaluate import reference as reference_module

    def fail(*args, **kwargs):
        raise UnsupportedModelError("transformers has no 'X' to run the checkpoint as the reference")

    monkeypatch.setattr(reference_module, "run_reference", fail)
    monkeypatch.setattr("edgevlm.evaluate.runner.run_reference", fail)
    # past the early check (architecture, processor), so that the reference fails after the items ran
    monkeypatch.setattr("edgevlm.benchmarks.transformers_ref.check_reference", lambda checkpoint: None)
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text("{}")
    out = tmp_path / "run"
    res = _run(*_eval_args(siglip_f32, demo, out, "--limit", "2", "--reference", "transformers",
                           "--hf", str(tmp_path / "hf")))
    _one_line_error(res, "transformers has no 'X'")
    assert json.loads((out / "metrics.json").read_text())["items"] == 2 and len(_records(out)) == 2


@pytest.mark.skipif(importlib.util.find_spec("torchvision") is not None, reason="torchvision is installed here")
def test_a_reference_that_cannot_run_stops_before_the_items(siglip_f32, demo, qwen2vl_checkpoint, tmp_path):
    """transformers' Qwen2-VL processor needs torchvision: one line before any item runs, no run folder."""
    out = tmp_path / "run"
    res = _run(*_eval_args(siglip_f32, demo, out, "--limit", "2", "--reference", "transformers",
                           "--hf", str(qwen2vl_checkpoint)))
    _one_line_error(res, "torchvision")
    assert not (out / "metrics.json").exists()
