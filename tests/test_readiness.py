"""One readiness under both servers: func-python (its own probes from `Function.alive()/ready()`, `/health` from the
app) and uvicorn (`create_app()`: every probe from the app) give the same answers, from the one
`function.http_common.Readiness`, for each state the process can be in: loading, ready, the speech model failed, the
engine dead, shutting down."""
from __future__ import annotations

import httpx
import pytest
from support.fake_engine import FakeEngine
from support.fake_speech import FakeSpeech
from func_python.http import ASGIApplication

from function.func import Function, create_app

ASR_FAILED = (True, False, "speech model failed: OSError: no such checkpoint")


def loading(engine: FakeEngine, asr: FakeSpeech) -> None:
    asr.finish()                    # the speech model is ready; the engine is still loading its weights


def ready(engine: FakeEngine, asr: FakeSpeech) -> None:
    asr.finish()
    engine.finish_loading()


def speech_model_failed(engine: FakeEngine, asr: FakeSpeech) -> None:
    asr.finish(ASR_FAILED)          # the engine loads all the same (and is ready): readiness still says no
    engine.finish_loading()


def speech_model_failed_long_ago(engine: FakeEngine, asr: FakeSpeech) -> None:
    speech_model_failed(engine, asr)
    asr.state = (False, False, ASR_FAILED[2])     # past FAILED_GRACE_S: liveness fails, the pod is restarted


def engine_dead(engine: FakeEngine, asr: FakeSpeech) -> None:
    ready(engine, asr)
    engine.alive, engine.ready, engine.message = False, False, "engine stopped: CUDA error: illegal memory access"


def engine_loading_speech_loading(engine: FakeEngine, asr: FakeSpeech) -> None:
    pass                            # the speech model loads first; the engine has not begun


STATES = {
    # name: (how to get there, (liveness, readiness, /health) as (status, text or JSON "status"))
    "speech model loading": (engine_loading_speech_loading,
                             ((200, "speech model loading: x"), (500, "speech model loading: x"), (503, "loading"))),
    "engine loading": (loading, ((200, "loading: weights"), (500, "loading: weights"), (503, "loading"))),
    "ready": (ready, ((200, "ready"), (200, "ready"), (200, "ok"))),
    "speech model failed": (speech_model_failed, ((200, ASR_FAILED[2]), (500, ASR_FAILED[2]), (503, "loading"))),
    "speech model failed long ago": (speech_model_failed_long_ago,
                                     ((500, ASR_FAILED[2]), (500, ASR_FAILED[2]), (503, "failed"))),
    "engine dead": (engine_dead, ((500, "engine stopped: CUDA error: illegal memory access"),
                                  (500, "engine stopped: CUDA error: illegal memory access"), (503, "failed"))),
}
ENV = {"ASR_MODEL_PATH": "/models/whisper"}


class Made:
    def __init__(self):
        self.engines: list[FakeEngine] = []
        self.asrs: list[FakeSpeech] = []

    def engine(self, config) -> FakeEngine:
        self.engines.append(FakeEngine(ready=False))
        return self.engines[-1]

    def asr(self, config) -> FakeSpeech:
        self.asrs.append(FakeSpeech(config))
        return self.asrs[-1]


async def probe(asgi) -> dict[str, tuple]:
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=asgi), base_url="http://fn") as c:
        live, ready_, health = [await c.get(p) for p in ("/health/liveness", "/health/readiness", "/health")]
        return {"liveness": (live.status_code, live.text), "readiness": (ready_.status_code, ready_.text),
                "health": (health.status_code, health.json(), health.headers.get("retry-after"))}


async def under_func_python(state, drain: bool = False) -> dict[str, tuple]:
    made = Made()
    fn = Function(engine_factory=made.engine, asr_factory=made.asr)
    fn.start(ENV)
    state(made.engines[0], made.asrs[0])
    if drain:
        fn._drain.begin()
    try:
        return await probe(ASGIApplication(fn))           # func-python answers the probes from alive()/ready()
    finally:
        fn.stop()


async def under_uvicorn(state, monkeypatch, drain: bool = False) -> dict[str, tuple]:
    made = Made()
    for k, v in ENV.items():
        monkeypatch.setenv(k, v)
    app = create_app(engine_factory=made.engine, asr_factory=made.asr)
    async with app.router.lifespan_context(app):         # uvicorn runs start() and stop() in the lifespan
        state(made.engines[0], made.asrs[0])
        if drain:
            app.state.drain.begin()
        return await probe(app)


@pytest.mark.parametrize("name", list(STATES))
async def test_both_servers_give_the_same_readiness(name, monkeypatch):
    state, (live, ready_, health) = STATES[name]
    func_python, uvicorn = await under_func_python(state), await under_uvicorn(state, monkeypatch)
    assert func_python == uvicorn
    assert func_python["liveness"] == live and func_python["readiness"] == ready_
    status, body, retry = func_python["health"]
    assert (status, body["status"]) == health
    if status == 503:
        assert body["message"] == ready_[1] and (retry is not None) == (health[1] != "failed")


@pytest.mark.parametrize("name", ["engine loading", "ready", "speech model failed"])
async def test_both_servers_say_shutting_down_once_draining(name, monkeypatch):
    state, _ = STATES[name]
    func_python = await under_func_python(state, drain=True)
    assert func_python == await under_uvicorn(state, monkeypatch, drain=True)
    assert func_python["readiness"] == (500, "shutting down") and func_python["liveness"] == (200, "shutting down")
    status, body, retry = func_python["health"]
    assert (status, body["status"], retry) == (503, "shutting down", "1")


async def test_the_uvicorn_lifespan_loads_the_speech_model_first_then_stops_both(monkeypatch):
    made = Made()
    monkeypatch.setenv("ASR_MODEL_PATH", "/models/whisper")
    app = create_app(engine_factory=made.engine, asr_factory=made.asr)
    (engine,), (asr,) = made.engines, made.asrs
    assert asr.then is None and not engine.loading_started           # nothing loads before the server starts
    async with app.router.lifespan_context(app):
        assert asr.then is not None and not engine.loading_started
        asr.finish()
        assert engine.loading_started
    assert asr.stopped and engine.shut_down and app.state.readiness.ready() == (False, "shutting down")


async def test_the_cache_front_is_ready_at_once_under_both_servers(monkeypatch):
    env = {"ROLE": "cache-front", "MODEL_URL": "http://127.0.0.1:9"}
    fn = Function(engine_factory=lambda c: pytest.fail("the cache front must not build an engine"))
    fn.start(env)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    app = create_app(engine_factory=lambda c: pytest.fail("the cache front must not build an engine"))
    async with app.router.lifespan_context(app):
        answers = await probe(ASGIApplication(fn)), await probe(app)
        assert answers[0] == answers[1]
        assert answers[0]["readiness"] == (200, "ready")
        assert answers[0]["health"] == (200, {"status": "ok", "model": "autoglm-phone-9b", "role": "cache-front"},
                                        None)
    fn.stop()
