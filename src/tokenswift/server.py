"""`tokenswift serve`: an OpenAI-compatible HTTP server over one loaded model.

Endpoints: POST /v1/completions, POST /v1/chat/completions (streamed as server-sent events or
not), GET /v1/models, GET /health. One generation runs at a time on one worker thread (the
model is not thread-safe); further requests wait in a bounded FIFO queue and get 429 when it is
full. A client that disconnects cancels its generation at the next iteration.

fastapi and uvicorn are imported only when an app is built, so the library works without them
(`pip install 'tokenswift[serve]'`). This module never prints: it logs one line per request.
"""

# No `from __future__ import annotations`: FastAPI and pydantic read the annotations of the
# request models and endpoints defined inside `create_app`, which must be real objects.

import asyncio
import collections
import functools
import hmac
import json
import logging
import socket
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence

from .api import LM, TextStream
from .config import rename_params
from .engine import Step

log = logging.getLogger("tokenswift.server")

MAX_STOPS = 4  # OpenAI's limit on stop strings
COMPLETION_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions
DISCONNECT_POLL_S = 0.25  # how often a non-streamed request checks that its client is still there
# The run's stats returned in the `tokenswift` field (the rest is planner detail for `--stats`).
PUBLIC_STATS = ("method", "iterations", "new_tokens", "seconds", "prefill_seconds", "decode_seconds", "tokens_per_s",
                "decode_tokens_per_s", "acceptance_rate", "tokens_per_iteration", "accepted_draft_tokens",
                "ngram_share", "mean_trie_size")


# -- stop strings ------------------------------------------------------------------------------


class StopMatcher:
    """Cuts streamed text before the first stop string.

    `push(piece)` returns `(text, hit)`: the text that is safe to emit, and whether a stop
    string has appeared. Until one appears it holds back the longest tail that could still grow
    into a stop string; once one appears it returns the text before it (the stop string itself
    is never emitted) and nothing after. Of several stop strings, the one that starts first wins.
    `flush()` releases the held-back tail when the generation ends without a stop.
    """

    def __init__(self, stops: Sequence[str] = ()) -> None:
        self.stops = [s for s in stops if s]
        self.longest = max((len(s) for s in self.stops), default=0)
        self.held = ""
        self.hit = False

    def push(self, piece: str) -> tuple[str, bool]:
        if self.hit:
            return "", True
        text = self.held + piece
        starts = [i for i in (text.find(s) for s in self.stops) if i >= 0]
        if starts:
            self.held, self.hit = "", True
            return text[: min(starts)], True
        keep = self._partial(text)
        self.held = text[len(text) - keep :]
        return text[: len(text) - keep], False

    def _partial(self, text: str) -> int:
        """Length of the longest tail of `text` that some stop string begins with."""
        for k in range(min(len(text), self.longest - 1), 0, -1):
            tail = text[-k:]
            if any(s.startswith(tail) for s in self.stops):
                return k
        return 0

    def flush(self) -> str:
        out, self.held = self.held, ""
        return "" if self.hit else out


# -- errors ------------------------------------------------------------------------------------


