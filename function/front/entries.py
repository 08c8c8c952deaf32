"""Cached answers and live ones: `sse_events` replays a cache entry as the live stream's events; `Recorded` watches
an answer produced in this process, whose entry the serving layer records from its own objects (nothing parsed);
`Capture` rebuilds an entry from the JSON or SSE bytes of the model service's answer behind the cache front as they
go by (and drops the usage chunk asked for on the client's behalf)."""
from __future__ import annotations

import json
import time
import uuid

from function.api.protocol import ChatCompletionChunk, Delta, StreamChoice, Usage
from function.cache import Entry, Recorder
from function.http_common import SSE_DONE, sse_event


def sse_events(entry: Entry, include_usage: bool) -> list[bytes]:
    """A cached answer as the live stream's chunks: role chunk, reasoning (if any), the content with the finish
    reason, the usage chunk when asked, [DONE]."""
    request_id, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())

    def event(choices: list[StreamChoice], usage: Usage | None = None) -> bytes:
        chunk = ChatCompletionChunk(id=request_id, created=created, model=entry.model,
                                    system_fingerprint=entry.system_fingerprint, choices=choices, usage=usage)
        return sse_event(chunk).encode()

    out = [event([StreamChoice(delta=Delta(role="assistant", content=""))])]
    if entry.reasoning_content:
        out.append(event([StreamChoice(delta=Delta(reasoning_content=entry.reasoning_content))]))
    # the content rides on the finish chunk, as a live answer's last piece does
    out.append(event([StreamChoice(delta=Delta(content=entry.content or None), finish_reason=entry.finish_reason,
                                   stop_reason=entry.stop_reason)]))
    if include_usage:
        out.append(event([], usage=Usage.model_validate(entry.usage)))
    out.append(SSE_DONE.encode())
    return out


def _is_answer(status: int, headers: list[tuple[bytes, bytes]], stream: bool) -> bool:
    """The response starting is the chat answer (not an error): 200 with SSE for a stream, JSON otherwise."""
    ctype = next((v for k, v in headers if k.lower() == b"content-type"), b"").lower()
    return status == 200 and ctype.startswith(b"text/event-stream" if stream else b"application/json")


class Recorded:
    """The answer produced in this process: the serving layer hands its objects to `recorder` (the cache layer
    puts it in `function.cache.recording`), so the bytes pass untouched and are never parsed. This only checks that
    the response is the answer and was sent to its end (a client gone before [DONE] leaves nothing)."""

    def __init__(self, stream: bool):
        self.stream = stream
        self.recorder = Recorder()
        self.ok = False
        self._ended = False

    def start(self, status: int, headers: list[tuple[bytes, bytes]]) -> None:
        self.ok = _is_answer(status, headers, self.stream)

    def feed(self, data: bytes, more: bool) -> bytes:
        self._ended = not more
        return data

    def entry(self) -> Entry | None:
        return self.recorder.entry() if self.ok and self._ended else None


class Capture:
    """The answer of the model service behind the cache front, which arrives as bytes: rebuilt from the JSON, or
    from the SSE events as they go by (their parts fed to a `Recorder`). With `strip_usage` it also removes the
    usage chunk that was asked for on the client's behalf."""

    def __init__(self, stream: bool, strip_usage: bool):
        self.stream = stream
        self.strip_usage = strip_usage
        self.ok = False               # storable so far
        self._events = False          # parsing SSE events
        self._buf = bytearray()
        self._recorder = Recorder()
        self._done = False

    def start(self, status: int, headers: list[tuple[bytes, bytes]]) -> None:
        self.ok = _is_answer(status, headers, self.stream)
        self._events = self.ok and self.stream

    def feed(self, data: bytes, more: bool) -> bytes:
        """The bytes to send on."""
        if not self._events:
            if self.ok:
                self._buf += data
            return data
        self._buf += data
        out = []
        while (end := self._buf.find(b"\n\n")) >= 0:
            event = bytes(self._buf[:end + 2])
            del self._buf[:end + 2]
            if self._event(event):
                out.append(event)
        if not more and self._buf:        # a partial event at the end: pass it on, store nothing
            out.append(bytes(self._buf))
            self._buf.clear()
            self.ok = False
        return b"".join(out)

    def _event(self, event: bytes) -> bool:
        """Note what the event says; False: drop it."""
        if not event.startswith(b"data:"):
            return True
        payload = event[5:].strip()
        if payload == b"[DONE]":
            self._done = True
            return True
        answer = self._recorder
        try:
            chunk = json.loads(payload)
            if "error" in chunk:
                self.ok = False
                return True
            answer.model = chunk.get("model", answer.model)
            answer.system_fingerprint = chunk.get("system_fingerprint", answer.system_fingerprint)
            for choice in chunk.get("choices") or ():
                delta = choice.get("delta") or {}
                answer.add(delta.get("content"), delta.get("reasoning_content"), choice.get("finish_reason"),
                           choice.get("stop_reason"))
            if chunk.get("usage"):
                answer.usage = chunk["usage"]
                if self.strip_usage and not chunk.get("choices"):
                    return False
        except (ValueError, AttributeError, TypeError):
            self.ok = False
        return True

    def entry(self) -> Entry | None:
        if not self.ok:
            return None
        if not self._events:
            try:
                return Entry.from_response(json.loads(self._buf))
            except ValueError:
                return None
        return self._recorder.entry() if self._done else None
