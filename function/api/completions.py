"""vLLM's other endpoints agent stacks call: POST /v1/completions (legacy text completions, the same engine and
sampling as chat), POST /tokenize and /detokenize (vLLM's shapes), GET /version. Shares ChatService's machinery
(model check, sampling defaults, choice fan-out, deadlines, disconnects), so both routes behave alike."""
from __future__ import annotations

import asyncio
import time
import uuid
from importlib import metadata
from typing import AsyncIterator

from function.engine.protocol import ChatInput, CompletionChunk, TokenLogprob
from function.http_common import Disconnected, sse_event

from .generation import choice_params, finish_reason_of, sse_stream, usage_of
from .protocol import (CompletionChoice, CompletionLogprobs, CompletionRequest, CompletionResponse,
                       DetokenizeRequest, DetokenizeResponse, TokenizeRequest, TokenizeResponse, VersionResponse)
from .serving import ChatService


def version() -> VersionResponse:
    try:
        return VersionResponse(version=metadata.version("function"))
    except metadata.PackageNotFoundError:
        return VersionResponse(version="0+unknown")


class CompletionService:
    def __init__(self, chat: ChatService):
        self.chat = chat
        self.engine = chat.engine

    async def create(self, request: CompletionRequest,
                     disconnected: Disconnected) -> CompletionResponse | AsyncIterator[str] | None:
        arrival = time.monotonic()
        deadline = asyncio.get_running_loop().time() + self.chat.timeout_s
        self.chat.check_model(request.model)
        self.chat.check_ready()
        params = self.chat.sampling_params(request)
        inputs = []
        for prompt in request.prompts():
            ids = prompt if isinstance(prompt, list) else \
                await self.engine.tokenize(prompt=prompt, add_special_tokens=request.add_special_tokens)
            inputs.extend((ChatInput(messages=[], prompt_token_ids=list(ids)), p)
                          for p in choice_params(params, request.n))
        started = await self.chat.start(f"cmpl-{uuid.uuid4().hex}", inputs, arrival, deadline, disconnected)
        if started is None:
            return None
        gens, firsts = started
        n = request.n or 1
        if not request.stream:
            outs = await self.chat.collect(gens, firsts, deadline, disconnected)
            if outs is None:
                return None
            choices = [CompletionChoice(index=i, text=o.text, finish_reason=finish_reason_of(o.last),
                                        stop_reason=o.last.stop_reason,
                                        logprobs=self._logprobs(o.logprobs, 0) if request.logprobs is not None
                                        else None) for i, o in enumerate(outs)]
            return CompletionResponse(id=gens[0].request_id, created=gens[0].created, model=self.chat.model_name,
                                      system_fingerprint=self.chat.fingerprint, choices=choices,
                                      usage=usage_of([o.last for o in outs], n))
        return sse_stream(self._stream(gens, firsts, request, deadline, n), gens)

    async def _stream(self, gens, firsts, request: CompletionRequest, deadline: float, n: int) -> AsyncIterator[str]:
        """The response's SSE events; `sse_stream` adds the error event, [DONE] and the close."""
        gen = gens[0]
        lasts: list[CompletionChunk | None] = [None] * len(gens)
        offsets = [0] * len(gens)

        def event(choices: list[CompletionChoice], usage=None) -> str:
            body = CompletionResponse(id=gen.request_id, created=gen.created, model=self.chat.model_name,
                                      system_fingerprint=self.chat.fingerprint, choices=choices, usage=usage)
            return sse_event(body)

        async for i, chunk in self.chat.merged(gens, firsts, deadline):
            lasts[i] = chunk
            lp = self._logprobs(chunk.logprobs or [], offsets[i]) if request.logprobs is not None else None
            offsets[i] += sum(len(t) for t in (lp.tokens if lp else ()))
            usage = usage_of([chunk], 1) if request.continuous_usage else None
            if chunk.finish_reason is not None:
                yield event([CompletionChoice(index=i, text=chunk.text, logprobs=lp,
                                              finish_reason=finish_reason_of(chunk),
                                              stop_reason=chunk.stop_reason)], usage)
            elif chunk.text or lp:
                yield event([CompletionChoice(index=i, text=chunk.text, logprobs=lp)], usage)
        if request.include_usage:
            yield event([], usage_of(lasts, n))

    def _logprobs(self, lps: list[TokenLogprob], offset: int) -> CompletionLogprobs:
        entries = self.chat.token_logprobs(lps)
        out = CompletionLogprobs(top_logprobs=[])
        for e in entries:
            out.tokens.append(e.token)
            out.token_logprobs.append(e.logprob)
            out.text_offset.append(offset)
            offset += len(e.token)
            out.top_logprobs.append({t.token: t.logprob for t in e.top_logprobs})
        return out

    # --- tokenizer endpoints
    async def tokenize(self, request: TokenizeRequest) -> TokenizeResponse:
        self.chat.check_model(request.model)
        self.chat.check_ready()
        if request.messages is not None:
            kw = dict(request.chat_template_kwargs or {})
            if request.enable_thinking is not None:
                kw["enable_thinking"] = request.enable_thinking
            chat = await self.chat.chat_input(request.messages, kw)
            ids = await self.engine.tokenize(chat=chat)
        else:
            ids = await self.engine.tokenize(prompt=request.prompt, add_special_tokens=request.add_special_tokens)
        return TokenizeResponse(count=len(ids), max_model_len=self.engine.max_model_len, tokens=list(ids),
                                token_strs=self.engine.token_texts(ids) if request.return_token_strs else None)

    async def detokenize(self, request: DetokenizeRequest) -> DetokenizeResponse:
        self.chat.check_model(request.model)
        self.chat.check_ready()
        return DetokenizeResponse(prompt=await self.engine.detokenize(list(request.tokens)))
