"""The response cache's HTTP face (`CacheLayer`), and the cache-front role built from it (`build_front_app`).

`CacheLayer` is ASGI middleware for POST /v1/chat/completions, one code path for both forms of the cache:
- model role (in-process cache): `install` puts it inside the model's app, so a miss goes on to the chat route;
- cache-front role: `build_front_app` puts it in front of `ModelProxy`, which forwards a miss to MODEL_URL with httpx,
  passing the answer through chunk by chunk. A hit needs no model service at all; this module never imports torch.

Per request: `Cache-Control: no-cache` skips the lookup, `no-store` the write -> parse the body, check the policy,
decode images for their pixel digests -> the key -> a hit is replayed as JSON, or as SSE when `stream` is true (the
live answer's chunk models: role chunk, reasoning, content, finish chunk, usage chunk when asked, [DONE]) -> a miss
joins an identical request in flight (single flight) or leads one: it is forwarded, its answer (JSON or SSE) is
watched as it goes by, and it is stored only when complete: status 200, finish_reason stop or length, usage, [DONE]
(an error chunk, an abort or a client gone leaves nothing). A streamed miss is forwarded with
`stream_options.include_usage` so its entry has usage; the usage chunk is removed again unless the client asked.
Anything unexpected on the cache's side (unparseable body, unreadable image, a store down) bypasses or misses the
cache: the app behind answers, with its own errors. Every chat answer carries `X-Cache: hit|miss|bypass`.

Bounded and private (docs/security.md): a large body is parsed in a worker thread; a request with more images than
MAX_IMAGES_PER_REQUEST is passed on without loading one (the app refuses it); keying a request (loading its images)
obeys REQUEST_TIMEOUT_S (504) and stops when the client leaves. The images loaded for the key are handed to the app
behind (`images.prefetched`), so a remote image is fetched once and the model sees the bytes the key was made from;
the cache front sends them on to the model service as data: URLs for the same reason. The key includes the API
key's hash (function/api/auth.py). A single-flight leader's answer is teed into the cache as the app produces it,
not at the pace of the leader's client: a client that does not read cannot hold up the identical requests waiting
for it. The front's proxy keeps no cookies and drops hop-by-hop headers (those named in Connection too) both ways;
the request gate bounds every body on every path.
"""
from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import logging
import time
import uuid
from http.cookiejar import CookieJar, DefaultCookiePolicy
from collections import OrderedDict, deque
from contextlib import asynccontextmanager
from dataclasses import dataclass
from functools import partial
from typing import Any, AsyncIterator

import httpx
from fastapi import FastAPI
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from pydantic import ValidationError
from starlette.middleware import Middleware
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from function import metrics, shutdown
from function.api import auth, errors
from function.api.app import HttpMetrics
from function.api.auth import SCOPE_KEY
from function.api.gate import Drain, RequestGate
from function.api.limits import INLINE_BYTES
from function.api.protocol import (ChatCompletionChunk, ChatCompletionRequest, Delta, ImagePart, StreamChoice,
                                   Usage)
from function.cache import FINISHED, Entry, ResponseCache
from function.config import Config
from function.engine.protocol import EngineError
from function.images import ImageLoader, LoadedImage, prefetched

log = logging.getLogger(__name__)

CHAT_PATH = "/v1/chat/completions"
SSE_DONE = b"data: [DONE]\n\n"
_SSE_HEADERS = [(b"content-type", b"text/event-stream; charset=utf-8"), (b"cache-control", b"no-cache"),
                (b"x-accel-buffering", b"no")]
_DIGEST_MEMO = 256          # image URLs (sha256 of the data: URL) whose pixel digest is remembered
_GONE = object()            # the client left while waiting


# ------------------------------------------------------------------------------------------------- cache layer
@dataclass
class _Plan:
    request: ChatCompletionRequest
    key: str
    read: bool
    write: bool
    images: dict[str, LoadedImage]


