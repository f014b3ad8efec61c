"""A desktop app: open an image, ask questions about it, read the answers as they stream (Tkinter).

Usage:
    python examples/desktop_app.py --model MODEL [IMAGE] [--question TEXT] [--max-tokens N] [--ctx N]

MODEL is a folder made by `edgevlm convert` (one LLM GGUF and one mmproj GGUF),
an LLM .gguf with its projector beside it, or a Hugging Face repo id (fetched
into the hub cache on that explicit request only); without --model the app
asks for a folder. IMAGE can also be opened from the window. --question is
asked as soon as the model and the image are ready.

How it stays responsive: every edgevlm call (loading, decoding the preview,
answering, closing) runs on one worker thread; the Tk thread only draws. The
worker posts callables to a queue that the Tk thread drains every 20 ms with
``after``. When a model and an image are both there, the worker prepares the
image (``VLM.prepare``: encoded, prompt read up to the question) while the
question is typed, so the answer starts after reading only the question. Stop
sets the answer's cancel event: decoding stops before the next
token and the engine keeps what it evaluated, so a follow-up question about
the same image evaluates only the new turn (its time to first token is in the
status bar). Standard library and edgevlm's public API only.
"""

from __future__ import annotations

import argparse
import queue
import sys
import threading
import time
import tkinter as tk
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from tkinter import filedialog, ttk

import edgevlm

PREVIEW_SIDE = 320
POLL_MS = 20
IMAGE_TYPES = [("Images", "*.png *.jpg *.jpeg *.webp *.bmp *.gif *.tif *.tiff"), ("All files", "*")]


@dataclass
class Options:
    """What the command line sets."""

    model: str | None = None
    image: str | None = None
    question: str | None = None
    max_tokens: int = 256
    n_ctx: int | None = None


class LoadAborted(Exception):
    """Raised from the load progress callback to stop a load (edgevlm frees what it had read)."""


class Worker:
    """One background thread running jobs in order (every edgevlm call goes through it)."""

    def __init__(self) -> None:
        self._jobs: queue.Queue[Callable[[], None] | None] = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="edgevlm-worker", daemon=True)
        self._thread.start()

    def submit(self, job: Callable[[], None]) -> None:
        self._jobs.put(job)

    def stop(self, timeout: float = 30.0) -> None:
        """Run what is queued, then end the thread (waits at most ``timeout`` seconds)."""
        self._jobs.put(None)
        self._thread.join(timeout)

    def _run(self) -> None:
        while (job := self._jobs.get()) is not None:
            job()


