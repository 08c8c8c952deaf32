"""The response cache in-process: keys and policy, the LRU, the cache layer inside the model's app against the fake
engine (hits, X-Cache, Cache-Control, streaming replays, what is never stored, single flight), and the Redis store
against a real redis-server started here on loopback (shared entries, TTL, failing open when Redis dies or hangs).

`RedisServer` and the `redis_server` fixture are reused by test_cache_front.py."""
from __future__ import annotations

import asyncio
import logging
import os
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import replace
from pathlib import Path

import httpx
import pytest
from conftest import data_url, image_bytes, image_message, sse_events
from support.asgi import call_asgi, until
from support.fake_engine import FakeEngine

from function import metrics
from function.api.app import build_app
from function.api.protocol import ChatCompletionRequest
from function.cache import Entry, MemoryStore, RedisStore, ResponseCache, deterministic, request_key
from function.config import Config
from function.errors import InvalidInput, Overloaded
from function.front import Capture, install

MODEL = "autoglm-phone-9b"
HELLO = [{"role": "user", "content": "hello"}]
GREEDY = {"model": MODEL, "messages": HELLO, "temperature": 0}
REDIS_SERVER = shutil.which("redis-server") or "/usr/bin/redis-server"


# ------------------------------------------------------------------------------------------------- redis-server
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RedisServer:
    """A throwaway redis-server on a free loopback port: no persistence, stopped by the test that started it."""

    def __init__(self, workdir: Path):
        assert os.access(REDIS_SERVER, os.X_OK), "redis-server is missing: apt-get install redis-server"
        self.workdir = workdir
        self.port = _free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc: subprocess.Popen | None = None
        self.start()

    def start(self) -> None:
        self.log = open(self.workdir / f"redis-{self.port}.log", "ab")
        self.proc = subprocess.Popen(
            [REDIS_SERVER, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", str(self.workdir), "--protected-mode", "no"], stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 10
        while self.command("PING") != "+PONG":
            log = (self.workdir / f"redis-{self.port}.log").read_text()
            assert self.proc.poll() is None, f"redis-server exited: {log}"
            assert time.monotonic() < deadline, "redis-server did not answer PING"
            time.sleep(0.02)

    def command(self, *args: str) -> str | None:
        """One inline command over a raw socket; the reply's first line, or None when Redis does not answer."""
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1) as s:
                s.sendall(" ".join(args).encode() + b"\r\n")
                return s.recv(65536).split(b"\r\n")[0].decode()
        except OSError:
            return None

    def kill(self) -> None:
        """Dies at once (SIGKILL): every connection is refused from now on."""
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self.log.close()

    def pause(self) -> None:
        """Hangs (SIGSTOP): connections open, nothing is answered."""
        os.kill(self.proc.pid, signal.SIGSTOP)

    def resume(self) -> None:
        os.kill(self.proc.pid, signal.SIGCONT)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.resume()
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.kill()
        self.log.close()


@pytest.fixture
def redis_server(tmp_path: Path):
    server = RedisServer(tmp_path)
    try:
        yield server
    finally:
        server.stop()


# ----------------------------------------------------------------------------------------------------- helpers
def config(**env) -> Config:
    return Config.from_env({k: str(v) for k, v in env.items()})


def cached_app(engine: FakeEngine, cache: ResponseCache | None = None, **env):
    """The model's app with the cache layer inside, as func.py assembles it."""
    cfg = config(**env)
    app = build_app(cfg, engine)
    install(app, cfg, cache)
    return app


def client_of(app) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://testserver")


@pytest.fixture
async def client(engine: FakeEngine):
    async with client_of(cached_app(engine)) as c:
        yield c


def count(result: str) -> float:
    return metrics.REGISTRY.get_sample_value("autoglm_response_cache_requests_total", {"result": result}) or 0.0


def sample(name: str, **labels) -> float:
    return metrics.REGISTRY.get_sample_value(name, labels) or 0.0


def without_ids(body: dict) -> dict:
    return {k: v for k, v in body.items() if k not in ("id", "created")}


def shape(value):
    """The JSON structure without the values: what a client's parser relies on."""
    if isinstance(value, dict):
        return tuple(sorted((k, shape(v)) for k, v in value.items()))
    if isinstance(value, list):
        return tuple(shape(v) for v in value)
    return type(value).__name__


def frame(event) -> tuple:
    """A chunk's structure with each delta's keys set aside (which of role/content/reasoning_content a delta carries
    depends on where the text happens to be cut, live or replayed)."""
    if not isinstance(event, dict):
        return (event,)
    return shape({**event, "choices": [{**c, "delta": None} for c in event["choices"]]})


def delta_keys(events: list) -> set[frozenset]:
    return {frozenset(c["delta"]) for e in events if isinstance(e, dict) for c in e["choices"]}


def stream_text(events: list) -> tuple[str, str]:
    deltas = [c["delta"] for e in events if isinstance(e, dict) for c in e["choices"]]
    return ("".join(d.get("reasoning_content") or "" for d in deltas), "".join(d.get("content") or "" for d in deltas))


def req(**kw) -> ChatCompletionRequest:
    return ChatCompletionRequest.model_validate({**GREEDY, **kw})


def key(digests=(), **kw) -> str:
    return request_key(req(**kw), MODEL, list(digests))


# ---------------------------------------------------------------------------------------------- keys and policy
def test_key_ignores_only_what_cannot_change_the_answer():
    base = key()
    for same in (dict(stream=True), dict(stream=True, stream_options={"include_usage": True}), dict(user="u1"),
                 dict(n=1), dict(model=None), dict(temperature=0.0)):
        assert key(**same) == base, same


DIFFERENT = [
    dict(messages=[{"role": "user", "content": "hello!"}]),
    dict(messages=[{"role": "system", "content": "be brief"}, *HELLO]),
    dict(messages=[{"role": "user", "content": [{"type": "text", "text": "hello"}]}]),
    dict(messages=[*HELLO, {"role": "assistant", "content": "hi"}, *HELLO]),
    dict(temperature=0.5, seed=1), dict(temperature=0.5, seed=2), dict(seed=1),
    dict(top_p=0.9), dict(top_k=1), dict(top_k=5), dict(frequency_penalty=0.5), dict(presence_penalty=0.5),
    dict(repetition_penalty=1.1), dict(stop="x"), dict(stop=["x", "y"]), dict(stop_token_ids=[5]),
    dict(max_tokens=8), dict(max_tokens=9), dict(max_completion_tokens=8), dict(ignore_eos=True),
    dict(skip_special_tokens=True), dict(enable_thinking=False), dict(enable_thinking=True),
    dict(return_reasoning=True), dict(chat_template_kwargs={"enable_thinking": False}),
    dict(some_future_field=1),
]


def test_key_changes_with_everything_that_can():
    keys = [key()] + [key(**kw) for kw in DIFFERENT]
    assert len(set(keys)) == len(keys)
    image = dict(messages=[image_message("data:image/png;base64,AAAA")])
    assert key(["a" * 64], **image) != key(["b" * 64], **image)        # the image's pixels
    assert key(["a" * 64], **image) != key(**image | {"messages": [{"role": "user", "content": "open the app"}]})
    assert request_key(req(), "other-model", []) != key()


def test_image_count_must_match():
    with pytest.raises(ValueError):
        key(["a" * 64])
    with pytest.raises(ValueError):
        key(messages=[image_message("data:,")])


@pytest.mark.parametrize("kw, cached", [
    (dict(temperature=0), True), (dict(top_k=1, temperature=None), True), (dict(seed=3, temperature=0.7), True),
    (dict(temperature=None), False), (dict(temperature=0.7), False), (dict(temperature=1, top_p=0.5), False)])
def test_only_deterministic_requests_by_default(kw, cached):
    assert deterministic(req(**kw)) is cached


# ---------------------------------------------------------------------------------------------- in-process LRU
class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


async def test_lru_is_bounded_by_entries():
    store = MemoryStore(max_entries=2, max_bytes=10**6)
    await store.set("a", b"1", 60)
    await store.set("b", b"2", 60)
    assert await store.get("a") == b"1"          # a is now the most recently used
    await store.set("c", b"3", 60)
    assert await store.get("b") is None and await store.get("a") == b"1" and await store.get("c") == b"3"
    assert len(store) == 2
    assert sample("autoglm_response_cache_entries") == 2


async def test_lru_is_bounded_by_bytes():
    store = MemoryStore(max_entries=100, max_bytes=30)
    await store.set("a", b"x" * 10, 60)          # 11 bytes with the key
    await store.set("b", b"x" * 10, 60)
    await store.set("c", b"x" * 10, 60)          # 33 > 30: a goes
    assert await store.get("a") is None and store.bytes == 22
    await store.set("big", b"x" * 40, 60)        # larger than the whole cache: not stored, nothing evicted
    assert await store.get("big") is None and len(store) == 2
    await store.set("b", b"y", 60)               # replacing an entry replaces its bytes
    assert store.bytes == 11 + 2 and sample("autoglm_response_cache_bytes") == 13


async def test_lru_entries_expire():
    clock = Clock()
    store = MemoryStore(max_entries=10, max_bytes=1000, clock=clock)
    await store.set("a", b"1", 5)
    clock.now += 4.9
    assert await store.get("a") == b"1"
    clock.now += 0.2
    assert await store.get("a") is None and len(store) == 0 and store.bytes == 0


# ------------------------------------------------------------------------------------- the layer in the model app
async def test_miss_then_hit(client, engine):
    hits, misses = count("hit"), count("miss")
    first = await client.post("/v1/chat/completions", json=GREEDY)
    second = await client.post("/v1/chat/completions", json=GREEDY)
    assert (first.status_code, second.status_code) == (200, 200)
    assert (first.headers["x-cache"], second.headers["x-cache"]) == ("miss", "hit")
    assert len(engine.calls) == 1
    assert without_ids(second.json()) == without_ids(first.json())
    assert second.json()["id"].startswith("chatcmpl-") and second.json()["id"] != first.json()["id"]
    assert int(second.headers["age"]) >= 0 and second.headers["content-type"] == "application/json"
    assert (count("hit") - hits, count("miss") - misses) == (1, 1)
    assert sample("autoglm_response_cache_hit_seconds_count", store="memory") >= 1
    text = (await client.get("/metrics")).text
    assert 'autoglm_response_cache_requests_total{result="hit"}' in text
    # hits are still HTTP requests of the chat route for the HTTP metrics (the layer sits inside them)
    assert 'http_requests_total{method="POST",route="/v1/chat/completions",status="200"}' in text


async def test_streamed_and_plain_requests_share_an_entry(client, engine):
    live = await client.post("/v1/chat/completions", json=GREEDY | {"stream": True})
    events = sse_events(live.text)
    assert live.headers["x-cache"] == "miss" and events[-1] == "[DONE]"
    assert all("usage" not in e for e in events[:-1])       # the entry's usage came from the serving layer
    plain = await client.post("/v1/chat/completions", json=GREEDY)
    assert plain.headers["x-cache"] == "hit" and len(engine.calls) == 1
    assert plain.json()["choices"][0]["message"]["content"] == stream_text(events)[1]
    assert plain.json()["usage"]["completion_tokens"] == len(events) - 2   # one chunk a piece, role chunk, [DONE]
    again = await client.post("/v1/chat/completions", json=GREEDY | {"stream": True,
                                                                     "stream_options": {"include_usage": True}})
    assert again.headers["x-cache"] == "hit"
    assert sse_events(again.text)[-2]["usage"] == plain.json()["usage"]


@pytest.mark.parametrize("extra", [{}, {"return_reasoning": True}], ids=["raw", "reasoning"])
async def test_streamed_hit_has_the_live_stream_shape(client, engine, extra):
    ask = GREEDY | extra | {"stream": True, "stream_options": {"include_usage": True}}
    live = await client.post("/v1/chat/completions", json=ask)
    hit = await client.post("/v1/chat/completions", json=ask)
    assert (live.headers["x-cache"], hit.headers["x-cache"]) == ("miss", "hit")
    assert hit.headers["content-type"] == live.headers["content-type"]
    assert hit.headers["cache-control"] == live.headers["cache-control"] == "no-cache"
    live_events, hit_events = sse_events(live.text), sse_events(hit.text)
    assert stream_text(hit_events) == stream_text(live_events)
    assert {frame(e) for e in hit_events} == {frame(e) for e in live_events}
    for i in (0, -3, -2, -1):                   # role chunk, finish chunk, usage chunk, [DONE]
        assert frame(hit_events[i]) == frame(live_events[i]), i
    assert hit_events[-3]["choices"][0]["finish_reason"] == live_events[-3]["choices"][0]["finish_reason"]
    assert without_ids(hit_events[0]) == without_ids(live_events[0])
    assert without_ids(hit_events[-2]) == without_ids(live_events[-2])
    assert delta_keys(hit_events) <= delta_keys(live_events) | {frozenset({"content"})}
    assert len({e["id"] for e in hit_events[:-1]}) == 1
    if extra:
        assert stream_text(hit_events)[0]                   # the reasoning came back as reasoning_content


@pytest.mark.parametrize("extra", [{"stream": True, "stream_options": {"include_usage": True}},
                                   {"stream": True, "return_reasoning": True,
                                    "stream_options": {"include_usage": True}},
                                   {}, {"return_reasoning": True}], ids=["stream", "stream-reasoning", "plain",
                                                                         "plain-reasoning"])
async def test_the_model_role_stores_what_serving_produced_without_parsing_it(engine, monkeypatch, extra):
    """The entry is recorded from the serving layer's objects (no byte parser runs), and it is the entry that
    parsing the bytes sent would have given."""
    class NoParsing:
        def __init__(self, *args, **kwargs):
            raise AssertionError("the model role parsed the answer it sent")
    monkeypatch.setattr("function.front.layer.Capture", NoParsing)
    cache = ResponseCache([MemoryStore(100, 10**6)], model=MODEL, ttl_s=60)
    async with client_of(cached_app(engine, cache)) as c:
        live = await c.post("/v1/chat/completions", json=GREEDY | extra)
        hit = await c.post("/v1/chat/completions", json=GREEDY | extra)
    assert (live.headers["x-cache"], hit.headers["x-cache"]) == ("miss", "hit") and len(engine.calls) == 1
    stored, _ = await cache.get(key(**{k: v for k, v in extra.items() if k != "stream_options"}))
    parsed = Capture(bool(extra.get("stream")), strip_usage=False)
    parsed.start(200, [(b"content-type", live.headers["content-type"].encode())])
    parsed.feed(live.content, more=False)
    from_bytes = parsed.entry()
    assert from_bytes is not None and replace(stored, stored_at=0) == replace(from_bytes, stored_at=0)
    assert stored.usage == (sse_events(live.text)[-2] if extra.get("stream") else live.json())["usage"]


async def test_a_streamed_miss_is_the_answer_without_the_cache(engine):
    """No request rewriting in the model role: continuous usage without include_usage stays off, as uncached."""
    ask = GREEDY | {"stream": True, "stream_options": {"continuous_usage_stats": True}}
    async with client_of(cached_app(engine)) as c:
        miss = await c.post("/v1/chat/completions", json=ask)
    async with client_of(build_app(config(), engine)) as c:
        uncached = await c.post("/v1/chat/completions", json=ask)
    assert miss.headers["x-cache"] == "miss"
    assert [frame(e) for e in sse_events(miss.text)] == [frame(e) for e in sse_events(uncached.text)]
    assert all("usage" not in e for e in sse_events(miss.text)[:-1])


async def test_length_limited_answers_are_complete_answers(client, engine):
    ask = GREEDY | {"max_tokens": 3}
    first = await client.post("/v1/chat/completions", json=ask)
    second = await client.post("/v1/chat/completions", json=ask)
    assert first.json()["choices"][0]["finish_reason"] == "length" and second.headers["x-cache"] == "hit"


async def test_sampled_requests_bypass_unless_allowed(engine):
    sampled = {"model": MODEL, "messages": HELLO, "temperature": 0.8}
    async with client_of(cached_app(engine)) as c:
        for _ in range(2):
            assert (await c.post("/v1/chat/completions", json=sampled)).headers["x-cache"] == "bypass"
    assert len(engine.calls) == 2
    async with client_of(cached_app(engine, RESPONSE_CACHE_ALL="true")) as c:
        assert (await c.post("/v1/chat/completions", json=sampled)).headers["x-cache"] == "miss"
        assert (await c.post("/v1/chat/completions", json=sampled)).headers["x-cache"] == "hit"
    assert len(engine.calls) == 3


async def test_cache_control_no_cache_refreshes_no_store_keeps_out(client, engine):
    assert (await client.post("/v1/chat/completions", json=GREEDY)).headers["x-cache"] == "miss"
    fresh = await client.post("/v1/chat/completions", json=GREEDY, headers={"Cache-Control": "no-cache"})
    assert fresh.headers["x-cache"] == "bypass" and len(engine.calls) == 2     # not read...
    engine.piece = 5                                                           # ...but written: a new answer
    fresh = await client.post("/v1/chat/completions", json=GREEDY, headers={"Cache-Control": "no-cache"})
    hit = await client.post("/v1/chat/completions", json=GREEDY)
    assert hit.headers["x-cache"] == "hit" and hit.json()["usage"] == fresh.json()["usage"]

    other = GREEDY | {"messages": [{"role": "user", "content": "other"}]}
    r = await client.post("/v1/chat/completions", json=other, headers={"Cache-Control": "no-store"})
    assert r.headers["x-cache"] == "miss"
    assert (await client.post("/v1/chat/completions", json=other)).headers["x-cache"] == "miss"   # was not stored
    r = await client.post("/v1/chat/completions", json=other, headers={"Cache-Control": "no-store"})
    assert r.headers["x-cache"] == "hit"                                       # no-store still reads
    r = await client.post("/v1/chat/completions", json=other, headers={"Cache-Control": "no-cache, no-store"})
    assert r.headers["x-cache"] == "bypass" and r.status_code == 200


async def test_refusals_and_errors_are_not_stored(client, engine):
    engine.fail_before = InvalidInput("too long", param="messages")
    for _ in range(2):
        r = await client.post("/v1/chat/completions", json=GREEDY)
        assert (r.status_code, r.headers["x-cache"]) == (400, "miss")
    assert len(engine.calls) == 2
    engine.fail_before = None
    engine.fail_after = (2, Overloaded("boom"))           # fails mid-stream: an error chunk, then [DONE]
    r = await client.post("/v1/chat/completions", json=GREEDY | {"stream": True})
    assert r.status_code == 200 and "error" in sse_events(r.text)[-2]
    engine.fail_after = None
    engine.finish_as = "abort"                            # the engine gave up on it
    r = await client.post("/v1/chat/completions", json=GREEDY)
    assert r.status_code == 503
    r = await client.post("/v1/chat/completions", json=GREEDY | {"stream": True})
    assert "error" in sse_events(r.text)[-2]
    engine.finish_as = None
    assert (await client.post("/v1/chat/completions", json=GREEDY)).headers["x-cache"] == "miss"
    assert len(engine.calls) == 6


async def test_unservable_requests_bypass_to_the_apps_own_errors(client, engine):
    r = await client.post("/v1/chat/completions", json=GREEDY | {"model": "gpt-4o"})
    assert (r.status_code, r.headers["x-cache"], r.json()["error"]["code"]) == (404, "bypass", "model_not_found")
    r = await client.post("/v1/chat/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert (r.status_code, r.headers["x-cache"]) == (400, "bypass")
    bad_image = GREEDY | {"messages": [image_message("data:image/png;base64,x")]}
    r = await client.post("/v1/chat/completions", json=bad_image)
    assert (r.status_code, r.headers["x-cache"], r.json()["error"]["param"]) == (
        400, "bypass", "messages[0].content[0].image_url")
    assert (await client.get("/v1/models")).headers.get("x-cache") is None    # only chat completions


async def test_reencoded_screenshot_hits(client, engine):
    png = image_bytes("PNG", size=(64, 96), color=(10, 200, 30))
    webp = image_bytes("WEBP", size=(64, 96), color=(10, 200, 30), lossless=True)
    assert png != webp
    ask = lambda url: GREEDY | {"messages": [image_message(url, "tap OK")]}    # noqa: E731
    assert (await client.post("/v1/chat/completions", json=ask(data_url(png)))).headers["x-cache"] == "miss"
    r = await client.post("/v1/chat/completions", json=ask(data_url(webp, "image/webp")))
    assert r.headers["x-cache"] == "hit" and len(engine.calls) == 1
    other = image_bytes("PNG", size=(64, 96), color=(10, 200, 31))
    assert (await client.post("/v1/chat/completions", json=ask(data_url(other)))).headers["x-cache"] == "miss"




async def test_client_gone_mid_stream_is_not_stored(engine):
    app = cached_app(engine)
    engine.hold_after = 2
    disconnect, sent = asyncio.Event(), []
    task = asyncio.create_task(call_asgi(app, GREEDY | {"stream": True}, disconnect, sent))
    await until(lambda: sum(m["type"] == "http.response.body" for m in sent) >= 3)
    disconnect.set()
    await task
    assert engine.calls[0][0] in engine.aborted
    engine.hold_after = None
    async with client_of(app) as c:
        assert (await c.post("/v1/chat/completions", json=GREEDY)).headers["x-cache"] == "miss"


async def test_single_flight(engine):
    app = cached_app(engine)
    engine.hold_after = 1                      # the first generation stalls until released
    coalesced = sample("autoglm_response_cache_coalesced_total")
    async with client_of(app) as c:
        asks = [GREEDY | {"stream": i % 2 == 1, "stream_options": {"include_usage": True}} for i in range(6)]
        tasks = [asyncio.create_task(c.post("/v1/chat/completions", json=a)) for a in asks]
        await until(lambda: engine.calls)
        await asyncio.sleep(0.2)               # everyone has arrived and waits
        assert len(engine.calls) == 1
        engine.release.set()
        answers = await asyncio.wait_for(asyncio.gather(*tasks), 10)
    assert len(engine.calls) == 1
    assert sorted(r.headers["x-cache"] for r in answers) == ["hit"] * 5 + ["miss"]
    texts = {r.json()["choices"][0]["message"]["content"] if i % 2 == 0 else stream_text(sse_events(r.text))[1]
             for i, r in enumerate(answers)}
    assert len(texts) == 1
    assert sample("autoglm_response_cache_coalesced_total") - coalesced == 5
    assert sample("autoglm_response_cache_hit_seconds_count", store="flight") >= 5


async def test_single_flight_followers_ask_the_model_when_the_leader_fails(engine):
    app = cached_app(engine)
    engine.hold_after, engine.finish_as = 1, "abort"
    async with client_of(app) as c:
        tasks = [asyncio.create_task(c.post("/v1/chat/completions", json=GREEDY)) for _ in range(3)]
        await until(lambda: engine.calls)
        await asyncio.sleep(0.1)
        engine.release.set()
        answers = await asyncio.wait_for(asyncio.gather(*tasks), 10)
    assert [r.status_code for r in answers] == [503] * 3 and len(engine.calls) == 3
    assert sorted(r.headers["x-cache"] for r in answers) == ["miss"] * 3


async def test_cache_off_installs_nothing(engine):
    cfg = config(RESPONSE_CACHE="off")
    app = build_app(cfg, engine)
    assert install(app, cfg) is None
    async with client_of(app) as c:
        assert "x-cache" not in (await c.post("/v1/chat/completions", json=GREEDY)).headers


# ----------------------------------------------------------------------------------------------------- Redis
async def test_redis_entries_are_shared_and_expire(redis_server, engine):
    env = dict(RESPONSE_CACHE="off", RESPONSE_CACHE_URL=redis_server.url, RESPONSE_CACHE_TTL_S="60")
    replica_a, replica_b = FakeEngine(), FakeEngine()
    async with client_of(cached_app(replica_a, **env)) as a, client_of(cached_app(replica_b, **env)) as b:
        first = await a.post("/v1/chat/completions", json=GREEDY)
        second = await b.post("/v1/chat/completions", json=GREEDY | {"stream": True})
    assert (first.headers["x-cache"], second.headers["x-cache"]) == ("miss", "hit")
    assert (len(replica_a.calls), len(replica_b.calls)) == (1, 0)
    assert stream_text(sse_events(second.text))[1] == first.json()["choices"][0]["message"]["content"]
    k = key()
    assert 55_000 < int(redis_server.command("PTTL", k)[1:]) <= 60_000
    assert sample("autoglm_response_cache_written_bytes_total", store="redis") > 0

    short = dict(env, RESPONSE_CACHE_TTL_S="0.3")
    async with client_of(cached_app(engine, **short)) as c:
        ask = GREEDY | {"max_tokens": 4}
        assert (await c.post("/v1/chat/completions", json=ask)).headers["x-cache"] == "miss"
        assert (await c.post("/v1/chat/completions", json=ask)).headers["x-cache"] == "hit"
        await asyncio.sleep(0.4)
        assert (await c.post("/v1/chat/completions", json=ask)).headers["x-cache"] == "miss"


async def test_memory_in_front_of_redis(redis_server):
    env = dict(RESPONSE_CACHE_URL=redis_server.url)
    async with client_of(cached_app(FakeEngine(), **env)) as a:
        assert (await a.post("/v1/chat/completions", json=GREEDY)).headers["x-cache"] == "miss"
    redis_hits = sample("autoglm_response_cache_hit_seconds_count", store="redis")
    memory_hits = sample("autoglm_response_cache_hit_seconds_count", store="memory")
    engine = FakeEngine()
    async with client_of(cached_app(engine, **env)) as b:       # another replica: empty memory, same Redis
        for _ in range(2):
            assert (await b.post("/v1/chat/completions", json=GREEDY)).headers["x-cache"] == "hit"
    assert not engine.calls
    assert sample("autoglm_response_cache_hit_seconds_count", store="redis") - redis_hits == 1
    assert sample("autoglm_response_cache_hit_seconds_count", store="memory") - memory_hits == 1


async def test_redis_killed_fails_open(redis_server, engine, caplog):
    cache = ResponseCache([RedisStore(redis_server.url, cooldown_s=0.0)], model=MODEL, ttl_s=60)
    app = cached_app(engine, cache)
    errors = sample("autoglm_response_cache_store_errors_total", store="redis", op="get")
    async with client_of(app) as c:
        assert (await c.post("/v1/chat/completions", json=GREEDY)).headers["x-cache"] == "miss"
        assert (await c.post("/v1/chat/completions", json=GREEDY)).headers["x-cache"] == "hit"
        assert sample("autoglm_response_cache_store_up", store="redis") == 1
        redis_server.kill()
        caplog.set_level(logging.WARNING, logger="function.cache")
        for _ in range(3):
            started = time.monotonic()
            r = await c.post("/v1/chat/completions", json=GREEDY)
            assert (r.status_code, r.headers["x-cache"]) == (200, "miss")
            assert time.monotonic() - started < 1
    assert len(engine.calls) == 4
    assert sample("autoglm_response_cache_store_errors_total", store="redis", op="get") - errors == 3
    assert sample("autoglm_response_cache_store_up", store="redis") == 0
    logged = [r for r in caplog.records if "redis get failed" in r.getMessage()]
    assert len(logged) == 1                     # rate-limited: one line for three failures

    redis_server.start()                        # back, empty: the next answer is stored again
    async with client_of(app) as c:
        assert (await c.post("/v1/chat/completions", json=GREEDY)).headers["x-cache"] == "miss"
        assert (await c.post("/v1/chat/completions", json=GREEDY)).headers["x-cache"] == "hit"
    await cache.aclose()


async def test_redis_hung_costs_a_timeout_then_is_skipped(redis_server, engine):
    store = RedisStore(redis_server.url, cooldown_s=30)
    app = cached_app(engine, ResponseCache([store], model=MODEL, ttl_s=60))
    async with client_of(app) as c:
        assert (await c.post("/v1/chat/completions", json=GREEDY)).headers["x-cache"] == "miss"    # connected
        redis_server.pause()
        try:
            started = time.monotonic()
            r = await c.post("/v1/chat/completions", json=GREEDY)
            first = time.monotonic() - started
            started = time.monotonic()
            r2 = await c.post("/v1/chat/completions", json=GREEDY)
            second = time.monotonic() - started
        finally:
            redis_server.resume()
    assert (r.status_code, r.headers["x-cache"], r2.headers["x-cache"]) == (200, "miss", "miss")
    assert first < 0.5, first                   # one Redis timeout (50 ms) and the model's answer
    assert second < first                       # in the cool-down Redis is not even asked
    assert len(engine.calls) == 3
    await store.aclose()


async def test_unreadable_entries_are_misses(redis_server, engine):
    k = key()
    assert redis_server.command("SET", k, "not-json") == "+OK"
    env = dict(RESPONSE_CACHE="off", RESPONSE_CACHE_URL=redis_server.url)
    async with client_of(cached_app(engine, **env)) as c:
        assert (await c.post("/v1/chat/completions", json=GREEDY)).headers["x-cache"] == "miss"
        assert (await c.post("/v1/chat/completions", json=GREEDY)).headers["x-cache"] == "hit"   # overwritten


def test_entry_round_trip():
    body = {"id": "x", "object": "chat.completion", "created": 1, "model": MODEL, "system_fingerprint": "fp_1",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": "hi", "reasoning_content": "r"},
                         "logprobs": None, "finish_reason": "length", "stop_reason": None}],
            "usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4,
                      "prompt_tokens_details": {"cached_tokens": 0}}}
    entry = Entry.from_response(body)
    assert Entry.from_bytes(entry.to_bytes()) == entry
    assert without_ids(entry.to_response().model_dump(mode="json")) == without_ids(body)
    for broken in ({**body, "choices": []}, {**body, "usage": None},
                   {**body, "choices": [{**body["choices"][0], "finish_reason": "abort"}]}):
        assert Entry.from_response(broken) is None
