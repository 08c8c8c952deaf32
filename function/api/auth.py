"""API keys: who may use the GPU. `ApiKeys` holds the configured keys (API_KEY, API_KEY_FILE re-read when it
changes); `AuthGate` is the ASGI middleware that asks for one on every route that does work.

Protected when any key is configured (docs/security.md):
- every path under `/v1` and the tokenizer routes (`/tokenize`, `/detokenize`), whatever routes exist, by prefix;
- `/health` and `/metrics` only with API_KEY_PROTECTS_HEALTH (the Kubernetes probes `/health/liveness` and
  `/health/readiness` are always open: the kubelet sends no key);
- the CloudEvents routes (`/`, `/events`) unless EVENTS_TRUST_NETWORK says the network is the authentication
  (a cluster-local Service behind a NetworkPolicy that admits only the broker).
Everything else (unknown paths, the OpenAPI page) is open and answers as before (404 for unknown paths).

CloudEvents may also authenticate the Knative way (docs/events.md): with EVENTS_OIDC_AUDIENCE set, a delivery on
`/` or `/events` passes with a valid API key or with Knative Eventing's OIDC sender token (feature
`authentication-oidc`: the broker's filter sends `Authorization: Bearer <JWT>` issued by the Kubernetes
service-account issuer for the Trigger's `subscriber.audience`). `OidcVerifier` checks the signature (RS256/ES256
against the issuer's JWKS, fetched from the API server with the pod's token or read from a file), `aud`, `exp`,
`iss` and optionally `sub`; a delivery with neither is a 401, and when the keys cannot be had it is a 503 (the broker
retries). PyJWT is imported only when OIDC is configured. A verified sender's identity (issuer and subject, not the
token, which changes on every refresh) takes the key's place in `scope[SCOPE_KEY]`, so replies never cross senders.

A refused request gets 401 in OpenAI's error shape (`code: invalid_api_key`) with `WWW-Authenticate: Bearer`.
The key is compared in constant time against every configured key (a miss costs the same whichever key is near),
and it is never logged: neither the key nor the Authorization header appears in any message. A request that passed
carries the SHA-256 of its key in `scope[SCOPE_KEY]`, which the response cache puts into its key (function/cache.py)
so that entries never cross keys.
"""
from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import os
import threading
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from function.config import Config

from . import errors
from .protocol import ErrorInfo, ErrorResponse

log = logging.getLogger(__name__)

SCOPE_KEY = "autoglm.api_key_hash"
"""ASGI scope entry: hex SHA-256 of the API key the request authenticated with ("" when keys are off), or of a
verified CloudEvents sender's issuer and subject."""
SCOPE_SENDER = "autoglm.oidc_subject"
"""ASGI scope entry: the `sub` of a CloudEvents delivery's verified OIDC token."""

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


SA_DIR = Path("/var/run/secrets/kubernetes.io/serviceaccount")
"""The pod's service-account token and the cluster CA, used to read the issuer's keys from the API server."""
OIDC_ALGORITHMS = ("RS256", "ES256")
"""What the Kubernetes service-account issuer signs with (RS256 by default, ES256 with an EC key); never HS*/none."""
OIDC_LEEWAY_S = 30
"""Clock skew allowed on exp/nbf/iat."""
OIDC_MAX_TOKEN = 16 * 1024
OIDC_MAX_JWKS = 1 << 20
OIDC_REFETCH_S = 30.0
"""A token signed by a key id that is not in the cached set fetches the keys again, at most this often."""
OIDC_FETCH_TIMEOUT_S = 5.0


class OidcRefused(Exception):
    """The token is not a valid sender token for this service; the message is for the log (never the token)."""


class OidcUnavailable(Exception):
    """The issuer's keys (or its name) cannot be had right now: a retriable 503, not the sender's fault."""


