"""Chat completions: request -> ChatInput + SamplingParams -> engine -> one JSON response or an SSE stream.

Sees only the `EngineClient` interface, so it runs against the real engine, a fake one in tests, or a wrapper. The
response cache is not here: it is HTTP middleware in front of this route (function/front/, docs/cache.md), the
same code in the model pod and in the cache-front service. When it will store the answer, it puts a
`function.cache.Recorder` in `function.cache.recording`, and `create` hands it the response or the stream's chunks
and usage as they are produced, so the cache stores these objects and never parses the bytes sent.

Lifetime of an engine request: it is aborted whenever this layer stops reading it before its last chunk - client
disconnect (non-stream: a watcher on the ASGI receive channel; stream: the response closes the generator), a failed
send, the deadline (REQUEST_TIMEOUT_S from the start of `create`: images, audio, queueing and generation), or an
error here. Errors before the first chunk become HTTP errors (a deadline: 504); after it, vLLM's error event and
[DONE].

Admission before decoding (`Admission`, in generation.py): the engine makes its 429 decision (MAX_QUEUE_SIZE) when a
request reaches it, which is after the request's images are decoded. So this layer keeps its own count of the same
thing - requests decoding images or started and waiting for their first chunk (`pending`), and engine requests past
their first chunk (`running`) - and refuses a request with images by the engine's rule (pending >= queue limit + free
slots) after its image headers are checked and before any image is decoded (function/images.py enters it around the
decodes, for the response cache's loader too). It never refuses what the engine would take: the engine also counts prefilling
requests as occupying slots, this count does not.
"""
from __future__ import annotations

import asyncio
import hashlib
import logging
import time
import uuid
from typing import TYPE_CHECKING, AsyncIterator

from function.audio import AudioLoader
from function.cache import Recorder, recording
from function.config import Config
from function.engine.protocol import ChatInput, CompletionChunk, EngineClient, SamplingParams, TokenLogprob
from function.errors import InvalidInput, ModelNotFound, RequestTimeout, unready
from function.http_common import Disconnected, sse_event, unless_disconnected
from function.images import ImageLoader, set_admission

from .audio_parts import transcribe_audio_parts
from .generation import (Admission, Generation, Output, choice_params, close_all, finish_reason_of, sse_stream,
                         usage_of)
from .protocol import (AssistantMessage, AudioTranscript, ChatCompletionChunk, ChatCompletionRequest,
                       ChatCompletionResponse, ChatMessage, Choice, ChoiceLogprobs, Delta, ImagePart, SamplingRequest,
                       StreamChoice, TextPart, TokenLogprobInfo, TopLogprob, Usage)
from .reasoning import ReasoningParser, split_reasoning

if TYPE_CHECKING:
    from function.asr import SpeechRecognizer

log = logging.getLogger(__name__)

