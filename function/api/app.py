"""The FastAPI app: thin routes over `ChatService`, health and metrics, OpenAI-shaped errors.

`build_app(config, engine)` is all a server needs. Under func-python, `Function.handle` forwards requests here and
func-python answers `/health/liveness|readiness` itself; the app answers them too (same 200/500 text semantics) so
uvicorn serving has them. The optional `lifespan` is for uvicorn only: func-python never forwards lifespan events.
Every request first passes `auth.AuthGate` (API keys) and `gate.RequestGate` (shutdown drain, body limit, JSON
budget); `app.state.drain` is the drain that function/shutdown.py starts on SIGTERM. No torch, no Knative.
"""
from __future__ import annotations

import time
from functools import partial
from typing import Any

from fastapi import FastAPI, Request, Response
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.routing import BaseRoute, Match, Route
from starlette.types import ASGIApp, Lifespan, Message, Receive, Scope, Send

from function import metrics
from function.asr import SpeechRecognizer
from function.config import Config
from function.engine.protocol import EngineClient
from function.events import ROUTES as EVENT_ROUTES, EventService

from . import auth, errors
from .errors import ModelNotFound
from .gate import Drain, RequestGate
from .protocol import ChatCompletionRequest, ChatCompletionResponse, ErrorResponse, ModelCard, ModelList
from .serving import ChatService
from .completions import CompletionService, version
from .protocol import (CompletionRequest, CompletionResponse, DetokenizeRequest, DetokenizeResponse, TokenizeRequest,
                       TokenizeResponse, VersionResponse)

_SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
_ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    s: {"model": ErrorResponse} for s in (400, 404, 408, 413, 429, 500, 503, 504)}
CLIENT_CLOSED = 499   # nginx's status for "client closed the request"; only metrics and logs ever see it


