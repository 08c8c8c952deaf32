"""Security (docs/security.md): API keys, bounded work before the expensive part, SSRF-safe remote images, file://
safety, cache and front hygiene, CloudEvents replay protection, no work after the client is gone.

Real servers on loopback where the network matters: an HTTP server that counts its hits (SSRF, changing images),
a real redis-server (malformed entries), the cache front as a uvicorn subprocess with a loopback model stub (keys,
rotation, hostile bodies). Every loop is bounded."""
from __future__ import annotations

import asyncio
import json
import os
import threading
import time
import uuid
from pathlib import Path

import httpx
import pytest
from cloudevents.core.bindings.http import to_binary
from cloudevents.core.formats.json import JSONFormat
from cloudevents.core.v1.event import CloudEvent
from conftest import data_url, image_bytes, image_message
from test_cache import GREEDY, RedisServer, cached_app, client_of, config
from test_e2e_servers import ROOT, free_port
from test_images import png_header_only

from function.api.app import build_app
from function.api.auth import ApiKeys
from function.api.limits import BudgetExceeded, json_budget
from function.cache import Entry, MemoryStore, RedisStore, ResponseCache, request_key
from function.engine.protocol import ChatInput, SamplingParams
from function.errors import InvalidInput
from function.front import build_front_app
from function.images import REMOTE_FAILED, ImageLoader, public_address

import ipaddress

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from support.fake_engine import FakeEngine
from support.http_stub import StubHandler, serving

MODEL = "autoglm-phone-9b"
P = "messages[0].content[0].image_url"
FORMAT = JSONFormat()


def app_client(engine: FakeEngine, **env) -> httpx.AsyncClient:
    return client_of(build_app(config(**env), engine))


def chat(text: str = "hello", **kw) -> dict:
    return {"model": MODEL, "messages": [{"role": "user", "content": text}], "max_tokens": 8, **kw}


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


# ================================================================================================== API keys
async def test_keys_none_wrong_and_each_configured(engine):
    async with app_client(engine, API_KEY="key-one, key-two") as c:
        missing = await c.post("/v1/chat/completions", json=chat())
        wrong = await c.post("/v1/chat/completions", json=chat(), headers=bearer("key-three"))
        for r in (missing, wrong):
            assert r.status_code == 401
            assert r.headers["www-authenticate"].startswith("Bearer")
            err = r.json()["error"]
            assert set(err) == {"message", "type", "param", "code"} and err["code"] == "invalid_api_key"
        assert "invalid_token" in wrong.headers["www-authenticate"]
        assert not engine.calls                              # refused before any work
        for key in ("key-one", "key-two"):
            r = await c.post("/v1/chat/completions", json=chat(), headers=bearer(key))
            assert r.status_code == 200, r.text
        # every /v1 route and the tokenizer routes, whether or not they exist
        for path in ("/v1/models", "/v1/models/x", "/v1/completions", "/v1", "/tokenize", "/detokenize"):
            r = await (c.get(path) if path.startswith("/v1/models") else c.post(path, json={}))
            assert r.status_code == 401, path
        assert (await c.get("/v1/models", headers=bearer("key-two"))).status_code == 200
        # probes, /health and /metrics open by default; unknown paths answer as before
        for path in ("/health/liveness", "/health/readiness", "/health", "/metrics"):
            assert (await c.get(path)).status_code == 200, path
        assert (await c.get("/nothing-here")).status_code == 404


async def test_health_and_metrics_protectable_probes_never(engine):
    async with app_client(engine, API_KEY="k", API_KEY_PROTECTS_HEALTH="true") as c:
        assert (await c.get("/health")).status_code == 401
        assert (await c.get("/metrics")).status_code == 401
        assert (await c.get("/metrics", headers=bearer("k"))).status_code == 200
        assert (await c.get("/health/liveness")).status_code == 200
        assert (await c.get("/health/readiness")).status_code == 200


