"""The cache-front role: in-process against the fake engine (single flight, an unreachable model, whose headers
win), then as real servers on loopback: redis-server, the model server (uvicorn, tiny model, its own cache off) and
the front (uvicorn, ROLE=cache-front, Redis only), with a second front replica under func-python. Hits need no model:
the last test stops the model server and is still answered.

Tests of the real-server part run in file order: the last two kill Redis and stop the model server."""
from __future__ import annotations

import asyncio
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai
import pytest
from conftest import sse_events
from test_cache import GREEDY, MODEL, RedisServer, config, delta_keys, frame, stream_text, until, without_ids
from test_e2e_servers import ROOT, Server, command, free_port, wait_ready

from function.api.app import build_app
from function.front import build_front_app, install
from function.func import Function, create_app

TIMEOUT_S = 120


# ------------------------------------------------------------------------------------------------- in-process
def front_client(upstream_app=None, transport: httpx.AsyncBaseTransport | None = None, **env) -> httpx.AsyncClient:
    cfg = config(ROLE="cache-front", MODEL_URL="http://model.invalid", **env)
    front = build_front_app(cfg, transport=transport or httpx.ASGITransport(app=upstream_app))
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=front), base_url="http://front")


def ask(text: str, **kw) -> dict:
    return GREEDY | {"messages": [{"role": "user", "content": text}], **kw}


async def test_in_process_front_hits_without_asking_the_model(engine):
    async with front_client(build_app(config(), engine)) as c:
        first = await c.post("/v1/chat/completions", json=GREEDY)
        second = await c.post("/v1/chat/completions", json=GREEDY | {"stream": True})
        models = await c.get("/v1/models")                # everything else is proxied
    assert (first.headers["x-cache"], second.headers["x-cache"]) == ("miss", "hit")
    assert len(engine.calls) == 1
    assert stream_text(sse_events(second.text))[1] == first.json()["choices"][0]["message"]["content"]
    assert models.status_code == 200 and models.json()["data"][0]["id"] == MODEL


async def test_in_process_front_single_flight(engine):
    engine.hold_after = 1
    async with front_client(build_app(config(), engine)) as c:
        tasks = [asyncio.create_task(c.post("/v1/chat/completions", json=GREEDY | {"stream": i % 2 == 0}))
                 for i in range(5)]
        await until(lambda: engine.calls)
        await asyncio.sleep(0.2)
        engine.release.set()
        answers = await asyncio.wait_for(asyncio.gather(*tasks), 10)
    assert len(engine.calls) == 1
    assert sorted(r.headers["x-cache"] for r in answers) == ["hit"] * 4 + ["miss"]


async def test_the_fronts_x_cache_replaces_the_models(engine):
    cfg = config()
    model_app = build_app(cfg, engine)
    install(model_app, cfg)                                # the model has its own in-process cache too
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=model_app), base_url="http://m") as m:
        assert (await m.post("/v1/chat/completions", json=GREEDY)).headers["x-cache"] == "miss"
    async with front_client(model_app) as c:
        r = await c.post("/v1/chat/completions", json=GREEDY)
    assert r.headers.get_list("x-cache") == ["miss"] and "age" not in r.headers   # the model's hit is not ours


class Unreachable(httpx.AsyncBaseTransport):
    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("connection refused", request=request)


async def test_in_process_front_with_the_model_unreachable(engine):
    async with front_client(build_app(config(), engine)) as c:
        assert (await c.post("/v1/chat/completions", json=GREEDY)).headers["x-cache"] == "miss"
        cache = c._transport.app.state.cache
    cfg = config(ROLE="cache-front", MODEL_URL="http://model.invalid")
    front = build_front_app(cfg, cache=cache, transport=Unreachable())
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=front), base_url="http://front") as c:
        hit = await c.post("/v1/chat/completions", json=GREEDY)
        down = await c.post("/v1/chat/completions", json=ask("something new"))
        again = await c.post("/v1/chat/completions", json=ask("something new"))
        health = await c.get("/health/readiness")
    assert (hit.status_code, hit.headers["x-cache"]) == (200, "hit")
    assert (down.status_code, down.headers["x-cache"], down.json()["error"]["code"]) == (503, "miss", "unavailable")
    assert down.headers["retry-after"] and again.headers["x-cache"] == "miss"    # the error was not stored
    assert health.status_code == 200                                            # ready without the model


