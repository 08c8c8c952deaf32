"""A deterministic stand-in for LocalEngine, so the HTTP layer is tested in-process without a model.

It answers every chat with AutoGLM-shaped text, `<think>…</think><answer>…</answer>`, in small pieces (one "token"
per piece), honours max_tokens (finish_reason "length") and the context limit (InvalidInput like the real engine),
records what it was asked, can be told to fail before or during a stream, can stall a stream (`hold_after`), and
follows the EngineClient contract that closing an unfinished stream aborts the request.
"""
from __future__ import annotations

import asyncio
from typing import AsyncIterator

from function.engine.protocol import ChatInput, CompletionChunk, EngineClient, SamplingParams
from function.errors import InvalidInput, ServiceError

__all__ = ["FakeEngine", "answer_for"]


def answer_for(chat: ChatInput) -> tuple[str, str]:
    """(reasoning, answer) the fake writes for `chat`: it names the image count and echoes the last user text (a
    raw prompt's token ids, for /v1/completions)."""
    if chat.prompt_token_ids is not None:
        return "I see 0 image(s).", f'do(action="Type", text="{" ".join(map(str, chat.prompt_token_ids[:8]))}")'
    last = chat.messages[-1]["content"]
    text = last if isinstance(last, str) else " ".join(p["text"] for p in last if p["type"] == "text")
    return f"I see {len(chat.image_digests)} image(s).", f'do(action="Type", text="{text}")'


class FakeEngine(EngineClient):
    def __init__(self, *, max_model_len: int = 4096, piece: int = 4, ready: bool = True):
        self.max_model_len = max_model_len
        self.piece = piece
        self.alive, self.ready, self.message = True, ready, "ready" if ready else "loading: weights"
        self.calls: list[tuple[str, ChatInput, SamplingParams]] = []
        self.aborted: list[str] = []
        self.fail_before: ServiceError | None = None     # raised at the first chunk (a refusal)
        self.fail_after: tuple[int, ServiceError] | None = None   # (pieces sent, error): a failure mid-stream
        self.finish_as: str | None = None               # e.g. "abort": override the last chunk's finish_reason
        self.hold_after: int | None = None              # pieces sent before the stream stalls until `release`
        self.release = asyncio.Event()
        self.loading_started = self.shut_down = False

    # --- lifecycle, as LocalEngine
    def start_loading(self) -> None:
        self.loading_started = True

    def finish_loading(self) -> None:
        self.ready, self.message = True, "ready"

    def shutdown(self, timeout: float = 30.0) -> None:
        self.shut_down = True
        self.ready, self.message = False, "shutting down"

    def status(self) -> tuple[bool, bool, str]:
        return self.alive, self.ready, self.message

    # --- requests
    def generate(self, request_id: str, chat: ChatInput, params: SamplingParams) -> AsyncIterator[CompletionChunk]:
        self.calls.append((request_id, chat, params))
        return self._generate(request_id, chat, params)

    @staticmethod
    def prompt_tokens(chat: ChatInput) -> int:
        """A deterministic prompt size: one token per 4 characters of text, 16 per image."""
        n = len(chat.prompt_token_ids or ())
        for m in chat.messages:
            parts = [m["content"]] if isinstance(m["content"], str) else m["content"]
            for p in parts:
                n += len(p) // 4 if isinstance(p, str) else (len(p["text"]) // 4 if p["type"] == "text" else 16)
        return n

    async def _generate(self, request_id: str, chat: ChatInput,
                        params: SamplingParams) -> AsyncIterator[CompletionChunk]:
        if self.fail_before is not None:
            raise self.fail_before
        prompt = self.prompt_tokens(chat)
        if prompt + (params.max_tokens or 1) > self.max_model_len:
            raise InvalidInput(f"This model's maximum context length is {self.max_model_len} tokens; the request "
                               f"needs {prompt + (params.max_tokens or 1)}.", param="messages")
        reasoning, answer = answer_for(chat)
        full = f"<think>{reasoning}</think><answer>{answer}</answer>"
        pieces = [full[i:i + self.piece] for i in range(0, len(full), self.piece)]
        finish = "stop"
        if params.max_tokens is not None and params.max_tokens < len(pieces):
            pieces, finish = pieces[:params.max_tokens], "length"
        finished = False
        try:
            for i, text in enumerate(pieces):
                if self.hold_after is not None and i >= self.hold_after:
                    await self.release.wait()
                await asyncio.sleep(0)
                if self.fail_after is not None and i == self.fail_after[0]:
                    finished = True
                    raise self.fail_after[1]
                last = i == len(pieces) - 1
                finished = last
                yield CompletionChunk(text=text, token_ids=[1000 + i], prompt_tokens=prompt, completion_tokens=i + 1,
                                      finish_reason=(self.finish_as or finish) if last else None,
                                      stop_reason=None)
        finally:
            if not finished:
                self.aborted.append(request_id)

    async def abort(self, request_id: str) -> None:
        self.aborted.append(request_id)