async def test_cloudevents_need_the_key_unless_the_network_is_trusted(engine):
    event = CloudEvent({"type": "com.autoglm.chat.completion.request", "source": "/phone", "id": "1"},
                       {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4})
    message = to_binary(event, FORMAT)
    async with app_client(engine, API_KEY="k") as c:
        assert (await c.post("/", headers=message.headers, content=message.body)).status_code == 401
        r = await c.post("/", headers={**message.headers, **bearer("k")}, content=message.body)
        assert r.status_code == 200, r.text
    async with app_client(engine, API_KEY="k", EVENTS_TRUST_NETWORK="true") as c:
        assert (await c.post("/events", headers=message.headers, content=message.body)).status_code == 200


async def test_models_shows_no_filesystem_path(engine, tmp_path):
    async with app_client(engine, MODEL_CACHE_DIR=str(tmp_path)) as c:
        (card,) = (await c.get("/v1/models")).json()["data"]
    assert card["root"] == MODEL and str(tmp_path) not in json.dumps(card)


def test_key_file_rotates_without_restart(tmp_path):
    now = [0.0]
    path = tmp_path / "keys"
    path.write_text("old-key\n")
    keys = ApiKeys(path=str(path), clock=lambda: now[0])
    assert keys.enabled and keys.match("old-key") and not keys.match("new-key")
    tmp = tmp_path / "keys.tmp"                       # replaced by rename, as a Secret volume is updated
    tmp.write_text("new-key,other-key\n")
    os.replace(tmp, path)
    now[0] += 2
    assert keys.match("new-key") and keys.match("other-key") and not keys.match("old-key")
    path.unlink()
    now[0] += 2
    assert keys.enabled and not keys.match("new-key")       # a vanished file opens nothing
    assert not keys.match("")


async def test_a_404_echoes_at_most_100_characters_of_the_model_name(engine):
    async with app_client(engine) as c:
        for r in (await c.post("/v1/chat/completions", json=chat(model="m" * 1_000_000)),
                  await c.get("/v1/models/" + "m" * 50_000)):
            assert r.status_code == 404
            assert len(r.text) < 400 and "m" * 101 not in r.text


# ========================================================================================== bounded work
@pytest.mark.parametrize("body,fragment", [
    (b'{"x":' + b"[" * 100_000 + b"]" * 100_000 + b"}", "MAX_JSON_DEPTH"),
    (b'{"x":[' + b"[]," * 3_000_000 + b"[]]}", "MAX_JSON_ELEMENTS"),
    (b'{"x":[' + b'"",' * 3_000_000 + b'""]}', "MAX_JSON_ELEMENTS"),
])
async def test_hostile_json_is_a_400_before_it_is_parsed(engine, body, fragment):
    async with app_client(engine) as c:
        r = await c.post("/v1/chat/completions", content=body, headers={"content-type": "application/json"})
    assert r.status_code == 400 and fragment in r.json()["error"]["message"]


def test_json_budget_counts_structure_not_strings():
    ok = json.dumps({"messages": [{"role": "user", "content": '[[[[{{{{ "\\" ,,,, ' * 1000}]}).encode()
    depth, values = json_budget(ok, 8, 100)
    assert depth == 3 and values < 20          # brackets, commas and escaped quotes inside strings do not count
    escaped = json.dumps({"a": "\\" * 51 + '"' + "[" * 50}).encode()
    assert json_budget(escaped, 4, 100)[0] == 1
    with pytest.raises(BudgetExceeded):
        json_budget(json.dumps({"a": [[[[[1]]]]]}).encode(), 4, 100)


def test_text_is_measured_in_characters_before_it_is_tokenized():
    """An 8 MB prompt is refused by a bound on its characters; the tokenizer is never called."""
    from function.engine.inputs import InputPreparer

    class Tokenizer:
        def __len__(self):
            return 3

        def convert_ids_to_tokens(self, ids):
            return ["a", "bcd", "<|x|>"][:len(ids)]

    class Processor:
        tokenizer = Tokenizer()

        def apply_chat_template(self, *a, **k):
            raise AssertionError("tokenized")

    class Model:
        class config:
            image_token_id = 1

        class model:
            get_rope_index = None

    prep = InputPreparer(Processor(), Model(), max_model_len=1000)
    assert prep.max_token_chars == 5
    chat_input = ChatInput(messages=[{"role": "user", "content": [{"type": "text", "text": "x" * 8_000_000}]}])
    with pytest.raises(InvalidInput) as e:
        prep.prepare(chat_input, SamplingParams(max_tokens=8))
    assert "maximum context length" in e.value.message
    with pytest.raises(InvalidInput, match="tokenized"):    # a short prompt does reach the tokenizer
        prep.prepare(ChatInput(messages=[{"role": "user", "content": "x" * 100}]), SamplingParams(max_tokens=8))


