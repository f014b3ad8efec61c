"""Loading a model in a worker thread, so that ``edgevlm chat`` asks for the question at once."""

from __future__ import annotations

import _thread
import signal
import threading
from typing import TYPE_CHECKING, Callable

from edgevlm import LoadProgress, LoadStage
from edgevlm.errors import EdgeVLMError, RuntimeFailure

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
            _wake_main_thread()  # the REPL then ends the chat with this error

    @property
    def loaded(self) -> bool:
        return self._done.is_set() and self.error is None

    def wait(self) -> VLM:
        """The loaded model (waits for it).

        Raises:
            EdgeVLMError: the load failed or was stopped.
        """
        self._done.wait()
        self.raise_failure()
        if self._vlm is None:
            raise RuntimeFailure("the model load was stopped")
        return self._vlm

    def failure(self) -> EdgeVLMError | None:
        """The load's failure as an edgevlm error; None while loading, once loaded, or when stopped here."""
        error = self.error
        if not self._done.is_set() or error is None or isinstance(error, LoadAborted):
            return None
        if isinstance(error, EdgeVLMError):
            return error
        return RuntimeFailure(f"the model could not be loaded: {error or type(error).__name__}")

    def raise_failure(self) -> None:
        """Raise the load's failure, if it failed (after an interrupt, to tell it from Ctrl-C)."""
        failure = self.failure()
        if failure is not None:
            raise failure from (self.error if failure is not self.error else None)

    def close(self) -> None:
        """Stop a load in progress (at its next progress event) and wait for the thread."""
        self._abort.set()
        if self._thread.is_alive():
            self._thread.join()


def _wake_main_thread() -> None:
    """Interrupt the main thread's ``input()``: a real SIGINT ends the read it is blocked in
    (``interrupt_main`` alone would wait for that read to return), where the platform has one."""
    if hasattr(signal, "pthread_kill"):
        signal.pthread_kill(threading.main_thread().ident or 0, signal.SIGINT)
    else:  # pragma: no cover - Windows: honoured once input() returns; the REPL also checks at each prompt
        _thread.interrupt_main()