class ApiError(Exception):
    """An error answered in OpenAI's shape: {"error": {message, type, param, code}}."""

    def __init__(self, status: int, message: str, param: str | None = None,
                 type: str = "invalid_request_error", code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.type, self.code = status, message, param, type, code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


# Names in library messages -> the API's field names.
_SAMPLING_FIELDS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty", "penalty_window", "seed")


def api_error(e: ValueError, prompt_field: str, max_field: str) -> ApiError:
    """A library ValueError as a 400 that names the API's fields (max_tokens, not max_new_tokens)."""
    msg = rename_params(str(e), {"max_new_tokens": max_field, "repetition penalty": "repetition_penalty"})
    msg = msg.replace("--rope-scaling / rope_scaling=", "tokenswift serve --rope-scaling")
    param = next((f for f in (*_SAMPLING_FIELDS, max_field) if msg.startswith(f + " ")), None)
    if param is None:
        if msg.startswith("unknown method"):
            param = "method"
        elif "exceeds the model's context" in msg:
            param = max_field
        elif msg.startswith(("prompt", "the prompt", "messages", "model")):
            param = prompt_field
    return ApiError(400, msg, param)


def _loc_path(loc: Sequence[Any]) -> str:
    """pydantic's error location as a field path, without "body" and union-member tags."""
    parts = [str(p) for p in loc if p != "body" and not (isinstance(p, str) and ("[" in p or p in _TYPE_TAGS))]
    return ".".join(parts)


_TYPE_TAGS = {"str", "int", "float", "bool", "list", "dict", "none"}


def validation_error(err: dict[str, Any]) -> ApiError:
    """The first pydantic/FastAPI validation error as a 400 naming the field and the value."""
    if err.get("type") == "json_invalid":
        return ApiError(400, f"malformed JSON in the request body: {err.get('ctx', {}).get('error', 'bad JSON')}")
    path = _loc_path(err.get("loc", ()))
    if not path:
        return ApiError(400, "the request body must be a JSON object (Content-Type: application/json)")
    param = path.split(".")[0]
    if err.get("type") == "missing":
        return ApiError(400, f"{path} is required", param)
    value = repr(err.get("input"))
    value = value if len(value) <= 80 else value[:77] + "..."
    return ApiError(400, f"{path}: {err.get('msg')}, got {value}", param)


# -- jobs and the worker -----------------------------------------------------------------------


@dataclass(eq=False)  # identity, not field equality: jobs are looked up in the waiting queue
class Job:
    """One accepted request: its step generator (created, not started) and its reply's shape."""

    steps: Iterator[Step]
    stop: StopMatcher
    chat: bool
    model: str
    prompt_tokens: int
    method: str
    include_usage: bool = False
    id: str = ""
    created: int = field(default_factory=lambda: int(time.time()))
    enqueued: float = field(default_factory=time.perf_counter)
    cancelled: threading.Event = field(default_factory=threading.Event)
    loop: asyncio.AbstractEventLoop | None = None
    events: "asyncio.Queue[tuple[str, Any]] | None" = None

    def send(self, kind: str, payload: Any = None) -> None:
        """From the worker thread to the request's event loop."""
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, payload))
        except RuntimeError:  # the loop is closed: the server shut down
            pass


class Busy(Exception):
    pass


class Scheduler:
    """One generation at a time on one worker thread, up to `queue_size` more waiting (FIFO)."""

    def __init__(self, lm: LM, queue_size: int) -> None:
        self.lm = lm
        self.queue_size = queue_size
        self.cv = threading.Condition()
        self.waiting: collections.deque[Job] = collections.deque()
        self.running: Job | None = None
        self.counts = {"completed": 0, "cancelled": 0, "failed": 0}
        # Prompts are tokenized on the event loop while the worker detokenizes: one at a time.
        self.tok_lock = threading.Lock()
        self.thread: threading.Thread | None = None
        self.stopping = False

    def start(self) -> None:
        with self.cv:
            if self.thread is None:
                self.thread = threading.Thread(target=self._work, name="tokenswift-generate", daemon=True)
                self.thread.start()

    def stop(self) -> None:
        with self.cv:
            self.stopping = True
            for job in [*self.waiting, *([self.running] if self.running else [])]:
                job.cancelled.set()
                job.send("error", "the server is shutting down")
            self.waiting.clear()
            self.cv.notify_all()
        if self.thread is not None:
            self.thread.join(timeout=10)

    def submit(self, job: Job) -> None:
        self.start()
        with self.cv:
            # a request that finds the worker idle counts as running, even before the worker pops it
            if len(self.waiting) + (self.running is not None) > self.queue_size:
                raise Busy(f"server busy: 1 generation running and {self.queue_size} waiting "
                           f"(--queue-size {self.queue_size}); retry later")
            self.waiting.append(job)
            self.cv.notify()

    def cancel(self, job: Job) -> None:
        """The client left: a waiting job leaves the queue now, a running one stops at its next step."""
        job.cancelled.set()
        with self.cv:
            if job in self.waiting:
                self.waiting.remove(job)
                self.counts["cancelled"] += 1
                job.steps.close()

    def snapshot(self) -> dict[str, Any]:
        with self.cv:
            return {"running": int(self.running is not None), "queued": len(self.waiting),
                    "queue_size": self.queue_size, **self.counts}

    def _work(self) -> None:
        while True:
            with self.cv:
                while not self.waiting and not self.stopping:
                    self.cv.wait()
                if self.stopping:
                    return
                job = self.running = self.waiting.popleft()
            outcome = self._run(job)
            with self.cv:
                self.running = None
                self.counts[outcome] += 1

    def _run(self, job: Job) -> str:
        """Runs one job, sending its text and its end; returns completed, cancelled or failed."""
        text = TextStream(self.lm.tokenizer)
        produced, stats, finish = 0, {}, "length"
        started = time.perf_counter()
        try:
            if job.cancelled.is_set():  # left while the worker picked it up: skip the prefill
                return "cancelled"
            for step in job.steps:
                if job.cancelled.is_set():
                    return "cancelled"
                produced += len(step.tokens)
                stats = step.stats
                with self.tok_lock:
                    piece = text.push(step.tokens)
                if self._emit(job, piece):
                    finish = "stop"
                    break
                if step.finished:
                    finish = "stop" if stats.get("finish_reason") == "eos" else "length"
            if not job.stop.hit:
                with self.tok_lock:
                    tail = text.flush()
                if self._emit(job, tail):
                    finish = "stop"
                elif rest := job.stop.flush():
                    job.send("text", rest)
            job.send("done", {"finish_reason": finish, "completion_tokens": produced,
                              "stats": public_stats(stats, job, started)})
            return "completed"
        except Exception as e:  # noqa: BLE001 - reported to the client and logged, the worker goes on
            log.exception("generation %s failed", job.id)
            job.send("error", f"generation failed: {e}")
            return "failed"
        finally:
            job.steps.close()  # frees the KV cache now, also when the loop was left early

    @staticmethod
    def _emit(job: Job, piece: str) -> bool:
        out, hit = job.stop.push(piece)
        if out:
            job.send("text", out)
        return hit