async def test_image_headers_are_checked_together_before_any_decode(make_config):
    """Eight images each under MAX_IMAGE_SOURCE_PIXELS but too many together: refused from their headers (these
    are header-only PNGs, so a decode would say 'truncated')."""
    ldr = ImageLoader(make_config(MAX_REQUEST_IMAGE_PIXELS=50_000_000))
    urls = [(data_url(png_header_only(6300, 6300)), f"messages[0].content[{i}].image_url") for i in range(8)]
    with pytest.raises(InvalidInput) as e:
        await ldr.load_many(urls)
    assert "MAX_REQUEST_IMAGE_PIXELS" in e.value.message and e.value.param == "messages[0].content[1].image_url"


# ========================================================================================= remote images
class Counting(StubHandler):
    hits: list[str] = []
    colors = [(255, 0, 0), (0, 0, 255)]

    def do_GET(self):  # noqa: N802
        Counting.hits.append(self.path)
        if self.path.startswith("/to/"):                      # /to/<url>: a redirect there
            self.send_response(302)
            self.send_header("Location", self.path[4:])
            self.end_headers()
            return
        if self.path.startswith("/hop/") and int(self.path[5:]):   # /hop/<n>: n more redirects, then the image
            self.send_response(302)
            self.send_header("Location", f"/hop/{int(self.path[5:]) - 1}")
            self.end_headers()
            return
        color = Counting.colors[(len([h for h in Counting.hits if h == self.path]) - 1) % 2] \
            if self.path == "/changing.png" else (0, 255, 0)
        self.send_body(image_bytes(size=(16, 16), color=color))


@pytest.fixture(scope="module")
def counting_server():
    with serving(Counting) as server:
        yield server.server_port


@pytest.fixture
def hits(counting_server):
    Counting.hits.clear()
    return Counting.hits


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost", "[::1]", "127.1", "2130706433", "0.0.0.0", "0x7f.1",
                                  "[::ffff:127.0.0.1]"])
async def test_loopback_in_any_spelling_is_never_fetched(make_config, counting_server, hits, host):
    ldr = ImageLoader(make_config(ALLOW_REMOTE_IMAGES="true"))
    with pytest.raises(InvalidInput) as e:
        await ldr.load(f"http://{host}:{counting_server}/shot.png", P)
    assert e.value.message == REMOTE_FAILED and hits == []


async def test_a_redirect_to_loopback_is_refused_and_allowed_hosts_are_fetched_once(make_config, counting_server,
                                                                                  hits):
    ldr = ImageLoader(make_config(ALLOW_REMOTE_IMAGES="true", REMOTE_IMAGE_ALLOWED_HOSTS="localhost"))
    with pytest.raises(InvalidInput) as e:
        await ldr.load(f"http://localhost:{counting_server}/to/http://127.0.0.1:{counting_server}/x.png", P)
    assert e.value.message == REMOTE_FAILED and hits == [f"/to/http://127.0.0.1:{counting_server}/x.png"]
    hits.clear()
    img = await ldr.load(f"http://localhost:{counting_server}/shot.png", P)
    assert img.image.size == (16, 16) and hits == ["/shot.png"] and img.fetched is not None


async def test_at_most_the_configured_redirects(make_config, counting_server, hits):
    ldr = ImageLoader(make_config(ALLOW_REMOTE_IMAGES="true", REMOTE_IMAGE_ALLOWED_HOSTS="127.0.0.1"))
    assert (await ldr.load(f"http://127.0.0.1:{counting_server}/hop/3", P)).image.size == (16, 16)
    with pytest.raises(InvalidInput) as e:
        await ldr.load(f"http://127.0.0.1:{counting_server}/hop/4", P)
    assert e.value.message == REMOTE_FAILED


