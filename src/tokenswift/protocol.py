"""The OpenAI-compatible protocol: request schemas, requests -> jobs, response bodies and
chunks, stop strings, and errors in OpenAI's shape. No I/O: the app (server.py) and the worker
(scheduler.py) use it."""

# No `from __future__ import annotations`: pydantic reads the annotations of the request models
# built in `schemas`, which must be real objects.

import functools
import json
import threading
import uuid
from typing import Any, Sequence

from .api import LM
from .params import BY_FIELD, PARAMS, ParamError, short_repr
from .scheduler import Job

MAX_STOPS = 4  # OpenAI's limit on stop strings
COMPLETION_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions


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


def param_error(e: ParamError, max_field: str) -> ApiError:
    """A bad option's value as a 400 naming the request field that set it."""
    field = max_field if e.param == "max_new_tokens" else (PARAMS[e.param].field if e.param in PARAMS else None)
    field = field or e.param
    return ApiError(400, e.named(field), field)


def _loc_path(loc: Sequence[Any]) -> str:
    """pydantic's error location as a field path, without "body" and union-member tags."""
    return ".".join(str(p) for p in loc if p != "body" and not _is_tag(p))


def _is_tag(p: Any) -> bool:
    return isinstance(p, str) and ("[" in p or p in _TYPE_TAGS)


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
    loc = list(err.get("loc", ()))
    tag = next((i for i, p in enumerate(loc) if _is_tag(p)), None)
    if tag is not None:  # a field of several types, none of which took the value: say which it takes
        field = _loc_path(loc[:tag])
        want = _UNIONS.get(field.split(".")[-1], "of another type")
        return ApiError(400, f"{field} must be {want}, got {short_repr(err.get('input'))}", param)
    return ApiError(400, f"{path}: {err.get('msg')}, got {short_repr(err.get('input'))}", param)


# what a field of several types takes, for the message when a value is none of them
_UNIONS = {"prompt": "a string, a list of one string or a list of token ids (integers)",
           "stop": "a string or a list of strings", "content": "a string or a list of text parts"}


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
    """The request's option fields as `LM.steps` keywords (unset ones keep its defaults)."""
    kw = {p.name: getattr(body, f) for f, p in BY_FIELD.items() if f != "max_tokens" and getattr(body, f) is not None}
    kw.setdefault("seed", 0)
    kw.setdefault("method", "tokenswift")
    return kw


def prepare(lm: LM, body: Any, chat: bool, names: Sequence[str], tok_lock: threading.Lock) -> Job:
    """Validates a request and builds its job, so that a bad request never takes a queue slot.
    Tokenizes: run it off the event loop."""
    stops = _check_common(body, names)
    prompt_field = "messages" if chat else "prompt"
    max_tokens, max_field = body.max_tokens, "max_tokens"
    if chat and body.max_completion_tokens is not None:  # OpenAI's newer name wins over max_tokens
        max_tokens, max_field = body.max_completion_tokens, "max_completion_tokens"
    kw = _sampling_kwargs(body)
    try:
        with tok_lock:
            ids = lm.encode_chat(_chat_messages(body)) if chat else lm.encode(_prompt(body))
    except ValueError as e:
        raise ApiError(400, str(e), prompt_field) from None
    if max_tokens is None:  # chat: the rest of the context (>= 1, so a too-long prompt says so)
        max_tokens = max(1, lm.config.context_length - len(ids)) if chat else COMPLETION_DEFAULT_MAX_TOKENS
    try:
        steps = lm.steps(ids, max_tokens, **kw)
    except ParamError as e:
        raise param_error(e, max_field) from None
    except ValueError as e:  # the prompt against the model's context
        raise ApiError(400, str(e), prompt_field) from None
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


@functools.lru_cache(maxsize=None)
def schemas() -> Any:
    """The request bodies as pydantic models, built on first use (pydantic comes with fastapi)."""
    from types import SimpleNamespace

    from typing import Optional

    from pydantic import BaseModel, ConfigDict, create_model

    # strict: a field takes its own JSON type only ("8" is not a number, true is not 1, "yes" not
    # true), as OpenAI's API does; a number without a fraction is still a float
    class StreamOptions(BaseModel):
        model_config = ConfigDict(extra="ignore", strict=True)
        include_usage: bool | None = None

    class Base(BaseModel):
        model_config = ConfigDict(extra="ignore", strict=True)  # unknown OpenAI fields are accepted and ignored
        model: str | None = None
        stop: str | list[str] | None = None
        n: int | None = None
        stream: bool | None = False
        stream_options: StreamOptions | None = None

    # every generation option the API serves (OpenAI's max_tokens, temperature, top_p, seed and
    # the extras beyond them), typed from its one definition; values are checked by the library
    Common = create_model("Common", __base__=Base,
                          **{f: (Optional[p.kind], None) for f, p in BY_FIELD.items()})  # type: ignore[call-overload]

    class Completion(Common):
        prompt: str | list[int] | list[str]

    class Message(BaseModel):
        model_config = ConfigDict(extra="ignore", strict=True)
        role: str
        content: str | list[dict[str, Any]] | None = None

    class Chat(Common):
        messages: list[Message]
        max_completion_tokens: int | None = None

    return SimpleNamespace(Completion=Completion, Chat=Chat)
