"""The cache tier's ASGI face: `CacheLayer` answers POST /v1/chat/completions from the response cache
(function/cache.py) or passes it on to the app behind, watching the answer go by to store it; `install` puts it inside
an app. The rules (what is cached, single flight, bounds) are in function/front/__init__.py."""
from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import logging
import time
from collections import OrderedDict
from dataclasses import dataclass
from functools import partial
from typing import Any

from fastapi import FastAPI
from pydantic import ValidationError
from starlette.middleware import Middleware
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from function import metrics
from function.api import errors
from function.api.auth import SCOPE_KEY
from function.api.limits import INLINE_BYTES
from function.api.protocol import ChatCompletionRequest, ImagePart
from function.cache import Entry, ResponseCache, recording
from function.config import Config
from function.errors import ServiceError
from function.http_common import SSE_START_HEADERS, Replay, read_body, unless_disconnected, until_disconnected
from function.images import ImageLoader, LoadedImage, prefetched

from .entries import Capture, Recorded, sse_events

log = logging.getLogger(__name__)

CHAT_PATH = "/v1/chat/completions"
_DIGEST_MEMO = 256          # image URLs (sha256 of the data: URL) whose pixel digest is remembered
_GONE = object()            # the client left while waiting


@dataclass
class _Plan:
    request: ChatCompletionRequest
    key: str
    read: bool
    write: bool
    images: dict[str, LoadedImage]


class CacheLayer:
    """ASGI middleware: chat completions through the response cache, everything else untouched. `proxied` (the
    cache front): the app behind is the proxy to the model service, so an answer arrives as bytes and is parsed to
    be stored (`Capture`), and remote images are sent on as data: URLs of the bytes the key was computed from.
    Otherwise the app behind is the model's own, whose serving layer records the answer from its objects as it
    produces them (`Recorded`, function.cache.recording)."""

    def __init__(self, app: ASGIApp, cache: ResponseCache, config: Config, proxied: bool = False):
        self.app = app
        self.cache = cache
        self.images = ImageLoader(config)
        self.max_images = config.max_images_per_request
        self.max_body = config.max_request_bytes
        self.wait_s = config.request_timeout_s
        self.proxied = proxied
        self._digests: OrderedDict[bytes, str] = OrderedDict()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST" or scope["path"] != CHAT_PATH:
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        body = await read_body(receive, self.max_body)
        replay = Replay(body.messages, receive)
        plan = None
        if body.data is not None:
            try:
                plan = await unless_disconnected(self._plan(scope, body.data), partial(until_disconnected, receive),
                                                 timeout=self.wait_s, gone=_GONE)
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
        if self.proxied and fetched:
            scope = await _rewrite(replay, scope, partial(_inline_images, fetched))
        with prefetched(plan.images):       # the app behind uses these instead of loading them again
            await self._answer(scope, replay, send, plan, receive, started)

    async def _answer(self, scope: Scope, replay: Replay, send: Send, plan: _Plan, receive: Receive,
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
        except ServiceError:                       # an image the app behind will refuse with its own 400
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
        try:
            return await unless_disconnected(flight, partial(until_disconnected, receive), timeout=self.wait_s,
                                             cancel=False, gone=_GONE)     # the flight is the leader's
        except TimeoutError:
            return None

    # --- answering
    async def _hit(self, send: Send, request: ChatCompletionRequest, entry: Entry, store: str,
                   started: float) -> None:
        headers = [(b"x-cache", b"hit"), (b"age", str(max(0, int(time.time() - entry.stored_at))).encode())]
        if request.stream:
            await send({"type": "http.response.start", "status": 200, "headers": SSE_START_HEADERS + headers})
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

    async def _miss(self, scope: Scope, replay: Replay, send: Send, plan: _Plan, lead: bool) -> None:
        watch: Capture | Recorded | None = None
        stream = bool(plan.request.stream)
        if plan.write and not self.proxied:
            watch = Recorded(stream)
        elif plan.write:
            watch = Capture(stream, strip_usage=stream and not plan.request.include_usage)
            if watch.strip_usage:           # the entry needs the usage: asked for, and removed from the answer
                scope = await _rewrite(replay, scope, _with_usage)
        flight = self.cache.lead(plan.key) if lead else None
        pump = _Pump(send) if flight is not None else None     # the waiters do not wait for our client's reading
        entry = None
        try:
            entry = await self._forward(scope, replay, pump.send if pump else send,
                                        b"miss" if plan.read else b"bypass", watch)
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
                       watch: Capture | Recorded | None) -> Entry | None:
        """The app behind answers; X-Cache is added, and `watch` (if any) watches (a `Capture` may edit the body)
        and gives the entry to store."""
        async def send_on(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = [(k, v) for k, v in message.get("headers", ()) if k.lower() not in (b"x-cache", b"age")]
                headers.append((b"x-cache", label))
                if watch is not None:
                    watch.start(message["status"], headers)
                message = {**message, "headers": headers}
            elif message["type"] == "http.response.body" and watch is not None:
                more = message.get("more_body", False)
                data = watch.feed(message.get("body", b""), more)
                if not data and more:
                    return
                message = {**message, "body": data}
            await send(message)

        token = recording.set(watch.recorder) if isinstance(watch, Recorded) else None
        try:
            await self.app(scope, receive, send_on)
        finally:
            if token is not None:
                recording.reset(token)
        return watch.entry() if watch is not None else None


def install(app: FastAPI, config: Config, cache: ResponseCache | None = None,
            proxied: bool = False) -> ResponseCache | None:
    """Put the cache layer inside `app`'s middleware (innermost: HTTP metrics and error handling see hits too);
    `proxied`: `app` is the cache front's (CacheLayer). Returns the cache, or None when RESPONSE_CACHE=off and there
    is no RESPONSE_CACHE_URL."""
    cache = cache or ResponseCache.from_config(config)
    if cache is not None:
        # add_middleware would make it the outermost; appended, it runs inside the app's own middleware
        app.user_middleware.append(Middleware(CacheLayer, cache=cache, config=config, proxied=proxied))
        log.info("response cache: %s", " + ".join(s.name for s in cache.stores))
    return cache



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


async def _rewrite(replay: Replay, scope: Scope, edit) -> Scope:
    """Replace the (complete) body `replay` holds with `edit(body)` (in a worker thread when large); returns the
    scope with a matching Content-Length."""
    body = replay.body
    return replay.replace(scope, await asyncio.to_thread(edit, body) if len(body) > INLINE_BYTES else edit(body))


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


def _cache_control(scope: Scope) -> set[str]:
    directives = set()
    for k, v in scope["headers"]:
        if k.lower() == b"cache-control":
            directives.update(d.split("=", 1)[0].strip().lower() for d in v.decode("latin-1").split(","))
    return directives