async def test_too_many_images_fetch_nothing(make_config, counting_server, hits):
    ldr = ImageLoader(make_config(ALLOW_REMOTE_IMAGES="true", REMOTE_IMAGE_ALLOWED_HOSTS="127.0.0.1"))
    urls = [(f"http://127.0.0.1:{counting_server}/{i}.png", P) for i in range(9)]
    with pytest.raises(InvalidInput) as e:
        await ldr.load_many(urls)
    assert "MAX_IMAGES_PER_REQUEST" in e.value.message and hits == []


@pytest.mark.parametrize("address,public", [
    ("8.8.8.8", True), ("2606:4700:4700::1111", True),
    ("127.0.0.1", False), ("10.1.2.3", False), ("172.16.0.1", False), ("192.168.1.1", False),
    ("169.254.169.254", False), ("100.64.0.1", False), ("0.0.0.0", False), ("224.0.0.1", False),
    ("255.255.255.255", False), ("::1", False), ("::", False), ("fc00::1", False), ("fe80::1", False),
    ("ff02::1", False), ("::ffff:127.0.0.1", False), ("::ffff:10.0.0.1", False), ("2002:7f00:1::", False),
])
def test_public_addresses(address, public):
    assert public_address(ipaddress.ip_address(address)) is public


async def test_a_changing_remote_image_cannot_poison_the_cache(counting_server, hits):
    """The image is fetched once per request and the key comes from the very bytes the model saw: a red-then-blue
    URL stores its answer under the red image, and a later red screenshot hits it, a blue one does not."""
    engine = FakeEngine()
    url = f"http://127.0.0.1:{counting_server}/changing.png"
    app = cached_app(engine, ALLOW_REMOTE_IMAGES="true", REMOTE_IMAGE_ALLOWED_HOSTS="127.0.0.1")
    red = ImageLoader(config()).load
    red_digest = (await red(data_url(image_bytes(size=(16, 16), color=(255, 0, 0))), P)).digest
    async with client_of(app) as c:
        r = await c.post("/v1/chat/completions", json=GREEDY | {"messages": [image_message(url)]})
        assert r.status_code == 200 and r.headers["x-cache"] == "miss"
        assert hits == ["/changing.png"]                                  # once, for the key and the model
        assert engine.calls[0][1].image_digests == [red_digest]
        red_again = await c.post("/v1/chat/completions", json=GREEDY | {"messages": [image_message(
            data_url(image_bytes(size=(16, 16), color=(255, 0, 0))))]})
        blue = await c.post("/v1/chat/completions", json=GREEDY | {"messages": [image_message(
            data_url(image_bytes(size=(16, 16), color=(0, 0, 255))))]})
    assert red_again.headers["x-cache"] == "hit" and blue.headers["x-cache"] == "miss"


async def test_the_front_sends_the_fetched_bytes_on(counting_server, hits):
    """Cache front: the model service gets the remote image as a data: URL of the bytes the key came from."""
    seen = []

    async def upstream(request: Request) -> Response:
        seen.append(json.loads(await request.body()))
        return JSONResponse({"error": {"message": "x", "type": "t", "param": None, "code": "c"}}, 503)

    cfg = config(ROLE="cache-front", MODEL_URL="http://model.invalid", ALLOW_REMOTE_IMAGES="true",
                 REMOTE_IMAGE_ALLOWED_HOSTS="127.0.0.1")
    front = build_front_app(cfg, transport=_upstream(upstream))
    url = f"http://127.0.0.1:{counting_server}/changing.png"
    async with client_of(front) as c:
        await c.post("/v1/chat/completions", json=GREEDY | {"messages": [image_message(url)]})
    sent = seen[0]["messages"][0]["content"][0]["image_url"]["url"]
    assert hits == ["/changing.png"] and sent.startswith("data:image/png;base64,")
    assert (await ImageLoader(config()).load(sent, P)).digest == \
        (await ImageLoader(config()).load(data_url(image_bytes(size=(16, 16), color=(255, 0, 0))), P)).digest


