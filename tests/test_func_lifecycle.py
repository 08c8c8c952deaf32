"""The Knative adapter: func-python's Function contract (start/stop/alive/ready/handle), with the fake engine, inside
func-python's own ASGI wrapper, and once with the real LocalEngine loading the tiny model."""
from __future__ import annotations

import asyncio
import subprocess
import sys
import time

import httpx
import pytest
from support.fake_engine import FakeEngine
from func_python.http import ASGIApplication

from function import new
from function.config import ConfigError
from function.func import Function, create_app

HELLO = {"model": "autoglm-phone-9b", "messages": [{"role": "user", "content": "hello"}]}


class LoadingFake(FakeEngine):
    """A fake engine that, like LocalEngine, is still loading when start() returns."""

    def __init__(self, config):
        super().__init__(ready=False)
        self.config = config


def fake_function() -> tuple[Function, list[LoadingFake]]:
    made: list[LoadingFake] = []

    def factory(config):
        made.append(LoadingFake(config))
        return made[-1]
    return Function(engine_factory=factory), made


def client(asgi) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=asgi), base_url="http://fn")


async def test_start_returns_while_loading_then_ready():
    fn, made = fake_function()
    fn.start({"SERVED_MODEL_NAME": "autoglm-phone-9b", "MAX_NUM_SEQS": "4"})
    (engine,) = made
    assert engine.loading_started and engine.config.max_num_seqs == 4
    assert fn.ready() == (False, "loading: weights")
    assert fn.alive() == (True, "loading: weights")
    engine.finish_loading()
    assert fn.ready() == (True, "ready")
    async with client(fn.handle) as c:
        r = await c.post("/v1/chat/completions", json=HELLO)
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"]


async def test_stop_turns_readiness_off_and_shuts_the_engine_down():
    fn, made = fake_function()
    fn.start({})
    made[0].finish_loading()
    fn.stop()
    assert made[0].shut_down
    assert fn.ready() == (False, "shutting down")


@pytest.mark.parametrize("env,fragment", [({"MAX_NUM_SEQS": "0"}, "MAX_NUM_SEQS"),
                                          ({"QUANTIZATION": "fp3"}, "QUANTIZATION"),
                                          ({"MAX_NUM_SEQS": "many"}, "MAX_NUM_SEQS")])
async def test_bad_config_is_reported_not_raised(env, fragment):
    fn, made = fake_function()
    fn.start(env)                                       # must not raise: func-python would exit without a word
    assert made == []
    ready, message = fn.ready()
    assert ready is False and message.startswith("configuration error") and fragment in message
    assert fn.alive() == (True, message)                # for a grace period, so the probe message is seen
    async with client(fn.handle) as c:
        r = await c.post("/v1/chat/completions", json=HELLO)
    assert r.status_code == 503
    assert r.json()["error"]["code"] == "unavailable" and fragment in r.json()["error"]["message"]
    fn.stop()                                           # nothing to stop, and no error


async def test_bad_config_liveness_fails_after_the_grace(monkeypatch):
    fn, _ = fake_function()
    fn.start({"MAX_NUM_SEQS": "0"})
    monkeypatch.setattr("function.func.FAILED_GRACE_S", 0.0)
    assert fn.alive()[0] is False


async def test_handle_acknowledges_lifespan_scopes():
    fn, _ = fake_function()
    inbox = [{"type": "lifespan.shutdown"}, {"type": "lifespan.startup"}]
    sent = []

    async def receive():
        return inbox.pop()

    async def send(message):
        sent.append(message["type"])
    await asyncio.wait_for(fn.handle({"type": "lifespan", "asgi": {"version": "3.0"}}, receive, send), 5)
    assert sent == ["lifespan.startup.complete", "lifespan.shutdown.complete"]


async def test_inside_func_pythons_own_asgi_wrapper(monkeypatch):
    """func-python's real ASGIApplication: it runs start() on lifespan startup, answers the probes from
    alive()/ready(), and forwards everything else to handle()."""
    monkeypatch.setenv("MAX_NUM_SEQS", "2")
    fn, made = fake_function()
    wrapper = ASGIApplication(fn)
    inbox = [{"type": "lifespan.shutdown"}, {"type": "lifespan.startup"}]
    startup_done, shutting_down = asyncio.Event(), asyncio.Event()

    async def receive():
        if len(inbox) == 1:
            await shutting_down.wait()
        return inbox.pop()

    async def send(message):
        if message["type"] == "lifespan.startup.complete":
            startup_done.set()
    lifespan = asyncio.create_task(wrapper({"type": "lifespan"}, receive, send))
    await asyncio.wait_for(startup_done.wait(), 5)
    assert made[0].config.max_num_seqs == 2             # start(cfg) got the environment
    async with client(wrapper) as c:
        r = await c.get("/health/readiness")
        assert (r.status_code, r.text) == (500, "loading: weights")
        made[0].finish_loading()
        r = await c.get("/health/readiness")
        assert (r.status_code, r.text) == (200, "ready")
        assert (await c.get("/health")).json() == {"status": "ok", "model": "autoglm-phone-9b"}
        assert (await c.post("/v1/chat/completions", json=HELLO)).status_code == 200
    shutting_down.set()
    await asyncio.wait_for(lifespan, 5)                 # shutdown ran stop()
    assert made[0].shut_down


def test_uvicorn_factory_fails_fast_on_a_bad_setting(monkeypatch):
    """Under uvicorn (a developer's terminal) a bad setting stops the start with its message."""
    monkeypatch.setenv("MAX_NUM_SEQS", "0")
    with pytest.raises(ConfigError, match="MAX_NUM_SEQS"):
        create_app()


def test_importing_the_function_imports_no_torch():
    code = ("import sys; from function import new; import function.func, function.api.app; "
            "f = new(); assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


async def test_real_engine_loads_the_tiny_model_in_the_background(model_cache_dir):
    fn = new()
    fn.start({"MODEL_CACHE_DIR": str(model_cache_dir), "MAX_NUM_SEQS": "2", "MAX_MODEL_LEN": "2048"})
    try:
        ready, message = fn.ready()
        assert ready is False and message and message != "ready"     # start() returned before the model loaded
        assert fn.alive()[0] is True
        deadline = time.monotonic() + 300
        while not fn.ready()[0]:
            assert fn.alive()[0], fn.alive()[1]
            assert time.monotonic() < deadline, f"not ready after 300 s: {fn.ready()[1]}"
            await asyncio.sleep(0.2)
        async with client(fn.handle) as c:
            r = await c.post("/v1/chat/completions", json={**HELLO, "max_tokens": 4, "temperature": 0})
        assert r.status_code == 200, r.text
        assert r.json()["usage"]["completion_tokens"] <= 4
    finally:
        fn.stop()
    assert fn.ready()[0] is False
