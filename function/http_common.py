"""HTTP plumbing written once, for the model app (function/api/app.py), the cache front (function/front/) and the
CloudEvents route (function/events.py): readiness and the probe routes, the body reader with its size limit, the
"until the client disconnects" race, the SSE framing and the per-route HTTP metrics. The body reader is the only one:
the request gate (function/api/gate.py, with the limit MAX_REQUEST_BYTES), the routes, the cache layer and the
front's proxy all read bodies with `read_body` and hand them on with `Replay`.

Readiness: every server asks one `Readiness` - func-python's `/health/liveness|readiness` through
`Function.alive()/ready()`, uvicorn's through the app's routes, and `/health` under both. It combines the stages
that load in the background (the speech model, then the engine: anything with the `Lifecycle` methods) with the
shutdown drain: the first stage not ready names the phase, any stage not alive makes the process not alive, a drain
that began makes it not ready ("shutting down").

Cheap to import (Starlette, FastAPI's responses, prometheus_client through function.metrics): no engine, no torch,
no model app.
"""
from __future__ import annotations

import asyncio
import time
from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Awaitable, Callable, Iterable, Protocol, Sequence, TypeVar

from fastapi import FastAPI
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from pydantic import BaseModel
from starlette.routing import BaseRoute, Match, Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from function import metrics
from function.api import errors

if TYPE_CHECKING:
    from function.api.gate import Drain

T = TypeVar("T")
Status = tuple[bool, bool, str]
"""(alive, ready, message): what a stage and the whole process say about themselves."""
Disconnected = Callable[[], Awaitable[None]]
"""Returns once the client has gone."""

CLIENT_CLOSED = 499   # nginx's status for "client closed the request"; only metrics and logs ever see it


# ------------------------------------------------------------------------------------------------ readiness
class Lifecycle(Protocol):
    """What a server needs of a stage that loads in the background: the engine (function.engine.client.LocalEngine),
    the speech model (function.asr.SpeechRecognizer), a test's fake (tests/support/)."""

    def start_loading(self) -> None:
        """Begin loading in the background; returns at once."""

    def shutdown(self) -> None:
        """Stop (blocking until the stage has stopped, or its own timeout)."""

    def status(self) -> Status:
        """(alive, ready, message); the message names the phase ("loading: weights", "failed: ...")."""


class Readiness:
    """The one answer to "alive? ready? why not?" for every probe under either server (module docstring)."""

    def __init__(self, stages: Sequence[Lifecycle], drain: Drain):
        self.stages = tuple(stages)       # in load order
        self.drain = drain

    def status(self) -> Status:
        alive, waiting, last = True, None, "ready"
        for stage in self.stages:
            stage_alive, stage_ready, last = stage.status()
            alive = alive and stage_alive
            if not stage_ready and waiting is None:
                waiting = last
        if self.drain.draining:
            return alive, False, "shutting down"
        return (alive, False, waiting) if waiting is not None else (alive, True, last)

    def alive(self) -> tuple[bool, str]:
        alive, _, message = self.status()
        return alive, message

    def ready(self) -> tuple[bool, str]:
        _, ready, message = self.status()
        return ready, message


def add_probe_routes(app: FastAPI, readiness: Readiness, model: str, **extra: str) -> None:
    """`/health` (JSON: 200 ok, or 503 loading|shutting down|failed with the message), `/health/liveness` and
    `/health/readiness` (func-python's text semantics: 200, or 500 with the message) and `/metrics`, all from
    `readiness`; `extra` goes into every `/health` body (the cache front's role)."""

    async def health() -> JSONResponse:
        alive, ready, message = readiness.status()
        if ready:
            return JSONResponse({"status": "ok", "model": model, **extra})
        draining = readiness.drain.draining
        body = {"status": ("shutting down" if draining else "loading") if alive else "failed", "model": model,
                "message": message, **extra}
        retry = errors.KINDS["shutting_down" if draining else "not_ready"].retry_after
        return JSONResponse(body, status_code=503, headers={"Retry-After": str(retry)} if alive else None)

    async def liveness() -> PlainTextResponse:
        alive, message = readiness.alive()
        return PlainTextResponse(message, status_code=200 if alive else 500)

    async def ready() -> PlainTextResponse:
        ready_, message = readiness.ready()
        return PlainTextResponse(message, status_code=200 if ready_ else 500)

    async def prometheus() -> Response:
        body, content_type = metrics.render()
        return Response(body, media_type=content_type)

    app.add_api_route("/health", health, methods=["GET"])
    app.add_api_route("/health/liveness", liveness, methods=["GET"], response_class=PlainTextResponse)
    app.add_api_route("/health/readiness", ready, methods=["GET"], response_class=PlainTextResponse,
                      name="readiness")
    app.add_api_route("/metrics", prometheus, methods=["GET"], response_class=PlainTextResponse)