# ================================================================================================ file://
async def test_swapping_a_directory_for_a_symlink_never_leads_outside(make_config, tmp_path):
    root, outside = tmp_path / "media", tmp_path / "outside"
    (root / "d").mkdir(parents=True)
    outside.mkdir()
    (root / "d" / "shot.png").write_bytes(image_bytes(size=(8, 8), color=(1, 2, 3)))
    (outside / "shot.png").write_bytes(image_bytes(size=(9, 9), color=(9, 9, 9)))
    ldr = ImageLoader(make_config(ALLOWED_LOCAL_MEDIA_PATH=root))
    stop = threading.Event()

    def swap():
        while not stop.is_set():
            os.rename(root / "d", root / "d.real")
            os.symlink(outside, root / "d")
            os.unlink(root / "d")
            os.rename(root / "d.real", root / "d")

    t = threading.Thread(target=swap)
    t.start()
    sizes = []
    try:
        for _ in range(300):
            try:
                sizes.append((await ldr.load(f"file://{root}/d/shot.png", P)).image.size)
            except InvalidInput as e:
                assert "symbolic link" in e.message or "not found" in e.message
    finally:
        stop.set()
        t.join(10)
    assert (9, 9) not in sizes and (8, 8) in sizes       # it did read inside, never outside


async def test_nul_in_a_file_path_is_a_400(make_config, tmp_path, engine):
    async with app_client(engine, ALLOWED_LOCAL_MEDIA_PATH=str(tmp_path)) as c:
        r = await c.post("/v1/chat/completions", json={"messages": [image_message(f"file://{tmp_path}/a%00b.png")]})
    assert r.status_code == 400 and "invalid path" in r.json()["error"]["message"]


# ================================================================================================= cache
async def test_cache_entries_do_not_cross_keys():
    engine = FakeEngine()
    async with client_of(cached_app(engine, API_KEY="alice,bob")) as c:
        body = GREEDY | {"messages": [{"role": "user", "content": "same question"}]}
        first = await c.post("/v1/chat/completions", json=body, headers=bearer("alice"))
        again = await c.post("/v1/chat/completions", json=body, headers=bearer("alice"))
        other = await c.post("/v1/chat/completions", json=body, headers=bearer("bob"))
    assert [r.headers["x-cache"] for r in (first, again, other)] == ["miss", "hit", "miss"]
    assert len(engine.calls) == 2


async def test_entries_may_be_shared_across_keys_by_setting():
    engine = FakeEngine()
    async with client_of(cached_app(engine, API_KEY="alice,bob", RESPONSE_CACHE_SHARE_KEYS="true")) as c:
        body = GREEDY | {"messages": [{"role": "user", "content": "same question"}]}
        await c.post("/v1/chat/completions", json=body, headers=bearer("alice"))
        other = await c.post("/v1/chat/completions", json=body, headers=bearer("bob"))
    assert other.headers["x-cache"] == "hit"


