"""``edgevlm chat``: interactive, streaming, multi-turn chat about images."""

from __future__ import annotations

import logging
import queue
import sys
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

import click

from edgevlm.cli.loading import BackgroundLoad
from edgevlm.cli.options import load_from_options, model_options, sampling_kwargs, sampling_options
from edgevlm.errors import EdgeVLMError

if TYPE_CHECKING:  # pragma: no cover
    from edgevlm import VLM

HELP = "commands: /image PATH (attach to next question), /reset, /quit, /help"


@click.command()
@model_options
@sampling_options
@click.option("-i", "--image", "images", multiple=True, type=click.Path(),
              help="Image to discuss (repeatable).")
@click.option("-p", "--prompt", default=None, help="Ask once, print the answer and exit.")
@click.option("--system", default=None, help="System prompt.")
def chat(images: tuple[str, ...], prompt: str | None, system: str | None, **params: Any) -> None:
    """Chat about one or more images (streaming; multi-turn)."""
    if prompt is not None:
        session = ChatSession(load_from_options(params), system=system, sampling=sampling_kwargs(params))
        session.attach(images)
        session.ask(prompt)
        return
    loading = BackgroundLoad(lambda progress: load_from_options(params, progress=progress))
    session = ChatSession(loading, system=system, sampling=sampling_kwargs(params), prepare=True)
    try:
        try:
            loading.start()  # the weights load while the question is typed
            session.attach(images)
            _repl(session)
        finally:
            session.close()
    except KeyboardInterrupt:  # also the wake-up of a failed load arriving after input() returned
        loading.raise_failure()
        raise


@dataclass
class Preparation:
    """Images being encoded (and the prompt read up to the question) while the user types."""

    thread: threading.Thread
    cancel: threading.Event

    def wait(self) -> None:
        self.thread.join()


class ChatSession:
    """A conversation: messages so far, images waiting for the next question.

    With ``prepare``, attaching images starts :meth:`edgevlm.VLM.prepare` in a
    worker thread: the images are encoded and the prompt read up to where the
    question goes while the user types it, so the answer starts after reading
    only the question (a question sent sooner waits for the work it needs anyway).
    ``model`` is a loaded model or one loading in the background (waited for
    when first needed).
    """

    def __init__(self, model: VLM | BackgroundLoad, *, system: str | None, sampling: dict[str, Any],
                 prepare: bool = False) -> None:
        self.model = model
        self.system = system
        self.sampling = sampling
        self.prepare = prepare
        self.preparations: list[Preparation] = []
        self.messages: list[dict[str, Any]] = []
        self.pending: list[str] = []
        self.reset()

    @property
    def vlm(self) -> VLM:
        """The model (waits for a background load to finish; raises its failure)."""
        return self.model.wait() if isinstance(self.model, BackgroundLoad) else self.model

    @property
    def preparation(self) -> Preparation | None:
        """The latest preparation, if any."""
        return self.preparations[-1] if self.preparations else None

    @property
    def loading(self) -> BackgroundLoad | None:
        return self.model if isinstance(self.model, BackgroundLoad) else None

    def reset(self) -> None:
        self.messages = [{"role": "system", "content": self.system}] if self.system else []
        self.pending = []
        self._cancel_preparations()

    def _cancel_preparations(self) -> None:
        """Stop the preparations now: between chunks, or inside a graph on the CPU (what they
        evaluated before the chunk in progress stays in the KV cache)."""
        for preparation in self.preparations:
            preparation.cancel.set()
        self.preparations = [p for p in self.preparations if p.thread.is_alive()]

    def attach(self, paths: tuple[str, ...] | list[str]) -> None:
        import edgevlm

        for path in paths:
            edgevlm.load_image(path)  # fail now, with a clear message, not mid-conversation
            self.pending.append(path)
        if self.prepare and paths:
            self._start_preparation()

    def _start_preparation(self) -> None:
        self._cancel_preparations()
        messages = [*self.messages, {"role": "user", "content": [{"type": "image", "image": p} for p in self.pending]}]
        cancel = threading.Event()
        thread = threading.Thread(target=_prepare_quietly, args=(lambda: self.vlm, messages, cancel),
                                  name="edgevlm-prepare", daemon=True)
        self.preparations.append(Preparation(thread, cancel))
        thread.start()

    def close(self) -> None:
        """Stop a load or a preparation still running (before the model goes away with the process)."""
        self._cancel_preparations()
        if self.loading is not None:
            self.loading.close()
        for preparation in self.preparations:
            preparation.wait()

    def ask(self, question: str, out: Any = None) -> str:
        out = out or sys.stdout
        content: list[dict[str, Any]] = [{"type": "image", "image": p} for p in self.pending]
        content.append({"type": "text", "text": question})
        self.messages.append({"role": "user", "content": content})
        # a preparation still running is left to finish: it evaluates a prefix of this turn, which
        # then reads on from where it ended (stopping it could drop an image stopped mid-encode: the
        # engines stop inside a graph). One that has not started yet finds the turn done and does nothing.
        self.preparations = [p for p in self.preparations if p.thread.is_alive()]
        try:
            pieces = _stream_interruptibly(self.vlm, self.messages, self.sampling, out,
                                           on_interrupt=self._cancel_preparations)
        except BaseException:
            self.messages.pop()  # keep the conversation consistent
            raise
        out.write("\n")
        out.flush()
        self.pending = []
        reply = "".join(pieces).strip()
        self.messages.append({"role": "assistant", "content": reply})
        return reply


