"""What every request passes before the routes: the shutdown drain and the request body limit.

`Drain` is the shutdown state shared by the app, the probes and the SIGTERM handler (function/shutdown.py): once
`begin()` is called, readiness is False and `RequestGate` answers every new request but the probes and /metrics
with 503 `shutting_down` + Retry-After, while the requests already inside run to their end; `in_flight` says how
many are left.

`RequestGate` also bounds the body of every POST under /v1/, to the tokenizer routes and to the CloudEvents routes
(every path, with `all_paths`: the cache front) by MAX_REQUEST_BYTES before any route, JSON parser or cache reads
it (function/http_common.py's `read_body`, the one body reader): a body over the limit (declared by Content-Length
or counted as it arrives) is a 413, and nothing of it is kept. The rest of a body up to twice the limit is read and
dropped before the 413 is sent, so that a client still sending gets the answer rather than a reset connection
(servers close a connection with unread data); a declared Content-Length beyond that is refused at once without
reading a byte. A body that does not arrive within REQUEST_TIMEOUT_S is a 408. A request counts as in flight only
once its body is in: the shutdown drain does not wait for a client still sending. On the CloudEvents routes the
gate does not answer itself (their errors are events): it hands the refusal to the route in `scope[BODY_ERROR]`
(function/events.py).

The JSON bodies (/v1/ and the tokenizer routes) then pass a structure budget before anything parses them:
MAX_JSON_DEPTH levels of nesting and MAX_JSON_ELEMENTS values (api/limits.py; a 400 above), measured in a worker
thread when the body is large, so that no single body can hold the event loop or bloat memory while it is parsed.
"""
from __future__ import annotations

import asyncio
import logging

from starlette.types import ASGIApp, Receive, Scope, Send

from function.http_common import Replay, read_body

from . import errors
from .limits import INLINE_BYTES, BudgetExceeded, json_budget

log = logging.getLogger(__name__)

PROBES = frozenset({"/health", "/health/liveness", "/health/readiness", "/metrics"})
"""Answered while draining too, and never counted as work in flight."""

JSON_PATHS = frozenset({"/tokenize", "/detokenize"})
"""Besides /v1/*: routes whose bodies are JSON requests."""
EVENT_PATHS = frozenset({"/", "/events"})
"""The CloudEvents routes: their refusals are events, answered by the route (function/events.py)."""
BODY_ERROR = "autoglm.body_error"
"""Scope entry on a CloudEvents route whose body the gate refused: (error kind, message)."""


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
    """ASGI middleware: the drain's 503 and in-flight count, the body limit and the JSON budget."""

    def __init__(self, app: ASGIApp, drain: Drain, max_body: int, body_timeout_s: float, max_depth: int = 32,
                 max_elements: int = 200_000, all_paths: bool = False):
        self.app = app
        self.drain = drain
        self.max_body = max_body
        self.body_timeout_s = body_timeout_s
        self.max_depth = max_depth
        self.max_elements = max_elements
        self.all_paths = all_paths

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in PROBES:
            await self.app(scope, receive, send)
            return
        if self.drain.draining:
            await self._shutting_down(scope, receive, send)
            return
        path = scope["path"]
        is_json = path.startswith("/v1/") or path in JSON_PATHS
        events = path in EVENT_PATHS and not self.all_paths
        if scope["method"] in ("POST", "PUT", "PATCH") and (is_json or events or self.all_paths):
            outcome = await self._read_body(scope, receive)
            if isinstance(outcome[0], str):        # refused
                kind, message = outcome
                if events:          # the route answers with an error event
                    scope = {**scope, BODY_ERROR: outcome}
                    receive = Replay.of(b"", receive)
                else:
                    await errors.error_response(kind, message)(scope, receive, send)
                    return
            else:
                receive, body = outcome
                if body is not None and is_json and (problem := await self._over_budget(body)):
                    await errors.error_response("invalid_request", problem)(scope, receive, send)
                    return
            if self.drain.draining:     # it began while the body was arriving
                await self._shutting_down(scope, receive, send)
                return
        self.drain.in_flight += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.drain.in_flight -= 1

    @staticmethod
    async def _shutting_down(scope: Scope, receive: Receive, send: Send) -> None:
        await errors.error_response("shutting_down", "the server is shutting down; retry the request (another "
                                    "replica takes it)")(scope, receive, send)

    async def _over_budget(self, body: bytes) -> str | None:
        try:
            if len(body) <= INLINE_BYTES:
                json_budget(body, self.max_depth, self.max_elements)
            else:
                await asyncio.to_thread(json_budget, body, self.max_depth, self.max_elements)
        except BudgetExceeded as e:
            log.info("refused a request body: %s", e)
            return str(e)
        return None

    async def _read_body(self, scope: Scope, receive: Receive) -> tuple[Receive, bytes | None] | tuple[str, str]:
        """(a receive that replays the whole body, the body or None when the client left), or (error kind,
        message) when the body is refused."""
        declared = next((v for k, v in scope["headers"] if k.lower() == b"content-length"), b"")
        if declared.isdigit() and int(declared) > 2 * self.max_body:
            return self._too_large(int(declared))
        try:
            async with asyncio.timeout(self.body_timeout_s):
                body = await read_body(receive, self.max_body, read_on_to=2 * self.max_body)
        except TimeoutError:
            return "request_timeout", (f"the request body did not arrive within {self.body_timeout_s:g} s "
                                       "(REQUEST_TIMEOUT_S)")
        if body.gone:                   # the client left: the app sees the disconnect
            return Replay(body.messages, receive), None
        if body.data is None:
            return self._too_large(body.size)
        return Replay.of(body.data, receive), body.data

    def _too_large(self, size: int) -> tuple[str, str]:
        log.warning("refused a request body of at least %d bytes (MAX_REQUEST_BYTES=%d)", size, self.max_body)
        return "request_too_large", (f"the request body has at least {size} bytes; the limit is {self.max_body} "
                                     "bytes (MAX_REQUEST_BYTES)")