_GOOD = Entry(content="ok", reasoning_content=None, finish_reason="stop", stop_reason=None,
              usage={"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}, model=MODEL,
              system_fingerprint="fp", stored_at=1.0)


@pytest.mark.parametrize("bad", [
    b"not json", b"[]", b'{"content": "x"}',
    json.dumps({**_GOOD.__dict__, "content": 5}).encode(),
    json.dumps({**_GOOD.__dict__, "finish_reason": "abort"}).encode(),
    json.dumps({**_GOOD.__dict__, "usage": {"prompt_tokens": "many"}}).encode(),
    json.dumps({**_GOOD.__dict__, "stored_at": "yesterday"}).encode(),
    json.dumps({**_GOOD.__dict__, "extra": 1}).encode(),
])
async def test_malformed_redis_entries_are_misses_deleted_and_never_copied(tmp_path, bad):
    import redis as redis_py
    server = RedisServer(tmp_path)
    try:
        direct = redis_py.Redis.from_url(server.url)
        memory = MemoryStore(100, 1 << 20)
        cache = ResponseCache([memory, RedisStore(server.url)], model=MODEL, ttl_s=60)
        direct.set("k", bad)
        assert await cache.get("k") is None
        assert len(memory) == 0 and not direct.exists("k")     # deleted from Redis, not copied to memory
        direct.set("k", _GOOD.to_bytes())
        assert (await cache.get("k"))[0] == _GOOD and len(memory) == 1
        await cache.aclose()
        direct.close()
    finally:
        server.stop()


def test_the_key_includes_the_caller():
    from function.api.protocol import ChatCompletionRequest
    req = ChatCompletionRequest.model_validate(chat())
    assert request_key(req, MODEL, [], "a") != request_key(req, MODEL, [], "b") != request_key(req, MODEL, [])


# ================================================================================================= front
def _upstream(endpoint) -> httpx.ASGITransport:
    """A model service in-process: every path and method goes to `endpoint`."""
    return httpx.ASGITransport(app=Starlette(routes=[Route("/{path:path}", endpoint, methods=["GET", "POST"])]))


async def test_the_front_keeps_no_cookies_and_strips_hop_by_hop_headers():
    seen = []

    async def upstream(request: Request) -> Response:
        seen.append(request.headers)
        return JSONResponse({"object": "list", "data": []},
                            headers={"set-cookie": "session=alice; Path=/", "connection": "x-internal",
                                     "x-internal": "secret", "keep-alive": "timeout=5",
                                     "proxy-authenticate": "Basic"})

    front = build_front_app(config(ROLE="cache-front", MODEL_URL="http://model.invalid"),
                            transport=_upstream(upstream))
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=front), base_url="http://front") as a, \
            httpx.AsyncClient(transport=httpx.ASGITransport(app=front), base_url="http://front") as b:
        ra = await a.get("/v1/models", headers={"connection": "x-hop", "x-hop": "1", "te": "trailers",
                                                  "proxy-authorization": "Basic eA=="})
        await b.get("/v1/models")
    assert "cookie" not in seen[1]                           # A's cookie never reaches B's request
    assert not {"x-hop", "te", "proxy-authorization"} & set(seen[0])
    assert ra.headers.get("set-cookie") == "session=alice; Path=/"   # the client's own cookie reaches it
    assert not {"x-internal", "keep-alive", "proxy-authenticate"} & set(ra.headers)


async def test_the_front_bounds_bodies_on_every_path():
    async def upstream(request: Request) -> Response:
        raise AssertionError("forwarded")

    front = build_front_app(config(ROLE="cache-front", MODEL_URL="http://model.invalid", MAX_REQUEST_BYTES=4096),
                            transport=_upstream(upstream))
    async with client_of(front) as c:
        for path in ("/", "//v1/chat/completions", "/anything"):
            r = await c.post(path, content=b"x" * 10_000)
            assert r.status_code == 413, path


async def test_a_non_reading_leader_does_not_block_its_followers(engine):
    """The leader's client never reads (its send never returns); an identical request still gets the answer."""
    app = cached_app(engine)
    body = json.dumps(GREEDY | {"messages": [{"role": "user", "content": "popular"}], "stream": True}).encode()
    stuck = asyncio.Event()

    async def never_reading_send(message):
        if message["type"] == "http.response.body":
            stuck.set()
            await asyncio.Event().wait()                        # the socket buffer is full, forever

    leader = asyncio.ensure_future(_asgi(app, body, never_reading_send))
    await asyncio.wait_for(stuck.wait(), 5)
    try:
        async with client_of(app) as c:
            r = await asyncio.wait_for(c.post("/v1/chat/completions", content=body), 5)
        assert r.status_code == 200 and r.text.endswith("data: [DONE]\n\n")
        assert r.headers["x-cache"] == "hit" and len(engine.calls) == 1
    finally:
        leader.cancel()
        await asyncio.gather(leader, return_exceptions=True)


