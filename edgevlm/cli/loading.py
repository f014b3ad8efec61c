"""Loading a model in a worker thread, so that ``edgevlm chat`` asks for the question at once."""

from __future__ import annotations

import signal
import threading
from typing import TYPE_CHECKING, Callable

from edgevlm.errors import EdgeVLMError
from edgevlm import LoadProgress, LoadStage

if TYPE_CHECKING:  # pragma: no cover
    from edgevlm import VLM

#: Stages at which a load has passed every check that reads no weights (files, headers, family,
#: settings, memory budget): its failures from here on are reported while the user types.
_READING_WEIGHTS = {LoadStage.LOADING_LLM, LoadStage.LOADING_PROJECTOR, LoadStage.CREATING_CONTEXT,
                    LoadStage.READY}


class LoadAborted(Exception):
    """Raised from the progress callback to stop a load nobody waits for any more."""


class BackgroundLoad:
    """``edgevlm.load`` in a worker thread.

    :meth:`start` returns once the load reads weights, so a missing file, a
    bad setting or a refused memory budget still fails at once, as a plain
    load does. A failure after that interrupts the main thread (which is
    usually waiting in ``input()``); :meth:`wait` raises it.

    Args:
        load: calls :func:`edgevlm.load` with the progress callback it is given.
    """

    def __init__(self, load: Callable[[Callable[[LoadProgress], None]], VLM]) -> None:
        self._load = load
        self._reading = threading.Event()
        self._done = threading.Event()
        self._abort = threading.Event()
        self._vlm: VLM | None = None
        self.error: BaseException | None = None
        #: set by the REPL while it waits in ``input()``: only then does a failure interrupt it
        self.at_prompt = threading.Event()
        self._thread = threading.Thread(target=self._run, name="edgevlm-load", daemon=True)

    def start(self) -> None:
        """Start loading; return when the weights are being read.

        Raises:
            EdgeVLMError: the load failed before reading weights.
        """
        self._thread.start()
        self._reading.wait()
        if self._done.is_set() and self.error is not None:
            raise self.error

    def _progress(self, event: LoadProgress) -> None:
        if self._abort.is_set():
            raise LoadAborted("the chat ended before the model was loaded")
        if event.stage in _READING_WEIGHTS:
            self._reading.set()

    def _run(self) -> None:
        try:
            self._vlm = self._load(self._progress)
        except BaseException as exc:  # noqa: BLE001 - handed to the thread that waits
            self.error = exc
        finally:
            reported_later = self._reading.is_set()
            self._done.set()
            self._reading.set()
        if self.error is not None and reported_later and self.at_prompt.is_set() and not self._abort.is_set():
            # wake the prompt (a real SIGINT: it also ends the read input() is blocked in);
            # the REPL then ends the chat with this error
            signal.pthread_kill(threading.main_thread().ident or 0, signal.SIGINT)

    @property
    def loaded(self) -> bool:
        return self._done.is_set() and self.error is None

    def wait(self) -> VLM:
        """The loaded model (waits for it).

        Raises:
            EdgeVLMError: the load failed.
        """
        self._done.wait()
        if self.error is not None:
            raise self.error
        assert self._vlm is not None
        return self._vlm

    def raise_failure(self) -> None:
        """Raise the load's failure, if it failed (after an interrupt, to tell it from Ctrl-C)."""
        if self._done.is_set() and isinstance(self.error, EdgeVLMError):
            raise self.error

    def close(self) -> None:
        """Stop a load in progress (at its next progress event) and wait for the thread."""
        self._abort.set()
        if self._thread.is_alive():
            self._thread.join()
