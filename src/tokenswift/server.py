"""`tokenswift serve`: an OpenAI-compatible HTTP server over one loaded model.

Endpoints: POST /v1/completions, POST /v1/chat/completions (streamed as server-sent events or
not), GET /v1/models, GET /health. One generation runs at a time on one worker thread (the
model is not thread-safe); further requests wait in a bounded FIFO queue and get 429 when it is
full. A client that disconnects cancels its generation at the next iteration.

This module is the app: HTTP endpoints, authentication, the request body limit. The protocol
(schemas, requests -> jobs, response shapes, errors) is in protocol.py, the worker and its
queue in scheduler.py. fastapi and uvicorn are imported only when an app is built, so the
library works without them (`pip install 'tokenswift[serve]'`). This module never prints: it
logs one line per request.
"""

# No `from __future__ import annotations`: FastAPI and pydantic read the annotations of the
# request models and endpoints defined inside `create_app`, which must be real objects.

import asyncio
import hmac
import logging
import socket
import time
from typing import Any, Sequence

from .api import LM
from .params import json_problem
from .protocol import ApiError, chunk, completion_body, prepare, schemas, sse, usage, validation_error
from .scheduler import Busy, Job, Scheduler

log = logging.getLogger("tokenswift.server")

DISCONNECT_POLL_S = 0.25  # how often a non-streamed request checks that its client is still there


# -- the app -----------------------------------------------------------------------------------


async def _reply(scope: Any, receive: Any, send: Any, err: ApiError) -> None:
    from starlette.responses import JSONResponse

    log.info("%s %s -> %d %s", scope.get("method"), scope.get("path"), err.status, err.message)
    await JSONResponse(err.body(), status_code=err.status)(scope, receive, send)


class BearerAuth:
    """ASGI middleware: every path but /health (the API, /docs and /openapi.json alike) needs
    `Authorization: Bearer KEY`. Plain ASGI, so that streaming responses and their disconnect
    handling pass through untouched. The key (ASCII) is compared with the header's bytes."""

    def __init__(self, app: Any, key: str) -> None:
        self.app, self.key = app, key.encode("ascii")

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope["path"] != "/health":
            auth = dict(scope.get("headers") or []).get(b"authorization", b"")
            scheme, _, given = auth.partition(b" ")
            if scheme.lower() != b"bearer" or not hmac.compare_digest(given.strip(), self.key):
                why = "missing API key: send Authorization: Bearer KEY" if not auth else "incorrect API key"
                await _reply(scope, receive, send, ApiError(401, why, code="invalid_api_key"))
                return
        await self.app(scope, receive, send)


class BodyLimit:
    """ASGI middleware: a request body over `limit` bytes gets 413 before it is read whole (by
    its Content-Length, or by counting a chunked body as it arrives), so a huge prompt costs
    neither the memory to hold it nor the time to parse it."""

    def __init__(self, app: Any, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        too_big = ApiError(413, f"request body larger than {self.limit} bytes (tokenswift serve --max-body-bytes)",
                           code="request_too_large")
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.limit):
            await _reply(scope, receive, send, too_big)
            return
        seen = 0

        async def counted() -> Any:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    raise _TooBig(too_big)
            return message

        try:
            await self.app(scope, counted, send)
        except _TooBig:
            await _reply(scope, receive, send, too_big)


class _TooBig(Exception):
    def __init__(self, error: ApiError) -> None:
        super().__init__(error.message)
        self.error = error


MAX_BODY_BYTES = 4 << 20  # default request body limit: ~100x the text of a 32K-token prompt


