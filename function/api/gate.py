"""What every request passes before the routes: the shutdown drain and the request body limit.

`Drain` is the shutdown state shared by the app, the probes and the SIGTERM handler (function/shutdown.py): once
`begin()` is called, readiness is False and `RequestGate` answers every new request but the probes and /metrics
with 503 `shutting_down` + Retry-After, while the requests already inside run to their end; `in_flight` says how
many are left.

`RequestGate` also bounds the body of every POST under /v1/ by MAX_REQUEST_BYTES before any route, JSON parser or
cache reads it: a body over the limit (declared by Content-Length or counted as it arrives) is a 413, and nothing of
it is kept. The rest of a body up to twice the limit is read and dropped before the 413 is sent, so that a client
still sending gets the answer rather than a reset connection (servers close a connection with unread data);
a declared Content-Length beyond that is refused at once without reading a byte. A body that does not arrive within
REQUEST_TIMEOUT_S is a 408. The CloudEvents routes keep their own limit (their errors are events, function/events.py).
"""
from __future__ import annotations

import asyncio
import logging

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from . import errors

log = logging.getLogger(__name__)

PROBES = frozenset({"/health", "/health/liveness", "/health/readiness", "/metrics"})
"""Answered while draining too, and never counted as work in flight."""


class Drain:
    def __init__(self) -> None:
        self.draining = False
        self.in_flight = 0

    def begin(self) -> None:
        """Stop taking new requests (readiness False, 503); those in flight go on."""
        if not self.draining:
            self.draining = True
            log.info("draining: no new requests; %d in flight", self.in_flight)

    async def wait_idle(self, timeout_s: float, poll_s: float = 0.05) -> bool:
        """Wait until no request is in flight (True) or `timeout_s` passed (False)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while self.in_flight and loop.time() < deadline:
            await asyncio.sleep(poll_s)
        return not self.in_flight


class RequestGate:
    """ASGI middleware: the drain's 503 and in-flight count, and the body limit."""

    def __init__(self, app: ASGIApp, drain: Drain, max_body: int, body_timeout_s: float):
        self.app = app
        self.drain = drain
        self.max_body = max_body
        self.body_timeout_s = body_timeout_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in PROBES:
            await self.app(scope, receive, send)
            return
        if self.drain.draining:
            await errors.error_response("shutting_down", "the server is shutting down; retry the request (another "
                                        "replica takes it)")(scope, receive, send)
            return
        self.drain.in_flight += 1
        try:
            if scope["method"] == "POST" and scope["path"].startswith("/v1/"):
                receive = await self._read_body(scope, receive, send)
                if receive is None:
                    return
            await self.app(scope, receive, send)
        finally:
            self.drain.in_flight -= 1

    async def _read_body(self, scope: Scope, receive: Receive, send: Send) -> Receive | None:
        """A `receive` that replays the whole body, or None when the request was refused here."""
        declared = next((v for k, v in scope["headers"] if k.lower() == b"content-length"), b"")
        if declared.isdigit() and int(declared) > 2 * self.max_body:
            await self._too_large(int(declared), scope, receive, send)
            return None
        chunks, size, more = [], 0, True
        try:
            async with asyncio.timeout(self.body_timeout_s):
                while more:
                    message = await receive()
                    if message["type"] != "http.request":      # the client left: the app sees the disconnect
                        return _replay([message], receive)
                    chunk = message.get("body", b"")
                    size += len(chunk)
                    more = message.get("more_body", False)
                    if size <= self.max_body:
                        chunks.append(chunk)
                    elif not more or size > 2 * self.max_body:
                        await self._too_large(size, scope, receive, send)
                        return None
                    else:
                        chunks.clear()                         # over the limit: read on to the end, keep nothing
        except TimeoutError:
            await errors.error_response("request_timeout", f"the request body did not arrive within "
                                        f"{self.body_timeout_s:g} s (REQUEST_TIMEOUT_S)")(scope, receive, send)
            return None
        return _replay([{"type": "http.request", "body": b"".join(chunks), "more_body": False}], receive)

    async def _too_large(self, size: int, scope: Scope, receive: Receive, send: Send) -> None:
        log.warning("refused a request body of at least %d bytes (MAX_REQUEST_BYTES=%d)", size, self.max_body)
        await errors.error_response("request_too_large", f"the request body has at least {size} bytes; the limit "
                                    f"is {self.max_body} bytes (MAX_REQUEST_BYTES)")(scope, receive, send)


def _replay(messages: list[Message], receive: Receive) -> Receive:
    """`messages` first, then the server's own receive (which reports the disconnect)."""
    pending = list(messages)

    async def replayed() -> Message:
        return pending.pop(0) if pending else await receive()
    return replayed
