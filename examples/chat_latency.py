"""What a person waits for in ``edgevlm chat --image``, measured in a real terminal (tmux).

Usage:
    python examples/chat_latency.py MODEL IMAGE [--question TEXT] [--typing 6] [--threads 2] [--rounds 2]

Each round starts ``edgevlm chat --model MODEL --image IMAGE`` in a tmux
session and measures, from the screen:

* ``prompt_ms``: from the command to the ``>`` prompt (the model loads behind it);
* ``first_text_ms``: from Enter to the answer's first character, when the
  question is typed ``--typing`` seconds after the prompt showed (meanwhile
  the weights load and the image is prepared) and when it is typed at once
  (``--typing 0``: nothing hidden).

``one_shot_ms`` is the wall time of ``edgevlm chat -p QUESTION --max-tokens 1``
beside them. Every command runs with ``--no-cache`` (a first look at the image;
the disk caches would otherwise answer from earlier rounds). Prints one JSON
object. Needs tmux.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Callable


class Terminal:
    """A tmux session on its own server socket: type into it, read its screen."""

    def __init__(self, name: str, command: str, width: int = 160, height: int = 50) -> None:
        self.base = ["tmux", "-L", name]
        subprocess.run([*self.base, "new-session", "-d", "-s", "t", "-x", str(width), "-y", str(height), command],
                       check=True)

    def screen(self) -> str:
        out = subprocess.run([*self.base, "capture-pane", "-p", "-S", "-200", "-t", "t"], capture_output=True,
                             text=True)
        return out.stdout

    def type(self, text: str) -> None:
        subprocess.run([*self.base, "send-keys", "-t", "t", "-l", text], check=True)
        subprocess.run([*self.base, "send-keys", "-t", "t", "Enter"], check=True)

    def wait_for(self, predicate: Callable[[str], bool], what: str, timeout: float = 120,
                 poll: float = 0.1) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            screen = self.screen()
            if predicate(screen):
                return screen
            time.sleep(poll)
        raise AssertionError(f"timed out waiting for {what}; screen:\n{self.screen()}")

    def close(self) -> None:
        subprocess.run([*self.base, "kill-server"], capture_output=True)


def prompts(screen: str) -> int:
    """Prompts shown so far (tmux drops the trailing space of an empty "> ")."""
    return sum(1 for line in screen.splitlines() if line == ">" or line.startswith("> "))


def _answer_started(question: str) -> Callable[[str], bool]:
    def started(screen: str) -> bool:
        after = screen.split(f"> {question}", 1)
        return len(after) == 2 and bool(after[1].strip())
    return started


def chat_round(command: str, question: str, typing: float, name: str) -> dict[str, float]:
    """One chat: (prompt_ms, first_text_ms) for a question typed ``typing`` s after the prompt."""
    started = time.perf_counter()
    term = Terminal(name, f"{command}; echo EXIT=$?; sleep 60")
    try:
        term.wait_for(lambda s: prompts(s) >= 1, "the prompt", poll=0.02)
        prompt_ms = (time.perf_counter() - started) * 1e3
        time.sleep(typing)
        sent = time.perf_counter()
        term.type(question)
        term.wait_for(_answer_started(question), "the answer", poll=0.01)
        first_ms = (time.perf_counter() - sent) * 1e3
        term.wait_for(lambda s: prompts(s) >= 2, "the next prompt")
        term.type("/quit")
        screen = term.wait_for(lambda s: "EXIT=" in s, "the chat to end")
        if "EXIT=0" not in screen:
            raise AssertionError(f"the chat failed:\n{screen}")
        return {"prompt_ms": round(prompt_ms), "first_text_ms": round(first_ms)}
    finally:
        term.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("image")
    parser.add_argument("--question", default="Describe this image in one sentence.")
    parser.add_argument("--typing", type=float, default=6.0, help="seconds between the prompt and Enter")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args(argv)
    if shutil.which("tmux") is None:
        print("chat_latency.py needs tmux", file=sys.stderr)
        return 2
    edgevlm = f"{shlex.quote(sys.executable)} -m edgevlm.cli.main"
    common = (f"--model {shlex.quote(args.model)} --image {shlex.quote(args.image)} --threads {args.threads} "
              "--no-cache")  # a first look at the image: nothing from earlier runs
    command = f"{edgevlm} chat {common} --max-tokens 8 --temperature 0"
    out: dict[str, object] = {"typing_s": args.typing}
    for typing, label in ((args.typing, "typed_later"), (0.0, "typed_at_once")):
        name = f"edgevlm-latency-{os.getpid()}-{label}"  # a tmux server of its own: runs may overlap
        rounds = [chat_round(command, args.question, typing, name) for _ in range(args.rounds)]
        out[label] = rounds
    one_shot = []
    for _ in range(args.rounds):
        started = time.perf_counter()
        subprocess.run(shlex.split(f"{edgevlm} chat {common} --max-tokens 1") + ["-p", args.question],
                       check=True, capture_output=True)
        one_shot.append(round((time.perf_counter() - started) * 1e3))
    out["one_shot_ms"] = one_shot
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