def create_app(lm: LM, names: Sequence[str] = (), api_key: str | None = None, queue_size: int = 16,
               max_body_bytes: int = MAX_BODY_BYTES) -> Any:
    """The FastAPI app serving `lm`. `names`: the model names requests may give (the first is
    the one reported; `lm.name` is always accepted). `api_key`: None serves without a key; an
    empty key is refused (it would look like protection and be none)."""
    from contextlib import asynccontextmanager

    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse
    from starlette.exceptions import HTTPException

    names = tuple(dict.fromkeys([lm.name, *names]))
    if queue_size < 1:
        raise ValueError(f"queue_size must be >= 1, got {queue_size}")
    if api_key is not None:
        check_api_key(api_key)
    if max_body_bytes < 1:
        raise ValueError(f"max_body_bytes must be >= 1, got {max_body_bytes}")
    scheduler = Scheduler(lm, queue_size)
    bodies = schemas()

    @asynccontextmanager
    async def lifespan(app: Any):
        scheduler.start()
        yield
        scheduler.stop()

    app = FastAPI(title="tokenswift", lifespan=lifespan)
    app.state.scheduler = scheduler
    if api_key is not None:
        app.add_middleware(BearerAuth, key=api_key)
    app.add_middleware(BodyLimit, limit=max_body_bytes)  # added last: runs first

    @app.exception_handler(ApiError)
    async def on_api_error(request: Request, exc: ApiError) -> JSONResponse:
        return error_response(request, exc)

    @app.exception_handler(RequestValidationError)
    async def on_validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        return error_response(request, validation_error(errors[0] if errors else {}))

    @app.exception_handler(HTTPException)
    async def on_http(request: Request, exc: HTTPException) -> JSONResponse:
        if isinstance(exc.__cause__, _TooBig):  # FastAPI wraps what its body read raised
            return error_response(request, exc.__cause__.error)
        detail = str(exc.detail)
        if exc.status_code == 400 and detail == "There was an error parsing the body":
            # FastAPI's words say less than the parser's error it wraps
            cause = exc.__cause__
            detail = "malformed JSON in the request body: " + (
                json_problem(cause) if isinstance(cause, (ValueError, RecursionError)) else "it must be UTF-8 encoded JSON")
        return error_response(request, ApiError(exc.status_code, detail))

    @app.post("/v1/completions")
    async def completions(body: bodies.Completion, request: Request) -> Any:
        return await handle(request, body, False, lm, names, scheduler)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: bodies.Chat, request: Request) -> Any:
        return await handle(request, body, True, lm, names, scheduler)

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        created = int(time.time())
        return {"object": "list", "data": [{"id": names[0], "object": "model", "created": created,
                                            "owned_by": "tokenswift"}]}

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "model": names[0], **scheduler.snapshot()}

    return app


async def handle(request: Any, body: Any, chat: bool, lm: LM, names: Sequence[str], scheduler: Scheduler) -> Any:
    """One completion request: validated and tokenized off the event loop, queued, answered."""
    from fastapi.responses import StreamingResponse
    from starlette.background import BackgroundTask

    # tokenizing a long prompt takes a while: never on the event loop, which answers /health
    job = await asyncio.to_thread(prepare, lm, body, chat, names, scheduler.tok_lock)
    job.loop, job.events = asyncio.get_running_loop(), asyncio.Queue()
    try:
        scheduler.submit(job)
    except Busy as e:
        job.steps.close()
        raise ApiError(429, str(e), type="rate_limit_error", code="queue_full") from None
    if body.stream:
        # the generator's `finally` cancels on disconnect; the background task also covers a
        # generator left suspended at a `yield` (only closed when garbage-collected)
        return StreamingResponse(stream(request, job, scheduler), media_type="text/event-stream",
                                 background=BackgroundTask(scheduler.cancel, job))
    try:
        return await respond(request, job, scheduler)
    finally:
        scheduler.cancel(job)  # no-op once finished; stops the run if this handler is cancelled


async def respond(request: Any, job: Job, scheduler: Scheduler) -> Any:
    """The reply of a non-streamed request, once its job is done; cancels the job when the
    client leaves first."""
    from fastapi.responses import JSONResponse, Response

    parts: list[str] = []
    checked = time.monotonic()
    while True:
        try:
            kind, payload = await asyncio.wait_for(job.events.get(), DISCONNECT_POLL_S)
        except asyncio.TimeoutError:
            kind = payload = None
        # by the clock, not on timeouts only: a fast run sends events more often than the poll
        if time.monotonic() - checked >= DISCONNECT_POLL_S:
            checked = time.monotonic()
            if await request.is_disconnected():
                scheduler.cancel(job)
                log.info("%s %s: client left, cancelled", request.url.path, job.id)
                return Response(status_code=499)  # nobody reads it
        if kind is None:
            continue
        if kind == "text":
            parts.append(payload)
        elif kind == "done":
            log_done(request, job, payload)
            return JSONResponse(completion_body(job, "".join(parts), payload))
        else:
            raise ApiError(500, payload, type="server_error")

