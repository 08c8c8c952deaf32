"""CloudEvents in, CloudEvents out: chat requests from a Knative Broker's Trigger, completion events back.

A Trigger POSTs each event to the service's root (`/`; `/events` is the same route under a name of its own). The
event is CloudEvents 1.0 in binary mode (`ce-*` headers, what brokers send) or structured mode
(`application/cloudevents+json`); its `type` must be CE_REQUEST_TYPE and its `data` an OpenAI chat-completion request
body, which `ChatService` serves exactly as over HTTP. Anything else on these routes is a 400.

Every response carries a CloudEvent, because a broker forwards a 200's body only if it is one:
* 200: the reply, in binary mode: type CE_RESPONSE_TYPE, source `Config.ce_reply_source`, a new id, the request's id
  and source in the `autoglmrequestid` / `autoglmrequestsource` extensions, data the chat.completion JSON.
* 4xx/5xx: an error event `<CE_RESPONSE_TYPE>.error` in structured mode (a broker keeps only the body of a failed
  delivery, base64 in the dead-letter event's `knativeerrordata`), data OpenAI's error object. Statuses follow
  Knative's retry rules (docs/events.md): what cannot succeed on a retry is 400/413, overload 429 and not-ready
  503 with Retry-After, failures of the model 5xx.

Brokers deliver at least once, so `RecentReplies` keeps the replies of recent (source, id) pairs: a redelivery gets
the very same reply without a second generation, and one that arrives while the first is still being computed waits
for it. A reply is given back only for the same request: the record keeps a hash of the event's type and data, and
an event that reuses an id with other data is a 409 (`event_id_conflict`); with API keys, the key's hash is part of
the record's identity too, so no caller can read or pre-empt another's reply. When every delivery waiting for a
computation has disconnected (the broker reset the connection), the generation is cancelled, as over HTTP.

Bodies are bounded before they are parsed: the request gate (api/gate.py) reads them with MAX_REQUEST_BYTES and
REQUEST_TIMEOUT_S and hands its refusal here as an event; the JSON budget (MAX_JSON_DEPTH, MAX_JSON_ELEMENTS) is
checked and the event decoded and validated in a worker thread when the body is large.
Knows the serving layer and the wire formats, no engine internals.
"""
from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import time
from collections import OrderedDict
from dataclasses import dataclass
from functools import partial
from typing import Any, Awaitable, Callable, Mapping

from cloudevents.core.bindings.http import HTTPMessage, from_binary, from_structured, to_binary, to_structured
from cloudevents.core.exceptions import BaseCloudEventException
from cloudevents.core.formats.json import JSONFormat
from cloudevents.core.v1.event import CloudEvent
from pydantic import ValidationError
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response

from function import metrics
from function.api.auth import SCOPE_KEY
from function.api.errors import KINDS, Kind, validation_message
from function.api.gate import BODY_ERROR
from function.api.limits import INLINE_BYTES, BudgetExceeded, json_budget
from function.api.protocol import ChatCompletionRequest, ChatCompletionResponse, ErrorInfo, ErrorResponse
from function.api.serving import ChatService
from function.config import Config
from function.errors import ServiceError
from function.http_common import CLIENT_CLOSED, read_body, unless_disconnected, until_disconnected

log = logging.getLogger(__name__)

ROUTES = ("/", "/events")
"""POST paths that take events: `/` is where a Trigger's `subscriber.ref` (and func-python's convention) sends."""

CORRELATION_ID = "autoglmrequestid"
CORRELATION_SOURCE = "autoglmrequestsource"
"""Extensions of every reply and error event: the request event's `id` and `source` (together they identify it)."""

REPLAY_TTL_S = 900.0
REPLAY_MAX_ENTRIES = 1024
REPLAY_MAX_BYTES = 32 * 2**20
"""Recent replies kept for redeliveries. A broker redelivers within its backoff (k8s/eventing.yaml: at most ~5 min
after the attempt it lost) plus one attempt's timeout, so 15 minutes covers the Trigger's whole retry schedule."""

