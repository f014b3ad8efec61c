"""``edgevlm chat --image ...`` as a person uses it: the interactive REPL in a real terminal (tmux)."""

from __future__ import annotations

import importlib.util
import json
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux is not installed (.ci/run installs it)")]


def _example():
    """examples/chat_latency.py as a module (its Terminal drives tmux for both)."""
    spec = importlib.util.spec_from_file_location("chat_latency", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "chat_latency.py"
latency = _example()
Terminal, _prompts = latency.Terminal, latency.prompts


def test_interactive_chat_in_a_terminal(siglip_f32, painting, tmp_path: Path, isolated_dirs: Path):
    from PIL import Image

    other = tmp_path / "other.png"
    Image.new("RGB", (50, 40), (250, 200, 10)).save(other)
    env = " ".join(f"{k}={shlex.quote(os.environ[k])}" for k in
                   ("HOME", "XDG_CACHE_HOME", "XDG_CONFIG_HOME", "HF_HOME", "EDGEVLM_CACHE_DIR", "HF_HUB_OFFLINE"))
    chat = (f"{shlex.quote(sys.executable)} -m edgevlm.cli.main chat --model {shlex.quote(str(siglip_f32))} "
            f"--image {shlex.quote(str(painting))} --max-tokens 8 --temperature 0 --threads 2")
    term = Terminal(f"edgevlm-{os.getpid()}", f"env {env} {chat}; echo EXIT=$?; sleep 60")
    try:
        term.wait_for(lambda s: "/image PATH" in s and _prompts(s) == 1, "the help line and the first prompt")
        term.type("What is in this painting?")
        screen = term.wait_for(lambda s: _prompts(s) == 2, "the answer and the next prompt")
        answer = screen.split("What is in this painting?", 1)[1].split("\n>", 1)[0].strip()
        assert answer, screen  # something was streamed before the next prompt
        term.type(f"/image {other}")
        term.wait_for(lambda s: "(image attached:" in s and _prompts(s) == 3, "the attach note")
        term.type("/image /no/such/picture.png")
        screen = term.wait_for(lambda s: _prompts(s) == 4, "the error and the next prompt")
        errors = [line for line in screen.splitlines() if line.startswith("edgevlm: error:")]
        assert len(errors) == 1 and "picture.png" in errors[0], screen
        term.type("And this one?")
        term.wait_for(lambda s: _prompts(s) == 5, "the second answer")
        term.type("/reset")
        term.wait_for(lambda s: "(conversation cleared)" in s, "the reset note")
        term.type("/quit")
        screen = term.wait_for(lambda s: "EXIT=" in s, "the chat to end")
        assert "EXIT=0" in screen, screen
        assert "Traceback" not in screen and "llama_" not in screen and "Warning" not in screen, screen
    finally:
        term.close()


def test_chat_latency_example_measures_a_real_terminal(siglip_f32, painting):
    proc = subprocess.run([sys.executable, str(EXAMPLE), str(siglip_f32), str(painting), "--typing", "1",
                           "--rounds", "1"], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    for label in ("typed_later", "typed_at_once"):
        (one,) = report[label]
        assert one["prompt_ms"] > 0 and one["first_text_ms"] > 0, report
    assert report["one_shot_ms"][0] > 0 and report["typing_s"] == 1
