"""Driving the ASGI app by hand in tests: a request whose client disconnects on cue, and polling for a state."""
from __future__ import annotations

import asyncio
import json

__all__ = ["call_asgi", "until"]


async def call_asgi(app, body: dict, disconnect: asyncio.Event, sent: list[dict]) -> None:
    """Run one request through the ASGI app, collecting what it sends; the client 'disconnects' when `disconnect`
    is set."""
    request = [{"type": "http.request", "body": json.dumps(body).encode(), "more_body": False}]

    async def receive():
        if request:
            return request.pop()
        await disconnect.wait()
        return {"type": "http.disconnect"}

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"}, "http_version": "1.1",
             "method": "POST", "scheme": "http", "path": "/v1/chat/completions", "raw_path": b"/v1/chat/completions",
             "root_path": "", "query_string": b"", "headers": [(b"content-type", b"application/json")],
             "client": ("127.0.0.1", 1), "server": ("testserver", 80)}
    await asyncio.wait_for(app(scope, receive, send), timeout=10)


async def until(predicate, timeout: float = 5.0, what: str = "condition") -> None:
    """Poll `predicate` until it is true; an AssertionError naming `what` after `timeout` seconds."""
    try:
        async with asyncio.timeout(timeout):
            while not predicate():
                await asyncio.sleep(0.01)
    except TimeoutError:
        raise AssertionError(f"timed out after {timeout:g} s waiting for {what}") from None