class OidcVerifier:
    """Verifies Knative Eventing OIDC sender tokens: a JWT from the service-account issuer for `audience`."""

    def __init__(self, audience: str, issuer: str = "", jwks_url: str = "", jwks_file: str = "",
                 allowed_subjects: str = "", ttl_s: float = 300.0, sa_dir: Path = SA_DIR, clock=time.monotonic):
        import jwt                      # lazily: only a server with OIDC configured needs PyJWT (and cryptography)
        self._jwt = jwt
        self.audience = audience
        self._issuer = issuer
        self.jwks_url = jwks_url
        self.jwks_file = jwks_file
        self.subjects = frozenset(_split(allowed_subjects))
        self.ttl_s = ttl_s
        self._sa_dir = sa_dir
        self._clock = clock
        self._keys: dict[str, list] = {}        # kid ("" for keys without one) -> PyJWK
        self._fetched_at: float | None = None
        self._tried_at = -OIDC_REFETCH_S
        self._stamp: tuple | None = None
        self._error: str | None = None
        self._lock = asyncio.Lock()

    @classmethod
    def from_config(cls, config: Config) -> OidcVerifier | None:
        if not config.events_oidc_audience:
            return None
        return cls(config.events_oidc_audience, config.events_oidc_issuer, config.events_oidc_jwks_url,
                   config.events_oidc_jwks_file, config.events_oidc_allowed_subjects, config.events_oidc_jwks_ttl_s)

    async def verify(self, token: str) -> dict[str, Any]:
        """The token's claims; OidcRefused when it is not valid here, OidcUnavailable when keys cannot be had."""
        jwt = self._jwt
        if len(token) > OIDC_MAX_TOKEN or token.count(".") != 2:
            raise OidcRefused("not a JWT")
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            raise OidcRefused("malformed JWT header") from None
        alg, kid = header.get("alg"), header.get("kid")
        if alg not in OIDC_ALGORITHMS:
            raise OidcRefused(f"signing algorithm {str(alg)[:20]!r} is not one of {', '.join(OIDC_ALGORITHMS)}")
        if kid is not None and not isinstance(kid, str):
            raise OidcRefused("malformed key id")
        issuer = await self.issuer()
        keys = await self._keys_for(kid or "")
        if not keys:
            raise OidcRefused("signed by a key the issuer does not publish")
        last: Exception | None = None
        for key in keys:
            try:
                claims = jwt.decode(token, key.key, algorithms=[alg], audience=self.audience, issuer=issuer,
                                    leeway=OIDC_LEEWAY_S, options={"require": ["exp", "iss", "aud", "sub"]})
                break
            except jwt.InvalidSignatureError as e:
                last = e
            except jwt.ExpiredSignatureError:
                raise OidcRefused("token expired") from None
            except jwt.InvalidAudienceError:
                raise OidcRefused(f"token is not for audience {self.audience!r}") from None
            except jwt.InvalidIssuerError:
                raise OidcRefused("token is from another issuer") from None
            except (jwt.PyJWTError, ValueError, TypeError) as e:
                raise OidcRefused(f"invalid token ({type(e).__name__})") from None
        else:
            raise OidcRefused(f"bad signature ({type(last).__name__})")
        sub = claims.get("sub")
        if not isinstance(sub, str) or (self.subjects and not _subject_allowed(sub, self.subjects)):
            raise OidcRefused(f"subject {str(sub)[:200]!r} is not in EVENTS_OIDC_ALLOWED_SUBJECTS")
        return claims

    # --- the issuer's name and keys
    async def issuer(self) -> str:
        if self._issuer:
            return self._issuer
        async with self._lock:
            if not self._issuer:
                origin = urlsplit(self.jwks_url)
                doc = await self._get_json(f"{origin.scheme}://{origin.netloc}/.well-known/openid-configuration")
                issuer = doc.get("issuer") if isinstance(doc, dict) else None
                if not isinstance(issuer, str) or not issuer:
                    raise OidcUnavailable("the API server's OIDC discovery document names no issuer")
                log.info("CloudEvents OIDC: issuer %s (from the API server's discovery document)", issuer)
                self._issuer = issuer
        return self._issuer

    async def _keys_for(self, kid: str) -> list:
        if self._due(kid):
            async with self._lock:
                if self._due(kid):
                    await self._refresh(self._clock())
        if not self._keys:
            raise OidcUnavailable(self._error or "no signing keys")
        if kid:
            return self._keys.get(kid, [])
        return [k for ks in self._keys.values() for k in ks]       # no kid in the token: try every key

    def _due(self, kid: str) -> bool:
        """Whether the keys should be read again now: expired (EVENTS_OIDC_JWKS_TTL_S), the file changed, or a key
        id not in the set (at most every OIDC_REFETCH_S); never more often than once a second."""
        now = self._clock()
        if now - self._tried_at < 1.0:
            return False
        if self._fetched_at is None or now - self._fetched_at >= self.ttl_s:
            return True
        if self.jwks_file and self._file_changed():
            return True
        unknown = kid not in self._keys if kid else not self._keys
        return unknown and now - self._tried_at >= OIDC_REFETCH_S

    def _file_changed(self) -> bool:
        try:
            st = os.stat(self.jwks_file)
        except OSError:
            return True
        return (st.st_ino, st.st_size, st.st_mtime_ns) != self._stamp

    async def _refresh(self, now: float) -> None:
        self._tried_at = now
        try:
            if self.jwks_file:
                st = os.stat(self.jwks_file)
                with open(self.jwks_file, "rb") as f:
                    data = json.loads(f.read(OIDC_MAX_JWKS))
                self._stamp = (st.st_ino, st.st_size, st.st_mtime_ns)
            else:
                data = await self._get_json(self.jwks_url)
            keys = self._parse(data)
        except (OidcUnavailable, OSError, ValueError) as e:
            self._error = str(e) if isinstance(e, OidcUnavailable) else f"the JWKS cannot be read ({e})"[:300]
            if self._keys:
                log.warning("CloudEvents OIDC: keeping the signing keys read before: %s", self._error)
                self._fetched_at = now - self.ttl_s + OIDC_REFETCH_S       # try again in OIDC_REFETCH_S
            else:
                log.error("CloudEvents OIDC: %s", self._error)
            return
        if sorted(keys) != sorted(self._keys):
            log.info("CloudEvents OIDC: %d signing key(s)", sum(map(len, keys.values())))
        self._keys, self._fetched_at, self._error = keys, now, None

    def _parse(self, data: Any) -> dict[str, list]:
        jwt = self._jwt
        if not isinstance(data, dict) or not isinstance(data.get("keys"), list):
            raise ValueError("not a JWKS")
        keys: dict[str, list] = {}
        for entry in data["keys"]:
            if not isinstance(entry, dict) or entry.get("use", "sig") != "sig":
                continue
            try:
                key = jwt.PyJWK(entry)
            except (jwt.PyJWKError, jwt.InvalidKeyError, ValueError, TypeError, KeyError):
                continue            # a key type or curve we do not verify with: skipped
            keys.setdefault(entry.get("kid") if isinstance(entry.get("kid"), str) else "", []).append(key)
        if not keys:
            raise ValueError("no usable signing key in the JWKS")
        return keys

    async def _get_json(self, url: str) -> Any:
        """GET `url` from the API server with the pod's service-account token and the cluster CA."""
        import httpx
        headers = {"Accept": "application/json"}
        try:
            token = (self._sa_dir / "token").read_text().strip()
            headers["Authorization"] = f"Bearer {token}"
        except OSError:
            pass                        # outside a pod: an issuer that serves its keys openly still works
        ca = self._sa_dir / "ca.crt"
        verify: Any = str(ca) if ca.is_file() else True
        try:
            async with httpx.AsyncClient(timeout=OIDC_FETCH_TIMEOUT_S, verify=verify, follow_redirects=False,
                                         trust_env=False) as client:
                async with client.stream("GET", url, headers=headers) as r:
                    if r.status_code != 200:
                        raise OidcUnavailable(f"{urlsplit(url).path} answered HTTP {r.status_code}")
                    body = bytearray()
                    async for piece in r.aiter_bytes():
                        body += piece
                        if len(body) > OIDC_MAX_JWKS:
                            raise OidcUnavailable(f"{urlsplit(url).path} is larger than {OIDC_MAX_JWKS} bytes")
            return json.loads(body)
        except (httpx.HTTPError, OSError, ValueError) as e:
            raise OidcUnavailable(f"{urlsplit(url).path} cannot be fetched ({type(e).__name__})") from None


