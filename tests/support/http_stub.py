"""Loopback HTTP stand-ins for the tests (an image host, the model service behind the cache front, the API server's
OIDC keys): a quiet request handler with whole-body replies, and a server on a free port for a `with` block."""
from __future__ import annotations

import contextlib
import http.server
import json
import threading
from typing import Any, Iterator

__all__ = ["StubHandler", "serving"]


class StubHandler(http.server.BaseHTTPRequestHandler):
    """http.server's handler without the access log, with `send_body`/`send_json` for a whole response."""

    def send_body(self, body: bytes, status: int = 200, content_type: str | None = None) -> None:
        self.send_response(status)
        if content_type:
            self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def send_json(self, obj: Any, status: int = 200) -> None:
        self.send_body(json.dumps(obj).encode(), status, "application/json")

    def log_message(self, *args) -> None:
        pass


@contextlib.contextmanager
def serving(handler: type[http.server.BaseHTTPRequestHandler]) -> Iterator[http.server.ThreadingHTTPServer]:
    """`handler` served on 127.0.0.1 at a free port from a thread, for the block; `server.url` is its base URL
    (`server.server_port` its port). Stopped and closed after."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    server.url = f"http://127.0.0.1:{server.server_port}"
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