async def test_function_and_uvicorn_factory_build_the_front(monkeypatch):
    fn = Function(engine_factory=lambda cfg: pytest.fail("the cache front must not build an engine"))
    fn.start({"ROLE": "cache-front", "MODEL_URL": "http://127.0.0.1:9"})
    assert fn.ready() == (True, "ready") and fn.alive() == (True, "ready")
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=fn.handle), base_url="http://f") as c:
        assert (await c.get("/health")).json()["role"] == "cache-front"
    monkeypatch.setenv("ROLE", "cache-front")
    monkeypatch.setenv("MODEL_URL", "http://127.0.0.1:9")
    assert create_app().title.endswith("cache front")


def test_the_front_imports_no_torch():
    port = free_port()   # nothing listens there: the miss gets the 503, the process never needs a model
    code = f"""
import asyncio, sys, httpx
from function import new
f = new()
f.start({{"ROLE": "cache-front", "MODEL_URL": "http://127.0.0.1:{port}"}})
async def main():
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=f.handle), base_url="http://f") as c:
        r = await c.post("/v1/chat/completions", json={{"messages": [{{"role": "user", "content": "hi"}}],
                                                        "temperature": 0}})
        assert r.status_code == 503, r.text
asyncio.run(main())
heavy = sorted(m for m in ("torch", "transformers", "accelerate", "safetensors") if m in sys.modules)
assert not heavy, heavy
"""
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60, cwd=ROOT)


def test_the_front_package_does_not_import_the_model_app():
    """function.front reuses the probes and HTTP metrics from function.http_common, not from the model's app."""
    code = ("import sys, function.front; "
            "loaded = [m for m in ('function.api.app', 'function.api.serving', 'function.engine.client') "
            "if m in sys.modules]; assert not loaded, loaded")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60, cwd=ROOT)