async def _asgi(app, body: bytes, send, path: str = "/v1/chat/completions", headers=(), gone: asyncio.Event = None):
    sent = [{"type": "http.request", "body": body, "more_body": False}]

    async def receive():
        if sent:
            return sent.pop()
        await (gone or asyncio.Event()).wait()
        return {"type": "http.disconnect"}

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
             "path": path, "raw_path": path.encode(), "root_path": "", "query_string": b"",
             "headers": [(b"content-type", b"application/json"), *headers], "client": ("127.0.0.1", 1),
             "server": ("testserver", 80)}
    await app(scope, receive, send)


# =========================================================================================== CloudEvents
def _event(data, id_="e1", source="/phone") -> tuple[list, bytes]:
    m = to_binary(CloudEvent({"type": "com.autoglm.chat.completion.request", "source": source, "id": id_}, data),
                  FORMAT)
    return [(k.lower().encode(), v.encode()) for k, v in m.headers.items()], m.body


async def test_a_reused_event_id_with_other_data_is_a_409(engine):
    async with app_client(engine) as c:
        one = {"messages": [{"role": "user", "content": "mine"}], "max_tokens": 4}
        other = {"messages": [{"role": "user", "content": "theirs"}], "max_tokens": 4}
        h, b = _event(one)
        first = await c.post("/", headers=dict((k.decode(), v.decode()) for k, v in h), content=b)
        again = await c.post("/", headers=dict((k.decode(), v.decode()) for k, v in h), content=b)
        h2, b2 = _event(other)
        clash = await c.post("/", headers=dict((k.decode(), v.decode()) for k, v in h2), content=b2)
    assert first.status_code == again.status_code == 200 and first.content == again.content
    assert clash.status_code == 409 and b"event_id_conflict" in clash.content and b"mine" not in clash.content
    assert len(engine.calls) == 1


async def test_replies_do_not_cross_keys(engine):
    async with app_client(engine, API_KEY="alice,bob") as c:
        h, b = _event({"messages": [{"role": "user", "content": "mine"}], "max_tokens": 4})
        hd = dict((k.decode(), v.decode()) for k, v in h)
        a = await c.post("/", headers=hd | bearer("alice"), content=b)
        bb = await c.post("/", headers=hd | bearer("bob"), content=b)
    assert a.status_code == bb.status_code == 200 and len(engine.calls) == 2


async def test_a_reset_cloudevent_frees_its_slot_within_a_second(engine):
    engine.hold_after = 1                                       # generation stalls after one piece
    app = build_app(config(), engine)
    h, b = _event({"messages": [{"role": "user", "content": "slow"}], "max_tokens": 50}, id_=str(uuid.uuid4()))
    gone, sent = asyncio.Event(), []

    async def send(message):
        sent.append(message)

    task = asyncio.ensure_future(_asgi(app, b, send, path="/", headers=h, gone=gone))
    async with asyncio.timeout(5):
        while not engine.calls:
            await asyncio.sleep(0.01)
    gone.set()                                                  # the broker's connection was reset
    async with asyncio.timeout(1):
        while not engine.aborted:
            await asyncio.sleep(0.01)
    await asyncio.wait_for(task, 5)
    assert engine.aborted == [engine.calls[0][0]]


# ==================================================== the cache front as a real server (uvicorn, loopback)
class ModelStub(StubHandler):
    """The model service: records Authorization, answers /v1/models."""
    seen: list[str | None] = []

    def do_GET(self):  # noqa: N802
        ModelStub.seen.append(self.headers.get("authorization"))
        self.send_json({"object": "list", "data": [{"id": MODEL, "object": "model"}]})


@pytest.fixture(scope="module")
def front_server(tmp_path_factory):
    with serving(ModelStub) as stub:
        yield from _front(tmp_path_factory.mktemp("front"), stub.url)