def build_app(config: Config, engine: EngineClient, lifespan: Lifespan[FastAPI] | None = None,
              asr: SpeechRecognizer | None = None, drain: Drain | None = None) -> FastAPI:
    """The app serving `engine`; `lifespan` only where the server delivers lifespan events (uvicorn); `asr` the
    speech-to-text stage for input_audio parts (None: audio is refused); `drain` the shutdown state (a new one by
    default, in `app.state.drain`)."""
    # strict_content_type=False: a body sent without Content-Type is read as JSON (curl -d users); other types 400
    app = FastAPI(title="AutoGLM-Phone-9B", summary="OpenAI-compatible chat completions", lifespan=lifespan,
                  strict_content_type=False)
    errors.install(app)
    app.add_exception_handler(Exception, _on_unexpected)
    chat = ChatService(config, engine, asr)
    model_name = config.served_model_name
    started = int(time.time())
    drain = drain or Drain()
    app.state.drain = drain

    def status() -> tuple[bool, bool, str]:
        alive, ready, message = engine.status()
        return (alive, False, "shutting down") if drain.draining else (alive, ready, message)

    def model_card() -> ModelCard:
        _, ready, _ = engine.status()
        return ModelCard(id=model_name, created=started, root=model_name,      # no filesystem path
                         max_model_len=engine.max_model_len if ready else None,
                         default_sampling_params=dict(engine.default_sampling) if ready else None)

    @app.post("/v1/chat/completions", response_model=ChatCompletionResponse, responses=_ERROR_RESPONSES)
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        result = await chat.create(body, partial(_until_disconnect, request))
        if result is None:
            return Response(status_code=CLIENT_CLOSED)
        if isinstance(result, ChatCompletionResponse):
            return JSONResponse(result.model_dump(mode="json"))
        return StreamingResponse(result, media_type="text/event-stream", headers=_SSE_HEADERS)

    # --- vLLM's other endpoints: legacy completions, tokenizer, version (function/api/completions.py)
    completions = CompletionService(chat)

    @app.post("/v1/completions", response_model=CompletionResponse, responses=_ERROR_RESPONSES)
    async def text_completions(body: CompletionRequest, request: Request) -> Response:
        result = await completions.create(body, partial(_until_disconnect, request))
        if result is None:
            return Response(status_code=CLIENT_CLOSED)
        if isinstance(result, CompletionResponse):
            return JSONResponse(result.model_dump(mode="json"))
        return StreamingResponse(result, media_type="text/event-stream", headers=_SSE_HEADERS)

    @app.post("/tokenize", response_model=TokenizeResponse, responses=_ERROR_RESPONSES)
    async def tokenize(body: TokenizeRequest) -> TokenizeResponse:
        return await completions.tokenize(body)

    @app.post("/detokenize", response_model=DetokenizeResponse, responses=_ERROR_RESPONSES)
    async def detokenize(body: DetokenizeRequest) -> DetokenizeResponse:
        return await completions.detokenize(body)

    @app.get("/version", response_model=VersionResponse)
    async def get_version() -> VersionResponse:
        return version()
    # --- end of vLLM's other endpoints

    events = EventService(config, chat)      # CloudEvents (a Broker's Trigger): docs/events.md
    for path in EVENT_ROUTES:
        app.add_api_route(path, events.endpoint, methods=["POST"], include_in_schema=False)

    @app.get("/v1/models", response_model=ModelList)
    async def list_models() -> ModelList:
        return ModelList(data=[model_card()])

    @app.get("/v1/models/{model:path}", response_model=ModelCard, responses=_ERROR_RESPONSES)
    async def get_model(model: str) -> ModelCard:
        if model != model_name:
            raise ModelNotFound(f"The model `{model[:100]}` does not exist; this server serves `{model_name}`.",
                                param="model")
        return model_card()

    @app.get("/health")
    async def health() -> JSONResponse:
        alive, ready, message = status()
        if ready:
            return JSONResponse({"status": "ok", "model": model_name})
        phase = "shutting down" if drain.draining else "loading"
        body = {"status": phase if alive else "failed", "model": model_name, "message": message}
        retry = errors.KINDS["shutting_down" if drain.draining else "not_ready"].retry_after
        return JSONResponse(body, status_code=503, headers={"Retry-After": str(retry)} if alive else None)

    @app.get("/health/liveness", response_class=PlainTextResponse)
    async def liveness() -> PlainTextResponse:
        alive, _, message = status()
        return PlainTextResponse(message, status_code=200 if alive else 500)

    @app.get("/health/readiness", response_class=PlainTextResponse)
    async def readiness() -> PlainTextResponse:
        _, ready, message = status()
        return PlainTextResponse(message, status_code=200 if ready else 500)

    @app.get("/metrics", response_class=PlainTextResponse)
    async def prometheus() -> Response:
        body, content_type = metrics.render()
        return Response(body, media_type=content_type)

    app.add_middleware(RequestGate, drain=drain, max_body=config.max_request_bytes,
                       body_timeout_s=config.request_timeout_s, max_depth=config.max_json_depth,
                       max_elements=config.max_json_elements)
    auth.install(app, config)     # before the body gate: a request without a valid key is refused unread
    app.add_middleware(HttpMetrics, routes=app.router.routes)     # outermost: counts the gate's refusals too
    return app


async def _until_disconnect(request: Request) -> None:
    """Returns once the client has gone (the body was already read, so the next message is the disconnect)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _on_unexpected(_: Request, exc: Exception) -> JSONResponse:
    """A bug: the client still gets the OpenAI error shape; Starlette then re-raises so the server logs it."""
    return errors.error_response("internal", "internal server error")


class HttpMetrics:
    """Counts, times and tracks in-flight requests by route template; unmatched paths and odd methods are "other"
    so that label values stay bounded."""

    def __init__(self, app: ASGIApp, routes: list[BaseRoute]):
        self.app = app
        self.routes = routes

    def _route(self, scope: Scope) -> str:
        for r in self.routes:
            if isinstance(r, Route) and r.matches(scope)[0] is Match.FULL:
                return r.path
        return "other"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        route = self._route(scope)
        method = scope["method"] if scope["method"] in _METHODS else "other"
        status = 500

        async def send_and_note(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        start = time.monotonic()
        with metrics.in_flight(route).track_inprogress():
            try:
                await self.app(scope, receive, send_and_note)
            finally:
                metrics.observe_http(route, method, status, time.monotonic() - start)


_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
