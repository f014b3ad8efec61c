"""``edgevlm chat`` loads the model in a worker thread while the first question is typed."""

from __future__ import annotations

import io
import os
import sys
import threading
import time

import pytest

from edgevlm import LoadProgress, LoadStage
from edgevlm.cli.chat import ChatSession, _repl
from edgevlm.cli.loading import BackgroundLoad, LoadAborted
from edgevlm.errors import InvalidModelError, MemoryBudgetError


def _event(stage: LoadStage) -> LoadProgress:
    return LoadProgress(stage, 0.0, 0.0)


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

    read_end, write_end = os.pipe()
    monkeypatch.setattr(sys, "stdin", os.fdopen(read_end, "r"))
    loading = BackgroundLoad(load)
    loading.start()
    session = ChatSession(loading, system=None, sampling={"max_tokens": 2})
    unblock = threading.Timer(20, lambda: os.write(write_end, b"/quit\n"))  # fail, not hang, if never woken
    unblock.start()
    try:
        with pytest.raises(InvalidModelError, match="damaged"):
            _repl(session)
    finally:
        unblock.cancel()
        os.close(write_end)
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