class CacheLayer:
    """ASGI middleware: chat completions through the response cache, everything else untouched. `rewrite_remote`
    (the cache front): send remote images on as data: URLs of the bytes the key was computed from."""

    def __init__(self, app: ASGIApp, cache: ResponseCache, config: Config, rewrite_remote: bool = False):
        self.app = app
        self.cache = cache
        self.images = ImageLoader(config)
        self.max_images = config.max_images_per_request
        self.max_body = config.max_request_bytes
        self.wait_s = config.request_timeout_s
        self.rewrite_remote = rewrite_remote
        self._digests: OrderedDict[bytes, str] = OrderedDict()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST" or scope["path"] != CHAT_PATH:
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        messages, body = await _read_body(receive, self.max_body)
        replay = _Replay(messages, receive)
        plan = None
        if body is not None:
            try:
                plan = await self._plan_in_time(scope, body, receive)
            except TimeoutError:
                await errors.error_response("timeout", f"the request's images did not load within "
                                            f"{self.wait_s:g} s (REQUEST_TIMEOUT_S)")(scope, receive, send)
                return
            if plan is _GONE:
                return
        if plan is None:
            metrics.observe_cache_result("bypass")
            await self._forward(scope, replay, send, b"bypass", None)
            return
        fetched = {url: img.fetched for url, img in plan.images.items() if img.fetched is not None}
        if self.rewrite_remote and fetched:
            scope = await replay.rewrite(scope, partial(_inline_images, fetched))
        with prefetched(plan.images):       # the app behind uses these instead of loading them again
            await self._answer(scope, replay, send, plan, receive, started)

    async def _plan_in_time(self, scope: Scope, body: bytes, receive: Receive) -> Any:
        """`_plan` within REQUEST_TIMEOUT_S (TimeoutError), or _GONE when the client leaves first."""
        work = asyncio.ensure_future(self._plan(scope, body))
        watcher = asyncio.ensure_future(_disconnected(receive))
        try:
            done, _ = await asyncio.wait({work, watcher}, timeout=self.wait_s, return_when=asyncio.FIRST_COMPLETED)
        finally:
            watcher.cancel()
            if not work.done():
                work.cancel()
                await asyncio.gather(work, return_exceptions=True)
        if work in done:
            return work.result()
        if watcher in done:
            return _GONE
        raise TimeoutError

    async def _answer(self, scope: Scope, replay: _Replay, send: Send, plan: _Plan, receive: Receive,
                      started: float) -> None:
        lead = plan.read and plan.write
        if plan.read:
            found = await self.cache.get(plan.key)
            flight = self.cache.join(plan.key) if found is None else None
            if flight is not None:
                entry = await self._wait(flight, receive)
                if entry is _GONE:
                    return
                if entry is not None:
                    metrics.observe_cache_coalesced()
                    found = entry, "flight"
                lead = False              # the leader's answer was not stored: ask the model, without a flight
            if found is not None:
                await self._hit(send, plan.request, *found, started)
                return
        metrics.observe_cache_result("miss" if plan.read else "bypass")
        await self._miss(scope, replay, send, plan, lead)

    # --- deciding
    async def _plan(self, scope: Scope, body: bytes) -> _Plan | None:
        """The key and what may be done with it, or None: bypass the cache."""
        directives = _cache_control(scope)
        read, write = "no-cache" not in directives, "no-store" not in directives
        if not (read or write):
            return None
        try:
            if len(body) > INLINE_BYTES:
                request = await asyncio.to_thread(ChatCompletionRequest.model_validate_json, body)
            else:
                request = ChatCompletionRequest.model_validate_json(body)
        except ValidationError:
            return None                           # the app behind answers with the 400
        except Exception:                         # noqa: BLE001 - a parsing bug must not cost the user an answer
            log.exception("response cache: cannot parse a request; bypassing the cache")
            return None
        if request.model not in (None, self.cache.model) or not self.cache.cacheable(request):
            return None
        try:
            images: dict[str, LoadedImage] = {}
            digests = await self._image_digests(request, images)
            if digests is None:
                return None
            key = self.cache.key(request, digests, scope.get(SCOPE_KEY, ""))
        except EngineError:                       # an image the app behind will refuse with its own 400
            return None
        except Exception:                         # noqa: BLE001 - a bug here must not cost the user an answer
            log.exception("response cache: cannot key a request; bypassing the cache")
            return None
        return _Plan(request, key, read, write, images)

    async def _image_digests(self, request: ChatCompletionRequest,
                             loaded: dict[str, LoadedImage]) -> list[str] | None:
        """One digest per image part, in order, or None when there are more than MAX_IMAGES_PER_REQUEST (nothing
        is loaded: the app behind refuses them). The images loaded go into `loaded` by URL."""
        parts = [(p.image_url.url, f"messages[{i}].content[{j}].image_url")
                 for i, m in enumerate(request.messages) if isinstance(m.content, list)
                 for j, p in enumerate(m.content) if isinstance(p, ImagePart)]
        if len(parts) > self.max_images:
            return None
        memos = [hashlib.sha256(url.encode()).digest() if url[:5].lower() == "data:" else None for url, _ in parts]
        digests: list[str | None] = []
        for memo in memos:
            digest = self._digests.get(memo) if memo else None
            if digest is not None:
                self._digests.move_to_end(memo)
            digests.append(digest)
        todo = list(dict.fromkeys(url for (url, _), d in zip(parts, digests) if d is None))   # each URL once
        params = {url: param for url, param in reversed(parts)}
        images = await self.images.load_many([(url, params[url]) for url in todo])
        loaded.update(zip(todo, images))
        out = []
        for (url, _), memo, digest in zip(parts, memos, digests):
            if digest is None:
                digest = loaded[url].digest
                if memo:
                    self._digests[memo] = digest
                    if len(self._digests) > _DIGEST_MEMO:
                        self._digests.popitem(last=False)
            out.append(digest)
        return out

    async def _wait(self, flight: asyncio.Future, receive: Receive) -> Any:
        """The leader's entry, None (not stored, or waited too long), or _GONE (our client disconnected)."""
        watcher = asyncio.ensure_future(_disconnected(receive))
        try:
            done, _ = await asyncio.wait({flight, watcher}, timeout=self.wait_s,
                                         return_when=asyncio.FIRST_COMPLETED)
        finally:
            watcher.cancel()
        if flight in done:
            return flight.result()
        return _GONE if watcher in done else None

    # --- answering
    async def _hit(self, send: Send, request: ChatCompletionRequest, entry: Entry, store: str,
                   started: float) -> None:
        headers = [(b"x-cache", b"hit"), (b"age", str(max(0, int(time.time() - entry.stored_at))).encode())]
        if request.stream:
            await send({"type": "http.response.start", "status": 200, "headers": _SSE_HEADERS + headers})
            for event in sse_events(entry, request.include_usage):
                await send({"type": "http.response.body", "body": event, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        else:
            body = entry.to_response().model_dump_json().encode()
            await send({"type": "http.response.start", "status": 200, "headers": [
                (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()), *headers]})
            await send({"type": "http.response.body", "body": body, "more_body": False})
        metrics.observe_cache_result("hit")
        metrics.observe_cache_hit(store, time.perf_counter() - started)

    async def _miss(self, scope: Scope, replay: _Replay, send: Send, plan: _Plan, lead: bool) -> None:
        capture = None
        if plan.write:
            capture = _Capture(bool(plan.request.stream), strip_usage=bool(plan.request.stream)
                               and not plan.request.include_usage)
            if capture.strip_usage:
                scope = await replay.rewrite(scope, _with_usage)
        flight = self.cache.lead(plan.key) if lead else None
        pump = _Pump(send) if flight is not None else None     # the waiters do not wait for our client's reading
        entry = None
        try:
            entry = await self._forward(scope, replay, pump.send if pump else send,
                                        b"miss" if plan.read else b"bypass", capture)
        finally:
            if flight is not None:
                self.cache.settle(flight, entry)          # waiters go on at once
            try:
                if entry is not None:
                    await self.cache.put(plan.key, entry)
            finally:
                if flight is not None:
                    self.cache.land(plan.key, flight)
                if pump is not None:
                    await pump.finish()                   # the rest of the answer, at our client's pace

    async def _forward(self, scope: Scope, receive: Receive, send: Send, label: bytes,
                       capture: _Capture | None) -> Entry | None:
        """The app behind answers; X-Cache is added, and `capture` (if any) watches and may edit the body."""
        async def send_on(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = [(k, v) for k, v in message.get("headers", ()) if k.lower() not in (b"x-cache", b"age")]
                headers.append((b"x-cache", label))
                if capture is not None:
                    capture.start(message["status"], headers)
                message = {**message, "headers": headers}
            elif message["type"] == "http.response.body" and capture is not None:
                more = message.get("more_body", False)
                data = capture.feed(message.get("body", b""), more)
                if not data and more:
                    return
                message = {**message, "body": data}
            await send(message)

        await self.app(scope, receive, send_on)
        return capture.entry() if capture is not None else None


def install(app: FastAPI, config: Config, cache: ResponseCache | None = None,
            rewrite_remote: bool = False) -> ResponseCache | None:
    """Put the cache layer inside `app`'s middleware (innermost: HTTP metrics and error handling see hits too).
    Returns the cache, or None when RESPONSE_CACHE=off and there is no RESPONSE_CACHE_URL."""
    cache = cache or ResponseCache.from_config(config)
    if cache is not None:
        # add_middleware would make it the outermost; appended, it runs inside the app's own middleware
        app.user_middleware.append(Middleware(CacheLayer, cache=cache, config=config, rewrite_remote=rewrite_remote))
        log.info("response cache: %s", " + ".join(s.name for s in cache.stores))
    return cache


def sse_events(entry: Entry, include_usage: bool) -> list[bytes]:
    """A cached answer as the live stream's chunks: role chunk, reasoning (if any), the content with the finish
    reason, the usage chunk when asked, [DONE]."""
    request_id, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())

    def event(choices: list[StreamChoice], usage: Usage | None = None) -> bytes:
        chunk = ChatCompletionChunk(id=request_id, created=created, model=entry.model,
                                    system_fingerprint=entry.system_fingerprint, choices=choices, usage=usage)
        return b"data: " + chunk.model_dump_json().encode() + b"\n\n"

    out = [event([StreamChoice(delta=Delta(role="assistant", content=""))])]
    if entry.reasoning_content:
        out.append(event([StreamChoice(delta=Delta(reasoning_content=entry.reasoning_content))]))
    # the content rides on the finish chunk, as a live answer's last piece does
    out.append(event([StreamChoice(delta=Delta(content=entry.content or None), finish_reason=entry.finish_reason,
                                   stop_reason=entry.stop_reason)]))
    if include_usage:
        out.append(event([], usage=Usage.model_validate(entry.usage)))
    out.append(SSE_DONE)
    return out


class _Capture:
    """Rebuilds the answer from the live response's bytes (JSON, or SSE events) as they go by. With `strip_usage`
    it also removes the usage chunk that was asked for on the client's behalf."""

    def __init__(self, stream: bool, strip_usage: bool):
        self.stream = stream
        self.strip_usage = strip_usage
        self.ok = False               # storable so far
        self._events = False          # parsing SSE events
        self._buf = bytearray()
        self._content: list[str] = []
        self._reasoning: list[str] = []
        self._finish = self._stop = self._usage = self._model = self._fingerprint = None
        self._done = False

    def start(self, status: int, headers: list[tuple[bytes, bytes]]) -> None:
        ctype = next((v for k, v in headers if k.lower() == b"content-type"), b"").lower()
        self._events = status == 200 and self.stream and ctype.startswith(b"text/event-stream")
        self.ok = status == 200 and (self._events or (not self.stream and ctype.startswith(b"application/json")))

    def feed(self, data: bytes, more: bool) -> bytes:
        """The bytes to send on."""
        if not self._events:
            if self.ok:
                self._buf += data
            return data
        self._buf += data
        out = []
        while (end := self._buf.find(b"\n\n")) >= 0:
            event = bytes(self._buf[:end + 2])
            del self._buf[:end + 2]
            if self._event(event):
                out.append(event)
        if not more and self._buf:        # a partial event at the end: pass it on, store nothing
            out.append(bytes(self._buf))
            self._buf.clear()
            self.ok = False
        return b"".join(out)

    def _event(self, event: bytes) -> bool:
        """Note what the event says; False: drop it."""
        if not event.startswith(b"data:"):
            return True
        payload = event[5:].strip()
        if payload == b"[DONE]":
            self._done = True
            return True
        try:
            chunk = json.loads(payload)
            if "error" in chunk:
                self.ok = False
                return True
            self._model = chunk.get("model", self._model)
            self._fingerprint = chunk.get("system_fingerprint", self._fingerprint)
            for choice in chunk.get("choices") or ():
                delta = choice.get("delta") or {}
                if isinstance(delta.get("content"), str):
                    self._content.append(delta["content"])
                if isinstance(delta.get("reasoning_content"), str):
                    self._reasoning.append(delta["reasoning_content"])
                if choice.get("finish_reason"):
                    self._finish, self._stop = choice["finish_reason"], choice.get("stop_reason")
            if chunk.get("usage"):
                self._usage = chunk["usage"]
                if self.strip_usage and not chunk.get("choices"):
                    return False
        except (ValueError, AttributeError, TypeError):
            self.ok = False
        return True

    def entry(self) -> Entry | None:
        if not self.ok:
            return None
        if not self._events:
            try:
                return Entry.from_response(json.loads(self._buf))
            except ValueError:
                return None
        if not (self._done and self._finish in FINISHED and self._usage and self._model and self._fingerprint):
            return None
        try:
            Usage.model_validate(self._usage)
        except ValidationError:
            return None
        return Entry(content="".join(self._content),
                     reasoning_content="".join(self._reasoning) if self._reasoning else None,
                     finish_reason=self._finish, stop_reason=self._stop, usage=self._usage, model=self._model,
                     system_fingerprint=self._fingerprint, stored_at=time.time())


class _Pump:
    """A `send` that never waits for the client: messages are queued (a completion's bytes) and a task sends them
    on. A failed send (the client left) drops the rest; the app learns of the disconnect from `receive`."""

    def __init__(self, send: Send):
        self._send = send
        self._queue: asyncio.Queue[Message | None] = asyncio.Queue()
        self._task = asyncio.ensure_future(self._run())

    async def send(self, message: Message) -> None:
        self._queue.put_nowait(message)

    async def _run(self) -> None:
        while (message := await self._queue.get()) is not None:
            try:
                await self._send(message)
            except Exception:       # noqa: BLE001 - the client is gone; nothing more can reach it
                return

    async def finish(self) -> None:
        self._queue.put_nowait(None)
        try:
            await asyncio.shield(self._task)
        except asyncio.CancelledError:
            self._task.cancel()
            raise


class _Replay:
    """An ASGI receive that gives the already-read request messages first, then the client's own channel (so the
    app behind still sees the client disconnect)."""

    def __init__(self, messages: list[Message], receive: Receive):
        self.messages = deque(messages)
        self.receive = receive

    async def __call__(self) -> Message:
        if self.messages:
            return self.messages.popleft()
        return await self.receive()

    async def rewrite(self, scope: Scope, edit) -> Scope:
        """Replace the (complete) body with `edit(body)` (in a worker thread when large); returns the scope with a
        matching Content-Length."""
        body = b"".join(m.get("body", b"") for m in self.messages)
        body = await asyncio.to_thread(edit, body) if len(body) > INLINE_BYTES else edit(body)
        self.messages = deque([{"type": "http.request", "body": body, "more_body": False}])
        headers = [(k, v) for k, v in scope["headers"] if k.lower() != b"content-length"]
        return {**scope, "headers": headers + [(b"content-length", str(len(body)).encode())]}


def _inline_images(fetched: dict[str, bytes], body: bytes) -> bytes:
    """The request with each remote image URL in `fetched` replaced by a data: URL of its fetched bytes."""
    data = json.loads(body)
    for message in data.get("messages") or ():
        for part in message.get("content") if isinstance(message.get("content"), list) else ():
            url = (part.get("image_url") or {}).get("url") if isinstance(part, dict) else None
            if isinstance(url, str) and url in fetched:
                mime = "image/" + _sniff(fetched[url])
                part["image_url"]["url"] = f"data:{mime};base64,{base64.b64encode(fetched[url]).decode()}"
    return json.dumps(data, ensure_ascii=False, separators=(",", ":")).encode()


def _sniff(data: bytes) -> str:
    """The declared type of a data: URL (the model checks the bytes themselves)."""
    if data.startswith(b"\x89PNG"):
        return "png"
    if data.startswith(b"RIFF") and data[8:12] == b"WEBP":
        return "webp"
    return "jpeg"


def _with_usage(body: bytes) -> bytes:
    data = json.loads(body)
    data["stream_options"] = {**(data.get("stream_options") or {}), "include_usage": True}
    return json.dumps(data, ensure_ascii=False, separators=(",", ":")).encode()


async def _read_body(receive: Receive, limit: int) -> tuple[list[Message], bytes | None]:
    """The request messages read, and the body: None when it is larger than `limit` or the client left (then the
    messages read so far are replayed to the app behind, which deals with it)."""
    messages, size = [], 0
    while True:
        message = await receive()
        messages.append(message)
        if message["type"] != "http.request":
            return messages, None
        size += len(message.get("body", b""))
        if size > limit:
            return messages, None
        if not message.get("more_body", False):
            return messages, b"".join(m.get("body", b"") for m in messages)


async def _disconnected(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


def _cache_control(scope: Scope) -> set[str]:
    directives = set()
    for k, v in scope["headers"]:
        if k.lower() == b"cache-control":
            directives.update(d.split("=", 1)[0].strip().lower() for d in v.decode("latin-1").split(","))
    return directives


# ------------------------------------------------------------------------------------------------- model proxy
_HOP_BY_HOP = frozenset({b"connection", b"keep-alive", b"te", b"trailer", b"trailers", b"transfer-encoding",
                         b"upgrade", b"proxy-authorization", b"proxy-authenticate", b"proxy-connection"})
_REQUEST_DROP = _HOP_BY_HOP | {b"host", b"content-length", b"accept-encoding"}
_RESPONSE_DROP = _HOP_BY_HOP | {b"content-length", b"date", b"server", b"x-cache", b"age"}


def _end_to_end(headers, drop: frozenset[bytes]) -> list[tuple[bytes, bytes]]:
    """`headers` without hop-by-hop ones: `drop` and those the Connection header names (RFC 9110 7.6.1)."""
    named = {t.strip().lower().encode("latin-1") for k, v in headers if k.lower() == b"connection"
             for t in v.decode("latin-1").split(",") if t.strip()}
    return [(k, v) for k, v in headers if k.lower() not in drop and k.lower() not in named]


class ModelProxy:
    """ASGI app forwarding each request to the model service; the response streams back chunk by chunk, and a
    client that leaves closes the upstream connection (the model aborts the generation)."""

    def __init__(self, base_url: str, timeout_s: float, transport: httpx.AsyncBaseTransport | None = None,
                 max_body: int = 64 * 2**20):
        self.max_body = max_body
        self.client = httpx.AsyncClient(
            base_url=base_url.rstrip("/"), transport=transport, follow_redirects=False, trust_env=False,
            timeout=httpx.Timeout(timeout_s, connect=10.0),
            cookies=CookieJar(DefaultCookiePolicy(allowed_domains=[])),   # keeps no cookie: clients share it
            limits=httpx.Limits(max_connections=None, max_keepalive_connections=64))

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        messages, body = await _read_body(receive, self.max_body)
        if body is None:
            return                                    # the client left (the request gate bounds the size)
        url = scope["path"] + (("?" + scope["query_string"].decode("latin-1")) if scope.get("query_string") else "")
        headers = _end_to_end(scope["headers"], _REQUEST_DROP)
        headers.append((b"accept-encoding", b"identity"))     # bytes pass through as they are (and get parsed)
        request = self.client.build_request(scope["method"], url, headers=headers, content=body)
        try:
            response = await self.client.send(request, stream=True)
        except httpx.HTTPError as e:
            log.warning("model service %s did not answer: %s: %s", self.client.base_url, type(e).__name__, e)
            await errors.error_response("unavailable", f"the model service did not answer ({type(e).__name__}); "
                                        "retry later", retry_after=5)(scope, receive, send)
            return
        try:
            await send({"type": "http.response.start", "status": response.status_code,
                        "headers": _end_to_end(response.headers.raw, _RESPONSE_DROP)})
            relay = asyncio.ensure_future(self._relay(response, send))
            watcher = asyncio.ensure_future(_disconnected(receive))
            try:
                await asyncio.wait({relay, watcher}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                watcher.cancel()
                if not relay.done():                  # the client left: stop reading, which closes upstream
                    relay.cancel()
                    await asyncio.gather(relay, return_exceptions=True)
            if not relay.cancelled():
                relay.result()
        finally:
            await response.aclose()

    @staticmethod
    async def _relay(response: httpx.Response, send: Send) -> None:
        try:
            async for chunk in response.aiter_raw():
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
        except httpx.HTTPError as e:
            log.warning("model service stream broke: %s: %s", type(e).__name__, e)
            if not response.headers.get("content-type", "").startswith("text/event-stream"):
                raise
            failure = errors.error_json(EngineError(f"the model service stream broke ({type(e).__name__})"))
            await send({"type": "http.response.body", "body": f"data: {failure}\n\n".encode() + SSE_DONE,
                        "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    async def aclose(self) -> None:
        await self.client.aclose()


# -------------------------------------------------------------------------------------------- cache-front role
def build_front_app(config: Config, *, cache: ResponseCache | None = None,
                    transport: httpx.AsyncBaseTransport | None = None, drain: Drain | None = None) -> FastAPI:
    """ROLE=cache-front: the cache layer over a proxy to MODEL_URL. Ready at once, with or without the model
    service and Redis, until `drain` begins (SIGTERM, function/shutdown.py). `transport` replaces the network in
    tests."""
    proxy = ModelProxy(config.model_url, config.request_timeout_s, transport, config.max_request_bytes)
    drain = drain or Drain()
    cache = cache or ResponseCache.from_config(config)
    if cache is None:
        log.warning("cache front without a cache (RESPONSE_CACHE=off, no RESPONSE_CACHE_URL): proxying only")

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        shutdown.drain_on_sigterm(drain, config.request_timeout_s)    # only under uvicorn (func-python: start())
        yield                                         # only under uvicorn; func-python sends no lifespan events
        await proxy.aclose()
        if cache is not None:
            await cache.aclose()

    app = FastAPI(title="AutoGLM-Phone-9B cache front", summary="Response cache in front of the model service",
                  lifespan=lifespan, strict_content_type=False)
    errors.install(app)
    name = config.served_model_name

    @app.get("/health")
    async def health() -> JSONResponse:
        return JSONResponse({"status": "ok", "model": name, "role": "cache-front"})

    @app.get("/health/liveness", response_class=PlainTextResponse)
    async def liveness() -> PlainTextResponse:
        return PlainTextResponse("ready")

    @app.get("/health/readiness", response_class=PlainTextResponse)
    async def readiness() -> PlainTextResponse:
        return PlainTextResponse("shutting down", status_code=500) if drain.draining else PlainTextResponse("ready")

    @app.get("/metrics", response_class=PlainTextResponse)
    async def prometheus() -> Response:
        body, content_type = metrics.render()
        return Response(body, media_type=content_type)

    app.router.routes.append(Route(CHAT_PATH, proxy, methods=["POST"]))
    app.router.routes.append(Route("/{path:path}", proxy, include_in_schema=False))   # /v1/models and the rest
    app.add_middleware(RequestGate, drain=drain, max_body=config.max_request_bytes,
                       body_timeout_s=config.request_timeout_s, max_depth=config.max_json_depth,
                       max_elements=config.max_json_elements, all_paths=True)   # every body on every path
    auth.install(app, config)       # checks the key here; the proxy passes Authorization on to the model
    app.add_middleware(HttpMetrics, routes=app.router.routes)
    if cache is not None:
        install(app, config, cache, rewrite_remote=True)
    app.state.proxy, app.state.cache, app.state.drain = proxy, cache, drain
    return app
