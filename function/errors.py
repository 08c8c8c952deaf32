"""The errors a client can see, for every layer: the engine, the speech model, image and audio loading, the API.

Each has a `kind` that function/api/errors.py maps to one HTTP status and OpenAI's error shape, a `param` naming
the offending request field, and an optional `retry_after` (seconds, sent as Retry-After). Nothing here imports
HTTP, torch or another package module, so any layer can raise them. function.engine.protocol re-exports the
engine's names (`EngineError` is `ServiceError`). `unready` is the one rule from a stage's status to its 503.
"""
from __future__ import annotations


class ServiceError(Exception):
    """An error with a kind the HTTP layer maps to a status code (see api/errors)."""
    kind = "internal"

    def __init__(self, message: str, param: str | None = None, retry_after: float | None = None):
        super().__init__(message)
        self.message = message
        self.param = param
        self.retry_after = retry_after


class InvalidInput(ServiceError):
    """The request cannot be served as given (too long, bad image, ...): 400."""
    kind = "invalid_request"


class ModelNotFound(ServiceError):
    """The request names a model this server does not serve: 404."""
    kind = "model_not_found"


class Overloaded(ServiceError):
    """The admission queue is full: 429, retry later."""
    kind = "overloaded"


class NotReady(ServiceError):
    """Still loading or shutting down: 503."""
    kind = "not_ready"


class GenerationFailed(ServiceError):
    """A step failed for this request (e.g. CUDA out of memory); retriable: 503."""
    kind = "unavailable"


class EngineDead(ServiceError):
    """The engine stopped (a device fault that poisons the CUDA context, a crashed loop): liveness turns false and
    the container is restarted, so the request is retriable elsewhere or later: 503 with Retry-After."""
    kind = "engine_stopped"


class RequestTimeout(ServiceError):
    """The request ran past its deadline (REQUEST_TIMEOUT_S) and was aborted: 504, or an error event mid-stream."""
    kind = "timeout"


class InternalError(ServiceError):
    """A bug on our side while serving one request: 500."""
    kind = "internal"


def unready(what: str, status: tuple[bool, bool, str]) -> ServiceError | None:
    """The refusal while a stage (`what`: "the model", "the speech model") is not ready, from its (alive, ready,
    message) status: EngineDead (503) once it is not alive, NotReady (503, retry in 5 s) while it loads or stops;
    None when it is alive and ready."""
    alive, ready, message = status
    if not alive:              # first: a stage whose thread died may still say ready
        return EngineDead(f"{what} is not running ({message})")
    if not ready:
        return NotReady(f"{what} is not ready ({message})", retry_after=5.0)
    return None