def system_fingerprint(config: Config) -> str:
    """Changes whenever the settings that shape outputs change (OpenAI: backend configuration)."""
    key = "|".join(map(str, (config.model_path or "tiny", config.quantization, config.quantize_vision,
                             config.dtype, config.attn_implementation, config.image_max_pixels)))
    if config.generation_config != "auto":     # other sampling defaults: other outputs
        key += f"|generation_config={config.generation_config}"
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
        self.admission = Admission(config.queue_limit, config.max_num_seqs)
        set_admission(config, self.admission.decoding)     # this loader's and the response cache's (same config)
        self.fingerprint = system_fingerprint(config)
        self.timeout_s = config.request_timeout_s

    # --- shared by chat and text completions
    def check_model(self, model: str | None) -> None:
        if model not in (None, self.model_name):
            raise ModelNotFound(f"The model `{model[:100]}` does not exist; this server serves `{self.model_name}`.",
                                param="model")

    def sampling_params(self, request: SamplingRequest) -> SamplingParams:
        """The request's params over the checkpoint's defaults (EngineClient.default_sampling, {} with
        GENERATION_CONFIG=vllm), with token ids checked against the vocabulary."""
        vocab = self.engine.vocab_size
        if vocab:
            for name, ids in request.token_ids_named().items():
                bad = [i for i in ids if i >= vocab]
                if bad:
                    raise InvalidInput(f"token ids {bad[:5]} in {name} are outside the vocabulary (0..{vocab - 1})",
                                       param=name)
        return request.to_sampling_params(self.default_max_tokens, self.engine.default_sampling)

    async def start(self, request_id: str, inputs: list[tuple[ChatInput, SamplingParams]], arrival: float,
                    deadline: float, disconnected: Disconnected) -> tuple[list[Generation], list[CompletionChunk]] | None:
        """Start every choice's engine request and wait for each one's first chunk (so refusals become HTTP
        errors). The first choice goes alone: the others then reuse its prefilled prompt (prefix reuse). None
        when the client left first; on an error every started request is closed."""
        gens: list[Generation] = []

        async def begin() -> list[CompletionChunk]:
            rid = lambda i: request_id if i == 0 else f"{request_id}-{i}"   # noqa: E731
            with self.admission.waiting():
                gens.append(Generation(self.engine, rid(0), *inputs[0], arrival, self.admission))
                first = [await gens[0].next()]
                gens.extend(Generation(self.engine, rid(i), chat, params, arrival, self.admission)
                            for i, (chat, params) in enumerate(inputs[1:], 1))
                return first + list(await asyncio.gather(*(g.next() for g in gens[1:])))

        try:
            async with asyncio.timeout_at(deadline):
                firsts = await unless_disconnected(begin(), disconnected)
        except BaseException as e:
            await close_all(gens)
            if isinstance(e, TimeoutError):
                raise self._timed_out(request_id) from None
            raise
        if firsts is None:
            await close_all(gens)
            return None
        return gens, firsts

    async def collect(self, gens: list[Generation], firsts: list[CompletionChunk], deadline: float,
                      disconnected: Disconnected) -> list[Output] | None:
        """Every choice to its end (non-streaming); the engine requests are closed after."""
        async def one(gen: Generation, chunk: CompletionChunk) -> Output:
            out = Output()
            while True:
                out.add(chunk)
                if chunk.finish_reason:
                    return out
                chunk = await gen.next()

        try:
            async with asyncio.timeout_at(deadline):
                return await unless_disconnected(
                    asyncio.gather(*(one(g, f) for g, f in zip(gens, firsts))), disconnected)
        except TimeoutError:
            raise self._timed_out(gens[0].request_id) from None
        finally:
            await close_all(gens)

    async def merged(self, gens: list[Generation], firsts: list[CompletionChunk],
                     deadline: float) -> AsyncIterator[tuple[int, CompletionChunk]]:
        """(choice index, chunk) of every choice as they come; raises the first error."""
        if len(gens) == 1:
            chunk = firsts[0]
            while True:
                yield 0, chunk
                if chunk.finish_reason:
                    return
                try:
                    async with asyncio.timeout_at(deadline):
                        chunk = await gens[0].next()
                except TimeoutError:
                    raise self._timed_out(gens[0].request_id) from None
        queue: asyncio.Queue = asyncio.Queue()

        async def pump(i: int, gen: Generation, chunk: CompletionChunk) -> None:
            try:
                while True:
                    await queue.put((i, chunk, None))
                    if chunk.finish_reason:
                        return
                    chunk = await gen.next()
            except Exception as e:  # noqa: BLE001 - handed to the stream
                await queue.put((i, None, e))

        tasks = [asyncio.ensure_future(pump(i, g, f)) for i, (g, f) in enumerate(zip(gens, firsts))]
        try:
            left = len(gens)
            while left:
                try:
                    async with asyncio.timeout_at(deadline):
                        i, chunk, error = await queue.get()
                except TimeoutError:
                    raise self._timed_out(gens[0].request_id) from None
                if error is not None:
                    raise error
                yield i, chunk
                left -= chunk.finish_reason is not None
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    def token_logprobs(self, lps: list[TokenLogprob]) -> list[TokenLogprobInfo]:
        """Engine logprobs -> OpenAI chat logprobs entries (token texts decoded one token at a time)."""
        ids = sorted({t for lp in lps for t in (lp.token_id, *(i for i, _ in lp.top))})
        text = dict(zip(ids, self.engine.token_texts(ids)))

        def top(i: int, v: float) -> TopLogprob:
            return TopLogprob(token=text[i], logprob=max(v, -9999.0), bytes=list(text[i].encode()))
        return [TokenLogprobInfo(**top(lp.token_id, lp.logprob).model_dump(),
                                 top_logprobs=[top(i, v) for i, v in lp.top]) for lp in lps]

    # --- chat completions
    async def create(self, request: ChatCompletionRequest,
                     disconnected: Disconnected) -> ChatCompletionResponse | AsyncIterator[str] | None:
        """The response, the SSE stream (strings to send), or None when the client left before an answer."""
        arrival = time.monotonic()
        deadline = asyncio.get_running_loop().time() + self.timeout_s
        self.check_model(request.model)
        self.check_ready()
        params = self.sampling_params(request)
        try:
            async with asyncio.timeout_at(deadline):
                request, transcripts = await transcribe_audio_parts(request, self.audio, self.asr)  # audio -> text
                chat = await self.chat_input(request.messages, request.template_kwargs())
        except TimeoutError:
            raise self._timed_out("a request still preparing its input") from None
        if not (request.return_transcript or (request.return_transcript is None and self.return_transcript)):
            transcripts = []
        started = await self.start(f"chatcmpl-{uuid.uuid4().hex}", [(chat, p) for p in choice_params(params, request.n)],
                                   arrival, deadline, disconnected)
        if started is None:
            return None
        gens, firsts = started
        recorder = recording.get()      # the response cache's, when it will store this answer (function/cache.py)
        if not request.stream:
            outs = await self.collect(gens, firsts, deadline, disconnected)
            if outs is None:
                return None
            response = self._response(gens[0], outs, request, transcripts)
            if recorder is not None:
                recorder.response(response)
            return response
        return sse_stream(self._stream(gens, firsts, request, transcripts, deadline, recorder), gens)

    def _response(self, gen: Generation, outs: list[Output], request: ChatCompletionRequest,
                  transcripts: list[AudioTranscript]) -> ChatCompletionResponse:
        choices = []
        for i, out in enumerate(outs):
            reasoning, content = split_reasoning(out.text) if request.return_reasoning_enabled else (None, out.text)
            choices.append(Choice(index=i, message=AssistantMessage(content=content, reasoning_content=reasoning),
                                  logprobs=ChoiceLogprobs(content=self.token_logprobs(out.logprobs))
                                  if request.logprobs else None,
                                  finish_reason=finish_reason_of(out.last), stop_reason=out.last.stop_reason))
        return ChatCompletionResponse(
            id=gen.request_id, created=gen.created, model=self.model_name, system_fingerprint=self.fingerprint,
            choices=choices, usage=usage_of([o.last for o in outs], 1), transcripts=transcripts or None)

    def _timed_out(self, what: str) -> RequestTimeout:
        log.warning("%s: stopped after REQUEST_TIMEOUT_S=%g s", what, self.timeout_s)
        return RequestTimeout(f"the request did not finish within {self.timeout_s:g} s (REQUEST_TIMEOUT_S) and was "
                              "stopped; ask for fewer tokens or retry later")

    def check_ready(self) -> None:
        if (error := unready("the model", self.engine.status())) is not None:
            raise error

    async def chat_input(self, messages: list[ChatMessage], template_kwargs: dict) -> ChatInput:
        """OpenAI messages -> transformers chat format with decoded images (and their digests)."""
        # all images together: count, bytes, headers (pixel caps), then decodes (function/images.py)
        loaded = iter(await self.images.load_many([
            (p.image_url.url, f"messages[{i}].content[{j}].image_url") for i, m in enumerate(messages)
            if isinstance(m.content, list) for j, p in enumerate(m.content) if isinstance(p, ImagePart)]))
        out, digests = [], []
        for i, m in enumerate(messages):
            role = "system" if m.role == "developer" else m.role   # the chat template knows no developer role
            if m.role != "user" or not isinstance(m.content, list):
                out.append({"role": role, "content": m.text()})
                continue
            parts = []
            for j, p in enumerate(m.content):
                if isinstance(p, ImagePart):
                    img = next(loaded)
                    parts.append({"type": "image", "image": img.image})
                    digests.append(img.digest)
                elif isinstance(p, TextPart):
                    parts.append({"type": "text", "text": p.text})
                else:
                    raise InvalidInput("audio parts are transcribed only by /v1/chat/completions",
                                       param=f"messages[{i}].content[{j}]")
            out.append({"role": role, "content": parts})
        return ChatInput(messages=out, chat_template_kwargs=template_kwargs, image_digests=digests)

    async def _stream(self, gens: list[Generation], firsts: list[CompletionChunk], request: ChatCompletionRequest,
                      transcripts: list[AudioTranscript], deadline: float,
                      recorder: Recorder | None) -> AsyncIterator[str]:
        """The response's SSE events; `sse_stream` adds the error event, [DONE] and the close."""
        n = len(gens)
        parsers = [ReasoningParser() if request.return_reasoning_enabled else None for _ in range(n)]
        lasts: list[CompletionChunk | None] = [None] * n
        gen = gens[0]

        def event(choices: list[StreamChoice], usage: Usage | None = None,
                  transcripts: list[AudioTranscript] | None = None) -> str:
            chunk = ChatCompletionChunk(id=gen.request_id, created=gen.created, model=self.model_name,
                                        system_fingerprint=self.fingerprint, choices=choices, usage=usage,
                                        transcripts=transcripts)
            if recorder is not None:
                recorder.chunk(chunk)
            return sse_event(chunk)

        for i in range(n):
            yield event([StreamChoice(index=i, delta=Delta(role="assistant", content=""))],
                        transcripts=(transcripts or None) if i == 0 else None)
        async for i, chunk in self.merged(gens, firsts, deadline):
            lasts[i] = chunk
            final = chunk.finish_reason is not None
            parser = parsers[i]
            if parser is None:
                delta = Delta(content=chunk.text or None)
            else:
                d = parser.feed(chunk.text, final=final)
                delta = Delta(reasoning_content=d.reasoning or None, content=d.content or None)
            lp = ChoiceLogprobs(content=self.token_logprobs(chunk.logprobs)) \
                if request.logprobs and chunk.logprobs else None
            usage = usage_of([chunk], 1) if request.continuous_usage else None
            if final:
                yield event([StreamChoice(index=i, delta=delta, logprobs=lp, finish_reason=finish_reason_of(chunk),
                                          stop_reason=chunk.stop_reason)], usage=usage)
            elif delta.content or delta.reasoning_content or lp:
                yield event([StreamChoice(index=i, delta=delta, logprobs=lp)], usage=usage)
        usage = usage_of(lasts, 1)
        if recorder is not None:
            recorder.stream_usage(usage)
        if request.include_usage:
            yield event([], usage=usage)
