"""One model, one thread: requests queued (bounded), each streamed back to its handler.

The model runs on a single worker thread (a :class:`~edgevlm.generation.TextStream`
is iterated by the thread that started it, and the model serves one request
at a time). Handlers on the event loop :meth:`ModelWorker.submit` a request
and read :class:`Piece`/:class:`Finished`/:class:`Failed` events from an
:class:`asyncio.Queue`; setting the request's cancel event (the client went
away, the server stops) ends its generation within one token, or skips it if
it has not started.
"""

from __future__ import annotations

import asyncio
import logging
import math
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Union

from edgevlm.errors import EdgeVLMError, RuntimeFailure
from edgevlm.server.protocol import ChatRequest
from edgevlm.server.sources import RequestRejected

if TYPE_CHECKING:  # pragma: no cover
    from edgevlm import VLM
    from edgevlm.stats import GenerationStats, TokenLogprob

LOG = logging.getLogger("edgevlm.server")


@dataclass(frozen=True)
class Piece:
    """Text streamed, with the log-probabilities of the tokens generated since the last piece."""

    text: str
    logprobs: tuple[TokenLogprob, ...] = ()


@dataclass(frozen=True)
class Finished:
    """The reply ended; ``logprobs`` holds tokens not yet reported with a piece."""

    stats: GenerationStats
    logprobs: tuple[TokenLogprob, ...] = ()


@dataclass(frozen=True)
class Failed:
    """The request failed; ``error`` says why (the handler maps it to an HTTP status)."""

    error: EdgeVLMError


Event = Union[Piece, Finished, Failed]


class QueueFull(RequestRejected):
    """Too many requests are waiting; ``retry_after`` is the suggested wait in seconds."""

    def __init__(self, waiting: int, retry_after: int) -> None:
        super().__init__(f"the server is busy: {waiting} requests are waiting; retry in {retry_after} s",
                         status=503, code="server_busy")
        self.retry_after = retry_after


@dataclass
class WorkerCounters:
    """What the worker has done since it started (``GET /health`` reports it)."""

    completed: int = 0
    cancelled: int = 0
    failed: int = 0
    generated_tokens: int = 0


@dataclass(eq=False)  # hashed by identity: the worker keeps a set of them
class Job:
    """A submitted request: its events, its cancel event."""

    events: asyncio.Queue[Event]
    cancel: threading.Event = field(default_factory=threading.Event)


class ModelWorker:
    """Runs requests on the model one at a time, at most ``max_queue`` waiting.

    Args:
        vlm: the loaded model.
        max_queue: requests allowed to wait behind the running one.
    """

    def __init__(self, vlm: VLM, max_queue: int) -> None:
        self.vlm = vlm
        self.max_queue = max_queue
        self.in_flight = 0  # running + waiting; changed on the event loop only
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="edgevlm-model")
        self._durations: deque[float] = deque(maxlen=32)
        self._jobs: set[Job] = set()
        self.counters = WorkerCounters()

    def submit(self, request: ChatRequest) -> Job:
        """Queue ``request``; its events arrive on the returned job's queue (on the running loop).

        Raises:
            QueueFull: ``max_queue`` requests are already waiting.
        """
        waiting = max(0, self.in_flight - 1)
        if self.in_flight > 0 and waiting >= self.max_queue:
            raise QueueFull(waiting, self.retry_after())
        loop = asyncio.get_running_loop()
        job = Job(asyncio.Queue())
        self.in_flight += 1
        self._jobs.add(job)
        future = loop.run_in_executor(self._executor, self._run, request, job, loop)
        future.add_done_callback(lambda _f: self._done(job))
        return job

    def retry_after(self) -> int:
        """Seconds until a place in the queue is likely free (from recent request times)."""
        typical = sorted(self._durations)[len(self._durations) // 2] if self._durations else 1.0
        return max(1, math.ceil(typical))

    def cancel_all(self) -> None:
        """Stop the running request and skip the waiting ones (server shutdown)."""
        for job in list(self._jobs):
            job.cancel.set()

    def close(self) -> None:
        self.cancel_all()
        self._executor.shutdown(wait=True, cancel_futures=True)

    def _done(self, job: Job) -> None:
        self.in_flight -= 1
        self._jobs.discard(job)

    def _run(self, request: ChatRequest, job: Job, loop: asyncio.AbstractEventLoop) -> None:
        """On the worker thread: generate, posting events to the handler's queue."""
        def post(event: Event) -> None:
            try:
                loop.call_soon_threadsafe(job.events.put_nowait, event)
            except RuntimeError:  # the event loop has closed (server shutdown): nobody is listening
                job.cancel.set()

        if job.cancel.is_set():
            self.counters.cancelled += 1
            post(Failed(RuntimeFailure("the request was cancelled before it started")))
            return
        started = time.perf_counter()
        try:
            stream = self.vlm.stream(request.messages, cancel=job.cancel, **request.sampling)
            reported = 0
            for text in stream:
                post(Piece(text, tuple(stream.logprobs[reported:])))
                reported = len(stream.logprobs)
            assert stream.stats is not None
            self._count(stream.stats)
            post(Finished(stream.stats, tuple(stream.logprobs[reported:])))
        except EdgeVLMError as exc:
            self.counters.failed += 1
            post(Failed(exc))
        except Exception:  # never a traceback to the client; the server log keeps it
            LOG.exception("request failed")
            self.counters.failed += 1
            post(Failed(RuntimeFailure("internal error while generating; see the server log")))
        finally:
            self._durations.append(time.perf_counter() - started)

    def _count(self, stats: GenerationStats) -> None:
        self.counters.generated_tokens += stats.completion_tokens
        if stats.finish_reason == "cancelled":
            self.counters.cancelled += 1
        else:
            self.counters.completed += 1
