"""examples/ask_about_image.py runs as a user would (a real subprocess) and shows the cache at work."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "ask_about_image.py"


def test_ask_about_image_encodes_the_image_once(siglip_f32, painting):
    proc = subprocess.run([sys.executable, str(EXAMPLE), str(siglip_f32), str(painting), "Genre?", "Colours?"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    status = [line for line in proc.stdout.splitlines() if "positions evaluated" in line]
    assert len(status) == 2
    assert "1 image(s) encoded" in status[0] and "0 image(s) encoded" in status[1]
    assert proc.stderr == ""


EVAL_DEMO = Path(__file__).resolve().parents[1] / "examples" / "eval_demo" / "make_demo.py"


def test_eval_demo_runs_end_to_end(siglip_f32, tmp_path):
    """What a new user does: draw the demo set, run edgevlm eval on it, read the summary."""
    demo = tmp_path / "demo"
    made = subprocess.run([sys.executable, str(EVAL_DEMO), str(demo), "--per-pair", "2"], capture_output=True,
                          text=True, timeout=120)
    assert made.returncode == 0, made.stderr
    assert len((demo / "items.csv").read_text().splitlines()) == 1 + 18
    cmd = [sys.executable, "-m", "edgevlm.cli.main", "eval", "--model", str(siglip_f32), "--data",
           str(demo / "items.csv"), "--choices", str(demo / "choices.txt"), "--out", str(demo / "run"),
           "--prompt", "Each picture shows one shape: {choices}. Answer with the shape only. "
           "What shape is the {colour} figure?", "--threads", "2"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("accuracy ") and "18 items (18 new" in proc.stdout
    assert proc.stderr == ""  # no progress bar when piped, no llama.cpp log
    assert len((demo / "run" / "predictions.jsonl").read_text().splitlines()) == 18
    for name in ("metrics.json", "confusion.png", "f1.png", "manifest.json"):
        assert (demo / "run" / name).stat().st_size > 0


FIRST_TURN_TABLE = Path(__file__).resolve().parents[1] / "examples" / "first_turn_table.py"


def test_first_turn_table_reports_every_engine(siglip_f32, llava_siglip_checkpoint, painting, tmp_path):
    """examples/first_turn_table.py on the tiny model with its checkpoint kept as hf/ beside it: one JSON
    object with each engine's first and warm turn and the image's part of the warm turns."""
    import json

    model = tmp_path / "model"
    model.mkdir()
    for gguf in siglip_f32.glob("*.gguf"):
        (model / gguf.name).symlink_to(gguf)
    (model / "hf").symlink_to(llava_siglip_checkpoint, target_is_directory=True)
    proc = subprocess.run([sys.executable, str(FIRST_TURN_TABLE), str(model), str(painting), "--rounds", "1"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(proc.stdout)
    for engine in ("edgevlm", "llama_cpp_python", "transformers_f32", "transformers_bf16"):
        assert report[f"{engine}_warm_ms"] > 0 and len(report[f"{engine}_warm_all_ms"]) == 1, engine
    for engine in ("edgevlm", "transformers_f32", "transformers_bf16"):
        assert 0 < report[f"{engine}_image_warm_ms"] <= report[f"{engine}_warm_ms"], engine
    assert report["first_to_second_ttft_ratio"] > 0 and report["edgevlm_prepared_warm_ms"] > 0
