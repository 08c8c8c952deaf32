"""Chat completions: request -> ChatInput + SamplingParams -> engine -> one JSON response or an SSE stream.

Sees only the `EngineClient` interface, so it runs against the real engine, a fake one in tests, or a wrapper. The
response cache is not here: it is HTTP middleware in front of this route (function/front.py, docs/cache.md), the
same code in the model pod and in the cache-front service.

Lifetime of an engine request: it is aborted whenever this layer stops reading it before its last chunk - client
disconnect (non-stream: a watcher on the ASGI receive channel; stream: the response closes the generator), a failed
send, the deadline (REQUEST_TIMEOUT_S from the start of `create`: images, audio, queueing and generation), or an
error here. Errors before the first chunk become HTTP errors (a deadline: 504); after it, vLLM's error event and
[DONE].
"""
from __future__ import annotations

import asyncio
import hashlib
import logging
import time
import uuid
from collections.abc import AsyncGenerator
from typing import AsyncIterator, Awaitable, Callable, TypeVar

import anyio

from function import metrics
from function.asr import SpeechRecognizer, transcribe_audio_parts
from function.audio import AudioLoader
from function.config import Config
from function.engine.protocol import (ChatInput, CompletionChunk, EngineClient, EngineDead, EngineError,
                                      GenerationFailed, InvalidInput, NotReady, SamplingParams)
from function.images import ImageLoader

from .errors import ModelNotFound, RequestTimeout, error_json
from .protocol import (AssistantMessage, AudioTranscript, ChatCompletionChunk, ChatCompletionRequest,
                       ChatCompletionResponse, Choice, Delta, ImagePart, PromptTokensDetails, StreamChoice, Usage)
from .reasoning import ReasoningParser, split_reasoning

log = logging.getLogger(__name__)

T = TypeVar("T")
Disconnected = Callable[[], Awaitable[None]]
"""Returns when the client has gone away."""

SSE_DONE = "data: [DONE]\n\n"


def system_fingerprint(config: Config) -> str:
    """Changes whenever the settings that shape outputs change (OpenAI: backend configuration)."""
    key = "|".join(map(str, (config.model_path or "tiny", config.quantization, config.quantize_vision,
                             config.dtype, config.attn_implementation, config.image_max_pixels)))
    return "fp_" + hashlib.sha256(key.encode()).hexdigest()[:10]


