"""The FastAPI app: thin routes over `ChatService`, health and metrics, OpenAI-shaped errors.

`build_app(config, engine)` is all a server needs. Under func-python, `Function.handle` forwards requests here and
func-python answers `/health/liveness|readiness` itself from `app.state.readiness`; the app answers them from the
same `Readiness` (function/http_common.py: the speech model, then the engine, then the drain) so that uvicorn serving
gives the same answers, and `/health` too. The optional `lifespan` is for uvicorn only: func-python never forwards
lifespan events.
Every request first passes `auth.AuthGate` (API keys) and `gate.RequestGate` (shutdown drain, body limit, JSON
budget); `app.state.drain` is the drain that function/shutdown.py starts on SIGTERM. No torch, no Knative.

The POST routes take their body raw (`http_common.read_body`, the one reader with the size limit) and parse it
themselves (`BodyParser`): a body over `limits.INLINE_BYTES` is decoded (`json.loads`) and validated
(`model_validate`) in a worker thread, at most `PARSE_THREADS` at a time, so that a large body does not hold the
event loop while probes and other requests wait; a small one inline (a thread hop costs more than its parse). The
errors are FastAPI's own, raised the same way (`RequestValidationError` with locations under `"body"`), so clients
see exactly what they saw when FastAPI parsed the body. The request models stay in the OpenAPI schema (`openapi_extra`
plus their JSON schemas in `components`).
"""
from __future__ import annotations

import email.message
import json
import time
from functools import partial
from typing import TYPE_CHECKING, Any, AsyncIterator, Awaitable, Callable, TypeVar

import anyio
from fastapi import FastAPI, HTTPException, Request, Response
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.models import OpenAPI
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ValidationError
from starlette.types import Lifespan

from function.config import Config
from function.engine.protocol import EngineClient
from function.events import ROUTES as EVENT_ROUTES, EventService
from function.http_common import (CLIENT_CLOSED, SSE_HEADERS, HttpMetrics, Readiness, add_probe_routes, read_body,
                                  until_disconnected)

from . import auth, errors
from .gate import Drain, RequestGate
from .limits import INLINE_BYTES
from .protocol import ChatCompletionRequest, ChatCompletionResponse, ErrorResponse, ModelCard, ModelList
from .serving import ChatService
from .completions import CompletionService, version
from .protocol import (CompletionRequest, CompletionResponse, DetokenizeRequest, DetokenizeResponse, TokenizeRequest,
                       TokenizeResponse, VersionResponse)

if TYPE_CHECKING:
    from function.asr import SpeechRecognizer

__all__ = ["build_app", "BodyParser", "parse_body", "PARSE_THREADS", "INLINE_BYTES",     # INLINE_BYTES: limits'
           "CLIENT_CLOSED", "HttpMetrics"]     # these two: function.http_common's, as before

M = TypeVar("M", bound=BaseModel)

_ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    s: {"model": ErrorResponse} for s in (400, 404, 408, 413, 429, 500, 503, 504)}

PARSE_THREADS = 2
"""Worker threads parsing large bodies at once (per app); more wait for one. Parsing holds the GIL most of the
time, so more threads would not parse faster, only take more of the GIL from the event loop."""
_SCHEMAS = "#/components/schemas/"


class BodyParser:
    """A route's JSON body as `model`, parsed as FastAPI would (module docstring): bodies over INLINE_BYTES in a
    worker thread under a limiter of PARSE_THREADS."""

    def __init__(self, max_bytes: int, threads: int = PARSE_THREADS):
        self.max_bytes = max_bytes
        self.limiter = anyio.CapacityLimiter(threads)

    async def __call__(self, request: Request, model: type[M]) -> M | None:
        """The request, or None when the client left before its body arrived. RequestValidationError (400 in the
        OpenAI shape, by errors.install) when it is not valid; the 413 when it is over the limit, which only an
        app without the request gate in front can see."""
        body = await read_body(request.receive, self.max_bytes)
        if body.gone:
            return None
        if body.data is None:
            raise HTTPException(413, f"the request body has at least {body.size} bytes; the limit is "
                                f"{self.max_bytes} bytes (MAX_REQUEST_BYTES)")
        as_json = _is_json(request.headers.get("content-type"))
        if len(body.data) <= INLINE_BYTES:
            return parse_body(model, body.data, as_json)
        return await anyio.to_thread.run_sync(parse_body, model, body.data, as_json, limiter=self.limiter)


