"""The Knative Functions adapter: func-python's `new()` -> Function(start, stop, alive, ready, handle).

func-python calls `start(cfg)` synchronously inside its lifespan startup and listens only after it returns, so
`start` only builds the config, the engine client and the app, then lets the engine load in a background thread;
`ready()` stays False with the loading phase until the model is loaded and warmed. func-python answers
/health/liveness and /health/readiness from `alive()`/`ready()` and forwards every other request to `handle`.

`create_app()` is the same composition for uvicorn (`scripts/run_autoglm_server.sh`), where the ASGI lifespan runs
the start and stop. Both go through `assemble()`: one app, one `Readiness` (function/http_common.py) that
func-python's probes (`alive()`/`ready()`), the app's own probes (uvicorn) and `/health` all answer from, and the
stages (speech model, engine) started and stopped through their `Lifecycle` methods. No routes and no torch here.

Under both servers SIGTERM first drains (function/shutdown.py): readiness False and 503 for new requests at once,
the requests in flight finish, then the server's own shutdown runs `stop()` (uvicorn: the lifespan's end).

ROLE picks what is assembled: `model` (default) is the engine and the API, with the response cache inside the app
(function.front.install); `cache-front` is the response cache in front of MODEL_URL (function.front.build_front_app):
no engine, no model, no torch, ready at once.
"""
from __future__ import annotations

import asyncio
import logging
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import AsyncIterator, Awaitable, Callable, Mapping

from fastapi import FastAPI
from starlette.types import Lifespan, Receive, Scope, Send

from function import front, shutdown
from function.api.app import build_app
from function.api.errors import error_response
from function.api.gate import Drain
from function.asr import SpeechRecognizer
from function.config import Config, ConfigError
from function.engine.client import LocalEngine
from function.engine.protocol import FAILED_GRACE_S
from function.engine.protocol import EngineClient
from function.http_common import Lifecycle, Readiness, Status

log = logging.getLogger(__name__)

EngineFactory = Callable[[Config], EngineClient]
"""Builds the engine from the config: LocalEngine, or a test's fake; it also has the `Lifecycle` methods."""
AsrFactory = Callable[[Config], SpeechRecognizer]


@dataclass
class Assembly:
    """One role's app and what a server runs around it. `start()` returns at once (the models load in the
    background, the speech model first: one model load at a time, function/asr.py says why); `stop()` blocks until
    the stages have stopped; `aclose()` is uvicorn's end: `stop()`, then the connections (Redis, the proxy)."""
    app: FastAPI
    readiness: Readiness
    engine: Lifecycle | None = None
    asr: SpeechRecognizer | None = None
    closers: list[Callable[[], Awaitable[None]]] = field(default_factory=list)

    def start(self) -> None:
        if self.engine is None:
            return
        if self.asr is None:
            self.engine.start_loading()
        else:
            self.asr.start_loading(then=self.engine.start_loading)

    def stop(self) -> None:
        self.readiness.drain.begin()
        if self.asr is not None:
            self.asr.shutdown()
        if self.engine is not None:
            log.info("shutting down the engine")
            self.engine.shutdown()

    async def aclose(self) -> None:
        await asyncio.to_thread(self.stop)
        for close in self.closers:
            await close()


def assemble(config: Config, drain: Drain, engine_factory: EngineFactory = LocalEngine,
             asr_factory: AsrFactory = SpeechRecognizer, lifespan: Lifespan[FastAPI] | None = None) -> Assembly:
    """The app of `config.role` with its readiness and stages; `lifespan` only for a server that sends lifespan
    events (uvicorn)."""
    if config.role == "cache-front":
        app = front.build_front_app(config, drain=drain, lifespan=lifespan)
        log.info("cache front: answering hits, forwarding misses to %s", config.model_url)
        return Assembly(app, app.state.readiness, closers=[lambda: front.aclose(app)])
    engine = engine_factory(config)
    asr = asr_factory(config) if config.asr_model_path else None
    app = build_app(config, engine, lifespan=lifespan, asr=asr, drain=drain)
    cache = front.install(app, config)
    return Assembly(app, app.state.readiness, engine, asr, closers=[cache.aclose] if cache is not None else [])


