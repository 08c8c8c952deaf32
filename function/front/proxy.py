"""The cache front's way to the model service: `ModelProxy` forwards a request to MODEL_URL with httpx and streams
the answer back chunk by chunk; it keeps no cookies and drops hop-by-hop headers (those named in Connection too)
both ways, and a client that leaves closes the upstream connection (the model aborts the generation)."""
from __future__ import annotations

import logging
from functools import partial
from http.cookiejar import CookieJar, DefaultCookiePolicy

import httpx
from starlette.types import Receive, Scope, Send

from function.api import errors
from function.errors import ServiceError
from function.http_common import SSE_DONE, read_body, sse_event, unless_disconnected, until_disconnected

log = logging.getLogger(__name__)

_HOP_BY_HOP = frozenset({b"connection", b"keep-alive", b"te", b"trailer", b"trailers", b"transfer-encoding",
                         b"upgrade", b"proxy-authorization", b"proxy-authenticate", b"proxy-connection"})
_REQUEST_DROP = _HOP_BY_HOP | {b"host", b"content-length", b"accept-encoding"}
_RESPONSE_DROP = _HOP_BY_HOP | {b"content-length", b"date", b"server", b"x-cache", b"age"}


def _end_to_end(headers, drop: frozenset[bytes]) -> list[tuple[bytes, bytes]]:
    """`headers` without hop-by-hop ones: `drop` and those the Connection header names (RFC 9110 7.6.1)."""
    named = {t.strip().lower().encode("latin-1") for k, v in headers if k.lower() == b"connection"
             for t in v.decode("latin-1").split(",") if t.strip()}
    return [(k, v) for k, v in headers if k.lower() not in drop and k.lower() not in named]


class ModelProxy:
    """ASGI app forwarding each request to the model service; the response streams back chunk by chunk, and a
    client that leaves closes the upstream connection (the model aborts the generation)."""

    def __init__(self, base_url: str, timeout_s: float, transport: httpx.AsyncBaseTransport | None = None,
                 max_body: int = 64 * 2**20):
        self.max_body = max_body
        self.client = httpx.AsyncClient(
            base_url=base_url.rstrip("/"), transport=transport, follow_redirects=False, trust_env=False,
            timeout=httpx.Timeout(timeout_s, connect=10.0),
            cookies=CookieJar(DefaultCookiePolicy(allowed_domains=[])),   # keeps no cookie: clients share it
            limits=httpx.Limits(max_connections=None, max_keepalive_connections=64))

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        body = await read_body(receive, self.max_body)
        if body.data is None:
            return                                    # the client left (the request gate bounds the size)
        url = scope["path"] + (("?" + scope["query_string"].decode("latin-1")) if scope.get("query_string") else "")
        headers = _end_to_end(scope["headers"], _REQUEST_DROP)
        headers.append((b"accept-encoding", b"identity"))     # bytes pass through as they are (and get parsed)
        request = self.client.build_request(scope["method"], url, headers=headers, content=body.data)
        try:
            response = await self.client.send(request, stream=True)
        except httpx.HTTPError as e:
            log.warning("model service %s did not answer: %s: %s", self.client.base_url, type(e).__name__, e)
            await errors.error_response("unavailable", f"the model service did not answer ({type(e).__name__}); "
                                        "retry later", retry_after=5)(scope, receive, send)
            return
        try:
            await send({"type": "http.response.start", "status": response.status_code,
                        "headers": _end_to_end(response.headers.raw, _RESPONSE_DROP)})
            # the client left: the relay stops reading, which closes upstream
            await unless_disconnected(self._relay(response, send), partial(until_disconnected, receive))
        finally:
            await response.aclose()

    @staticmethod
    async def _relay(response: httpx.Response, send: Send) -> None:
        try:
            async for chunk in response.aiter_raw():
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
        except httpx.HTTPError as e:
            log.warning("model service stream broke: %s: %s", type(e).__name__, e)
            if not response.headers.get("content-type", "").startswith("text/event-stream"):
                raise
            failure = errors.error_json(ServiceError(f"the model service stream broke ({type(e).__name__})"))
            await send({"type": "http.response.body", "body": (sse_event(failure) + SSE_DONE).encode(),
                        "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    async def aclose(self) -> None:
        await self.client.aclose()