MAX_ERROR_MESSAGE = 400
"""Characters of an error message in an error event: with the attributes it stays under the 1,024 bytes of a failed
response that Knative copies into the dead-letter event."""

SPECVERSION = "1.0"
_REQUIRED = ("specversion", "id", "source", "type")
_FORMAT = JSONFormat()

# Event-level errors, and the event statuses that differ from the HTTP API's (api/errors.KINDS covers the rest).
# A broker retries 404, so an event naming a model this service does not serve is a 400 here: retrying cannot help.
EVENT_KINDS: dict[str, Kind] = {
    "not_a_cloudevent": Kind(400, "invalid_request_error"),
    "invalid_event": Kind(400, "invalid_request_error"),
    "unsupported_event_type": Kind(400, "invalid_request_error"),
    "request_too_large": Kind(413, "invalid_request_error"),
    "model_not_found": Kind(400, "invalid_request_error"),
    "event_id_conflict": Kind(409, "invalid_request_error"),
}


def kind_of(code: str) -> Kind:
    return EVENT_KINDS.get(code) or KINDS[code]


class EventError(Exception):
    """An event that gets an error event instead of a reply; `code` is a key of EVENT_KINDS or api/errors.KINDS and
    decides the status."""

    def __init__(self, code: str, message: str, param: str | None = None, retry_after: float | None = None):
        super().__init__(message)
        self.code = code
        self.message = message
        self.param = param
        self.retry_after = retry_after

    @classmethod
    def from_service_error(cls, e: ServiceError) -> EventError:
        return cls(e.kind, e.message, e.param, e.retry_after)

    @property
    def status(self) -> int:
        return kind_of(self.code).status


@dataclass(frozen=True)
class EncodedEvent:
    """An HTTP response that carries an event: what is sent, and what is replayed for a redelivery."""
    status: int
    headers: dict[str, str]
    body: bytes

    @property
    def size(self) -> int:
        return len(self.body) + sum(len(k) + len(v) for k, v in self.headers.items())

    def response(self) -> Response:
        return Response(self.body, status_code=self.status, headers=self.headers)


# --- decoding
def decode_event(headers: Mapping[str, str], body: bytes) -> CloudEvent:
    """The CloudEvents 1.0 event of an HTTP request, by the HTTP binding's rules: structured mode when the
    Content-Type says so, else binary mode when there are `ce-` headers. EventError when it is not a valid one."""
    headers = {k.lower(): v for k, v in headers.items()}
    media = headers.get("content-type", "").split(";")[0].strip().lower()
    if media.startswith("application/cloudevents-batch"):
        raise EventError("invalid_event", "batched content mode is not supported: send one event per request")
    if media.startswith("application/cloudevents"):
        if media != JSONFormat.CONTENT_TYPE:
            raise EventError("invalid_event", f"structured content mode with {media} is not supported; use "
                             f"{JSONFormat.CONTENT_TYPE}")
        return _decode(from_structured, headers, body, "structured")
    if any(k.startswith("ce-") for k in headers):
        return _decode(from_binary, headers, body, "binary")
    raise EventError("not_a_cloudevent", "not a CloudEvent: this route takes CloudEvents 1.0 in binary mode "
                     "(ce-specversion, ce-id, ce-source and ce-type headers) or structured mode (Content-Type: "
                     f"{JSONFormat.CONTENT_TYPE}); plain chat requests go to POST /v1/chat/completions")


def _decode(decoder: Callable[..., Any], headers: dict[str, str], body: bytes, mode: str) -> CloudEvent:
    try:
        return decoder(HTTPMessage(headers=headers, body=body), _FORMAT, partial(_strict_v1, mode))
    except EventError:
        raise
    except (BaseCloudEventException, ValueError, TypeError, AttributeError, KeyError) as e:
        raise EventError("invalid_event", f"invalid {mode}-mode CloudEvent: {e}") from None