class App:
    """The window: image preview, conversation, question box, Stop, status bar with load progress and TTFT."""

    def __init__(self, root: tk.Tk, options: Options) -> None:
        self.root, self.options = root, options
        self.worker = Worker()
        self._ui: queue.Queue[Callable[[], None]] = queue.Queue()  # filled by the worker, drained by Tk
        self._vlm: edgevlm.VLM | None = None  # touched on the worker thread only
        self.messages: list[dict] = []  # the conversation about the current image
        self._conversation = 0  # bumped by a new image / new chat: late answers to an old one are dropped
        self.image_path: str | None = None
        self.model_ready = False
        self.busy = False  # an answer is streaming
        self.last_reply: edgevlm.Reply | None = None
        self._cancel = threading.Event()  # the answer being streamed
        self._prepare_cancel = threading.Event()  # the image being prepared
        self._closing = threading.Event()  # set by shutdown(): a load in progress is aborted
        self._pending_question = options.question
        self._build()
        root.protocol("WM_DELETE_WINDOW", self.shutdown)
        root.after(POLL_MS, self._poll)
        if options.model:
            self.load_model(options.model)
        if options.image:
            self.open_image(options.image)

    # ------------------------------------------------------------------ layout
    def _build(self) -> None:
        root = self.root
        root.title("edgevlm")
        root.geometry("940x600")
        bar = ttk.Frame(root, padding=4)
        bar.pack(side=tk.TOP, fill=tk.X)
        ttk.Button(bar, text="Open image…", command=self.choose_image).pack(side=tk.LEFT)
        ttk.Button(bar, text="Open model…", command=self.choose_model).pack(side=tk.LEFT, padx=4)
        ttk.Label(bar, text="Max tokens").pack(side=tk.LEFT, padx=(12, 2))
        self.max_tokens = tk.IntVar(value=self.options.max_tokens)
        ttk.Spinbox(bar, from_=1, to=8192, textvariable=self.max_tokens, width=6).pack(side=tk.LEFT)
        self.new_chat_button = ttk.Button(bar, text="New chat", command=self.new_chat)
        self.new_chat_button.pack(side=tk.LEFT, padx=4)
        status = ttk.Frame(root, padding=(4, 2))
        status.pack(side=tk.BOTTOM, fill=tk.X)
        self.status = ttk.Label(status, text="Open a model and an image.", anchor=tk.W)
        self.status.pack(side=tk.LEFT, fill=tk.X, expand=True)
        self.progress = ttk.Progressbar(status, length=200, maximum=1.0, mode="determinate")
        self.progress.pack(side=tk.RIGHT)
        ask = ttk.Frame(root, padding=4)
        ask.pack(side=tk.BOTTOM, fill=tk.X)
        self.question = ttk.Entry(ask)
        self.question.pack(side=tk.LEFT, fill=tk.X, expand=True)
        self.question.bind("<Return>", lambda _event: self.ask())
        self.ask_button = ttk.Button(ask, text="Ask", command=self.ask)
        self.ask_button.pack(side=tk.LEFT, padx=4)
        self.stop_button = ttk.Button(ask, text="Stop", command=self.stop, state=tk.DISABLED)
        self.stop_button.pack(side=tk.LEFT)
        body = ttk.Frame(root, padding=4)
        body.pack(side=tk.TOP, fill=tk.BOTH, expand=True)
        self.preview = ttk.Label(body, text="(no image)", width=40, anchor=tk.CENTER)
        self.preview.pack(side=tk.LEFT, fill=tk.Y, padx=(0, 6))
        self.transcript = tk.Text(body, wrap=tk.WORD, state=tk.DISABLED, height=10)
        scroll = ttk.Scrollbar(body, command=self.transcript.yview)
        self.transcript.configure(yscrollcommand=scroll.set)
        scroll.pack(side=tk.RIGHT, fill=tk.Y)
        self.transcript.pack(side=tk.LEFT, fill=tk.BOTH, expand=True)
        self.transcript.tag_configure("you", font=("TkDefaultFont", 10, "bold"))
        self.transcript.tag_configure("note", foreground="#666666")
        self._photo: tk.PhotoImage | None = None

    def _write(self, text: str, tag: str | None = None) -> None:
        self.transcript.configure(state=tk.NORMAL)
        self.transcript.insert(tk.END, text, tag or ())
        self.transcript.configure(state=tk.DISABLED)
        self.transcript.see(tk.END)

    def _set_status(self, text: str) -> None:
        self.status.configure(text=text)

    # ------------------------------------------------------------------ the worker's messages
    def _post(self, update: Callable[[], None]) -> None:
        """From the worker: run ``update`` on the Tk thread."""
        self._ui.put(update)

    def _poll(self) -> None:
        for _ in range(500):  # bounded: a flood of pieces cannot starve the event loop
            try:
                update = self._ui.get_nowait()
            except queue.Empty:
                break
            update()
        self.root.after(POLL_MS, self._poll)

    def _guarded(self, job: Callable[[], None], what: str) -> Callable[[], None]:
        """``job`` with its errors shown in the status bar instead of ending the worker."""
        def run() -> None:
            try:
                job()
            except edgevlm.EdgeVLMError as exc:
                message = " ".join(str(exc).split())
                self._post(lambda: self._on_error(f"{what}: {message}"))
            except Exception as exc:  # noqa: BLE001 - a bug must not silently stop the worker
                message = f"{type(exc).__name__}: {exc}"
                self._post(lambda: self._on_error(f"{what}: {message}"))
        return run

    def _on_error(self, message: str) -> None:
        self.busy = False
        self._buttons()
        self.progress.configure(value=0)
        self._set_status(message)

    # ------------------------------------------------------------------ model
    def choose_model(self) -> None:
        folder = filedialog.askdirectory(title="Model folder (an LLM GGUF and an mmproj GGUF)")
        if folder:
            self.load_model(folder)

    def load_model(self, model: str) -> None:
        self.model_ready = False
        self._stop_all()
        self._set_status(f"Loading {model}…")
        n_ctx = self.options.n_ctx

        def job() -> None:
            if self._vlm is not None:
                self._vlm.close()
                self._vlm = None
            self._vlm = edgevlm.load(model, n_ctx=n_ctx, progress=self._report_progress)
            family, load_ms = self._vlm.family, self._vlm.load_ms
            self._post(lambda: self._on_loaded(f"{Path(model).name} ({family}) loaded in {load_ms / 1e3:.1f} s"))

        self.worker.submit(self._guarded(job, "could not load the model"))

    def _report_progress(self, event: edgevlm.LoadProgress) -> None:
        """On the worker, from inside ``edgevlm.load``: raising here aborts the load."""
        if self._closing.is_set():
            raise LoadAborted("the window was closed")
        self._post(lambda: self._on_progress(event))

    def _on_progress(self, event: edgevlm.LoadProgress) -> None:
        self.progress.configure(value=event.fraction)
        self._set_status(f"Loading: {event.stage.value.replace('_', ' ')} {event.detail}")

    def _on_loaded(self, text: str) -> None:
        self.model_ready = True
        self.progress.configure(value=1.0)
        self._set_status(text)
        self._prepare()
        self._maybe_ask_pending()

    # ------------------------------------------------------------------ image
    def choose_image(self) -> None:
        path = filedialog.askopenfilename(title="Open an image", filetypes=IMAGE_TYPES)
        if path:
            self.open_image(path)

    def open_image(self, path: str) -> None:
        """Show ``path`` and start a new conversation about it (the current answer is stopped)."""
        self._stop_all()

        def job() -> None:
            small = edgevlm.load_image(path, max_side=PREVIEW_SIDE)  # validates it too
            ppm = b"P6\n%d %d\n255\n" % (small.width, small.height) + small.rgb
            self._post(lambda: self._on_image(path, ppm))

        self.worker.submit(self._guarded(job, "could not open the image"))

    def _on_image(self, path: str, ppm: bytes) -> None:
        photo = tk.PhotoImage(data=ppm, format="PPM")
        zoom = PREVIEW_SIDE // max(photo.width(), photo.height(), 1)
        self._photo = photo.zoom(zoom) if zoom > 1 else photo  # small images shown bigger
        self.preview.configure(image=self._photo, text="")
        self.image_path = path
        self.messages, self._conversation = [], self._conversation + 1
        self._write(f"— {Path(path).name} —\n", "note")
        self._prepare()
        self._maybe_ask_pending()

    def new_chat(self) -> None:
        """Forget the conversation; the next question starts again from the image."""
        self._stop_all()
        self.messages, self._conversation = [], self._conversation + 1
        self._write("— new chat —\n", "note")
        self._prepare()

    def _stop_all(self) -> None:
        """Cancel the answer and the preparation (a new image, chat or model, or closing)."""
        self._cancel.set()
        self._prepare_cancel.set()

    def _prepare(self) -> None:
        """Encode the image while the question is typed (``VLM.prepare`` on the worker): the
        question, queued behind it, then only reads itself. A new image, chat or model cancels it;
        its errors are left to the question, which reports them where the user looks."""
        if not (self.model_ready and self.image_path and not self.messages):
            return
        self._prepare_cancel = cancel = threading.Event()
        messages = [{"role": "user", "content": [{"type": "image", "image": self.image_path}]}]

        def job() -> None:
            try:
                if self._vlm is not None:
                    self._vlm.prepare(messages, cancel=cancel)
            except edgevlm.EdgeVLMError:
                pass  # the question repeats the work and shows the error

        self.worker.submit(job)

    # ------------------------------------------------------------------ questions
    def _maybe_ask_pending(self) -> None:
        if self._pending_question and self.model_ready and self.image_path:
            self.question.delete(0, tk.END)
            self.question.insert(0, self._pending_question)
            self._pending_question = None
            self.ask()

    def ask(self) -> None:
        question = self.question.get().strip()
        if not question or self.busy:
            return
        if not self.model_ready:
            self._set_status("The model is not loaded yet.")
            return
        content: list[dict] = []
        if not self.messages and self.image_path:
            content.append({"type": "image", "image": self.image_path})
        content.append({"type": "text", "text": question})
        self.messages.append({"role": "user", "content": content})
        self.question.delete(0, tk.END)
        self._write(f"You: {question}\n", "you")
        self._write("Assistant: ")
        self.busy, self._cancel = True, threading.Event()
        self._buttons()
        self._set_status("Thinking…")
        messages, cancel, max_tokens, conversation = list(self.messages), self._cancel, self._max_tokens(), \
            self._conversation
        asked = time.perf_counter()  # what the user waits counts from here, a preparation included
        self.worker.submit(lambda: self._answer(messages, cancel, max_tokens, conversation, asked))

    def _max_tokens(self) -> int:
        try:
            return max(1, int(self.max_tokens.get()))
        except (tk.TclError, ValueError):
            return self.options.max_tokens

    def _answer(self, messages: list[dict], cancel: threading.Event, max_tokens: int, conversation: int,
                asked: float) -> None:
        """On the worker: stream the reply into the window (``asked``: when Ask was pressed)."""
        ttft = 0.0
        try:
            if self._vlm is None:
                raise edgevlm.EdgeVLMError("no model is loaded")
            stream = self._vlm.stream(messages, max_tokens=max_tokens, cancel=cancel)
            for piece in stream:
                if not ttft:
                    ttft = time.perf_counter() - asked
                    self._post(lambda: self._set_status(f"Answering… (first token after {ttft:.2f} s)"))
                self._post(lambda piece=piece: self._write(piece))
            reply = stream.reply()
        except Exception as exc:  # noqa: BLE001 - shown in the window; the question is taken back
            message = " ".join(str(exc).split()) or type(exc).__name__
            self._post(lambda: self._on_unanswered(conversation, message))
            return
        self._post(lambda: self._on_answered(reply, conversation, ttft))

    def _on_answered(self, reply: edgevlm.Reply, conversation: int, waited_s: float) -> None:
        self.busy = False
        self.last_reply = reply
        if conversation == self._conversation:
            self.messages.append({"role": "assistant", "content": reply.text})
        self._write("\n")
        self._buttons()
        self._set_status(describe(reply, waited_s))

    def _on_unanswered(self, conversation: int, message: str) -> None:
        if conversation == self._conversation and self.messages:
            self.messages.pop()  # the question without an answer: the next one replaces it
        self._write("\n")
        self._on_error(f"could not answer: {message}")

    def stop(self) -> None:
        """Cancel the answer being streamed (decoding stops before the next token)."""
        if self.busy:
            self._cancel.set()
            self._set_status("Stopping…")

    def _buttons(self) -> None:
        self.ask_button.configure(state=tk.DISABLED if self.busy else tk.NORMAL)
        self.stop_button.configure(state=tk.NORMAL if self.busy else tk.DISABLED)

    # ------------------------------------------------------------------ closing
    def shutdown(self) -> None:
        """Stop the answer (or the load), free the model on the worker, end the worker, close the window."""
        self._stop_all()
        self._closing.set()

        def close() -> None:
            if self._vlm is not None:
                self._vlm.close()
                self._vlm = None

        self.worker.submit(close)
        self.worker.stop()
        self.root.destroy()