async def stream(request: Any, job: Job, scheduler: Scheduler) -> Any:
    """The server-sent events of a streamed request; cancels the job when the client leaves."""
    finished = False
    try:
        if job.chat:
            yield sse(chunk(job, role=True))
        while True:
            kind, payload = await job.events.get()
            if kind == "text":
                yield sse(chunk(job, payload))
                continue
            if kind == "done":
                log_done(request, job, payload)
                last = chunk(job, finish=payload["finish_reason"])
                last["tokenswift"] = payload["stats"]
                yield sse(last)
                if job.include_usage:
                    yield sse({**chunk(job, choices=False), "usage": usage(job, payload)})
            else:
                log.info("%s %s -> error %s", request.url.path, job.id, payload)
                yield sse(ApiError(500, payload, type="server_error").body())
            finished = True
            yield "data: [DONE]\n\n"
            return
    finally:
        # Starlette cancels this generator when the client disconnects
        scheduler.cancel(job)
        if not finished:
            log.info("%s %s: client left, cancelled", request.url.path, job.id)

def log_done(request: Any, job: Job, done: dict[str, Any]) -> None:
    st = done["stats"]
    log.info("%s %s -> 200 %s: %d+%d tokens, finish %s, %.2f s (queued %.2f s), %.1f tok/s decode",
             request.url.path, job.id, job.method, job.prompt_tokens, done["completion_tokens"],
             done["finish_reason"], st.get("seconds", 0.0), st["queue_seconds"],
             st.get("decode_tokens_per_s", 0.0))


def error_response(request: Any, err: ApiError) -> Any:
    from fastapi.responses import JSONResponse

    log.info("%s %s -> %d %s", request.method, request.url.path, err.status, err.message)
    headers = {"Retry-After": "1"} if err.status == 429 else None
    return JSONResponse(err.body(), status_code=err.status, headers=headers)


def check_api_key(key: str, name: str = "api_key") -> None:
    """An API key must be non-empty printable ASCII with no spaces: it travels in an HTTP header,
    which HTTP clients (the openai client among them) send as ASCII only, so a key with any other
    character could never be sent. `name`: how the caller's user set it."""
    if not key:
        raise ValueError(f"{name} is empty: give a key, or leave it out to serve without one")
    bad = next((c for c in key if c.isspace() or not c.isprintable()), None)
    if bad is not None:
        raise ValueError(f"{name} must not contain spaces or control characters, got {bad!r} in it")
    bad = next((c for c in key if not c.isascii()), None)
    if bad is not None:
        raise ValueError(f"{name} must be ASCII (HTTP clients send headers as ASCII), got {bad!r} in it")


def bind(host: str, port: int) -> socket.socket:
    """A listening socket (port 0: any free port). Raises OSError (address in use, bad host)."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    family, kind, proto, _, addr = infos[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(addr)
        sock.listen(128)
    except OSError:
        sock.close()
        raise
    return sock


def make_server(lm: LM, names: Sequence[str] = (), api_key: str | None = None, queue_size: int = 16,
                max_body_bytes: int = MAX_BODY_BYTES) -> Any:
    """A uvicorn.Server for the app; run it with `.run(sockets=[bind(host, port)])`. uvicorn's
    own logging config is left out: its records go to the `logging` setup of the caller."""
    import uvicorn

    app = create_app(lm, names=names, api_key=api_key, queue_size=queue_size, max_body_bytes=max_body_bytes)
    config = uvicorn.Config(app, log_config=None, access_log=False, timeout_graceful_shutdown=3)
    return uvicorn.Server(config)