def _strict_v1(mode: str, attributes: dict[str, Any], data: Any) -> CloudEvent:
    """The SDK's event factory, minus its defaults: the SDK would invent a missing `id` (breaking redelivery
    detection) and `specversion`; the spec requires both from the sender."""
    missing = [a for a in _REQUIRED if a not in attributes]
    if missing:
        if mode == "binary":
            where = ", ".join(f"ce-{a}" for a in missing) + " header(s)"
        else:
            where = ", ".join(missing) + " attribute(s)"
        raise EventError("invalid_event", f"the event has no {where}; CloudEvents 1.0 requires "
                         f"{', '.join(_REQUIRED)}")
    if attributes["specversion"] != SPECVERSION:
        raise EventError("invalid_event", f"specversion {attributes['specversion']!r} is not supported; send "
                         f"CloudEvents {SPECVERSION}", param="specversion")
    return CloudEvent(attributes, data)


def chat_request(event: CloudEvent) -> ChatCompletionRequest:
    """The event's data as a chat-completion request (streaming refused: the reply is one event)."""
    content_type = event.get_datacontenttype()
    if content_type is not None and not JSONFormat.JSON_CONTENT_TYPE_PATTERN.match(content_type):
        raise EventError("invalid_request", f"datacontenttype {content_type!r} is not JSON: data must be an OpenAI "
                         "chat-completion request body (application/json)", param="datacontenttype")
    data = event.get_data()
    if isinstance(data, (bytes, str)):      # the SDK hands over a body it could not parse as JSON as it came
        try:
            data = json.loads(data)
        except (ValueError, UnicodeDecodeError) as e:
            raise EventError("invalid_request", f"data is not valid JSON: {e}", param="data") from None
    if data is None:
        raise EventError("invalid_request", "the event has no data: it must be an OpenAI chat-completion request "
                         "body", param="data")
    if not isinstance(data, dict):
        raise EventError("invalid_request", f"data must be a JSON object (an OpenAI chat-completion request body), "
                         f"not a JSON {type(data).__name__}", param="data")
    try:
        request = ChatCompletionRequest.model_validate(data)
    except ValidationError as e:
        message, param = validation_message(e.errors(include_url=False))
        raise EventError("invalid_request", message, param) from None
    if request.stream:
        raise EventError("invalid_request", "stream: true is not available for CloudEvents: the reply is one event "
                         "with the whole completion; leave stream out", param="stream")
    return request


# --- replies kept for redeliveries
Key = tuple[str, ...]


class IdConflict(Exception):
    """An event reuses the (source, id) of an earlier one with other content."""


@dataclass
class _Running:
    task: asyncio.Future
    digest: str
    waiters: int = 0


