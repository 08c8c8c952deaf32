"""uvicorn with func-python's (hypercorn's) header limits: `python -m function.uvicorn_http <uvicorn options>`.

uvicorn's own HTTP implementations wait for request headers without a time limit, and httptools (its default when
installed) has no size limit for them: a client can hold connections open with endless or enormous headers.
`BoundedH11Protocol` is uvicorn's h11 protocol with both bounds hypercorn applies: headers within
`HEADER_TIMEOUT_S` of the connection opening (or of the previous response ending; a connection without a complete
request by then is closed) and within `MAX_HEADER_BYTES` (larger is a 431). Running this module registers it as
`--http h11-bounded` and runs uvicorn's own command line (scripts/run_autoglm_server.sh passes that option).
"""
from __future__ import annotations

import asyncio

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

HEADER_TIMEOUT_S = 5.0
"""hypercorn's keep_alive_timeout, which bounds the wait for a request's headers."""
MAX_HEADER_BYTES = 16 * 1024
"""hypercorn's h11_max_incomplete_size."""


class BoundedH11Protocol(H11Protocol):
    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEADER_BYTES)
        self._header_timer: asyncio.TimerHandle | None = None
        self._head = bytearray()          # the start of the next request, until its headers end

    def _arm(self) -> None:
        self._disarm()
        self._head = bytearray()
        self._header_timer = self.loop.call_later(HEADER_TIMEOUT_S, self._headers_too_slow)

    def _disarm(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _headers_too_slow(self) -> None:
        self._header_timer = None
        if not self.transport.is_closing():
            self.transport.close()

    def connection_made(self, transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        # h11 bounds only headers that arrive in pieces; a whole oversized block in one read is counted here
        if self._header_timer is not None and self._head is not None:
            self._head += data[:MAX_HEADER_BYTES + 4 - len(self._head)]
            if b"\r\n\r\n" in self._head:
                self._head = None         # type: ignore[assignment] - headers complete: stop counting
            elif len(self._head) > MAX_HEADER_BYTES:
                self._disarm()
                body = b"request headers over 16 KiB"
                self.transport.write(b"HTTP/1.1 431 Request Header Fields Too Large\r\ncontent-type: text/plain\r\n"
                                     b"connection: close\r\ncontent-length: " + str(len(body)).encode() + b"\r\n\r\n"
                                     + body)
                self.transport.close()
                return
        super().data_received(data)

    def handle_events(self) -> None:
        before = self.scope
        super().handle_events()
        if self.scope is not before:          # a request's headers are complete
            self._disarm()

    def on_response_complete(self) -> None:
        self._arm()                           # the next request's headers, if the connection is kept alive
        super().on_response_complete()


if __name__ == "__main__":
    from uvicorn.config import HTTP_PROTOCOLS

    HTTP_PROTOCOLS["h11-bounded"] = "function.uvicorn_http:BoundedH11Protocol"
    from uvicorn.main import main             # after the registration: its --http choices are read at import

    main(prog_name="uvicorn")