def parse_body(model: type[M], body: bytes, as_json: bool = True) -> M:
    """`body` as `model`, with FastAPI's errors for each failure (fastapi.routing.get_request_handler): empty ->
    `missing`; not JSON -> `json_invalid` at the error's position; not text -> its 400 "There was an error parsing
    the body"; not valid -> the model's errors under ("body", ...). A body of another content type is validated as
    bytes (so it fails as FastAPI's did: "must be a JSON object")."""
    if not body:
        raise RequestValidationError([{"type": "missing", "loc": ("body",), "msg": "Field required", "input": None}])
    data: Any = body
    if as_json:
        try:
            data = json.loads(body)
        except json.JSONDecodeError as e:
            raise RequestValidationError([{"type": "json_invalid", "loc": ("body", e.pos), "msg": "JSON decode error",
                                           "input": {}, "ctx": {"error": e.msg}}], body=e.doc) from e
        except Exception as e:          # invalid UTF-8, a number too long to convert, ...: as FastAPI
            raise HTTPException(400, "There was an error parsing the body") from e
    try:
        return model.model_validate(data, from_attributes=True)     # FastAPI's TypeAdapter call, from_attributes too
    except ValidationError as e:
        raise RequestValidationError([{**err, "loc": ("body", *err["loc"])} for err in e.errors(include_url=False)],
                                     body=data) from None


def _is_json(content_type: str | None) -> bool:
    """FastAPI's test with strict_content_type=False: no Content-Type, application/json or application/*+json."""
    if not content_type:
        return True
    message = email.message.Message()
    message["content-type"] = content_type
    subtype = message.get_content_subtype()
    return message.get_content_maintype() == "application" and (subtype == "json" or subtype.endswith("+json"))


def _json_body(model: type[BaseModel]) -> dict[str, Any]:
    """The route's OpenAPI requestBody, as FastAPI writes it for a `body: model` parameter."""
    return {"requestBody": {"content": {"application/json": {"schema": {"$ref": _SCHEMAS + model.__name__}}},
                            "required": True}}


def _document_bodies(app: FastAPI, models: tuple[type[BaseModel], ...]) -> None:
    """Add the request models' JSON schemas (and those they use) to the app's OpenAPI components, which FastAPI
    fills only from the parameters and response models it sees; written as FastAPI writes its own (the text of a
    description up to a form feed, sorted, then through its `OpenAPI` model, which drops `default: null`)."""
    generate = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = generate()
            components = schema.setdefault("components", {}).setdefault("schemas", {})
            for model in models:
                model_schema = model.model_json_schema(ref_template=_SCHEMAS + "{model}", mode="validation")
                for name, sub in [*model_schema.pop("$defs", {}).items(), (model.__name__, model_schema)]:
                    if "description" in sub:
                        sub["description"] = sub["description"].split("\f")[0]
                    components.setdefault(name, sub)
            schema["components"]["schemas"] = dict(sorted(components.items()))
            app.openapi_schema = jsonable_encoder(OpenAPI(**schema), by_alias=True, exclude_none=True)
        return app.openapi_schema
    app.openapi = openapi       # type: ignore[method-assign]


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

    parse = app.state.body_parser = BodyParser(config.max_request_bytes)    # raw bodies, parsed off the loop if large

    def post(path: str, request_model: type[BaseModel], response_model: type[BaseModel],
             serve: Callable[[Any, Request], Awaitable[Any]]) -> None:
        """A POST route with a `request_model` JSON body (read and parsed by `parse`): what `serve(body, request)`
        returns, or 499 when the client left while its body was being read."""
        async def endpoint(request: Request) -> Any:
            if (body := await parse(request, request_model)) is None:
                return Response(status_code=CLIENT_CLOSED)
            return await serve(body, request)

        app.add_api_route(path, endpoint, methods=["POST"], name=serve.__name__, response_model=response_model,
                          responses=_ERROR_RESPONSES, openapi_extra=_json_body(request_model))

    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        return _respond(await chat.create(body, partial(until_disconnected, request.receive)))

    post("/v1/chat/completions", ChatCompletionRequest, ChatCompletionResponse, chat_completions)

    # --- vLLM's other endpoints: legacy completions, tokenizer, version (function/api/completions.py)
    completions = CompletionService(chat)

    async def text_completions(body: CompletionRequest, request: Request) -> Response:
        return _respond(await completions.create(body, partial(until_disconnected, request.receive)))

    async def tokenize(body: TokenizeRequest, _: Request) -> TokenizeResponse:
        return await completions.tokenize(body)

    async def detokenize(body: DetokenizeRequest, _: Request) -> DetokenizeResponse:
        return await completions.detokenize(body)

    post("/v1/completions", CompletionRequest, CompletionResponse, text_completions)
    post("/tokenize", TokenizeRequest, TokenizeResponse, tokenize)
    post("/detokenize", DetokenizeRequest, DetokenizeResponse, detokenize)
    _document_bodies(app, (ChatCompletionRequest, CompletionRequest, TokenizeRequest, DetokenizeRequest))

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
        chat.check_model(model)
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
