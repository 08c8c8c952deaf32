"""ROLE=cache-front: `build_front_app` is the cache layer (function/front/layer.py) over a proxy to MODEL_URL
(function/front/proxy.py), with the model app's gates (API keys, body limits, the drain), probes and HTTP metrics.
No engine, no model, no torch."""
from __future__ import annotations

import logging

import httpx
from fastapi import FastAPI
from starlette.routing import Route
from starlette.types import Lifespan

from function.api import auth, errors
from function.api.gate import Drain, RequestGate
from function.cache import ResponseCache
from function.config import Config
from function.http_common import HttpMetrics, Readiness, add_probe_routes

from .layer import CHAT_PATH, install
from .proxy import ModelProxy

log = logging.getLogger(__name__)


def build_front_app(config: Config, *, cache: ResponseCache | None = None,
                    transport: httpx.AsyncBaseTransport | None = None, drain: Drain | None = None,
                    lifespan: Lifespan[FastAPI] | None = None) -> FastAPI:
    """ROLE=cache-front: the cache layer over a proxy to MODEL_URL. Ready at once, with or without the model
    service and Redis, until `drain` begins (SIGTERM, function/shutdown.py): `app.state.readiness` has no stage to
    wait for. `transport` replaces the network in tests; `lifespan` only where the server delivers lifespan events
    (uvicorn: function/func.py's, which ends with `aclose`)."""
    proxy = ModelProxy(config.model_url, config.request_timeout_s, transport, config.max_request_bytes)
    drain = drain or Drain()
    cache = cache or ResponseCache.from_config(config)
    if cache is None:
        log.warning("cache front without a cache (RESPONSE_CACHE=off, no RESPONSE_CACHE_URL): proxying only")

    app = FastAPI(title="AutoGLM-Phone-9B cache front", summary="Response cache in front of the model service",
                  lifespan=lifespan, strict_content_type=False)
    errors.install(app)

    readiness = Readiness([], drain)
    add_probe_routes(app, readiness, config.served_model_name, role="cache-front")

    app.router.routes.append(Route(CHAT_PATH, proxy, methods=["POST"]))
    app.router.routes.append(Route("/{path:path}", proxy, include_in_schema=False))   # /v1/models and the rest
    app.add_middleware(RequestGate, drain=drain, max_body=config.max_request_bytes,
                       body_timeout_s=config.request_timeout_s, max_depth=config.max_json_depth,
                       max_elements=config.max_json_elements, all_paths=True)   # every body on every path
    auth.install(app, config)       # checks the key here; the proxy passes Authorization on to the model
    app.add_middleware(HttpMetrics, routes=app.router.routes)
    if cache is not None:
        install(app, config, cache, proxied=True)
    app.state.proxy, app.state.cache, app.state.drain, app.state.readiness = proxy, cache, drain, readiness
    return app


async def aclose(app: FastAPI) -> None:
    """Close the front's connections: to the model service, and Redis'."""
    await app.state.proxy.aclose()
    if app.state.cache is not None:
        await app.state.cache.aclose()