class _NotServing:
    """The one stage while there is no app: not started yet, or a bad setting (then alive for FAILED_GRACE_S, so
    that the probe's message is seen before the restart)."""

    def __init__(self, message: str, failed: bool):
        self.message = message
        self.failed_at = time.monotonic() if failed else None

    def start_loading(self) -> None:
        pass

    def shutdown(self) -> None:
        pass

    def status(self) -> Status:
        failed = self.failed_at is not None and time.monotonic() - self.failed_at >= FAILED_GRACE_S
        return not failed, False, self.message


class Function:
    def __init__(self, engine_factory: EngineFactory = LocalEngine, asr_factory: AsrFactory = SpeechRecognizer):
        """`engine_factory` builds the engine from the config (tests pass a fake with the same lifecycle);
        `asr_factory` the speech-to-text stage, built only where ASR_MODEL_PATH is set."""
        self._engine_factory = engine_factory
        self._asr_factory = asr_factory
        self._drain = Drain()               # SIGTERM: not ready, 503 for new requests, then stop()
        self._assembly: Assembly | None = None
        self._failure = "not started"       # why there is no app, while there is none
        self._readiness = Readiness([_NotServing(self._failure, failed=False)], self._drain)

    def start(self, cfg: Mapping[str, str]) -> None:
        """Build everything and start loading the model in the background; returns at once. A bad setting does
        not raise (the process would crash-loop without saying why): readiness reports it, and liveness turns
        False after the same grace as a failed model load."""
        try:
            config = Config.from_env(cfg)
        except ConfigError as e:
            self._failure = f"configuration error: {e}"
            self._readiness = Readiness([_NotServing(self._failure, failed=True)], self._drain)
            log.error(self._failure)
            return
        configure_logging(config)
        shutdown.drain_on_sigterm(self._drain, config.request_timeout_s)   # under func-python: hypercorn's loop
        self._assembly = assemble(config, self._drain, self._engine_factory, self._asr_factory)
        self._readiness = self._assembly.readiness
        self._assembly.start()
        if config.role != "cache-front":
            log.info("serving %s; the model loads in the background", config.served_model_name)

    async def handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Every request but the health probes; the app does the routing."""
        if scope["type"] == "lifespan":     # func-python never sends these; answer any server that does
            await _acknowledge_lifespan(receive, send)
        elif self._assembly is None:
            await error_response("unavailable", self._failure)(scope, receive, send)
        else:
            await self._assembly.app(scope, receive, send)

    def stop(self) -> None:
        """Called by func-python on shutdown: readiness turns False, then the stages are stopped."""
        self._drain.begin()
        if self._assembly is not None:
            self._assembly.stop()

    def alive(self) -> tuple[bool, str]:
        return self._readiness.alive()

    def ready(self) -> tuple[bool, str]:
        return self._readiness.ready()


def new() -> Function:
    """func-python's entry point: `func_python.http.serve(new)`."""
    return Function()


def create_app(engine_factory: EngineFactory = LocalEngine, asr_factory: AsrFactory = SpeechRecognizer) -> FastAPI:
    """uvicorn's entry point (`uvicorn --factory function.func:create_app`): the same assembly as `Function`, with
    its start and stop run by the ASGI lifespan. Under uvicorn a bad setting fails the start at once."""
    config = Config.from_env()
    configure_logging(config)
    drain = Drain()
    assembly: Assembly | None = None

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        shutdown.drain_on_sigterm(drain, config.request_timeout_s)    # after uvicorn's own handler
        assembly.start()
        try:
            yield
        finally:
            await assembly.aclose()

    assembly = assemble(config, drain, engine_factory, asr_factory, lifespan=lifespan)
    return assembly.app


def configure_logging(config: Config) -> None:
    """Our loggers at LOG_LEVEL; a root handler only if the server installed none (uvicorn configures only its own)."""
    level = logging.getLevelName(config.log_level.upper())
    if not isinstance(level, int):
        log.warning("LOG_LEVEL=%r is not a log level; using INFO", config.log_level)
        level = logging.INFO
    if not logging.getLogger().handlers:
        logging.basicConfig(format="%(levelname)s:     %(name)s: %(message)s")
    logging.getLogger("function").setLevel(level)


async def _acknowledge_lifespan(receive: Receive, send: Send) -> None:
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return
