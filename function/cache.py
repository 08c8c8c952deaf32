"""The response cache: request keys, the caching policy, cached answers, the stores and single flight.

Knows no HTTP and no engine (function.front is its HTTP face). Two stores, usable together as tiers:
- `MemoryStore`: the in-process LRU, bounded by entries and bytes, entries expire after the TTL;
- `RedisStore`: Redis or Valkey shared by replicas and surviving scale to zero. Every call has a timeout of
  milliseconds; a failure is counted, logged at most every `LOG_EVERY_S` and skipped for `COOLDOWN_S` (so a hung
  Redis costs one timeout per cool-down, not one per request), and the caller sees a miss: the cache fails open.

Key: the SHA-256 of the canonical request: the served model name, the whole validated request (messages with every
image replaced by the digest of its decoded pixels, every sampling parameter, template flags such as
enable_thinking, return_reasoning, max tokens, unknown extra fields too) minus only what cannot change the answer
(`stream`, `stream_options`, `user`, `n`, which must be 1), plus the SHA-256 of the caller's API key when keys are
configured (function/api/auth.py), so that entries never cross keys (X-Cache and Age would tell one caller what
another asked) unless RESPONSE_CACHE_SHARE_KEYS says they may. A stored `Entry` is the answer itself (content,
reasoning, finish and stop reason, usage), so one entry serves streamed and non-streamed requests alike. A
`Recorder` assembles it from what the serving layer produced (or, in the cache front, from the parsed answer).

An entry read back is checked field by field (`Entry.from_bytes`): one that is malformed (written by another
version, by hand, or corrupted) is a miss, deleted from its store and logged once per store; it is never copied
into the tiers above.

What the key cannot see is the deployment: a changed checkpoint, quantization or DEFAULT_MAX_TOKENS behind the same
SERVED_MODEL_NAME. The in-process cache dies with its revision; a shared Redis keeps entries until their TTL, so
flush it (or rename the model) when the model changes (docs/cache.md).
"""
from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import time
import uuid
from collections import OrderedDict
from contextvars import ContextVar
from dataclasses import asdict, dataclass
from typing import Any, Callable, Protocol, Sequence

from function import metrics
from function.api.protocol import (AssistantMessage, ChatCompletionChunk, ChatCompletionRequest,
                                   ChatCompletionResponse, Choice, ImagePart, Usage)
from function.config import Config

log = logging.getLogger(__name__)

KEY_PREFIX = "autoglm:rc:v1:"
"""Redis key prefix; the version changes whenever the key or the entry format does."""

REDIS_TIMEOUT_S = 0.05
"""Per-call timeout of Redis commands (loopback or in-cluster Redis answers in well under a millisecond)."""

REDIS_CONNECT_TIMEOUT_S = 0.25
"""Timeout of opening a connection (TLS handshakes with rediss:// included)."""

COOLDOWN_S = 1.0
"""After a failed Redis call, skip Redis this long before trying again."""

LOG_EVERY_S = 30.0
"""At most one log line per store per this interval while it keeps failing."""

_NOT_IN_KEY = frozenset({"model", "stream", "stream_options", "user", "n"})
FINISHED = ("stop", "length")
"""Finish reasons of a complete answer; anything else (abort, error, none) is never stored."""


# ----------------------------------------------------------------------------------------------------------- keys
def canonical_request(request: ChatCompletionRequest, model: str, image_digests: Sequence[str]) -> dict[str, Any]:
    """The request as the data its answer depends on. `image_digests`: one per image part, in order (the digest
    of the decoded pixels, `function.images.LoadedImage.digest`), so a re-encoded screenshot gives the same key."""
    body = request.model_dump(mode="json", exclude_none=True, exclude=set(_NOT_IN_KEY))
    digests = iter(image_digests)
    for message, parsed in zip(body["messages"], request.messages):
        if not isinstance(parsed.content, list):
            continue
        for part, parsed_part in zip(message["content"], parsed.content):
            if isinstance(parsed_part, ImagePart):
                digest = next(digests, None)
                if digest is None:
                    raise ValueError("fewer image digests than images")
                part["image_url"] = {**part["image_url"], "url": "sha256:" + digest}
    if next(digests, None) is not None:
        raise ValueError("more image digests than images")
    return {"model": model, "request": body}


