"""``edgevlm chat`` loads the model in a worker thread while the first question is typed."""

from __future__ import annotations

import contextlib
import io
import os
import sys
import threading
import time

import pytest

from edgevlm import LoadProgress, LoadStage
from edgevlm.cli.chat import ChatSession, _repl
from edgevlm.cli.loading import BackgroundLoad, LoadAborted
from edgevlm.errors import InvalidModelError, MemoryBudgetError, RuntimeFailure


def _event(stage: LoadStage) -> LoadProgress:
    return LoadProgress(stage, 0.0, 0.0)


@contextlib.contextmanager
def _silent_terminal(monkeypatch):
    """stdin a pipe nobody writes to: input() blocks until something interrupts it (after 20 s a
    "/quit" line ends the REPL, so a missing wake-up fails the test instead of hanging it)."""
    read_end, write_end = os.pipe()
    monkeypatch.setattr(sys, "stdin", os.fdopen(read_end, "r"))
    unblock = threading.Timer(20, lambda: os.write(write_end, b"/quit\n"))
    unblock.start()
    try:
        yield
    finally:
        unblock.cancel()
        os.close(write_end)


def test_a_failure_before_the_weights_is_raised_by_start():
    def load(progress):
        progress(_event(LoadStage.READING_HEADERS))
        raise MemoryBudgetError("needs 1 GiB; the memory budget is 300 MiB")

    loading = BackgroundLoad(load)
    with pytest.raises(MemoryBudgetError, match="300 MiB"):
        loading.start()


def test_start_returns_while_the_weights_load_and_wait_gives_the_model(siglip_f32):
    import edgevlm

    release = threading.Event()

    def load(progress):
        def slowed(event):
            progress(event)
            if event.stage is LoadStage.LOADING_LLM:
                release.wait(30)  # the weights are "still loading" until the test says so
        return edgevlm.load(siglip_f32, n_threads=2, cache=False, progress=slowed)

    loading = BackgroundLoad(load)
    loading.start()
    assert not loading.loaded  # the prompt can show now
    release.set()
    vlm = loading.wait()
    assert loading.loaded and vlm.chat([{"role": "user", "content": "Hi"}], max_tokens=2, temperature=0).text
    vlm.close()


def test_quitting_during_the_load_stops_it():
    def load(progress):
        while True:  # a load that only ends when aborted through its progress callback
            progress(_event(LoadStage.LOADING_LLM))
            time.sleep(0.01)

    loading = BackgroundLoad(load)
    loading.start()
    started = time.perf_counter()
    loading.close()
    assert time.perf_counter() - started < 5
    assert isinstance(loading.error, LoadAborted)


def test_a_load_failing_while_the_user_types_ends_the_chat_with_its_error(monkeypatch):
    """The REPL waits in input() on a terminal-like pipe that never gets a line; the load fails
    after reading weights: the prompt is interrupted and the chat ends with the load's error."""
    def load(progress):
        progress(_event(LoadStage.LOADING_LLM))
        time.sleep(0.5)
        raise InvalidModelError("tensor 'blk.0.attn_q.weight' data is damaged; convert the model again")

    with _silent_terminal(monkeypatch):
        loading = BackgroundLoad(load)
        loading.start()
        session = ChatSession(loading, system=None, sampling={"max_tokens": 2})
        with pytest.raises(InvalidModelError, match="damaged"):
            _repl(session)
        session.close()


def test_a_question_asked_before_the_load_ends_waits_for_it(siglip_f32, painting):
    import edgevlm

    loading = BackgroundLoad(lambda progress: edgevlm.load(siglip_f32, n_threads=2, cache=False,
                                                           progress=progress))
    loading.start()
    session = ChatSession(loading, system=None, sampling={"max_tokens": 3, "temperature": 0}, prepare=True)
    session.attach([str(painting)])
    answer = session.ask("What is it?", out=io.StringIO())
    vlm = loading.wait()
    assert answer == vlm.chat([{"role": "user", "content": [{"type": "image", "image": str(painting)},
                                                            {"type": "text", "text": "What is it?"}]}],
                              max_tokens=3, temperature=0).text.strip()
    session.close()
    vlm.close()


def _failing_after_weights(error: BaseException, delay: float = 0.0):
    def load(progress):
        progress(_event(LoadStage.LOADING_LLM))
        time.sleep(delay)
        raise error
    return load


def test_any_load_failure_ends_the_chat_with_one_edgevlm_error(monkeypatch):
    """An OSError from deep in a load is an edgevlm error with its message, not a silent exit."""
    with _silent_terminal(monkeypatch):
        loading = BackgroundLoad(_failing_after_weights(OSError(5, "Input/output error"), delay=0.3))
        loading.start()
        session = ChatSession(loading, system=None, sampling={"max_tokens": 2})
        with pytest.raises(RuntimeFailure, match="could not be loaded: .*Input/output error"):
            _repl(session)
        session.close()


def test_a_load_that_failed_between_prompts_is_raised_at_the_next_one(monkeypatch):
    """No one was waiting in input() when the load failed (no wake-up was sent): the next prompt
    raises it instead of blocking."""
    monkeypatch.setattr(sys, "stdin", io.StringIO("/help\nWhat is it?\n"))
    loading = BackgroundLoad(_failing_after_weights(InvalidModelError("tensor data is damaged")))
    loading.start()
    while not loading.failure():
        time.sleep(0.01)
    session = ChatSession(loading, system=None, sampling={"max_tokens": 2})
    with pytest.raises(InvalidModelError, match="damaged"):
        _repl(session)
    session.close()


def test_closing_joins_every_preparation(siglip_f32, painting, square_image):
    import edgevlm

    loading = BackgroundLoad(lambda progress: edgevlm.load(siglip_f32, n_threads=2, cache=False,
                                                           progress=progress))
    loading.start()
    session = ChatSession(loading, system=None, sampling={"max_tokens": 2}, prepare=True)
    session.attach([str(painting)])
    session.attach([str(square_image(40, seed=11))])
    threads = [p.thread for p in session.preparations]
    session.close()
    assert threads and not any(t.is_alive() for t in threads)
    if loading.loaded:  # else the close stopped the load
        loading.wait().close()