def public_stats(stats: dict[str, Any], job: Job, started: float) -> dict[str, Any]:
    out = {k: stats[k] for k in PUBLIC_STATS if k in stats}
    out.setdefault("method", job.method)
    out.setdefault("acceptance_rate", None)  # plain decoding drafts nothing
    out["queue_seconds"] = started - job.enqueued
    return out


# -- requests -> jobs --------------------------------------------------------------------------


def _check_common(body: Any, names: Sequence[str]) -> list[str]:
    """Checks model and n; returns the stop strings."""
    if body.model is not None and body.model not in names:
        raise ApiError(400, f"model {body.model!r} is not served here; this server serves {names[0]!r}", "model",
                       code="model_not_found")
    if body.n is not None and body.n != 1:
        raise ApiError(400, f"n must be 1 (one choice per request), got {body.n}", "n")
    stops = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    if len(stops) > MAX_STOPS:
        raise ApiError(400, f"stop takes at most {MAX_STOPS} strings, got {len(stops)}", "stop")
    if any(not s for s in stops):
        raise ApiError(400, "stop strings must not be empty", "stop")
    return stops


def _chat_messages(body: Any) -> list[dict[str, str]]:
    """OpenAI messages as {role, content} strings: text parts joined, "developer" read as "system"."""
    out = []
    for i, m in enumerate(body.messages):
        content = m.content
        if isinstance(content, list):
            kinds = [p.get("type") for p in content if p.get("type") != "text"]
            if kinds:
                raise ApiError(400, f"messages[{i}].content: only text parts are supported, got type {kinds[0]!r}",
                               "messages")
            content = "".join(str(p.get("text", "")) for p in content)
        out.append({"role": "system" if m.role == "developer" else m.role, "content": content or ""})
    return out


def _prompt(body: Any) -> str | list[int]:
    prompt = body.prompt
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], str):
        if len(prompt) != 1:
            raise ApiError(400, f"prompt: one prompt per request, got a list of {len(prompt)}", "prompt")
        return prompt[0]
    return prompt


def _sampling_kwargs(body: Any) -> dict[str, Any]:
    """The request's sampling and method fields as `LM.steps` keywords (unset ones keep its defaults)."""
    names = {"temperature": "temperature", "top_p": "top_p", "top_k": "top_k", "min_p": "min_p",
             "repetition_penalty": "penalty", "penalty_window": "penalty_window", "ignore_eos": "ignore_eos"}
    kw = {py: getattr(body, api) for api, py in names.items() if getattr(body, api) is not None}
    kw["seed"] = body.seed if body.seed is not None else 0
    kw["method"] = body.method or "tokenswift"
    return kw


def prepare(lm: LM, body: Any, chat: bool, names: Sequence[str], tok_lock: threading.Lock) -> Job:
    """Validates a request and builds its job, so that a bad request never takes a queue slot."""
    stops = _check_common(body, names)
    prompt_field = "messages" if chat else "prompt"
    max_tokens, max_field = body.max_tokens, "max_tokens"
    if chat and body.max_completion_tokens is not None:  # OpenAI's newer name wins over max_tokens
        max_tokens, max_field = body.max_completion_tokens, "max_completion_tokens"
    kw = _sampling_kwargs(body)
    try:
        with tok_lock:
            ids = lm.encode_chat(_chat_messages(body)) if chat else lm.encode(_prompt(body))
        if max_tokens is None:  # chat: the rest of the context (>= 1, so a too-long prompt says so)
            max_tokens = max(1, lm.config.context_length - len(ids)) if chat else COMPLETION_DEFAULT_MAX_TOKENS
        steps = lm.steps(ids, max_tokens, **kw)
    except ValueError as e:
        raise api_error(e, prompt_field, max_field) from None
    prefix = "chatcmpl-" if chat else "cmpl-"
    include_usage = bool(body.stream and body.stream_options and body.stream_options.include_usage)
    return Job(steps=steps, stop=StopMatcher(stops), chat=chat, model=names[0], prompt_tokens=len(ids),
               method=kw["method"], include_usage=include_usage, id=prefix + uuid.uuid4().hex[:24])


