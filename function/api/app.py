"""The FastAPI app: thin routes over `ChatService`, health and metrics, OpenAI-shaped errors.

`build_app(config, engine)` is all a server needs. Under func-python, `Function.handle` forwards requests here and
func-python answers `/health/liveness|readiness` itself from `app.state.readiness`; the app answers them from the
same `Readiness` (function/http_common.py: the speech model, then the engine, then the drain) so that uvicorn serving
gives the same answers, and `/health` too. The optional `lifespan` is for uvicorn only: func-python never forwards
lifespan events.
Every request first passes `auth.AuthGate` (API keys) and `gate.RequestGate` (shutdown drain, body limit, JSON
budget); `app.state.drain` is the drain that function/shutdown.py starts on SIGTERM. No torch, no Knative.
"""
from __future__ import annotations

import time
from functools import partial
from typing import TYPE_CHECKING, Any, AsyncIterator

from fastapi import FastAPI, Request, Response
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel
from starlette.types import Lifespan

from function.config import Config
from function.engine.protocol import EngineClient
from function.events import ROUTES as EVENT_ROUTES, EventService
from function.http_common import (CLIENT_CLOSED, SSE_HEADERS, HttpMetrics, Readiness, add_probe_routes,
                                  until_disconnected)

from . import auth, errors
from .errors import ModelNotFound
from .gate import Drain, RequestGate
from .protocol import ChatCompletionRequest, ChatCompletionResponse, ErrorResponse, ModelCard, ModelList
from .serving import ChatService
from .completions import CompletionService, version
from .protocol import (CompletionRequest, CompletionResponse, DetokenizeRequest, DetokenizeResponse, TokenizeRequest,
                       TokenizeResponse, VersionResponse)

if TYPE_CHECKING:
    from function.asr import SpeechRecognizer

__all__ = ["build_app", "CLIENT_CLOSED", "HttpMetrics"]     # the last two: function.http_common's, as before

_ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    s: {"model": ErrorResponse} for s in (400, 404, 408, 413, 429, 500, 503, 504)}


def build_app(config: Config, engine: EngineClient, lifespan: Lifespan[FastAPI] | None = None,
              asr: SpeechRecognizer | None = None, drain: Drain | None = None) -> FastAPI:
    """The app serving `engine`; `lifespan` only where the server delivers lifespan events (uvicorn); `asr` the
    speech-to-text stage for input_audio parts (None: audio is refused); `drain` the shutdown state (a new one by
    default, in `app.state.drain`). The engine and `asr` also follow `http_common.Lifecycle` (their `status()`
    feeds `app.state.readiness`); nothing of theirs is called here before a request or a probe comes."""
    # strict_content_type=False: a body sent without Content-Type is read as JSON (curl -d users); other types 400
    app = FastAPI(title="AutoGLM-Phone-9B", summary="OpenAI-compatible chat completions", lifespan=lifespan,
                  strict_content_type=False)
    errors.install(app)
    app.add_exception_handler(Exception, _on_unexpected)
    chat = ChatService(config, engine, asr)
    model_name = config.served_model_name
    started = int(time.time())
    drain = drain or Drain()
    readiness = Readiness([asr, engine] if asr is not None else [engine], drain)     # load order
    app.state.drain, app.state.readiness = drain, readiness

    def model_card() -> ModelCard:
        _, ready, _ = engine.status()
        return ModelCard(id=model_name, created=started, root=model_name,      # no filesystem path
                         max_model_len=engine.max_model_len if ready else None,
                         default_sampling_params=dict(engine.default_sampling) if ready else None)

    @app.post("/v1/chat/completions", response_model=ChatCompletionResponse, responses=_ERROR_RESPONSES)
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        return _respond(await chat.create(body, partial(until_disconnected, request.receive)))

    # --- vLLM's other endpoints: legacy completions, tokenizer, version (function/api/completions.py)
    completions = CompletionService(chat)

    @app.post("/v1/completions", response_model=CompletionResponse, responses=_ERROR_RESPONSES)
    async def text_completions(body: CompletionRequest, request: Request) -> Response:
        return _respond(await completions.create(body, partial(until_disconnected, request.receive)))

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

    add_probe_routes(app, readiness, model_name)     # /health, /health/liveness|readiness, /metrics

    app.add_middleware(RequestGate, drain=drain, max_body=config.max_request_bytes,
                       body_timeout_s=config.request_timeout_s, max_depth=config.max_json_depth,
                       max_elements=config.max_json_elements)
    auth.install(app, config)     # before the body gate: a request without a valid key is refused unread
    app.add_middleware(HttpMetrics, routes=app.router.routes)     # outermost: counts the gate's refusals too
    return app


def _respond(result: BaseModel | AsyncIterator[str] | None) -> Response:
    """A service's answer as the route's response: JSON, SSE, or the client-closed status when it left."""
    if result is None:
        return Response(status_code=CLIENT_CLOSED)
    if isinstance(result, BaseModel):
        return JSONResponse(result.model_dump(mode="json"))
    return StreamingResponse(result, media_type="text/event-stream", headers=SSE_HEADERS)


async def _on_unexpected(_: Request, exc: Exception) -> JSONResponse:
    """A bug: the client still gets the OpenAI error shape; Starlette then re-raises so the server logs it."""
    return errors.error_response("internal", "internal server error")