class ChatService:
    def __init__(self, config: Config, engine: EngineClient, asr: SpeechRecognizer | None = None):
        """`asr`: the speech-to-text stage for input_audio parts (None: audio is refused with a 400)."""
        self.engine = engine
        self.asr = asr
        self.audio = AudioLoader(config)
        self.return_transcript = config.return_transcript
        self.model_name = config.served_model_name
        self.default_max_tokens = config.default_max_tokens or None
        self.max_images = config.max_images_per_request
        self.images = ImageLoader(config)
        self.fingerprint = system_fingerprint(config)
        self.timeout_s = config.request_timeout_s

    async def create(self, request: ChatCompletionRequest,
                     disconnected: Disconnected) -> ChatCompletionResponse | AsyncIterator[str] | None:
        """The response, the SSE stream (strings to send), or None when the client left before an answer."""
        arrival = time.monotonic()
        deadline = asyncio.get_running_loop().time() + self.timeout_s
        if request.model not in (None, self.model_name):
            raise ModelNotFound(f"The model `{request.model[:100]}` does not exist; this server serves "
                                f"`{self.model_name}`.", param="model")
        self._check_ready()
        params = request.to_sampling_params(self.default_max_tokens)
        try:
            async with asyncio.timeout_at(deadline):
                request, transcripts = await transcribe_audio_parts(request, self.audio, self.asr)  # audio -> text
                chat = await self._chat_input(request)
        except TimeoutError:
            raise self._timed_out("a request still preparing its input") from None
        if not (request.return_transcript or (request.return_transcript is None and self.return_transcript)):
            transcripts = []
        gen = _Generation(self.engine, f"chatcmpl-{uuid.uuid4().hex}", chat, params, arrival)
        if not request.stream:
            try:
                async with asyncio.timeout_at(deadline):
                    return await _unless_disconnected(self._complete(gen, request, transcripts), disconnected)
            except TimeoutError:
                raise self._timed_out(gen.request_id) from None
            finally:
                await gen.close()                                          # aborts it unless it finished
        try:
            async with asyncio.timeout_at(deadline):
                first = await _unless_disconnected(gen.next(), disconnected)   # refusals become HTTP errors
        except BaseException as e:
            await gen.close()
            if isinstance(e, TimeoutError):
                raise self._timed_out(gen.request_id) from None
            raise
        if first is None:
            await gen.close()
            return None
        return self._stream(gen, first, request, transcripts, deadline)

    def _timed_out(self, what: str) -> RequestTimeout:
        log.warning("%s: stopped after REQUEST_TIMEOUT_S=%g s", what, self.timeout_s)
        return RequestTimeout(f"the request did not finish within {self.timeout_s:g} s (REQUEST_TIMEOUT_S) and was "
                              "stopped; ask for fewer tokens or retry later")

    def _check_ready(self) -> None:
        alive, ready, message = self.engine.status()
        if not alive:
            raise EngineDead(message)
        if not ready:
            raise NotReady(message)

    async def _chat_input(self, request: ChatCompletionRequest) -> ChatInput:
        """OpenAI messages -> transformers chat format with decoded images (and their digests)."""
        # all images together: count, bytes, headers (pixel caps), then decodes (function/images.py)
        loaded = iter(await self.images.load_many([
            (p.image_url.url, f"messages[{i}].content[{j}].image_url") for i, m in enumerate(request.messages)
            if isinstance(m.content, list) for j, p in enumerate(m.content) if isinstance(p, ImagePart)]))
        messages, digests = [], []
        for i, m in enumerate(request.messages):
            role = "system" if m.role == "developer" else m.role   # the chat template knows no developer role
            if m.role != "user" or not isinstance(m.content, list):
                messages.append({"role": role, "content": m.text()})
                continue
            parts = []
            for j, p in enumerate(m.content):
                if isinstance(p, ImagePart):
                    img = next(loaded)
                    parts.append({"type": "image", "image": img.image})
                    digests.append(img.digest)
                else:
                    parts.append({"type": "text", "text": p.text})
            messages.append({"role": role, "content": parts})
        return ChatInput(messages=messages, chat_template_kwargs=request.template_kwargs(), image_digests=digests)

    async def _complete(self, gen: _Generation, request: ChatCompletionRequest,
                        transcripts: list[AudioTranscript]) -> ChatCompletionResponse:
        pieces = []
        while True:
            chunk = await gen.next()
            pieces.append(chunk.text)
            if chunk.finish_reason:
                break
        finish = _finish_reason(chunk)
        text = "".join(pieces)
        reasoning, content = split_reasoning(text) if request.return_reasoning_enabled else (None, text)
        return ChatCompletionResponse(
            id=gen.request_id, created=gen.created, model=self.model_name, system_fingerprint=self.fingerprint,
            choices=[Choice(message=AssistantMessage(content=content, reasoning_content=reasoning),
                            finish_reason=finish, stop_reason=chunk.stop_reason)],
            usage=_usage(chunk), transcripts=transcripts or None)

    async def _stream(self, gen: _Generation, first: CompletionChunk, request: ChatCompletionRequest,
                      transcripts: list[AudioTranscript], deadline: float) -> AsyncIterator[str]:
        parser = ReasoningParser() if request.return_reasoning_enabled else None

        def event(choices: list[StreamChoice], usage: Usage | None = None,
                  transcripts: list[AudioTranscript] | None = None) -> str:
            chunk = ChatCompletionChunk(id=gen.request_id, created=gen.created, model=self.model_name,
                                        system_fingerprint=self.fingerprint, choices=choices, usage=usage,
                                        transcripts=transcripts)
            return f"data: {chunk.model_dump_json()}\n\n"

        try:
            yield event([StreamChoice(delta=Delta(role="assistant", content=""))], transcripts=transcripts or None)
            chunk = first
            while True:
                final = chunk.finish_reason is not None
                if parser is None:
                    delta = Delta(content=chunk.text or None)
                else:
                    d = parser.feed(chunk.text, final=final)
                    delta = Delta(reasoning_content=d.reasoning or None, content=d.content or None)
                if final:
                    yield event([StreamChoice(delta=delta, finish_reason=_finish_reason(chunk),
                                              stop_reason=chunk.stop_reason)])
                    if request.include_usage:
                        yield event([], usage=_usage(chunk))
                    break
                if delta.content or delta.reasoning_content:
                    yield event([StreamChoice(delta=delta)])
                try:
                    async with asyncio.timeout_at(deadline):
                        chunk = await gen.next()
                except TimeoutError:
                    raise self._timed_out(gen.request_id) from None
        except EngineError as e:
            if not isinstance(e, RequestTimeout):       # logged where it was raised
                log.warning("%s failed while streaming: %s", gen.request_id, e.message)
            yield f"data: {error_json(e)}\n\n"
        except Exception:
            log.exception("%s failed while streaming", gen.request_id)
            yield f"data: {error_json(EngineDead('internal error while streaming'))}\n\n"
        finally:
            await gen.close()
        yield SSE_DONE


class _Generation:
    """One engine request: its chunks, their metrics, and an abort when it is closed before finishing."""

    def __init__(self, engine: EngineClient, request_id: str, chat: ChatInput, params: SamplingParams,
                 arrival: float):
        self.engine = engine
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
        with anyio.CancelScope(shield=True):    # runs while the request is being cancelled, too
            if isinstance(self._chunks, AsyncGenerator):
                await self._chunks.aclose()     # EngineClient contract: closing early aborts
            elif not self.finished:
                self.finished = True
                await self.engine.abort(self.request_id)


def _finish_reason(chunk: CompletionChunk) -> str:
    if chunk.finish_reason in ("stop", "length"):
        return chunk.finish_reason
    raise GenerationFailed(f"generation ended with {chunk.finish_reason!r}; retry the request")


def _usage(chunk: CompletionChunk) -> Usage:
    return Usage(prompt_tokens=chunk.prompt_tokens, completion_tokens=chunk.completion_tokens,
                 total_tokens=chunk.prompt_tokens + chunk.completion_tokens,
                 prompt_tokens_details=PromptTokensDetails(cached_tokens=chunk.cached_prompt_tokens))


async def _unless_disconnected(work: Awaitable[T], disconnected: Disconnected) -> T | None:
    """`work`'s result, or None (and `work` cancelled) if the client disconnects first."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(disconnected())
    try:
        await asyncio.wait((task, watcher), return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
    if task.cancelled():
        return None
    return task.result()