def request_key(request: ChatCompletionRequest, model: str, image_digests: Sequence[str], caller: str = "") -> str:
    """`caller`: the hash of the caller's API key ("" without keys, or when entries may cross keys)."""
    canon = canonical_request(request, model, image_digests)
    if caller:
        canon["caller"] = caller
    blob = json.dumps(canon, sort_keys=True, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    return KEY_PREFIX + hashlib.sha256(blob.encode()).hexdigest()


def deterministic(request: ChatCompletionRequest) -> bool:
    """Greedy (temperature 0 or top_k 1) or seeded: the answers that are worth replaying by default."""
    params = request.to_sampling_params()
    return params.greedy or params.seed is not None


# -------------------------------------------------------------------------------------------------------- entries
@dataclass(frozen=True)
class Entry:
    """A complete answer, as stored."""
    content: str
    reasoning_content: str | None
    finish_reason: str
    stop_reason: str | int | None
    usage: dict[str, Any]              # OpenAI usage object, prompt_tokens_details included
    model: str
    system_fingerprint: str
    stored_at: float                   # epoch seconds (the hit's Age header)

    def to_bytes(self) -> bytes:
        return json.dumps(asdict(self), ensure_ascii=False, separators=(",", ":")).encode()

    @classmethod
    def from_bytes(cls, data: bytes) -> Entry:
        """The stored entry; ValueError unless every field has its type (and the usage is a valid usage)."""
        raw = json.loads(data)
        if not isinstance(raw, dict) or set(raw) != {f for f in cls.__dataclass_fields__}:
            raise ValueError("not an entry object")
        ok = (isinstance(raw["content"], str) and isinstance(raw["reasoning_content"], (str, type(None)))
              and raw["finish_reason"] in FINISHED
              and (raw["stop_reason"] is None or (isinstance(raw["stop_reason"], (str, int))
                                                  and not isinstance(raw["stop_reason"], bool)))
              and isinstance(raw["usage"], dict) and isinstance(raw["model"], str)
              and isinstance(raw["system_fingerprint"], str)
              and isinstance(raw["stored_at"], (int, float)) and not isinstance(raw["stored_at"], bool))
        if not ok:
            raise ValueError("an entry field has the wrong type")
        try:
            Usage.model_validate(raw["usage"])
        except Exception:       # pydantic's ValidationError is a ValueError; anything else is malformed too
            raise ValueError("invalid usage") from None
        return cls(**raw)

    @classmethod
    def from_response(cls, body: dict[str, Any]) -> Entry | None:
        """From a chat.completion JSON object; None unless it is one complete answer."""
        try:
            (choice,) = body["choices"]
            message = choice["message"]
            if choice["finish_reason"] not in FINISHED or not isinstance(message.get("content"), str):
                return None
            Usage.model_validate(body["usage"])
            return cls(content=message["content"], reasoning_content=message.get("reasoning_content"),
                       finish_reason=choice["finish_reason"], stop_reason=choice.get("stop_reason"),
                       usage=body["usage"], model=body["model"], system_fingerprint=body["system_fingerprint"],
                       stored_at=time.time())
        except (KeyError, TypeError, ValueError):
            return None

    def to_response(self) -> ChatCompletionResponse:
        """The answer as a new chat.completion (new id, created now)."""
        return ChatCompletionResponse(
            id=f"chatcmpl-{uuid.uuid4().hex}", created=int(time.time()), model=self.model,
            system_fingerprint=self.system_fingerprint,
            choices=[Choice(message=AssistantMessage(content=self.content, reasoning_content=self.reasoning_content),
                            finish_reason=self.finish_reason, stop_reason=self.stop_reason)],
            usage=Usage.model_validate(self.usage))


# ------------------------------------------------------------------------------------------------------ recording
class Recorder:
    """One answer assembled into the `Entry` to store, from its parts as they are produced; only a complete answer
    (finish reason stop or length, usage, model and fingerprint, no failure) gives an entry.

    In the model's process the serving layer hands it its own objects before it encodes them (function/api/
    serving.py: `response`, or each `chunk` and then `stream_usage` once the stream ended well), so nothing it
    sent is parsed back; the cache layer puts the recorder in `recording` around the chat route. The cache front
    gets the answer as bytes from the model service and feeds the parsed events to `add` (function/front/entries.py).
    One choice only: the cache stores no other (`ResponseCache.cacheable`)."""

    def __init__(self) -> None:
        self.content: list[str] = []
        self.reasoning: list[str] = []
        self.finish_reason: str | None = None
        self.stop_reason: str | int | None = None
        self.usage: dict[str, Any] | None = None
        self.model: str | None = None
        self.system_fingerprint: str | None = None
        self.failed = False
        self._response: dict[str, Any] | None = None

    def add(self, content: Any, reasoning: Any, finish_reason: str | None, stop_reason: str | int | None) -> None:
        """A piece of the choice (a streamed delta): its text, its reasoning, and the finish when it is the last."""
        if isinstance(content, str):
            self.content.append(content)
        if isinstance(reasoning, str):
            self.reasoning.append(reasoning)
        if finish_reason:
            self.finish_reason, self.stop_reason = finish_reason, stop_reason

    def chunk(self, chunk: ChatCompletionChunk) -> None:
        """A streamed chunk as the serving layer produced it (its usage, if any, is not the stream's: see
        `stream_usage`)."""
        self.model, self.system_fingerprint = chunk.model, chunk.system_fingerprint
        for choice in chunk.choices:
            self.add(choice.delta.content, choice.delta.reasoning_content, choice.finish_reason, choice.stop_reason)

    def stream_usage(self, usage: Usage) -> None:
        """The whole stream's usage, handed over once it ended well, whether or not the client asked for it."""
        self.usage = usage.model_dump(mode="json")

    def response(self, response: ChatCompletionResponse) -> None:
        """A whole (non-streamed) answer as the serving layer produced it."""
        self._response = response.model_dump(mode="json")

    def entry(self) -> Entry | None:
        if self.failed:
            return None
        if self._response is not None:
            return Entry.from_response(self._response)
        if not (self.finish_reason in FINISHED and self.usage and self.model and self.system_fingerprint):
            return None
        try:
            Usage.model_validate(self.usage)
        except ValueError:          # pydantic's ValidationError
            return None
        return Entry(content="".join(self.content),
                     reasoning_content="".join(self.reasoning) if self.reasoning else None,
                     finish_reason=self.finish_reason, stop_reason=self.stop_reason, usage=self.usage,
                     model=self.model, system_fingerprint=self.system_fingerprint, stored_at=time.time())


recording: ContextVar[Recorder | None] = ContextVar("autoglm_response_cache_recording", default=None)
"""The recorder of the chat answer being produced in this context, when the cache will store it (set by
function/front/layer.py around the chat route; read by function/api/serving.py)."""


# --------------------------------------------------------------------------------------------------------- stores
class Store(Protocol):
    name: str

    async def get(self, key: str) -> bytes | None:
        """The value, or None when absent, expired or the store failed (never raises)."""

    async def set(self, key: str, value: bytes, ttl_s: float) -> None:
        """Store with a time to live (never raises)."""

    async def delete(self, key: str) -> None:
        """Remove (never raises)."""

    async def aclose(self) -> None: ...


class MemoryStore:
    """In-process LRU bounded by entries and bytes (key + value), with per-entry expiry."""
    name = "memory"

    def __init__(self, max_entries: int, max_bytes: int, clock: Callable[[], float] = time.monotonic):
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self.clock = clock
        self.bytes = 0
        self._data: OrderedDict[str, tuple[float, bytes]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._data)

    async def get(self, key: str) -> bytes | None:
        item = self._data.get(key)
        if item is None:
            return None
        expires, value = item
        if expires <= self.clock():
            self._drop(key)
            self._report()
            return None
        self._data.move_to_end(key)
        return value

    async def set(self, key: str, value: bytes, ttl_s: float) -> None:
        size = len(key) + len(value)
        if key in self._data:
            self._drop(key)
        if size <= self.max_bytes and self.max_entries > 0 and ttl_s > 0:
            self._data[key] = (self.clock() + ttl_s, value)
            self.bytes += size
            while len(self._data) > self.max_entries or self.bytes > self.max_bytes:
                self._drop(next(iter(self._data)))
            metrics.observe_cache_write(self.name, len(value))
        self._report()

    async def delete(self, key: str) -> None:
        if key in self._data:
            self._drop(key)
            self._report()

    def _drop(self, key: str) -> None:
        _, value = self._data.pop(key)
        self.bytes -= len(key) + len(value)

    def _report(self) -> None:
        metrics.set_cache_size(len(self._data), self.bytes)

    async def aclose(self) -> None:
        self._data.clear()
        self.bytes = 0
        self._report()


class RedisStore:
    """Redis/Valkey through redis-py's asyncio client (one connection pool, no retries): fails open."""
    name = "redis"

    def __init__(self, url: str, timeout_s: float = REDIS_TIMEOUT_S,
                 connect_timeout_s: float = REDIS_CONNECT_TIMEOUT_S, cooldown_s: float = COOLDOWN_S):
        self.url = url
        self.timeout_s = timeout_s
        self.connect_timeout_s = connect_timeout_s
        self.cooldown_s = cooldown_s
        self._client = None                 # created on first use, inside the serving event loop
        self._skip_until = 0.0
        self._last_log = -LOG_EVERY_S
        self._suppressed = 0

    def _redis(self):
        if self._client is None:
            from redis.asyncio import Redis
            from redis.asyncio.retry import Retry
            from redis.backoff import NoBackoff
            self._client = Redis.from_url(self.url, socket_timeout=self.timeout_s,
                                          socket_connect_timeout=self.connect_timeout_s,
                                          retry=Retry(NoBackoff(), 0), health_check_interval=0)
        return self._client

    async def _call(self, op: str, fn):
        now = time.monotonic()
        if now < self._skip_until:
            return None
        try:
            # the client's socket timeouts do the work; this outer bound also covers connecting and pool waits
            result = await asyncio.wait_for(fn(self._redis()), self.connect_timeout_s + self.timeout_s)
        except Exception as e:      # noqa: BLE001 - any failure of the cache is a miss, never the user's error
            self._failed(op, e)
            return None
        metrics.set_cache_store_up(self.name)
        return result

    def _failed(self, op: str, e: Exception) -> None:
        now = time.monotonic()
        self._skip_until = now + self.cooldown_s
        metrics.observe_cache_store_error(self.name, op)
        if now - self._last_log >= LOG_EVERY_S:
            more = f" ({self._suppressed} more failures since the last report)" if self._suppressed else ""
            log.warning("response cache: redis %s failed: %s: %s; serving without it for %.0f s%s", op,
                        type(e).__name__, e or "timeout", self.cooldown_s, more)
            self._last_log, self._suppressed = now, 0
        else:
            self._suppressed += 1

    async def get(self, key: str) -> bytes | None:
        return await self._call("get", lambda r: r.get(key))

    async def set(self, key: str, value: bytes, ttl_s: float) -> None:
        if ttl_s <= 0:
            return
        done = await self._call("set", lambda r: r.set(key, value, px=max(1, int(ttl_s * 1000))))
        if done:
            metrics.observe_cache_write(self.name, len(value))

    async def delete(self, key: str) -> None:
        await self._call("delete", lambda r: r.delete(key))

    async def aclose(self) -> None:
        if self._client is not None:
            client, self._client = self._client, None
            try:
                await client.aclose()
            except Exception:   # noqa: BLE001 - closing a dead connection
                pass


# ---------------------------------------------------------------------------------------------------------- cache
class ResponseCache:
    """Stores as tiers (memory before Redis), the caching policy, and single flight."""

    def __init__(self, stores: Sequence[Store], *, model: str, ttl_s: float, cache_all: bool = False,
                 share_keys: bool = False):
        self.stores = list(stores)
        self.model = model
        self.ttl_s = ttl_s
        self.cache_all = cache_all
        self.share_keys = share_keys
        self._malformed_logged: set[str] = set()
        self._flights: dict[str, asyncio.Future[Entry | None]] = {}

    @classmethod
    def from_config(cls, config: Config) -> ResponseCache | None:
        """RESPONSE_CACHE=memory: the in-process tier; RESPONSE_CACHE_URL: the Redis tier behind it. None: neither."""
        stores: list[Store] = []
        if config.response_cache == "memory":
            stores.append(MemoryStore(config.response_cache_max_entries, config.response_cache_max_bytes))
        if config.response_cache_url:
            stores.append(RedisStore(config.response_cache_url))
        if not stores:
            return None
        return cls(stores, model=config.served_model_name, ttl_s=config.response_cache_ttl_s,
                   cache_all=config.response_cache_all, share_keys=config.response_cache_share_keys)

    def cacheable(self, request: ChatCompletionRequest) -> bool:
        if (request.n or 1) > 1 or request.logprobs:     # an entry holds one choice, without logprobs
            return False
        return self.cache_all or deterministic(request)

    def key(self, request: ChatCompletionRequest, image_digests: Sequence[str], caller: str = "") -> str:
        """`caller`: the hash of the request's API key (function/api/auth.py); ignored with share_keys."""
        return request_key(request, self.model, image_digests, "" if self.share_keys else caller)

    async def get(self, key: str) -> tuple[Entry, str] | None:
        """(entry, name of the store that had it); a lower tier's hit is copied into the tiers above it."""
        for i, store in enumerate(self.stores):
            data = await store.get(key)
            if data is None:
                continue
            try:
                entry = Entry.from_bytes(data)
            except (TypeError, ValueError, KeyError, RecursionError) as e:
                if store.name not in self._malformed_logged:       # once per store: it may hold many
                    self._malformed_logged.add(store.name)
                    log.warning("response cache: a malformed %s entry (%s) is a miss and is deleted; further ones "
                                "are deleted without a log line", store.name, e)
                await store.delete(key)
                continue
            for upper in self.stores[:i]:
                await upper.set(key, data, self.ttl_s)
            return entry, store.name
        return None

    async def put(self, key: str, entry: Entry) -> None:
        data = entry.to_bytes()
        for store in self.stores:
            await store.set(key, data, self.ttl_s)

    # --- single flight: one generation per key at a time in this process; the others wait for its entry
    def join(self, key: str) -> asyncio.Future[Entry | None] | None:
        """The future of an identical request in flight, or None (then the caller may `lead`)."""
        return self._flights.get(key)

    def lead(self, key: str) -> asyncio.Future[Entry | None]:
        fut = asyncio.get_running_loop().create_future()
        self._flights[key] = fut
        return fut

    def settle(self, fut: asyncio.Future[Entry | None], entry: Entry | None) -> None:
        """Hand the leader's result to the waiters: the entry, or None when it is not stored (they then ask the
        model themselves)."""
        if not fut.done():
            fut.set_result(entry)

    def land(self, key: str, fut: asyncio.Future[Entry | None]) -> None:
        """End the flight (after the entry is stored: until then, new arrivals still join the settled flight)."""
        self.settle(fut, None)
        if self._flights.get(key) is fut:
            del self._flights[key]

    async def aclose(self) -> None:
        for store in self.stores:
            await store.aclose()
