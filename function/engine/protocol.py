"""What the serving layer may know about the engine: request/param/output types, errors, and the client ABC.

No torch, no HTTP. The HTTP layer builds a `ChatInput` + `SamplingParams`, calls `EngineClient.generate`, and
gets an async stream of `CompletionChunk`s; errors are `EngineError`s whose `kind` maps to one HTTP status.
"""
from __future__ import annotations

import abc
from dataclasses import dataclass, field
from typing import Any, AsyncIterator


@dataclass(frozen=True)
class SamplingParams:
    """Per-request sampling; every row of a batch carries its own."""
    max_tokens: int | None = None          # None: up to the context limit
    temperature: float = 1.0               # 0: greedy
    top_p: float = 1.0
    top_k: int = 0                         # 0: off
    frequency_penalty: float = 0.0         # OpenAI semantics: subtract penalty * count(token) from the logit
    presence_penalty: float = 0.0          # subtract penalty once for every token already generated
    repetition_penalty: float = 1.0        # HF/vLLM multiplicative penalty (1: off)
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    skip_special_tokens: bool = False      # AutoGLM's <think>/<answer> tags are part of its text

    @property
    def greedy(self) -> bool:
        return self.temperature <= 1e-5 or self.top_k == 1


@dataclass
class ChatInput:
    """A conversation in transformers' chat format: content parts {"type": "text", "text"} and
    {"type": "image", "image": PIL.Image.Image}. `image_digests` (one per image, in order) identify image
    content for prefix reuse and response caching."""
    messages: list[dict[str, Any]]
    chat_template_kwargs: dict[str, Any] = field(default_factory=dict)
    image_digests: list[str] = field(default_factory=list)


@dataclass
class CompletionChunk:
    """One increment of a request's output. The last chunk has `finish_reason` set."""
    text: str
    token_ids: list[int]
    finish_reason: str | None = None       # "stop" | "length" | "abort" | "error"
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_prompt_tokens: int = 0
    stop_reason: str | int | None = None   # the stop string or token id that ended it (as vLLM reports)


class EngineError(Exception):
    """An error with a kind the HTTP layer maps to a status code (see api/errors)."""
    kind = "internal"

    def __init__(self, message: str, param: str | None = None, retry_after: float | None = None):
        super().__init__(message)
        self.message = message
        self.param = param
        self.retry_after = retry_after


class InvalidInput(EngineError):
    """The request cannot be served as given (too long, bad image, ...): 400."""
    kind = "invalid_request"


class Overloaded(EngineError):
    """The admission queue is full: 429, retry later."""
    kind = "overloaded"


class NotReady(EngineError):
    """Still loading or shutting down: 503."""
    kind = "not_ready"


class GenerationFailed(EngineError):
    """A step failed for this request (e.g. CUDA out of memory); retriable: 503."""
    kind = "unavailable"


class EngineDead(EngineError):
    """The engine stopped (a device fault that poisons the CUDA context, a crashed loop): liveness turns false and
    the container is restarted, so the request is retriable elsewhere or later: 503 with Retry-After."""
    kind = "engine_stopped"


class InternalError(EngineError):
    """A bug on our side while serving one request: 500."""
    kind = "internal"


class EngineClient(abc.ABC):
    """The async face of the engine that the serving layer uses."""

    max_model_len: int

    @abc.abstractmethod
    def generate(self, request_id: str, chat: ChatInput, params: SamplingParams) -> AsyncIterator[CompletionChunk]:
        """Stream the completion of `chat`. Raises EngineError before the first chunk if the request is refused;
        closing the iterator early aborts the request and frees its batch slot."""

    @abc.abstractmethod
    async def abort(self, request_id: str) -> None:
        """Stop a running request at the next step boundary."""

    @abc.abstractmethod
    def status(self) -> tuple[bool, bool, str]:
        """(alive, ready, message): message names the loading phase or the fatal error."""