def describe(reply: edgevlm.Reply, waited_s: float) -> str:
    """The status line after an answer: time to first token (from Ask, a preparation the question
    waited for included), speed, what was reused."""
    pre = reply.prefill
    total_s = reply.timings["total_ms"] / 1e3
    ttft_s = reply.timings["ttft_ms"] / 1e3
    speed = reply.completion_tokens / max(total_s - ttft_s, 1e-6)
    images = ("image reused" if pre.images_reused else
              "image from the cache" if pre.images_from_cache else
              f"{pre.images_encoded} image(s) encoded" if pre.images_encoded else "no image")
    end = "stopped" if reply.finish_reason == "cancelled" else reply.finish_reason
    return (f"TTFT {max(waited_s, ttft_s):.2f} s · {reply.completion_tokens} tokens at {speed:.1f}/s ({end}) · {images} · "
            f"{pre.evaluated_positions} of {pre.prompt_positions} positions evaluated")


def parse_args(argv: list[str]) -> Options:
    parser = argparse.ArgumentParser(description="Ask questions about an image (edgevlm desktop example).")
    parser.add_argument("image", nargs="?", help="the image to open")
    parser.add_argument("--model", help="model folder, LLM .gguf or hub repo id")
    parser.add_argument("--question", help="ask this once the model and the image are ready")
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument("--ctx", type=int, default=None, help="context size in tokens")
    args = parser.parse_args(argv)
    return Options(model=args.model, image=args.image, question=args.question, max_tokens=args.max_tokens,
                   n_ctx=args.ctx)


def main(argv: list[str]) -> int:
    options = parse_args(argv)
    try:
        root = tk.Tk()
    except tk.TclError as exc:
        print(f"desktop_app: error: no display ({exc}); run it in a desktop session", file=sys.stderr)
        return 1
    App(root, options)
    root.mainloop()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