# -- response shapes ---------------------------------------------------------------------------


def usage(job: Job, done: dict[str, Any]) -> dict[str, int]:
    n = done["completion_tokens"]
    return {"prompt_tokens": job.prompt_tokens, "completion_tokens": n, "total_tokens": job.prompt_tokens + n}


def completion_body(job: Job, text: str, done: dict[str, Any]) -> dict[str, Any]:
    choice: dict[str, Any] = {"index": 0}
    if job.chat:
        choice["message"] = {"role": "assistant", "content": text}
    else:
        choice["text"] = text
    choice.update(finish_reason=done["finish_reason"], logprobs=None)
    return {"id": job.id, "object": "chat.completion" if job.chat else "text_completion", "created": job.created,
            "model": job.model, "choices": [choice], "usage": usage(job, done), "tokenswift": done["stats"]}


def chunk(job: Job, text: str | None = None, finish: str | None = None, role: bool = False,
          choices: bool = True) -> dict[str, Any]:
    """One streamed chunk in OpenAI's shape (`choices=False`: the usage chunk's empty list)."""
    out: dict[str, Any] = {"id": job.id, "object": "chat.completion.chunk" if job.chat else "text_completion",
                           "created": job.created, "model": job.model, "choices": []}
    if choices:
        choice: dict[str, Any] = {"index": 0}
        if job.chat:
            choice["delta"] = {"role": "assistant", "content": ""} if role else ({"content": text} if text else {})
        else:
            choice["text"] = text or ""
        choice.update(logprobs=None, finish_reason=finish)
        out["choices"] = [choice]
    if job.include_usage:
        out["usage"] = None  # OpenAI's chunks carry usage null until the last one
    return out


def sse(obj: dict[str, Any]) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


# -- the app -----------------------------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def _schemas() -> Any:
    """The request bodies as pydantic models, built on first use (pydantic comes with fastapi)."""
    from types import SimpleNamespace

    from pydantic import BaseModel, ConfigDict

    class StreamOptions(BaseModel):
        model_config = ConfigDict(extra="ignore")
        include_usage: bool | None = None

    class Common(BaseModel):
        model_config = ConfigDict(extra="ignore")  # unknown OpenAI fields are accepted and ignored
        model: str | None = None
        max_tokens: int | None = None
        temperature: float | None = None
        top_p: float | None = None
        seed: int | None = None
        stop: str | list[str] | None = None
        n: int | None = None
        stream: bool | None = False
        stream_options: StreamOptions | None = None
        # extras beyond OpenAI's API
        min_p: float | None = None
        top_k: int | None = None
        repetition_penalty: float | None = None
        penalty_window: int | None = None
        ignore_eos: bool | None = None
        method: str | None = None

    class Completion(Common):
        prompt: str | list[int] | list[str]

    class Message(BaseModel):
        model_config = ConfigDict(extra="ignore")
        role: str
        content: str | list[dict[str, Any]] | None = None

    class Chat(Common):
        messages: list[Message]
        max_completion_tokens: int | None = None

    return SimpleNamespace(Completion=Completion, Chat=Chat)


class BearerAuth:
    """ASGI middleware: /v1/* needs `Authorization: Bearer KEY` (plain ASGI, so that streaming
    responses and their disconnect handling pass through untouched)."""

    def __init__(self, app: Any, key: str) -> None:
        self.app, self.key = app, key

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope["path"].startswith("/v1/"):
            headers = dict(scope.get("headers") or [])
            auth = headers.get(b"authorization", b"").decode("latin-1")
            scheme, _, given = auth.partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), self.key.encode()):
                from starlette.responses import JSONResponse

                why = "missing API key: send Authorization: Bearer KEY" if not auth else "incorrect API key"
                log.info("%s %s -> 401 %s", scope.get("method"), scope["path"], why)
                err = ApiError(401, why, type="invalid_request_error", code="invalid_api_key")
                await JSONResponse(err.body(), status_code=401)(scope, receive, send)
                return
        await self.app(scope, receive, send)


