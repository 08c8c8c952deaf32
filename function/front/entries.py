"""Cached answers and the live answer's bytes: `sse_events` replays a cache entry as the live stream's events;
`Capture` rebuilds an entry from the JSON or SSE bytes of a live answer as they go by (and drops the usage chunk
asked for on the client's behalf)."""
from __future__ import annotations

import json
import time
import uuid

from pydantic import ValidationError

from function.api.protocol import ChatCompletionChunk, Delta, StreamChoice, Usage
from function.cache import FINISHED, Entry
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


class Capture:
    """Rebuilds the answer from the live response's bytes (JSON, or SSE events) as they go by. With `strip_usage`
    it also removes the usage chunk that was asked for on the client's behalf."""

    def __init__(self, stream: bool, strip_usage: bool):
        self.stream = stream
        self.strip_usage = strip_usage
        self.ok = False               # storable so far
        self._events = False          # parsing SSE events
        self._buf = bytearray()
        self._content: list[str] = []
        self._reasoning: list[str] = []
        self._finish = self._stop = self._usage = self._model = self._fingerprint = None
        self._done = False

    def start(self, status: int, headers: list[tuple[bytes, bytes]]) -> None:
        ctype = next((v for k, v in headers if k.lower() == b"content-type"), b"").lower()
        self._events = status == 200 and self.stream and ctype.startswith(b"text/event-stream")
        self.ok = status == 200 and (self._events or (not self.stream and ctype.startswith(b"application/json")))

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
        try:
            chunk = json.loads(payload)
            if "error" in chunk:
                self.ok = False
                return True
            self._model = chunk.get("model", self._model)
            self._fingerprint = chunk.get("system_fingerprint", self._fingerprint)
            for choice in chunk.get("choices") or ():
                delta = choice.get("delta") or {}
                if isinstance(delta.get("content"), str):
                    self._content.append(delta["content"])
                if isinstance(delta.get("reasoning_content"), str):
                    self._reasoning.append(delta["reasoning_content"])
                if choice.get("finish_reason"):
                    self._finish, self._stop = choice["finish_reason"], choice.get("stop_reason")
            if chunk.get("usage"):
                self._usage = chunk["usage"]
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
        if not (self._done and self._finish in FINISHED and self._usage and self._model and self._fingerprint):
            return None
        try:
            Usage.model_validate(self._usage)
        except ValidationError:
            return None
        return Entry(content="".join(self._content),
                     reasoning_content="".join(self._reasoning) if self._reasoning else None,
                     finish_reason=self._finish, stop_reason=self._stop, usage=self._usage, model=self._model,
                     system_fingerprint=self._fingerprint, stored_at=time.time())
