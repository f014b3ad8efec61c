"""``edgevlm chat --image ...`` as a person uses it: the interactive REPL in a real terminal (tmux)."""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux is not installed (.ci/run installs it)")]


class Terminal:
    """A tmux session on its own server socket: type into it, read its screen."""

    def __init__(self, name: str, command: str) -> None:
        self.base = ["tmux", "-L", name]
        subprocess.run([*self.base, "new-session", "-d", "-s", "t", "-x", "160", "-y", "50", command], check=True)

    def screen(self) -> str:
        out = subprocess.run([*self.base, "capture-pane", "-p", "-S", "-200", "-t", "t"], capture_output=True,
                             text=True)
        return out.stdout

    def type(self, text: str) -> None:
        subprocess.run([*self.base, "send-keys", "-t", "t", "-l", text], check=True)
        subprocess.run([*self.base, "send-keys", "-t", "t", "Enter"], check=True)

    def wait_for(self, predicate, what: str, timeout: float = 120) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            screen = self.screen()
            if predicate(screen):
                return screen
            time.sleep(0.1)
        raise AssertionError(f"timed out waiting for {what}; screen:\n{self.screen()}")

    def close(self) -> None:
        subprocess.run([*self.base, "kill-server"], capture_output=True)


def _prompts(screen: str) -> int:
    """Prompts shown so far (tmux drops the trailing space of an empty "> ")."""
    return sum(1 for line in screen.splitlines() if line == ">" or line.startswith("> "))


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
