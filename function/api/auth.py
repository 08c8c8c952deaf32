"""API keys: who may use the GPU. `ApiKeys` holds the configured keys (API_KEY, API_KEY_FILE re-read when it
changes); `AuthGate` is the ASGI middleware that asks for one on every route that does work.

Protected when any key is configured (docs/security.md):
- every path under `/v1` and the tokenizer routes (`/tokenize`, `/detokenize`), whatever routes exist, by prefix;
- `/health` and `/metrics` only with API_KEY_PROTECTS_HEALTH (the Kubernetes probes `/health/liveness` and
  `/health/readiness` are always open: the kubelet sends no key);
- the CloudEvents routes (`/`, `/events`) unless EVENTS_TRUST_NETWORK says the network is the authentication
  (a cluster-local Service behind a NetworkPolicy that admits only the broker).
Everything else (unknown paths, the OpenAPI page) is open and answers as before (404 for unknown paths).

A refused request gets 401 in OpenAI's error shape (`code: invalid_api_key`) with `WWW-Authenticate: Bearer`.
The key is compared in constant time against every configured key (a miss costs the same whichever key is near),
and it is never logged: neither the key nor the Authorization header appears in any message. A request that passed
carries the SHA-256 of its key in `scope[SCOPE_KEY]`, which the response cache puts into its key (function/cache.py)
so that entries never cross keys.
"""
from __future__ import annotations

import hashlib
import hmac
import logging
import os
import threading
import time

from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from function.config import Config

from .protocol import ErrorInfo, ErrorResponse

log = logging.getLogger(__name__)

SCOPE_KEY = "autoglm.api_key_hash"
"""ASGI scope entry: hex SHA-256 of the API key the request authenticated with ("" when keys are off)."""

TOKENIZER_PATHS = frozenset({"/tokenize", "/detokenize"})
HEALTH_PATHS = frozenset({"/health", "/metrics"})
EVENT_PATHS = frozenset({"/", "/events"})
RECHECK_S = 1.0
"""API_KEY_FILE is stat'ed at most this often; a changed file (inode, size or mtime: Kubernetes swaps a Secret
volume's files by renaming a directory) is read again."""


def key_hash(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode("utf-8", "surrogatepass")).digest()


def _split(text: str) -> list[str]:
    return [k.strip() for line in text.splitlines() for k in line.split(",") if k.strip()]


class ApiKeys:
    """The configured keys: API_KEY's and API_KEY_FILE's, the file re-read when it changes."""

    def __init__(self, keys: str = "", path: str = "", clock=time.monotonic):
        self._static = [_digest(k) for k in _split(keys)]
        self._path = path
        self._clock = clock
        self._file_keys: list[bytes] = []
        self._stamp: tuple | None = None
        self._checked = -RECHECK_S
        self._lock = threading.Lock()
        if path:
            self._reload(force=True)

    @classmethod
    def from_config(cls, config: Config) -> ApiKeys:
        return cls(config.api_key, config.api_key_file)

    @property
    def enabled(self) -> bool:
        """Authentication is on when keys are configured; a configured but empty or unreadable file still counts
        (it refuses everyone rather than opening the service)."""
        return bool(self._static or self._path)

    def _reload(self, force: bool = False) -> None:
        now = self._clock()
        if not force and now - self._checked < RECHECK_S:
            return
        with self._lock:
            self._checked = now
            try:
                st = os.stat(self._path)
                stamp = (st.st_ino, st.st_size, st.st_mtime_ns)
            except OSError as e:
                if self._stamp != ("missing",):
                    log.error("API_KEY_FILE %s cannot be read (%s); its keys are not accepted", self._path,
                              e.strerror or type(e).__name__)
                    self._stamp, self._file_keys = ("missing",), []
                return
            if stamp == self._stamp:
                return
            try:
                with open(self._path, encoding="utf-8") as f:
                    keys = _split(f.read(1 << 20))
            except (OSError, UnicodeDecodeError) as e:
                log.error("API_KEY_FILE %s cannot be read (%s); its keys are not accepted", self._path,
                          type(e).__name__)
                keys = []
            if self._stamp is not None:
                log.info("API_KEY_FILE changed: %d key(s) now", len(keys))      # how many, never which
            self._stamp, self._file_keys = stamp, [_digest(k) for k in keys]

    def match(self, presented: str) -> bool:
        """Whether `presented` is one of the keys; constant time in the keys' contents."""
        if self._path:
            self._reload()
        candidate = _digest(presented)         # equal lengths: compare_digest leaks nothing, not even the length
        found = False
        for key in self._static + self._file_keys:
            found |= hmac.compare_digest(candidate, key)
        return found


def bearer(scope: Scope) -> str | None:
    """The token of `Authorization: Bearer <token>`, or None."""
    for k, v in scope["headers"]:
        if k.lower() == b"authorization":
            scheme, _, token = v.decode("latin-1").strip().partition(" ")
            return token.strip() if scheme.lower() == "bearer" and token.strip() else None
    return None


def unauthorized(message: str, invalid: bool) -> JSONResponse:
    body = ErrorResponse(error=ErrorInfo(message=message, type="invalid_request_error", param=None,
                                         code="invalid_api_key"))
    challenge = 'Bearer realm="autoglm"' + (', error="invalid_token"' if invalid else "")
    return JSONResponse(body.model_dump(mode="json"), status_code=401, headers={"WWW-Authenticate": challenge})


class AuthGate:
    """ASGI middleware: 401 for a protected path without a valid key; the key's hash in the scope otherwise."""

    def __init__(self, app: ASGIApp, keys: ApiKeys, protect_health: bool = False, events_open: bool = False):
        self.app = app
        self.keys = keys
        self.protect_health = protect_health
        self.events_open = events_open

    def protected(self, path: str) -> bool:
        if path == "/v1" or path.startswith("/v1/") or path in TOKENIZER_PATHS:
            return True
        if path in HEALTH_PATHS:
            return self.protect_health
        if path in EVENT_PATHS:
            return not self.events_open
        return False

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not self.keys.enabled:
            await self.app(scope, receive, send)
            return
        token = bearer(scope)
        if token is not None and self.keys.match(token):
            await self.app({**scope, SCOPE_KEY: key_hash(token)}, receive, send)
            return
        if not self.protected(scope["path"]):
            await self.app(scope, receive, send)
            return
        if token is None:
            response = unauthorized("You didn't provide an API key. Send it in an Authorization header: "
                                    "Authorization: Bearer <key>.", invalid=False)
        else:
            response = unauthorized("Incorrect API key provided.", invalid=True)
        await response(scope, receive, send)


def install(app, config: Config, keys: ApiKeys | None = None) -> ApiKeys:
    """Add the gate to `app` (call after the body gate, so that a refused request's body is never read)."""
    keys = keys or ApiKeys.from_config(config)
    if keys.enabled:
        log.info("API keys required on /v1/*%s%s", ", /health, /metrics" if config.api_key_protects_health else "",
                 "" if config.events_trust_network else " and CloudEvents")
    app.add_middleware(AuthGate, keys=keys, protect_health=config.api_key_protects_health,
                       events_open=config.events_trust_network)
    return keys
