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

from function.errors import ServiceError

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
    "request_timeout": Kind(408, "invalid_request_error"),         # the body did not arrive in time
    "request_too_large": Kind(413, "invalid_request_error"),
    "overloaded": Kind(429, "rate_limit_error", retry_after=1),
    "not_ready": Kind(503, "service_unavailable_error", retry_after=5),
    "shutting_down": Kind(503, "service_unavailable_error", retry_after=1),   # another replica can take it now
    "unavailable": Kind(503, "service_unavailable_error"),
    "engine_stopped": Kind(503, "service_unavailable_error", retry_after=5),   # the container is being restarted
    "timeout": Kind(504, "timeout_error"),                         # REQUEST_TIMEOUT_S passed; the work was stopped
    "internal": Kind(500, "server_error"),
}


def _body(kind: str, message: str, param: str | None) -> ErrorResponse:
    return ErrorResponse(error=ErrorInfo(message=message, type=KINDS[kind].type, param=param, code=kind))


def error_response(kind: str, message: str, param: str | None = None,
                   retry_after: float | None = None) -> JSONResponse:
    """The JSON response for an error of `kind` (a key of KINDS)."""
    k = KINDS[kind]
    wait = retry_after if retry_after is not None else k.retry_after
    headers = {"Retry-After": str(max(1, round(wait)))} if wait is not None else None
    return JSONResponse(_body(kind, message, param).model_dump(mode="json"), status_code=k.status, headers=headers)


def service_error_response(e: ServiceError) -> JSONResponse:
    return error_response(e.kind, e.message, e.param, e.retry_after)


def error_json(e: ServiceError) -> str:
    """The error as the JSON object sent in a failing SSE stream (the body of `service_error_response`)."""
    return _body(e.kind, e.message, e.param).model_dump_json()


# pydantic puts the union member or function it tried into a location: type names, tags (capitalised, see
# protocol.ContentPart) and descriptions with brackets. Field names are lowercase identifiers.
_NOT_A_FIELD = re.compile(r"^(str|int|float|bool|list|dict|none|[A-Z].*|.*[\[\]<>,\- ].*)$")


def param_of(loc: Iterable[Any]) -> str | None:
    """`("body", "messages", 0, "content", "list[...]", 1)` -> `"messages[0].content[1]"`."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part != "body" and not _NOT_A_FIELD.match(str(part)):
            out += f".{part}" if out else str(part)
    return out or None


def validation_message(errors: list[dict[str, Any]]) -> tuple[str, str | None]:
    """A one-line message and a param. A value that fits no member of a union gets one error per member; the
    deepest one says the most (a list of parts with a bad part beats "not a string"), so shallower errors whose
    location is a prefix of another's are dropped."""
    if not errors:
        return "Invalid request", None
    if errors[0].get("type") == "json_invalid":
        detail = (errors[0].get("ctx") or {}).get("error", errors[0].get("msg", ""))
        return f"Invalid JSON in the request body: {detail}", None
    if tuple(errors[0].get("loc", ())) == ("body",) and isinstance(errors[0].get("input"), (bytes, bytearray)):
        return "The request body must be a JSON object (Content-Type: application/json)", None
    found = [(param_of(e.get("loc", ())), str(e.get("msg", "invalid value")).removeprefix("Value error, "))
             for e in errors]
    by_param: dict[str | None, list[str]] = {}
    for p, m in found:
        if not any(q and q != p and (p is None or q.startswith((p + ".", p + "["))) for q, _ in found):
            by_param.setdefault(p, []).append(m)
    message = "; ".join(f"{p}: {' or '.join(ms)}" if p else " or ".join(ms) for p, ms in by_param.items())
    return message, next(iter(by_param))


async def _on_request_validation(_: Request, exc: RequestValidationError) -> JSONResponse:
    message, param = validation_message(list(exc.errors()))
    return error_response("invalid_request", message, param)


async def _on_pydantic_validation(_: Request, exc: ValidationError) -> JSONResponse:
    message, param = validation_message(exc.errors(include_url=False))
    return error_response("invalid_request", message, param)


async def _on_service_error(_: Request, exc: ServiceError) -> JSONResponse:
    if exc.kind == "internal":
        log.error("internal error: %s", exc.message)
    return service_error_response(exc)


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
    app.add_exception_handler(ServiceError, _on_service_error)
    app.add_exception_handler(HTTPException, _on_http_exception)