def _front(tmp: Path, model_url: str):
    import subprocess
    import sys
    keys = tmp / "keys"
    keys.write_text("first-key\n")
    port = free_port()
    env = {**os.environ, "ROLE": "cache-front", "MODEL_URL": model_url,
           "API_KEY_FILE": str(keys), "HOST": "127.0.0.1", "PORT": str(port), "PYTHON": sys.executable,
           "MAX_REQUEST_BYTES": str(64 * 2**20)}
    log = tmp / "front.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(["bash", str(ROOT / "scripts" / "run_autoglm_server.sh")], cwd=ROOT, env=env,
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(120):
            try:
                if httpx.get(f"{url}/health/readiness", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.5)
        else:
            pytest.fail(log.read_text())
        yield url, keys, proc, log
    finally:
        proc.terminate()
        proc.wait(30)


def test_front_checks_the_key_passes_it_on_and_rotates(front_server):
    url, keys, _, log = front_server
    ModelStub.seen.clear()
    assert httpx.get(f"{url}/v1/models", timeout=10).status_code == 401
    assert httpx.get(f"{url}/v1/models", headers=bearer("first-key"), timeout=10).status_code == 200
    assert ModelStub.seen == ["Bearer first-key"]                 # the model service checks it too
    tmp = keys.with_suffix(".new")
    tmp.write_text("second-key\n")
    os.replace(tmp, keys)
    deadline = time.monotonic() + 10
    while httpx.get(f"{url}/v1/models", headers=bearer("second-key"), timeout=10).status_code != 200:
        assert time.monotonic() < deadline, "the new key was not picked up"
        time.sleep(0.3)
    assert httpx.get(f"{url}/v1/models", headers=bearer("first-key"), timeout=10).status_code == 401
    assert httpx.get(f"{url}/health/liveness", timeout=10).status_code == 200
    text = log.read_text()
    assert "first-key" not in text and "second-key" not in text


def _rss_kib(pid: int) -> int:
    """Resident memory of `pid` and its children (the script execs uvicorn: the same pid)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


@pytest.mark.parametrize("body", [
    b'{"x":' + b"[" * 5_000_000 + b"]" * 5_000_000 + b"}",
    b'{"model":"autoglm-phone-9b","messages":[' + b'{"role":"user","content":"x"},' * 900_000 + b"{}]}",
], ids=["deep", "wide"])
async def test_hostile_bodies_against_the_real_front(front_server, body):
    """A 10-30 MB hostile body: a 400 before it is parsed, probes keep answering, RSS within 2x the body cap."""
    url, keys, proc, _ = front_server
    key = keys.read_text().strip()          # whichever key is current (the rotation test may have run)
    before = _rss_kib(proc.pid)
    async with httpx.AsyncClient(base_url=url, timeout=60) as c:
        latencies = []

        async def probe():
            for _ in range(200):
                t = time.perf_counter()
                assert (await c.get("/health/liveness")).status_code == 200
                latencies.append(time.perf_counter() - t)
                await asyncio.sleep(0.02)

        prober = asyncio.ensure_future(probe())
        r = await c.post("/v1/chat/completions", content=body,
                         headers={"content-type": "application/json", **bearer(key)})
        prober.cancel()
        await asyncio.gather(prober, return_exceptions=True)
    assert r.status_code == 400, r.text
    assert "MAX_JSON" in r.json()["error"]["message"]
    latencies.sort()
    assert latencies and latencies[len(latencies) // 2] < 0.1
    assert _rss_kib(proc.pid) - before < 2 * 64 * 1024


def test_uvicorn_bounds_request_headers_like_func_python(front_server):
    """Headers that never complete: the connection is closed after HEADER_TIMEOUT_S; headers over 16 KiB: 400."""
    import socket

    from function.uvicorn_http import HEADER_TIMEOUT_S
    url = front_server[0]
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=HEADER_TIMEOUT_S + 10) as s:
        s.sendall(b"GET /health/liveness HTTP/1.1\r\nHost: x\r\nX-Slow: ")
        started = time.monotonic()
        assert s.recv(1024) == b""                                    # closed by the server, not by our timeout
        assert time.monotonic() - started < HEADER_TIMEOUT_S + 10
    r = httpx.get(f"{url}/health/liveness", headers={"X-Big": "a" * 50_000}, timeout=10)
    assert r.status_code == 431
    assert httpx.get(f"{url}/health/liveness", timeout=10).status_code == 200
