"""What chat and text completions share below the request models: one engine request (`Generation`, with its
metrics and abort), a choice's whole output, the admission count, usage and finish reasons, and the end of every SSE
stream (`sse_stream`: the error event and [DONE], the engine requests closed however it ends).

Error rule, the same before and after the first chunk: a `ServiceError` is answered as its kind says (an engine that
stopped, `EngineDead`: 503 with Retry-After, or `engine_stopped` in the error event); anything else is a bug here,
logged with its traceback and answered as `internal` (500) in OpenAI's error shape, its text kept from the client.
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import time
from collections.abc import AsyncGenerator
from typing import AsyncIterator, Iterator

import anyio

from function import metrics
from function.engine.protocol import ChatInput, CompletionChunk, EngineClient, SamplingParams, TokenLogprob
from function.errors import GenerationFailed, InternalError, Overloaded, RequestTimeout, ServiceError
from function.http_common import SSE_DONE, sse_event

from .errors import error_json
from .protocol import PromptTokensDetails, Usage

log = logging.getLogger(__name__)


class Admission:
    """This process's view of the engine's queue, for the 429 decision before images are decoded. Used on the
    event loop only (no lock)."""

    def __init__(self, queue_limit: int, slots: int):
        self.queue_limit = queue_limit
        self.slots = slots
        self.pending = 0        # decoding images, or started and waiting for the engine's first chunk
        self.running = 0        # engine requests past their first chunk, not yet closed

    def full(self) -> bool:
        return self.pending >= self.queue_limit + max(0, self.slots - self.running)

    @contextlib.contextmanager
    def decoding(self) -> Iterator[None]:
        """Around a request's image decodes: Overloaded (429) when the server is full, else counted as pending."""
        if self.full():
            log.info("refused a request with images before decoding them: %d waiting, %d running", self.pending,
                     self.running)
            raise Overloaded(f"the server is at capacity ({self.pending} requests waiting); retry later",
                             retry_after=1.0)
        with self.waiting():
            yield

    @contextlib.contextmanager
    def waiting(self) -> Iterator[None]:
        self.pending += 1
        try:
            yield
        finally:
            self.pending -= 1



def choice_params(params: SamplingParams, n: int | None) -> list[SamplingParams]:
    """One SamplingParams per choice: with a seed, choice i samples with seed + i (as vLLM's parallel sampling)."""
    n = n or 1
    if n == 1 or params.seed is None:
        return [params] * n
    return [dataclasses.replace(params, seed=(params.seed + i + 2**63) % 2**64 - 2**63) for i in range(n)]


class Output:
    """One choice's whole output."""

    def __init__(self) -> None:
        self.pieces: list[str] = []
        self.logprobs: list[TokenLogprob] = []
        self.last: CompletionChunk | None = None

    def add(self, chunk: CompletionChunk) -> None:
        self.pieces.append(chunk.text)
        self.logprobs.extend(chunk.logprobs or ())
        self.last = chunk

    @property
    def text(self) -> str:
        return "".join(self.pieces)


async def close_all(gens: list[Generation]) -> None:
    for g in gens:
        await g.close()


def usage_of(lasts: list[CompletionChunk | None], n: int) -> Usage:
    """Usage of a request's choices: the prompt counted once per `n` choices that share it, completions summed."""
    done = [c for c in lasts if c is not None]
    prompt = sum(c.prompt_tokens for c in done[::n]) if done else 0
    cached = sum(c.cached_prompt_tokens for c in done[::n]) if done else 0
    completion = sum(c.completion_tokens for c in done)
    return Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion,
                 prompt_tokens_details=PromptTokensDetails(cached_tokens=cached))


class Generation:
    """One engine request: its chunks, their metrics, and an abort when it is closed before finishing."""

    def __init__(self, engine: EngineClient, request_id: str, chat: ChatInput, params: SamplingParams,
                 arrival: float, admission: Admission | None = None):
        self.engine = engine
        self._admission = admission
        self._running = False       # counted in admission.running (past its first chunk, not closed)
        self.request_id = request_id
        self.created = int(time.time())
        self._chunks = engine.generate(request_id, chat, params)
        self._arrival = arrival
        self._last_token_at: float | None = None
        self.finished = False

    async def next(self) -> CompletionChunk:
        try:
            chunk = await anext(self._chunks)
        except StopAsyncIteration:
            self.finished = True
            raise GenerationFailed("the engine ended the request without a finish reason") from None
        now = time.monotonic()
        if not self._running and self._admission is not None:
            self._running = True
            self._admission.running += 1
        if chunk.token_ids:
            if self._last_token_at is None:
                metrics.observe_ttft(now - self._arrival)
            else:
                metrics.observe_inter_token(now - self._last_token_at, len(chunk.token_ids))
            self._last_token_at = now
        if chunk.finish_reason:
            self.finished = True
            metrics.observe_usage(chunk.prompt_tokens, chunk.completion_tokens)
        return chunk

    async def close(self) -> None:
        """Release the engine stream, which aborts the request unless it finished. Safe to call more than once."""
        if self._running and self._admission is not None:
            self._running = False
            self._admission.running -= 1
        with anyio.CancelScope(shield=True):    # runs while the request is being cancelled, too
            if isinstance(self._chunks, AsyncGenerator):
                await self._chunks.aclose()     # EngineClient contract: closing early aborts
            elif not self.finished:
                self.finished = True
                await self.engine.abort(self.request_id)


def finish_reason_of(chunk: CompletionChunk) -> str:
    if chunk.finish_reason in ("stop", "length"):
        return chunk.finish_reason
    raise GenerationFailed(f"generation ended with {chunk.finish_reason!r}; retry the request")


async def sse_stream(events: AsyncIterator[str], gens: list[Generation]) -> AsyncIterator[str]:
    """`events` (a response's SSE strings), then [DONE]. An error after the first event becomes vLLM's error event
    before [DONE], by the rule in the module docstring. The engine requests in `gens` are closed however the stream
    ends: finished, failed, or closed early by the server when the client disconnects."""
    request_id = gens[0].request_id
    try:
        async with contextlib.aclosing(events):
            async for event in events:
                yield event
    except ServiceError as e:
        if not isinstance(e, RequestTimeout):       # logged where it was raised
            log.warning("%s failed while streaming: %s", request_id, e.message)
        yield sse_event(error_json(e))
    except Exception:
        log.exception("%s failed while streaming", request_id)
        yield sse_event(error_json(InternalError("internal error while streaming")))
    finally:
        await close_all(gens)
    yield SSE_DONE
