"""The Knative Functions adapter: func-python's `new()` -> Function(start, stop, alive, ready, handle).

func-python calls `start(cfg)` synchronously inside its lifespan startup and listens only after it returns, so
`start` only builds the config, the engine client and the app, then lets the engine load in a background thread;
`ready()` stays False with the loading phase until the model is loaded and warmed. func-python answers
/health/liveness and /health/readiness from `alive()`/`ready()` and forwards every other request to `handle`.

`create_app()` is the same composition for uvicorn (`scripts/run_autoglm_server.sh`), where the ASGI lifespan runs
the engine's start and stop. No routes and no torch here.

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
from typing import AsyncIterator, Callable, Mapping

from fastapi import FastAPI
from starlette.types import Receive, Scope, Send

from function import shutdown
from function.api.app import build_app
from function.api.errors import error_response
from function.api.gate import Drain
from function.asr import SpeechRecognizer
from function.config import Config, ConfigError
from function.engine.client import FAILED_GRACE_S, LocalEngine
from function.front import build_front_app, install as install_cache

log = logging.getLogger(__name__)


class Function:
    def __init__(self, engine_factory: Callable[[Config], LocalEngine] = LocalEngine,
                 asr_factory: Callable[[Config], SpeechRecognizer] = SpeechRecognizer):
        """`engine_factory` builds the engine from the config (tests pass a fake with the same lifecycle);
        `asr_factory` the speech-to-text stage, built only where ASR_MODEL_PATH is set."""
        self._engine_factory = engine_factory
        self._asr_factory = asr_factory
        self._asr: SpeechRecognizer | None = None
        self._engine: LocalEngine | None = None
        self._app: FastAPI | None = None
        self._failure = "not started"       # why there is no engine, while there is none
        self._front = False                 # ROLE=cache-front: no engine, always ready
        self._failed_at: float | None = None
        self._drain = Drain()               # SIGTERM: not ready, 503 for new requests, then stop()

    def start(self, cfg: Mapping[str, str]) -> None:
        """Build everything and start loading the model in the background; returns at once. A bad setting does
        not raise (the process would crash-loop without saying why): readiness reports it, and liveness turns
        False after the same grace as a failed model load."""
        try:
            config = Config.from_env(cfg)
        except ConfigError as e:
            self._failure = f"configuration error: {e}"
            self._failed_at = time.monotonic()
            log.error(self._failure)
            return
        configure_logging(config)
        shutdown.drain_on_sigterm(self._drain, config.request_timeout_s)   # under func-python: hypercorn's loop
        if config.role == "cache-front":
            self._app, self._front = build_front_app(config, drain=self._drain), True
            log.info("cache front: answering hits, forwarding misses to %s", config.model_url)
            return
        self._engine = self._engine_factory(config)
        self._asr = self._asr_factory(config) if config.asr_model_path else None
        self._app = build_app(config, self._engine, asr=self._asr, drain=self._drain)
        install_cache(self._app, config)
        if self._asr is None:
            self._engine.start_loading()
        else:                                   # one model load at a time (function/asr.py says why): ASR first
            self._asr.start_loading(then=self._engine.start_loading)
        log.info("serving %s; the model loads in the background", config.served_model_name)

    async def handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Every request but the health probes; the app does the routing."""
        if scope["type"] == "lifespan":     # func-python never sends these; answer any server that does
            await _acknowledge_lifespan(receive, send)
        elif self._app is None:
            await error_response("unavailable", self._failure)(scope, receive, send)
        else:
            await self._app(scope, receive, send)

    def stop(self) -> None:
        """Called by func-python on shutdown: readiness turns False, then the engine thread is stopped."""
        self._drain.begin()
        if self._engine is not None:
            log.info("shutting down the engine")
            self._engine.shutdown()
        if self._asr is not None:
            self._asr.shutdown()

    def alive(self) -> tuple[bool, str]:
        if self._front:
            return True, "ready"
        if self._engine is None:
            failed = self._failed_at is not None and time.monotonic() - self._failed_at >= FAILED_GRACE_S
            return not failed, self._failure
        alive, _, message = _status(self._engine, self._asr)
        return alive, message

    def ready(self) -> tuple[bool, str]:
        if self._drain.draining:
            return False, "shutting down"
        if self._front:
            return True, "ready"
        if self._engine is None:
            return False, self._failure
        _, ready, message = _status(self._engine, self._asr)
        return ready, message


def _status(engine: LocalEngine, asr: SpeechRecognizer | None) -> tuple[bool, bool, str]:
    """(alive, ready, message) of what loads first and is not ready yet: the speech model, then the engine."""
    alive, ready, message = engine.status()
    if asr is not None:
        asr_alive, asr_ready, asr_message = asr.status()
        if not asr_ready:
            return alive and asr_alive, False, asr_message
    return alive, ready, message


def new() -> Function:
    """func-python's entry point: `func_python.http.serve(new)`."""
    return Function()


def create_app() -> FastAPI:
    """uvicorn's entry point (`uvicorn --factory function.func:create_app`): the same config, engine and app, with
    the engine's start and stop run by the ASGI lifespan. Under uvicorn a bad setting fails the start at once."""
    config = Config.from_env()
    configure_logging(config)
    if config.role == "cache-front":
        return build_front_app(config)      # its own lifespan closes the proxy's and Redis' connections
    engine = LocalEngine(config)
    asr = SpeechRecognizer(config) if config.asr_model_path else None
    cache = None

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        shutdown.drain_on_sigterm(app.state.drain, config.request_timeout_s)    # after uvicorn's own handler
        if asr is None:
            engine.start_loading()
        else:
            asr.start_loading(then=engine.start_loading)
        try:
            yield
        finally:
            log.info("shutting down the engine")
            if asr is not None:
                asr.shutdown()
            await asyncio.to_thread(engine.shutdown)
            if cache is not None:
                await cache.aclose()

    app = build_app(config, engine, lifespan=lifespan, asr=asr)
    cache = install_cache(app, config)
    return app


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