def _subject_allowed(sub: str, allowed: frozenset[str]) -> bool:
    """Exact matches, or `prefix*` entries (e.g. `system:serviceaccount:events:*`)."""
    return sub in allowed or any(a.endswith("*") and sub.startswith(a[:-1]) for a in allowed)


def sender_hash(claims: dict[str, Any]) -> str:
    """The identity of a verified sender for the replay record: issuer and subject, not the (refreshed) token."""
    return key_hash(f"oidc\n{claims.get('iss')}\n{claims.get('sub')}")


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
    """ASGI middleware: 401 for a protected path without a valid key (or, on the CloudEvents routes, a valid OIDC
    sender token); the key's (or sender's) hash in the scope otherwise."""

    def __init__(self, app: ASGIApp, keys: ApiKeys, protect_health: bool = False, events_open: bool = False,
                 oidc: OidcVerifier | None = None):
        self.app = app
        self.keys = keys
        self.protect_health = protect_health
        self.events_open = events_open
        self.oidc = oidc

    def protected(self, path: str) -> bool:
        if path == "/v1" or path.startswith("/v1/") or path in TOKENIZER_PATHS:
            return True
        if path in HEALTH_PATHS:
            return self.protect_health
        if path in EVENT_PATHS:
            return not self.events_open
        return False

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not (self.keys.enabled or self.oidc):
            await self.app(scope, receive, send)
            return
        token = bearer(scope)
        if token is not None and self.keys.enabled and self.keys.match(token):
            await self.app({**scope, SCOPE_KEY: key_hash(token)}, receive, send)
            return
        if self.oidc is not None and scope["path"] in EVENT_PATHS:
            await self._sender(scope, receive, send, token)
            return
        if not self.keys.enabled or not self.protected(scope["path"]):
            await self.app(scope, receive, send)
            return
        if token is None:
            response = unauthorized("You didn't provide an API key. Send it in an Authorization header: "
                                    "Authorization: Bearer <key>.", invalid=False)
        else:
            response = unauthorized("Incorrect API key provided.", invalid=True)
        await response(scope, receive, send)

    async def _sender(self, scope: Scope, receive: Receive, send: Send, token: str | None) -> None:
        """A CloudEvents delivery with OIDC configured: a valid sender token passes, anything else is refused."""
        assert self.oidc is not None
        if token is None:
            await unauthorized("CloudEvents need Knative Eventing's OIDC sender token (authentication-oidc) or an "
                               "API key in the Authorization header.", invalid=False)(scope, receive, send)
            return
        try:
            claims = await self.oidc.verify(token)
        except OidcUnavailable as e:
            log.warning("CloudEvents OIDC: cannot verify a delivery: %s", e)
            await errors.error_response("not_ready", "the sender's token cannot be verified right now (the "
                                        "issuer's signing keys are unavailable); retry later")(scope, receive, send)
            return
        except OidcRefused as e:
            log.info("CloudEvents OIDC: refused a delivery: %s", e)
            await unauthorized("Invalid OIDC token or API key.", invalid=True)(scope, receive, send)
            return
        await self.app({**scope, SCOPE_KEY: sender_hash(claims), SCOPE_SENDER: claims["sub"]}, receive, send)


def install(app, config: Config, keys: ApiKeys | None = None, oidc: OidcVerifier | None = None) -> ApiKeys:
    """Add the gate to `app` (call after the body gate, so that a refused request's body is never read)."""
    keys = keys or ApiKeys.from_config(config)
    oidc = oidc or OidcVerifier.from_config(config)
    if keys.enabled:
        log.info("API keys required on /v1/*%s%s", ", /health, /metrics" if config.api_key_protects_health else "",
                 "" if config.events_trust_network else " and CloudEvents")
    if oidc is not None:
        log.info("CloudEvents need an OIDC sender token for audience %r%s", oidc.audience,
                 " or an API key" if keys.enabled else "")
    app.add_middleware(AuthGate, keys=keys, protect_health=config.api_key_protects_health,
                       events_open=config.events_trust_network, oidc=oidc)
    return keys
