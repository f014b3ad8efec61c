"""The Starlette application and its uvicorn runner.

Routes: ``POST /v1/chat/completions`` (JSON or server-sent events),
``GET /v1/models``, ``GET /v1/models/{id}``, ``GET /health``. Errors are
OpenAI-shaped JSON (``{"error": {"message", "type", "param", "code"}}``) with
a 4xx status for bad input and 5xx for the server's own failures; a Python
traceback never reaches a client.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hmac
import json
import logging
import socket
import uuid
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING, Any

from edgevlm.errors import ContextOverflowError, EdgeVLMError, ImageError, ImageNotFoundError, InvalidRequestError
from edgevlm.server.config import ServerConfig
from edgevlm.server.protocol import (ResponseHead, chunk_body, completion_body, error_body, finish_reason,
                                     parse_chat_request, usage_chunk)
from edgevlm.server.sources import RequestRejected
from edgevlm.server.worker import Failed, Finished, Job, ModelWorker, Piece, QueueFull

if TYPE_CHECKING:  # pragma: no cover
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import Response

    from edgevlm import VLM

LOG = logging.getLogger("edgevlm.server")
#: How often a non-streaming handler checks whether its client is still there.
DISCONNECT_POLL_S = 0.2


def require_serve_extra() -> None:
    """Raises InvalidRequestError naming the missing package when the ``serve`` extra is not installed."""
    try:
        import sse_starlette  # noqa: F401
        import starlette  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as exc:
        raise InvalidRequestError(f"edgevlm serve needs the 'serve' extra ({exc.name} is missing): "
                                  f"pip install 'edgevlm[serve]'") from None


def create_app(vlm: VLM, config: ServerConfig | None = None) -> Starlette:
    """The OpenAI-compatible application serving ``vlm``.

    Args:
        vlm: the loaded model (the application runs it on one worker thread).
        config: policy and limits (default :class:`ServerConfig`).

    Returns:
        A Starlette application (ASGI); the worker is stopped when it shuts down.

    Raises:
        InvalidRequestError: the ``serve`` extra is not installed.
    """
    require_serve_extra()
    from starlette.applications import Starlette
    from starlette.routing import Route

    config = config or ServerConfig()
    api = _Api(vlm, config)

    @contextlib.asynccontextmanager
    async def lifespan(_app: Starlette) -> AsyncIterator[None]:
        yield
        api.worker.close()

    routes = [Route("/v1/chat/completions", api.guarded(api.chat_completions), methods=["POST"]),
              Route("/v1/models", api.guarded(api.models), methods=["GET"]),
              Route("/v1/models/{model_id:path}", api.guarded(api.model), methods=["GET"]),
              Route("/health", api.health, methods=["GET"])]
    app = Starlette(routes=routes, lifespan=lifespan)
    app.state.api = api
    return app


def error_response(exc: EdgeVLMError) -> Response:
    """The HTTP answer to an edgevlm error: 4xx for the client's input, 5xx for the server's failures."""
    from starlette.responses import JSONResponse

    message = " ".join(str(exc).split())
    headers: dict[str, str] = {}
    if isinstance(exc, RequestRejected):
        status, code, param = exc.status, exc.code, exc.param
        if isinstance(exc, QueueFull):
            headers["Retry-After"] = str(exc.retry_after)
    elif isinstance(exc, ContextOverflowError):
        status, code, param = 400, "context_length_exceeded", "messages"
    elif isinstance(exc, ImageNotFoundError):
        status, code, param = 400, "image_not_found", "messages"
    elif isinstance(exc, ImageError):
        status, code, param = 400, "invalid_image", "messages"
    elif isinstance(exc, (InvalidRequestError, ValueError)):
        status, code, param = 400, "invalid_request", None
    else:
        status, code, param = 500, "server_error", None
    kind = "invalid_request_error" if status < 500 else "server_error"
    if status == 401:
        kind = "authentication_error"
    return JSONResponse(error_body(message, kind=kind, code=code, param=param), status_code=status,
                        headers=headers)


class _Api:
    """The handlers, sharing the model worker and the policy."""

    def __init__(self, vlm: VLM, config: ServerConfig) -> None:
        self.vlm = vlm
        self.config = config
        self.worker = ModelWorker(vlm, config.max_queue)

    # ------------------------------------------------------------------ guards
    def guarded(self, handler: Callable[[Request], Any]) -> Callable[[Request], Any]:
        """``handler`` behind the API key check, with edgevlm errors turned into responses."""
        async def run(request: Request) -> Response:
            try:
                self._check_key(request)
                return await handler(request)
            except EdgeVLMError as exc:
                return error_response(exc)
            except Exception:  # never a traceback to the client
                LOG.exception("handler failed")
                return error_response(EdgeVLMError("internal server error; see the server log"))
        return run

    def _check_key(self, request: Request) -> None:
        if self.config.api_key is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, given = header.partition(" ")
        ok = scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), self.config.api_key.encode())
        if not ok:
            raise RequestRejected("invalid or missing API key (send 'Authorization: Bearer KEY')", status=401,
                                  code="invalid_api_key")

    async def _json_body(self, request: Request) -> object:
        declared = request.headers.get("content-length")
        limit = self.config.max_body_bytes
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise RequestRejected(f"the request body is {declared} bytes; the limit is {limit}", status=413,
                                  code="request_too_large")
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise RequestRejected(f"the request body exceeds {limit} bytes", status=413,
                                      code="request_too_large")
            chunks.append(chunk)
        try:
            return json.loads(b"".join(chunks))
        except (ValueError, UnicodeDecodeError):
            raise RequestRejected("the request body is not valid JSON") from None

    # ------------------------------------------------------------------ routes
    async def health(self, _request: Request) -> Response:
        from starlette.responses import JSONResponse

        counters = dataclasses.asdict(self.worker.counters)
        return JSONResponse({"status": "ok", "model": self.config.model_id, "requests": self.worker.in_flight,
                             "max_queue": self.config.max_queue, **counters})

    def _model_card(self) -> dict[str, Any]:
        modalities = ["text", "image"] if self.vlm.vision_engine else ["text"]
        return {"id": self.config.model_id, "object": "model", "created": int(self.vlm.model_path.stat().st_mtime),
                "owned_by": "edgevlm", "input_modalities": modalities, "output_modalities": ["text"],
                "family": self.vlm.family, "context_length": self.vlm.n_ctx}

    async def models(self, _request: Request) -> Response:
        from starlette.responses import JSONResponse

        return JSONResponse({"object": "list", "data": [self._model_card()]})

    async def model(self, request: Request) -> Response:
        from starlette.responses import JSONResponse

        if request.path_params["model_id"] != self.config.model_id:
            raise RequestRejected(f"no model {request.path_params['model_id']!r}; this server has "
                                  f"{self.config.model_id!r}", status=404, code="model_not_found", param="model")
        return JSONResponse(self._model_card())

    async def chat_completions(self, request: Request) -> Response:
        body = await self._json_body(request)
        chat = await asyncio.to_thread(parse_chat_request, body, self.config, self.vlm.n_ctx)
        job = self.worker.submit(chat)
        head = ResponseHead(f"chatcmpl-{uuid.uuid4().hex}", self.config.model_id)
        if chat.stream:
            return await self._stream(request, job, head, chat.include_usage)
        return await self._complete(request, job, head, chat.logprobs)

    async def _complete(self, request: Request, job: Job, head: ResponseHead, logprobs: bool) -> Response:
        from starlette.responses import JSONResponse

        watcher = asyncio.create_task(_cancel_on_disconnect(request, job))
        pieces: list[str] = []
        tokens = []
        try:
            while True:
                event = await job.events.get()
                if isinstance(event, Failed):
                    return error_response(event.error)
                tokens.extend(event.logprobs)
                if isinstance(event, Finished):
                    body = completion_body(head, "".join(pieces), event.stats, tokens if logprobs else None)
                    return JSONResponse(body)
                pieces.append(event.text)
        finally:
            job.cancel.set()  # no-op when finished; stops generation when the handler is torn down
            watcher.cancel()

    async def _stream(self, request: Request, job: Job, head: ResponseHead, include_usage: bool) -> Response:
        from sse_starlette.sse import EventSourceResponse

        watcher = asyncio.create_task(_cancel_on_disconnect(request, job))
        try:
            first = await job.events.get()  # errors before the first token are still a proper HTTP status
        finally:
            watcher.cancel()
        if isinstance(first, Failed):
            return error_response(first.error)
        return EventSourceResponse(_sse_events(first, job, head, include_usage), ping=15,
                                   headers={"Cache-Control": "no-cache"})


async def _cancel_on_disconnect(request: Request, job: Job) -> None:
    while not job.cancel.is_set():
        if await request.is_disconnected():
            job.cancel.set()
            return
        await asyncio.sleep(DISCONNECT_POLL_S)


async def _sse_events(first: Piece | Finished, job: Job, head: ResponseHead,
                      include_usage: bool) -> AsyncIterator[str]:
    """The stream's ``data:`` payloads; a client gone away cancels the generation (``finally``)."""
    try:
        yield json.dumps(chunk_body(head, {"role": "assistant", "content": ""}))
        event: Piece | Finished | Failed = first
        while True:
            if isinstance(event, Failed):
                error = error_body(" ".join(str(event.error).split()), kind="server_error", code="generation_failed")
                yield json.dumps(error)
                break
            if isinstance(event, Finished):
                yield json.dumps(chunk_body(head, {}, finish=finish_reason(event.stats), logprobs=event.logprobs))
                if include_usage:
                    yield json.dumps(usage_chunk(head, event.stats))
                break
            yield json.dumps(chunk_body(head, {"content": event.text}, logprobs=event.logprobs))
            event = await job.events.get()
        yield "[DONE]"
    finally:
        job.cancel.set()


def bind_socket(host: str, port: int) -> socket.socket:
    """A listening socket on ``host:port`` (port 0: a free one), so the URL is known before serving.

    Raises:
        InvalidRequestError: the address cannot be bound (in use, no such interface).
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise InvalidRequestError(f"cannot listen on {host}:{port}: {exc.strerror or exc}; "
                                  f"choose another --port or --host") from None
    sock.listen(128)
    sock.set_inheritable(True)
    return sock


def serve(vlm: VLM, config: ServerConfig, sock: socket.socket, *, verbose: bool = False) -> None:
    """Serve ``vlm`` on the bound ``sock`` until SIGINT/SIGTERM.

    Raises:
        InvalidRequestError: the ``serve`` extra is not installed.
    """
    import uvicorn

    app = create_app(vlm, config)
    server = uvicorn.Server(uvicorn.Config(app, log_level="info" if verbose else "warning",
                                           access_log=verbose, timeout_graceful_shutdown=5,
                                           lifespan="on"))
    server.run(sockets=[sock])