def create_app(lm: LM, names: Sequence[str] = (), api_key: str | None = None, queue_size: int = 16) -> Any:
    """The FastAPI app serving `lm`. `names`: the model names requests may give (the first is
    the one reported; `lm.name` is always accepted)."""
    from contextlib import asynccontextmanager

    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, Response, StreamingResponse
    from starlette.background import BackgroundTask
    from starlette.exceptions import HTTPException

    names = tuple(dict.fromkeys([lm.name, *names]))
    if queue_size < 1:
        raise ValueError(f"queue_size must be >= 1, got {queue_size}")
    scheduler = Scheduler(lm, queue_size)
    schemas = _schemas()

    @asynccontextmanager
    async def lifespan(app: Any):
        scheduler.start()
        yield
        scheduler.stop()

    app = FastAPI(title="tokenswift", lifespan=lifespan)
    app.state.scheduler = scheduler
    if api_key:
        app.add_middleware(BearerAuth, key=api_key)

    def error_response(request: Request, err: ApiError) -> JSONResponse:
        log.info("%s %s -> %d %s", request.method, request.url.path, err.status, err.message)
        headers = {"Retry-After": "1"} if err.status == 429 else None
        return JSONResponse(err.body(), status_code=err.status, headers=headers)

    @app.exception_handler(ApiError)
    async def on_api_error(request: Request, exc: ApiError) -> JSONResponse:
        return error_response(request, exc)

    @app.exception_handler(RequestValidationError)
    async def on_validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        return error_response(request, validation_error(errors[0] if errors else {}))

    @app.exception_handler(HTTPException)
    async def on_http(request: Request, exc: HTTPException) -> JSONResponse:
        detail = str(exc.detail)
        if exc.status_code == 400 and detail == "There was an error parsing the body":
            detail = "malformed JSON in the request body: it must be UTF-8 encoded JSON"  # FastAPI's words say less
        return error_response(request, ApiError(exc.status_code, detail))

    async def handle(request: Request, body: Any, chat: bool) -> Any:
        job = prepare(lm, body, chat, names, scheduler.tok_lock)
        job.loop, job.events = asyncio.get_running_loop(), asyncio.Queue()
        try:
            scheduler.submit(job)
        except Busy as e:
            job.steps.close()
            raise ApiError(429, str(e), type="rate_limit_error", code="queue_full") from None
        if body.stream:
            # the generator's `finally` cancels on disconnect; the background task also covers a
            # generator left suspended at a `yield` (only closed when garbage-collected)
            return StreamingResponse(stream(request, job), media_type="text/event-stream",
                                     background=BackgroundTask(scheduler.cancel, job))
        try:
            return await respond(request, job)
        finally:
            scheduler.cancel(job)  # no-op once finished; stops the run if this handler is cancelled

    async def respond(request: Request, job: Job) -> Any:
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

    async def stream(request: Request, job: Job) -> Any:
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

    def log_done(request: Request, job: Job, done: dict[str, Any]) -> None:
        st = done["stats"]
        log.info("%s %s -> 200 %s: %d+%d tokens, finish %s, %.2f s (queued %.2f s), %.1f tok/s decode",
                 request.url.path, job.id, job.method, job.prompt_tokens, done["completion_tokens"],
                 done["finish_reason"], st.get("seconds", 0.0), st["queue_seconds"],
                 st.get("decode_tokens_per_s", 0.0))

    @app.post("/v1/completions")
    async def completions(body: schemas.Completion, request: Request) -> Any:
        return await handle(request, body, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: schemas.Chat, request: Request) -> Any:
        return await handle(request, body, chat=True)

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        created = int(time.time())
        return {"object": "list", "data": [{"id": names[0], "object": "model", "created": created,
                                            "owned_by": "tokenswift"}]}

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "model": names[0], **scheduler.snapshot()}

    return app


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


def make_server(lm: LM, names: Sequence[str] = (), api_key: str | None = None, queue_size: int = 16) -> Any:
    """A uvicorn.Server for the app; run it with `.run(sockets=[bind(host, port)])`. uvicorn's
    own logging config is left out: its records go to the `logging` setup of the caller."""
    import uvicorn

    app = create_app(lm, names=names, api_key=api_key, queue_size=queue_size)
    config = uvicorn.Config(app, log_config=None, access_log=False, timeout_graceful_shutdown=3)
    return uvicorn.Server(config)