def _stream_interruptibly(vlm: VLM, messages: list[dict[str, Any]], sampling: dict[str, Any], out: Any, *,
                          on_interrupt: Callable[[], None]) -> list[str]:
    """Stream the answer from a worker thread and write it here; Ctrl-C stops it at once.

    Python runs its Ctrl-C handler in the main thread only between its own instructions, never
    inside a llama.cpp call (a prompt batch can take seconds): here the main thread only waits
    for pieces, so the interrupt arrives at once; it stops the preparations (``on_interrupt``,
    the answer may be waiting for one) and sets the stream's cancel event, which the engines'
    abort hook reads within 20 ms, then waits for the worker and re-raises.
    """
    cancel = threading.Event()
    items: queue.Queue[str | BaseException | None] = queue.Queue()

    def produce() -> None:
        try:
            for piece in vlm.stream(messages, cancel=cancel, **sampling):
                items.put(piece)
            items.put(None)
        except BaseException as exc:  # noqa: BLE001 - raised again in the main thread
            items.put(exc)

    worker = threading.Thread(target=produce, name="edgevlm-answer", daemon=True)
    worker.start()
    pieces: list[str] = []
    try:
        while (item := _next_item(items)) is not None:
            if isinstance(item, BaseException):
                raise item
            pieces.append(item)
            out.write(item)
            out.flush()
    except KeyboardInterrupt:
        on_interrupt()
        cancel.set()
        worker.join()
        raise
    return pieces


def _next_item(items: queue.Queue[str | BaseException | None]) -> str | BaseException | None:
    """The worker's next item; a short timeout keeps the wait interruptible on every platform."""
    while True:
        try:
            return items.get(timeout=0.1)
        except queue.Empty:
            continue


def _prepare_quietly(model: Callable[[], VLM], messages: list[dict[str, Any]], cancel: threading.Event) -> None:
    """Prepare the next turn (once the model is loaded); a failure is left for the question to report,
    where the user is looking."""
    try:
        model().prepare(messages, cancel=cancel)
    except Exception:  # noqa: BLE001 - the question repeats the work and reports the error itself
        logging.getLogger("edgevlm").debug("preparing the next turn failed", exc_info=True)


def _repl(session: ChatSession) -> None:
    interactive = sys.stdin.isatty()
    if interactive:
        click.echo(HELP, err=True)
    while True:
        line = _read_line(session, "> " if interactive else "")
        if line is None:
            return
        line = line.strip()
        if not line:
            continue
        if line.startswith("/"):
            if not _command(session, line):
                return
            continue
        try:
            session.ask(line)
        except KeyboardInterrupt:
            _raise_load_failure(session)
            click.echo("\n(interrupted)", err=True)
        except EdgeVLMError as exc:
            _raise_load_failure(session)  # the model never loaded: the chat ends with that error
            click.echo(f"edgevlm: error: {exc}", err=True)


def _read_line(session: ChatSession, prompt: str) -> str | None:
    """The next line typed; None at end of input or Ctrl-C. A background load that fails
    meanwhile interrupts the wait and is raised here."""
    loading = session.loading
    if loading is not None:
        loading.at_prompt.set()
    try:
        _raise_load_failure(session)  # one that failed before the prompt was set is not signalled
        return input(prompt)
    except EOFError:
        return None
    except KeyboardInterrupt:
        _raise_load_failure(session)
        click.echo("", err=True)
        return None
    finally:
        if loading is not None:
            loading.at_prompt.clear()


def _raise_load_failure(session: ChatSession) -> None:
    if session.loading is not None:
        session.loading.raise_failure()


def _command(session: ChatSession, line: str) -> bool:
    """Handle a /command; False means quit."""
    cmd, _, arg = line.partition(" ")
    if cmd in ("/quit", "/exit", "/q"):
        return False
    if cmd == "/reset":
        session.reset()
        click.echo("(conversation cleared)", err=True)
    elif cmd == "/image":
        try:
            session.attach([arg.strip()])
            click.echo(f"(image attached: {arg.strip()})", err=True)
        except EdgeVLMError as exc:
            click.echo(f"edgevlm: error: {exc}", err=True)
    else:
        click.echo(HELP, err=True)
    return True