# ----------------------------------------------------------------------------------------------- real servers
def start(kind: str, argv_kind: str, env_extra: dict[str, str], log_dir: Path) -> Server:
    port = free_port()
    cmd, extra = command(argv_kind, port)
    env = {k: v for k, v in os.environ.items()
           if k not in ("MODEL_PATH", "ROLE", "MODEL_URL") and not k.startswith("RESPONSE_CACHE")}
    env.update(extra, HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1", **env_extra)
    log_path = log_dir / f"{kind}.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    server = Server(kind, f"http://127.0.0.1:{port}", proc, log_path)
    try:
        wait_ready(server)
    except BaseException:
        server.stop()
        raise
    return server


@pytest.fixture(scope="module")
def redis(tmp_path_factory):
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    yield server
    server.stop()


@pytest.fixture(scope="module")
def model(model_cache_dir: Path, tmp_path_factory):
    server = start("model", "uvicorn", dict(MODEL_CACHE_DIR=str(model_cache_dir), MAX_NUM_SEQS="4",
                                            MAX_MODEL_LEN="4096", DEFAULT_MAX_TOKENS="16", RESPONSE_CACHE="off"),
                   tmp_path_factory.mktemp("model"))
    yield server
    server.stop()


def front_env(model: Server, redis: RedisServer) -> dict[str, str]:
    return dict(ROLE="cache-front", MODEL_URL=model.url, RESPONSE_CACHE="off", RESPONSE_CACHE_URL=redis.url)


@pytest.fixture(scope="module")
def front(model: Server, redis: RedisServer, tmp_path_factory):
    server = start("front", "uvicorn", front_env(model, redis), tmp_path_factory.mktemp("front"))
    yield server
    server.stop()


def post(server: Server, body: dict, **headers) -> httpx.Response:
    return httpx.post(f"{server.url}/v1/chat/completions", json=body, headers=headers, timeout=TIMEOUT_S)


def model_requests(model: Server) -> int:
    """Chat requests the model server has answered (any status)."""
    text = httpx.get(f"{model.url}/metrics", timeout=10).text
    return sum(int(float(v)) for v in re.findall(
        r'^http_requests_total\{method="POST",route="/v1/chat/completions",status="\d+"\} (\S+)$', text, re.M))


def metric(server: Server, name: str) -> float:
    text = httpx.get(f"{server.url}/metrics", timeout=10).text
    return sum(float(v) for v in re.findall(rf"^{re.escape(name)}(?:\{{[^}}]*\}})? (\S+)$", text, re.M))


def loads_torch(server: Server) -> bool:
    maps = Path(f"/proc/{server.proc.pid}/maps").read_text()
    return "libtorch" in maps or "libc10" in maps


def test_front_is_up_on_its_own(front: Server, model: Server):
    health = httpx.get(f"{front.url}/health", timeout=10)
    assert (health.status_code, health.json()) == (200, {"status": "ok", "model": MODEL, "role": "cache-front"})
    assert httpx.get(f"{front.url}/health/liveness", timeout=10).status_code == 200
    models = httpx.get(f"{front.url}/v1/models", timeout=10).json()      # proxied to the model service
    assert models["data"][0]["max_model_len"] == 4096
    assert not loads_torch(front) and loads_torch(model)


def test_miss_then_hit_through_the_front(front: Server, model: Server):
    before = model_requests(model)
    with openai.OpenAI(base_url=f"{front.url}/v1", api_key="EMPTY", timeout=TIMEOUT_S, max_retries=0) as oai:
        ask_ = dict(model=MODEL, messages=[{"role": "user", "content": "打开微信"}], max_tokens=8, temperature=0)
        miss = oai.chat.completions.with_raw_response.create(**ask_)
        hit = oai.chat.completions.with_raw_response.create(**ask_)
    assert (miss.headers["x-cache"], hit.headers["x-cache"]) == ("miss", "hit")
    assert model_requests(model) == before + 1
    a, b = miss.parse(), hit.parse()
    assert b.choices[0].message.content == a.choices[0].message.content and b.usage == a.usage
    assert b.id != a.id and b.system_fingerprint == a.system_fingerprint


def test_another_replica_under_func_python_shares_redis(front: Server, model: Server, redis: RedisServer,
                                                        tmp_path: Path):
    body = ask("shared between replicas", max_tokens=6)
    assert post(front, body).headers["x-cache"] == "miss"
    before = model_requests(model)
    replica = start("front-func-python", "func-python", front_env(model, redis), tmp_path)
    try:
        r = post(replica, body)
        assert (r.status_code, r.headers["x-cache"]) == (200, "hit")
        assert httpx.get(f"{replica.url}/health/readiness", timeout=10).status_code == 200
        assert not loads_torch(replica)
    finally:
        replica.stop()
    assert model_requests(model) == before


def stream(server: Server, body: dict, **headers) -> tuple[httpx.Headers, list, int]:
    """(headers, SSE events, number of separate reads the body arrived in)."""
    reads, raw = 0, b""
    with httpx.stream("POST", f"{server.url}/v1/chat/completions", json=body | {"stream": True}, headers=headers,
                      timeout=TIMEOUT_S) as r:
        assert r.status_code == 200, r.read()
        for piece in r.iter_raw():
            reads += 1
            raw += piece
    return r.headers, sse_events(raw.decode()), reads


def test_streamed_miss_passes_through_then_hits_with_the_same_shape(front: Server, model: Server):
    body = ask("stream me", max_tokens=12, stream_options={"include_usage": True})
    _, direct, _ = stream(model, body)                          # the model's own live stream (its cache is off)
    headers, live, reads = stream(front, body)
    assert headers["x-cache"] == "miss" and headers["content-type"].startswith("text/event-stream")
    # passed through as it was: the same text and frames (the chunk boundaries of two live streams may differ: a
    # request whose consumer falls behind gets the tokens queued since in one chunk), the same final events
    assert stream_text(live) == stream_text(direct) and {frame(e) for e in live} == {frame(e) for e in direct}
    assert [without_ids(e) if isinstance(e, dict) else e for e in live[-2:]] == \
        [without_ids(e) if isinstance(e, dict) else e for e in direct[-2:]]
    assert reads > 2                                            # chunk by chunk, not buffered into one body
    headers, hit, _ = stream(front, body)
    assert headers["x-cache"] == "hit"
    assert stream_text(hit) == stream_text(live)
    assert {frame(e) for e in hit} == {frame(e) for e in live}
    assert delta_keys(hit) <= delta_keys(live) | {frozenset({"content"})}
    assert without_ids(hit[-2]) == without_ids(live[-2]) and hit[-1] == "[DONE]"


def test_stream_without_usage_is_stored_with_it(front: Server):
    body = ask("no usage please", max_tokens=5)
    headers, live, _ = stream(front, body)
    assert headers["x-cache"] == "miss" and all("usage" not in e for e in live[:-1])
    plain = post(front, body)
    assert plain.headers["x-cache"] == "hit" and plain.json()["usage"]["completion_tokens"] > 0


def test_cache_control_through_the_front(front: Server, model: Server):
    body = ask("cache control", max_tokens=4)
    before = model_requests(model)
    assert post(front, body, **{"Cache-Control": "no-store"}).headers["x-cache"] == "miss"
    assert post(front, body).headers["x-cache"] == "miss"                        # no-store: was not stored
    assert post(front, body).headers["x-cache"] == "hit"
    assert post(front, body, **{"Cache-Control": "no-cache"}).headers["x-cache"] == "bypass"
    assert model_requests(model) == before + 3


def test_errors_pass_through_and_are_not_stored(front: Server, model: Server):
    before = model_requests(model)
    for _ in range(2):
        r = post(front, ask("x", max_tokens=5000))
        assert (r.status_code, r.headers["x-cache"]) == (400, "miss")
        assert "context length" in r.json()["error"]["message"]
    assert model_requests(model) == before + 2


def test_redis_killed_fails_open(front: Server, redis: RedisServer):
    body = ask("while redis is down", max_tokens=4)
    errors = metric(front, "autoglm_response_cache_store_errors_total")
    redis.kill()
    try:
        for _ in range(2):
            r = post(front, body)
            assert (r.status_code, r.headers["x-cache"]) == (200, "miss")
            assert r.json()["choices"][0]["finish_reason"] in ("stop", "length")
        assert metric(front, "autoglm_response_cache_store_errors_total") > errors
        assert metric(front, 'autoglm_response_cache_store_up{store="redis"}') == 0
        assert "response cache: redis" in front.log()
    finally:
        redis.start()                            # back on the same port, empty
    time.sleep(1.2)                              # the front's cool-down after a failure
    assert post(front, body).headers["x-cache"] == "miss"
    assert post(front, body).headers["x-cache"] == "hit"


def test_hits_need_no_model_service(front: Server, model: Server):
    """Last: stops the model server."""
    body = ask("answered with the model gone", max_tokens=6)
    live = post(front, body)
    assert live.headers["x-cache"] == "miss"
    model.stop()
    hit = post(front, body)
    assert (hit.status_code, hit.headers["x-cache"]) == (200, "hit")
    assert without_ids(hit.json()) == without_ids(live.json())
    headers, events, _ = stream(front, body)
    assert headers["x-cache"] == "hit" and stream_text(events)[1] == live.json()["choices"][0]["message"]["content"]
    down = post(front, ask("a new question"))
    assert (down.status_code, down.json()["error"]["code"]) == (503, "unavailable")