class RecentReplies:
    """Replies of recent events by (caller, source, id), the spec's identity of an event, each with the digest of the
    request it answers. An entry lives `ttl_s` after its reply was computed; the oldest go first beyond
    `max_entries` or `max_bytes`. An id still being computed is joined (single flight): a concurrent redelivery
    waits for the first computation instead of starting a second. The computation goes on while anyone waits for it
    or after a waiter was cancelled (its redelivery then finds the reply), and is cancelled once every waiter's
    client has disconnected. Only replies are kept: a failed event is computed again when it is redelivered."""

    def __init__(self, ttl_s: float = REPLAY_TTL_S, max_entries: int = REPLAY_MAX_ENTRIES,
                 max_bytes: int = REPLAY_MAX_BYTES, clock: Callable[[], float] = time.monotonic):
        self.ttl_s, self.max_entries, self.max_bytes = ttl_s, max_entries, max_bytes
        self._clock = clock
        self._done: OrderedDict[Key, tuple[float, str, EncodedEvent]] = OrderedDict()   # by expiry, oldest first
        self._running: dict[Key, _Running] = {}
        self._bytes = 0

    def __len__(self) -> int:
        return len(self._done)

    @property
    def running(self) -> int:
        return len(self._running)

    async def get_or_compute(self, key: Key, compute: Callable[[], Awaitable[EncodedEvent]], digest: str = "",
                             disconnected: Callable[[], Awaitable[None]] | None = None
                             ) -> tuple[EncodedEvent, bool] | None:
        """(reply, replayed): the held or running reply of `key` (replayed), else `compute()`'s; None when
        `disconnected` returned first. IdConflict when `key` is held or running for another `digest`."""
        self._expire()
        held = self._done.get(key)
        if held is not None:
            if held[1] != digest:
                raise IdConflict()
            return held[2], True
        running = self._running.get(key)
        replayed = running is not None
        if running is None:
            running = _Running(asyncio.ensure_future(compute()), digest)
            self._running[key] = running
            running.task.add_done_callback(partial(self._finished, key, digest))
        elif running.digest != digest:
            raise IdConflict()
        running.waiters += 1
        reply: Any = None
        try:
            reply = await unless_disconnected(running.task, disconnected, cancel=False, gone=_GONE)
        finally:
            running.waiters -= 1
            if reply is _GONE and running.waiters == 0 and not running.task.done():
                running.task.cancel()           # nobody is left to answer: stop the generation
        return None if reply is _GONE else (reply, replayed)

    def _finished(self, key: Key, digest: str, task: asyncio.Future[EncodedEvent]) -> None:
        del self._running[key]
        if task.cancelled() or task.exception() is not None:    # exception(): retrieved, so never logged as lost
            return
        reply = task.result()
        if reply.size > self.max_bytes:
            return
        self._done[key] = (self._clock() + self.ttl_s, digest, reply)
        self._bytes += reply.size
        while len(self._done) > self.max_entries or self._bytes > self.max_bytes:
            self._drop_oldest()

    def _expire(self) -> None:
        now = self._clock()
        while self._done and next(iter(self._done.values()))[0] <= now:
            self._drop_oldest()

    def _drop_oldest(self) -> None:
        _, (_, _, reply) = self._done.popitem(last=False)
        self._bytes -= reply.size