# ------------------------------------------------------------------------------------------------ request body
@dataclass
class Body:
    """What `read_body` read: the messages as received (to replay to an app behind: `Replay`), and the whole body,
    or None when it is over the limit (`size` then counts the bytes read so far) or the client left (`gone`)."""
    messages: list[Message]
    data: bytes | None
    size: int
    gone: bool = False


async def read_body(receive: Receive, limit: int, *, read_on_to: int | None = None) -> Body:
    """Read the request body from `receive`, stopping as soon as the client leaves or the body is over `limit`
    bytes. With `read_on_to`, a body over the limit is read on instead, keeping nothing of it (no messages), until
    it ends or passes `read_on_to` bytes: a client still sending then gets the answer rather than a reset
    connection (servers close a connection with unread data)."""
    messages: list[Message] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] != "http.request":
            messages.append(message)
            return Body(messages, None, size, gone=True)
        size += len(message.get("body", b""))
        more = message.get("more_body", False)
        if size > limit and read_on_to is not None:
            messages.clear()
            if not more or size > read_on_to:
                return Body(messages, None, size)
            continue
        messages.append(message)
        if size > limit:
            return Body(messages, None, size)
        if not more:
            return Body(messages, b"".join(m.get("body", b"") for m in messages), size)


class Replay:
    """An ASGI receive that gives the request messages already read first, then the client's own channel (so that
    the app behind still sees the client disconnect)."""

    def __init__(self, messages: Iterable[Message], receive: Receive):
        self.messages = deque(messages)
        self.receive = receive

    @classmethod
    def of(cls, body: bytes, receive: Receive) -> Replay:
        """A whole body as one message, then `receive`."""
        return cls([_whole(body)], receive)

    async def __call__(self) -> Message:
        if self.messages:
            return self.messages.popleft()
        return await self.receive()

    @property
    def body(self) -> bytes:
        """The body still to be replayed."""
        return b"".join(m.get("body", b"") for m in self.messages if m["type"] == "http.request")

    def replace(self, scope: Scope, body: bytes) -> Scope:
        """Replay `body` (a whole body) instead; returns `scope` with a matching Content-Length."""
        self.messages = deque([_whole(body)])
        headers = [(k, v) for k, v in scope["headers"] if k.lower() != b"content-length"]
        return {**scope, "headers": headers + [(b"content-length", str(len(body)).encode())]}


def _whole(body: bytes) -> Message:
    return {"type": "http.request", "body": body, "more_body": False}


# ------------------------------------------------------------------------------------------------ disconnects
async def until_disconnected(receive: Receive) -> None:
    """Returns once the client has gone (the body was already read, so the next message is the disconnect)."""
    while (await receive())["type"] != "http.disconnect":
        pass


async def unless_disconnected(work: Awaitable[T], disconnected: Disconnected | None, *, timeout: float | None = None,
                              cancel: bool = True, gone: Any = None) -> Any:
    """`work`'s result (its exception is raised), or `gone` when `disconnected()` returns first; TimeoutError after
    `timeout` seconds. `work` is cancelled when it loses, unless `cancel` is False (a future others wait for too).
    `disconnected` None: no watcher (only the timeout)."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(disconnected()) if disconnected is not None else None
    try:
        done, _ = await asyncio.wait({task} if watcher is None else {task, watcher}, timeout=timeout,
                                     return_when=asyncio.FIRST_COMPLETED)
    finally:
        if watcher is not None:
            watcher.cancel()
        if cancel and not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
    if task in done:
        return task.result()
    if watcher in done:
        return gone
    raise TimeoutError


# ------------------------------------------------------------------------------------------------ SSE
SSE_DONE = "data: [DONE]\n\n"
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
"""Besides Content-Type text/event-stream: no caching, no buffering by a proxy (nginx) on the way."""
SSE_START_HEADERS = [(b"content-type", b"text/event-stream; charset=utf-8"),
                     *((k.lower().encode(), v.encode()) for k, v in SSE_HEADERS.items())]
"""The same as raw ASGI headers, for a response sent without Starlette."""


def sse_event(data: str | BaseModel) -> str:
    """One server-sent event carrying `data` (a model is sent as its JSON)."""
    return f"data: {data.model_dump_json() if isinstance(data, BaseModel) else data}\n\n"


# ------------------------------------------------------------------------------------------------ HTTP metrics
class HttpMetrics:
    """ASGI middleware: counts, times and tracks in-flight requests by route template; unmatched paths and odd
    methods are "other" so that label values stay bounded."""

    def __init__(self, app: ASGIApp, routes: Iterable[BaseRoute]):
        self.app = app
        self.routes = routes

    def _route(self, scope: Scope) -> str:
        for r in self.routes:
            if isinstance(r, Route) and r.matches(scope)[0] is Match.FULL:
                return r.path
        return "other"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        route = self._route(scope)
        method = scope["method"] if scope["method"] in _METHODS else "other"
        status = 500

        async def send_and_note(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        start = time.monotonic()
        with metrics.in_flight(route).track_inprogress():
            try:
                await self.app(scope, receive, send_and_note)
            finally:
                metrics.observe_http(route, method, status, time.monotonic() - start)


_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
