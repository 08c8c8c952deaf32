"""One table from error kind to HTTP status, and the handlers that turn every failure into OpenAI's error shape.

Every error a client can see is `{"error": {"message", "type", "param", "code"}}` (`code` is the kind below, e.g.
`model_not_found`, as OpenAI's own API does). Request validation failures of any sort, malformed JSON included, are
400 as vLLM answers them, never FastAPI's default 422.
"""
from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from typing import Any, Iterable

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException

from function.engine.protocol import EngineError

from .protocol import ErrorInfo, ErrorResponse

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Kind:
    status: int
    type: str
    retry_after: int | None = None   # seconds; sent as Retry-After when the error does not name its own


KINDS: dict[str, Kind] = {
    "invalid_request": Kind(400, "invalid_request_error"),
    "model_not_found": Kind(404, "invalid_request_error"),
    "not_found": Kind(404, "invalid_request_error"),
    "method_not_allowed": Kind(405, "invalid_request_error"),
    "overloaded": Kind(429, "rate_limit_error", retry_after=1),
    "not_ready": Kind(503, "service_unavailable_error", retry_after=5),
    "unavailable": Kind(503, "service_unavailable_error"),
    "internal": Kind(500, "server_error"),
}


class ModelNotFound(EngineError):
    """The request names a model this server does not serve: 404."""
    kind = "model_not_found"


def error_response(kind: str, message: str, param: str | None = None,
                   retry_after: float | None = None) -> JSONResponse:
    """The JSON response for an error of `kind` (a key of KINDS)."""
    k = KINDS[kind]
    body = ErrorResponse(error=ErrorInfo(message=message, type=k.type, param=param, code=kind))
    headers = {}
    wait = retry_after if retry_after is not None else k.retry_after
    if wait is not None:
        headers["Retry-After"] = str(max(1, round(wait)))
    return JSONResponse(body.model_dump(mode="json"), status_code=k.status, headers=headers)


def engine_error_response(e: EngineError) -> JSONResponse:
    return error_response(e.kind, e.message, e.param, e.retry_after)


def error_json(e: EngineError) -> str:
    """The error as the JSON object sent in a failing SSE stream (the body of `engine_error_response`)."""
    return ErrorResponse(error=ErrorInfo(message=e.message, type=KINDS[e.kind].type, param=e.param,
                                         code=e.kind)).model_dump_json()


# pydantic adds these to a location to name the union member or function it tried; they are not field names.
_TYPE_TAG = re.compile(r"^(str|int|float|bool|list|dict|none|function-.*|.*[\[\]<>,\- ].*)$")


def param_of(loc: Iterable[Any]) -> str | None:
    """`("body", "messages", 0, "content", "list[...]", 1)` -> `"messages[0].content[1]"`."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part != "body" and not _TYPE_TAG.match(str(part)):
            out += f".{part}" if out else str(part)
    return out or None


def _validation_message(errors: list[dict[str, Any]]) -> tuple[str, str | None]:
    """A one-line message and the param of the first error; JSON syntax errors get their own wording."""
    if not errors:
        return "Invalid request", None
    first = errors[0]
    if first.get("type") == "json_invalid":
        detail = (first.get("ctx") or {}).get("error", first.get("msg", ""))
        return f"Invalid JSON in the request body: {detail}", None
    msgs = []
    for e in errors:
        p = param_of(e.get("loc", ()))
        msg = str(e.get("msg", "invalid value")).removeprefix("Value error, ")
        msgs.append(f"{p}: {msg}" if p else msg)
    return "; ".join(msgs), param_of(first.get("loc", ()))


async def _on_request_validation(_: Request, exc: RequestValidationError) -> JSONResponse:
    message, param = _validation_message(list(exc.errors()))
    return error_response("invalid_request", message, param)


async def _on_pydantic_validation(_: Request, exc: ValidationError) -> JSONResponse:
    message, param = _validation_message(exc.errors(include_url=False))
    return error_response("invalid_request", message, param)


async def _on_engine_error(_: Request, exc: EngineError) -> JSONResponse:
    if exc.kind == "internal":
        log.error("internal error: %s", exc.message)
    return engine_error_response(exc)


async def _on_http_exception(request: Request, exc: HTTPException) -> JSONResponse:
    if exc.status_code == 404:
        return error_response("not_found", f"Invalid URL ({request.method} {request.url.path})")
    if exc.status_code == 405:
        return error_response("method_not_allowed", f"Method {request.method} is not allowed for {request.url.path}")
    kind = next((k for k, v in KINDS.items() if v.status == exc.status_code), "invalid_request")
    return error_response(kind, str(exc.detail))


def install(app: FastAPI) -> None:
    """Register the handlers on `app`."""
    app.add_exception_handler(RequestValidationError, _on_request_validation)
    app.add_exception_handler(ValidationError, _on_pydantic_validation)
    app.add_exception_handler(EngineError, _on_engine_error)
    app.add_exception_handler(HTTPException, _on_http_exception)