# --- the service
class EventService:
    """The events route: decode, check, serve through `ChatService`, encode the reply or the error event."""

    def __init__(self, config: Config, chat: ChatService, replies: RecentReplies | None = None):
        self.chat = chat
        self.request_type = config.ce_request_type
        self.response_type = config.ce_response_type
        self.error_type = f"{config.ce_response_type}.error"
        self.source = config.ce_reply_source
        self.max_request_bytes = config.max_request_bytes
        self.max_depth, self.max_elements = config.max_json_depth, config.max_json_elements
        self.replies = replies if replies is not None else RecentReplies()

    async def endpoint(self, request: Request) -> Response:
        """The route handler (POST on each of ROUTES)."""
        try:
            refused = request.scope.get(BODY_ERROR)
            if refused is not None:                     # the request gate refused the body (too large, too slow)
                raise EventError(*refused)
            headers, body = dict(request.headers), await self._body(request)
            if len(body) > INLINE_BYTES:                # parsing a large body must not hold the event loop
                event, parsed = await asyncio.to_thread(self._parse, headers, body)
            else:
                event, parsed = self._parse(headers, body)
        except EventError as e:
            metrics.observe_event_received("invalid")
            return self._failed(e, None).response()
        metrics.observe_event_received(self.request_type if event.get_type() == self.request_type else "other")
        try:
            if isinstance(parsed, EventError):
                raise parsed
            outcome = await self._answer(event, parsed, request)
        except EventError as e:
            return self._failed(e, event).response()
        except Exception:
            log.exception("event %s from %s: internal error", event.get_id(), event.get_source())
            return self._failed(EventError("internal", "internal server error"), event).response()
        if outcome is None:                             # the sender reset the connection: nobody to answer
            log.info("event %s from %s: the sender disconnected; generation stopped", event.get_id(),
                     event.get_source())
            return Response(status_code=CLIENT_CLOSED)
        reply, replayed = outcome
        metrics.observe_event_replied(replayed)
        if replayed:
            log.info("event %s from %s: replayed the reply to its earlier delivery", event.get_id(),
                     event.get_source())
        return reply.response()

    def _parse(self, headers: dict[str, str], body: bytes) -> tuple[CloudEvent, ChatCompletionRequest | EventError]:
        """The event, and its chat request or the error it gets (EventError raised: not a valid event)."""
        try:
            json_budget(body, self.max_depth, self.max_elements)
        except BudgetExceeded as e:
            raise EventError("invalid_request", str(e)) from None
        event = decode_event(headers, body)
        if event.get_type() != self.request_type:
            return event, EventError("unsupported_event_type", f"event type {event.get_type()!r} is not served "
                                     f"here; this service takes {self.request_type!r} (CE_REQUEST_TYPE)",
                                     param="type")
        try:
            return event, chat_request(event)
        except EventError as e:
            return event, e

    async def _body(self, request: Request) -> bytes:
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > self.max_request_bytes:
            raise self._too_large(int(declared))
        body = await read_body(request.receive, self.max_request_bytes)
        if body.gone:
            raise ClientDisconnect()
        if body.data is None:
            raise self._too_large(body.size)
        return body.data

    def _too_large(self, size: int) -> EventError:
        return EventError("request_too_large", f"the event has at least {size} bytes; the limit is "
                          f"{self.max_request_bytes} (MAX_REQUEST_BYTES)")

    async def _answer(self, event: CloudEvent, request: ChatCompletionRequest,
                      http: Request) -> tuple[EncodedEvent, bool] | None:
        digest = hashlib.sha256(f"{event.get_type()}\n".encode() + request.model_dump_json().encode()).hexdigest()
        key = (http.scope.get(SCOPE_KEY, ""), event.get_source(), event.get_id())
        try:
            return await self.replies.get_or_compute(key, partial(self._complete, event, request), digest,
                                                     partial(until_disconnected, http.receive))
        except IdConflict:
            raise EventError("event_id_conflict", f"an event with source {event.get_source()[:100]!r} and id "
                             f"{event.get_id()[:100]!r} was already received with other data; a redelivery must "
                             "carry the same data, and a new event needs a new id", param="id") from None

    async def _complete(self, event: CloudEvent, request: ChatCompletionRequest) -> EncodedEvent:
        try:
            # RecentReplies cancels this when every delivery waiting for it has disconnected
            result = await self.chat.create(request, _never)
        except ServiceError as e:
            raise EventError.from_service_error(e) from None
        if not isinstance(result, ChatCompletionResponse):
            raise EventError("internal", "the chat service did not return a completion")
        reply = CloudEvent({"type": self.response_type, "source": self.source, "datacontenttype": "application/json",
                            **self._correlation(event)}, result.model_dump(mode="json"))
        message = to_binary(reply, _FORMAT)
        return EncodedEvent(200, dict(message.headers), message.body)

    def _failed(self, e: EventError, event: CloudEvent | None) -> EncodedEvent:
        """The error event for `e` (structured mode), counted and logged."""
        kind = kind_of(e.code)
        metrics.observe_event_failed(e.code)
        ident = f"event {event.get_id()} from {event.get_source()}" if event is not None else "request"
        (log.error if e.code == "internal" else log.warning)("%s: %d %s: %s", ident, kind.status, e.code, e.message)
        message = e.message if len(e.message) <= MAX_ERROR_MESSAGE else e.message[:MAX_ERROR_MESSAGE - 1] + "…"
        error = ErrorResponse(error=ErrorInfo(message=message, type=kind.type, param=e.param, code=e.code))
        attributes = {"type": self.error_type, "source": self.source, "datacontenttype": "application/json"}
        if event is not None:
            attributes.update(self._correlation(event))
        encoded = to_structured(CloudEvent(attributes, error.model_dump(mode="json")), _FORMAT)
        headers = dict(encoded.headers)
        wait = e.retry_after if e.retry_after is not None else kind.retry_after
        if wait is not None:
            headers["retry-after"] = str(max(1, round(wait)))
        return EncodedEvent(kind.status, headers, encoded.body)

    @staticmethod
    def _correlation(event: CloudEvent) -> dict[str, str]:
        return {CORRELATION_ID: event.get_id(), CORRELATION_SOURCE: event.get_source()}


_GONE = object()      # the delivery's client left before the reply


async def _never() -> None:
    """ChatService's `disconnected` for events: never; RecentReplies watches the deliveries' connections."""
    await asyncio.get_running_loop().create_future()

