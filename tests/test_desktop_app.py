"""examples/desktop_app.py in a real window on Xvfb: load progress, typed questions, streamed answers,
a fast follow-up, Stop during a long answer, a window that never blocks; a screenshot goes to tmp_path."""

from __future__ import annotations

import ast
import importlib.util
import os
import select
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType

import pytest

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "desktop_app.py"
#: The longest the Tk thread may be busy in one event-loop turn (edgevlm runs on the worker).
MAX_BLOCKED_S = 0.5


@pytest.fixture(scope="module")
def display() -> Iterator[str]:
    """A private X display (Xvfb picks a free number; no TCP listener)."""
    xvfb = shutil.which("Xvfb")
    if xvfb is None:
        pytest.skip("no display server: Xvfb is not installed (apt-get install -y xvfb; .ci/run installs it)")
    read, write = os.pipe()
    proc = subprocess.Popen([xvfb, "-displayfd", str(write), "-nolisten", "tcp", "-screen", "0", "1024x680x24"],
                            pass_fds=(write,), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    os.close(write)
    try:
        ready, _, _ = select.select([read], [], [], 30)
        number = os.read(read, 64).decode().strip() if ready else ""
        if not number:
            pytest.fail("Xvfb did not report a display number within 30 s")
        yield f":{number}"
    finally:
        os.close(read)
        proc.terminate()
        proc.wait(10)


def _example() -> ModuleType:
    spec = importlib.util.spec_from_file_location("desktop_app", EXAMPLE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while it runs
    spec.loader.exec_module(module)
    return module


class Window:
    """Drives the Tk event loop from the test, timing every turn."""

    def __init__(self, root) -> None:
        self.root = root
        self.longest_turn = 0.0

    def pump(self, until: Callable[[], bool], what: str, timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        while not until():
            assert time.monotonic() < deadline, f"timed out waiting for {what}"
            t0 = time.perf_counter()
            self.root.update()
            self.longest_turn = max(self.longest_turn, time.perf_counter() - t0)
            time.sleep(0.005)

    def type_into(self, entry, text: str) -> None:
        """Real key events into ``entry``, then Return."""
        entry.focus_force()
        self.root.update()
        names = {" ": "space", "?": "question", ".": "period", ",": "comma"}
        for ch in text:
            entry.event_generate("<KeyPress>", keysym=names.get(ch, ch))
        self.root.update()
        assert entry.get() == text
        entry.event_generate("<KeyPress>", keysym="Return")

    def click(self, button) -> None:
        x, y = button.winfo_width() // 2, button.winfo_height() // 2
        button.event_generate("<Enter>", x=x, y=y)
        button.event_generate("<ButtonPress-1>", x=x, y=y)
        button.event_generate("<ButtonRelease-1>", x=x, y=y)


def _transcript(app) -> str:
    return app.transcript.get("1.0", "end-1c")


#: Questions for a long answer: a random model ends some answers early; the first that goes on is stopped.
LONG_QUESTIONS = ("Tell me everything about it, in detail.", "Describe the painting.", "What do you see?",
                  "Write a long story about this picture.", "List every object in the image.",
                  "Explain the colours and the shapes.", "What happens here?", "Describe it again, slowly.",
                  "Who painted this, and when?", "Give me ten facts about it.", "What is the mood here?",
                  "Describe the left side, then the right side.")


def _stop_a_long_answer(window: Window, app):
    """Ask (in a new chat) until an answer is still streaming after 20 characters, then click Stop."""
    app.max_tokens.set(3000)
    for question in LONG_QUESTIONS:
        window.click(app.new_chat_button)
        window.type_into(app.question, question)
        before = len(_transcript(app))
        window.pump(lambda: not app.busy or len(_transcript(app)) > before + 20, "a streamed piece")
        if not app.busy:
            continue  # it ended by itself
        assert str(app.stop_button.cget("state")) == "normal"
        window.click(app.stop_button)
        window.pump(lambda: not app.busy, "the answer to stop", timeout=30)
        if app.last_reply.finish_reason == "cancelled":
            return app.last_reply
    raise AssertionError("no answer could be stopped: each ended by itself or ignored Stop")


def test_desktop_app_answers_follows_up_fast_and_stops(display, siglip_f32, painting, tmp_path):
    tk = pytest.importorskip("tkinter", reason="this Python was built without Tkinter")
    from PIL import ImageGrab

    example = _example()
    root = tk.Tk(screenName=display)
    window = Window(root)
    question = "What is in this picture?"  # asked by the app once ready (its --question hook)
    app = example.App(root, example.Options(model=str(siglip_f32), image=str(painting), question=question,
                                            max_tokens=24))
    fractions: list[float] = []
    shown = app._on_progress
    app._on_progress = lambda event: (fractions.append(event.fraction), shown(event))
    try:
        window.pump(lambda: app.last_reply is not None and not app.busy, "the model, the image and an answer")
        assert app.progress.cget("value") == 1.0
        assert any(0 < f < 1 for f in fractions) and fractions[-1] == 1.0, fractions
        first = app.last_reply
        # the app prepared the image (VLM.prepare) before the question, queued behind it, was read
        assert first.prefill.images_encoded == 0 and first.prefill.images_reused == 1 and first.text
        assert first.prefill.evaluated_positions <= len(app._vlm.tokenize(question)) + 12, first.prefill
        assert f"You: What is in this picture?\nAssistant: {first.text}" in _transcript(app)
        assert app.status.cget("text").startswith("TTFT ")

        window.type_into(app.question, "And the colours?")
        window.pump(lambda: app.last_reply is not first and not app.busy, "the follow-up")
        follow = app.last_reply
        assert follow.prefill.images_encoded == 0 and follow.prefill.images_reused == 1
        assert follow.prefill.reused_positions > 0  # the image and the text around it, from the KV cache
        # fast because the first turn's prompt (image included) is not read again; a wall-clock ratio of
        # two few-ms turns of the tiny model failed CI on noise
        assert follow.prefill.reused_positions >= first.prefill.prompt_positions - 1, (first.prefill, follow.prefill)
        assert "image reused" in app.status.cget("text")

        stopped = _stop_a_long_answer(window, app)
        assert stopped.finish_reason == "cancelled" and 0 < stopped.completion_tokens < 3000
        assert stopped.text and stopped.text in _transcript(app)
        assert "(stopped)" in app.status.cget("text")
        assert window.longest_turn < MAX_BLOCKED_S, f"the window was blocked for {window.longest_turn:.2f} s"

        window.pump(lambda: True, "a redraw")
        shot = ImageGrab.grab(xdisplay=display)
        shot.save(tmp_path / "desktop_app.png")
        low, high = zip(*shot.convert("RGB").getextrema())
        assert max(high) - min(low) > 100, "the screenshot is blank"
    finally:
        app.shutdown()
    assert app._vlm is None, "the model was not closed"


def test_closing_the_window_during_a_load_aborts_it(display, medium_f32):
    tk = pytest.importorskip("tkinter", reason="this Python was built without Tkinter")
    from edgevlm.progress import LoadStage

    example = _example()
    root = tk.Tk(screenName=display)
    app = example.App(root, example.Options())
    stages: list[LoadStage] = []
    report = app._report_progress
    app._report_progress = lambda event: (stages.append(event.stage), report(event))
    app.load_model(str(medium_f32))
    started = time.perf_counter()
    app.shutdown()  # as the window's close button does
    assert stages and LoadStage.READY not in stages, stages
    assert app._vlm is None and not app.worker._thread.is_alive()
    assert time.perf_counter() - started < 10


def test_desktop_app_without_a_display_says_so(siglip_f32):
    env = {k: v for k, v in os.environ.items() if k != "DISPLAY"}
    proc = subprocess.run([sys.executable, str(EXAMPLE), "--model", str(siglip_f32)], capture_output=True,
                          text=True, timeout=120, env=env)
    assert proc.returncode == 1
    assert proc.stderr.startswith("desktop_app: error: no display") and "Traceback" not in proc.stderr


def test_desktop_app_uses_the_standard_library_and_the_public_api_only():
    tree = ast.parse(EXAMPLE.read_text())
    imported = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    imported |= {node.module or "" for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    outside = {m for m in imported if m.split(".")[0] not in sys.stdlib_module_names and m != "edgevlm"}
    assert not outside, f"the example imports {sorted(outside)}"
    assert "edgevlm" in imported and not any(m.startswith("edgevlm.") for m in imported)
    assert ".engine" not in EXAMPLE.read_text()
