"""CloudEvents authenticated the Knative way (docs/events.md, docs/security.md): Knative Eventing's OIDC sender
identity (feature `authentication-oidc`). Real signed JWTs (RSA and EC keys made here with `cryptography`), a JWKS
file and a loopback JWKS server that plays the API server (discovery document, keys, the pod's token), events built
with the `cloudevents` SDK. Every loop is bounded."""
from __future__ import annotations

import asyncio
import json
import time
import uuid
from pathlib import Path

import httpx
import jwt
import pytest
from cloudevents.core.bindings.http import to_binary, to_structured
from cloudevents.core.formats.json import JSONFormat
from cloudevents.core.v1.event import CloudEvent
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from function.api.app import build_app
from function.api.auth import OidcVerifier
from function.config import Config, ConfigError

from support.fake_engine import FakeEngine
from support.http_stub import StubHandler, serving

ISSUER = "https://kubernetes.default.svc.cluster.local"
AUDIENCE = "autoglm-phone-9b"
SUB = "system:serviceaccount:default:autoglm-chat-requests-oidc-eventing.knative.dev-trigger"
FORMAT = JSONFormat()


def rsa_key():
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def jwk_of(private, kid: str) -> dict:
    alg = "ES256" if isinstance(private, ec.EllipticCurvePrivateKey) else "RS256"
    algo = jwt.algorithms.ECAlgorithm if alg == "ES256" else jwt.algorithms.RSAAlgorithm
    return {**json.loads(algo.to_jwk(private.public_key())), "kid": kid, "alg": alg, "use": "sig"}


def token(private, kid: str = "k1", *, aud=AUDIENCE, iss=ISSUER, sub=SUB, exp_in: float = 600, alg=None,
          **claims) -> str:
    now = int(time.time())
    alg = alg or ("ES256" if isinstance(private, ec.EllipticCurvePrivateKey) else "RS256")
    body = {"iss": iss, "aud": aud, "sub": sub, "iat": now, "nbf": now, "exp": now + int(exp_in), **claims}
    return jwt.encode({k: v for k, v in body.items() if v is not None}, private, algorithm=alg,
                      headers={"kid": kid} if kid else None)


def write_jwks(path: Path, *jwks: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"keys": list(jwks)}))
    tmp.replace(path)           # a new inode, as a ConfigMap volume swaps its files


def event(text: str = "hi", id_: str | None = None, structured: bool = False) -> tuple[dict, bytes]:
    ev = CloudEvent({"type": "com.autoglm.chat.completion.request", "source": "/phone", "id": id_ or str(uuid.uuid4())},
                    {"messages": [{"role": "user", "content": text}], "max_tokens": 4})
    m = (to_structured if structured else to_binary)(ev, FORMAT)
    return dict(m.headers), m.body


def bearer(t: str) -> dict:
    return {"Authorization": f"Bearer {t}"}


@pytest.fixture
def key():
    return rsa_key()


@pytest.fixture
def jwks_file(tmp_path, key) -> Path:
    path = tmp_path / "jwks.json"
    write_jwks(path, jwk_of(key, "k1"))
    return path


def oidc_env(jwks_file: Path, **more) -> dict:
    return {"EVENTS_OIDC_AUDIENCE": AUDIENCE, "EVENTS_OIDC_ISSUER": ISSUER, "EVENTS_OIDC_JWKS_FILE": str(jwks_file),
            **more}


def client(engine: FakeEngine, **env) -> httpx.AsyncClient:
    app = build_app(Config.from_env({k: str(v) for k, v in env.items()}), engine)
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://testserver")


# ============================================================================================ the JWKS file
async def test_a_valid_sender_token_passes_and_every_bad_one_is_a_401(engine, key, jwks_file):
    other = rsa_key()
    hs_confusion = jwt.encode({"iss": ISSUER, "aud": AUDIENCE, "sub": SUB, "exp": int(time.time()) + 600},
                              "a-shared-secret-of-at-least-32-bytes", algorithm="HS256", headers={"kid": "k1"})
    bad = {
        "wrong audience": token(key, aud="some-other-sink"),
        "expired": token(key, exp_in=-120),
        "wrong key": token(other),
        "unknown key id": token(other, kid="k9"),
        "wrong issuer": token(key, iss="https://evil.example"),
        "no subject": token(key, sub=None),
        "no expiry": jwt.encode({"iss": ISSUER, "aud": AUDIENCE, "sub": SUB}, key, algorithm="RS256",
                                headers={"kid": "k1"}),
        "HS256": hs_confusion,
        "alg none": jwt.encode({"iss": ISSUER, "aud": AUDIENCE, "sub": SUB, "exp": int(time.time()) + 600}, None,
                               algorithm="none"),
        "garbage": "not.a.jwt",
        "tampered": token(key)[:-4] + "AAAA",
    }
    async with client(engine, API_KEY="the-key", **oidc_env(jwks_file)) as c:
        for why, t in bad.items():
            h, b = event()
            r = await c.post("/", headers=h | bearer(t), content=b)
            assert r.status_code == 401, (why, r.text)
            assert r.headers["www-authenticate"].startswith("Bearer") and "invalid_token" in r.headers[
                "www-authenticate"]
            assert r.json()["error"]["code"] == "invalid_api_key", why
        h, b = event()
        missing = await c.post("/", headers=h, content=b)
        assert missing.status_code == 401 and "OIDC" in missing.json()["error"]["message"]
        assert not engine.calls                                  # nothing refused reached the model
        for path in ("/", "/events"):
            h, b = event()
            ok = await c.post(path, headers=h | bearer(token(key)), content=b)
            assert ok.status_code == 200, ok.text
            assert ok.headers["ce-type"] == "com.autoglm.chat.completion.response"
        h, b = event(structured=True)
        assert (await c.post("/", headers=h | bearer(token(key)), content=b)).status_code == 200
        h, b = event()                                           # the API key still works for events
        assert (await c.post("/", headers=h | bearer("the-key"), content=b)).status_code == 200
        # a sender token is for CloudEvents only: not an API key
        r = await c.post("/v1/chat/completions", headers=bearer(token(key)),
                         json={"messages": [{"role": "user", "content": "x"}], "max_tokens": 2})
        assert r.status_code == 401
    assert len(engine.calls) == 4


async def test_es256_keys_and_allowed_subjects(engine, tmp_path):
    ec_key = ec.generate_private_key(ec.SECP256R1())
    path = tmp_path / "jwks.json"
    write_jwks(path, jwk_of(ec_key, "ec1"))
    env = oidc_env(path, EVENTS_OIDC_ALLOWED_SUBJECTS=f"{SUB}, system:serviceaccount:pipelines:*")
    async with client(engine, **env) as c:
        for sub, status in ((SUB, 200), ("system:serviceaccount:pipelines:any-sa", 200),
                            ("system:serviceaccount:default:someone-else", 401)):
            h, b = event()
            r = await c.post("/", headers=h | bearer(token(ec_key, "ec1", sub=sub)), content=b)
            assert r.status_code == status, (sub, r.text)


async def test_oidc_without_api_keys_guards_only_the_events(engine, key, jwks_file):
    async with client(engine, **oidc_env(jwks_file)) as c:
        h, b = event()
        assert (await c.post("/", headers=h, content=b)).status_code == 401
        assert (await c.post("/", headers=h | bearer(token(key)), content=b)).status_code == 200
        r = await c.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "x"}],
                                                       "max_tokens": 2})
        assert r.status_code == 200                             # no API keys: the OpenAI routes stay as they were
        assert (await c.get("/health/readiness")).status_code == 200


async def test_a_rotated_key_file_is_read_again(engine, key, jwks_file):
    new = rsa_key()
    async with client(engine, **oidc_env(jwks_file)) as c:
        h, b = event()
        assert (await c.post("/", headers=h | bearer(token(key)), content=b)).status_code == 200
        write_jwks(jwks_file, jwk_of(new, "k2"))                # the issuer rotated its key
        ok = False
        for _ in range(40):                                     # the file is looked at about once a second
            h, b = event()
            r = await c.post("/", headers=h | bearer(token(new, "k2")), content=b)
            if r.status_code == 200:
                ok = True
                break
            assert r.status_code == 401, r.text
            await asyncio.sleep(0.1)
        assert ok
        h, b = event()
        assert (await c.post("/", headers=h | bearer(token(key)), content=b)).status_code == 401   # the old key


async def test_replies_follow_the_sender_not_the_token(engine, key, jwks_file):
    """A redelivery carries a fresh token (tokens expire): same sender, same reply. Another sender reusing the id
    gets its own computation, never the first sender's reply."""
    async with client(engine, **oidc_env(jwks_file)) as c:
        h, b = event("mine", id_="e-1")
        first = await c.post("/", headers=h | bearer(token(key)), content=b)
        again = await c.post("/", headers=h | bearer(token(key, jti="refreshed", exp_in=900)), content=b)
        other = await c.post("/", headers=h | bearer(token(key, sub="system:serviceaccount:x:y")), content=b)
    assert first.status_code == again.status_code == other.status_code == 200
    assert first.content == again.content
    assert len(engine.calls) == 2


# ===================================================================== the API server's keys over HTTP(S)
class FakeApiServer(StubHandler):
    """/.well-known/openid-configuration and /openid/v1/jwks as the API server serves them; counts and records
    the Authorization header of each request."""
    jwks: dict = {"keys": []}
    hits: list = []
    fail = False

    def do_GET(self):  # noqa: N802
        type(self).hits.append((self.path, self.headers.get("Authorization")))
        if type(self).fail:
            self.send_response(500)
            self.end_headers()
            return
        if self.path == "/.well-known/openid-configuration":
            port = self.server.server_address[1]
            body = {"issuer": ISSUER, "jwks_uri": f"http://127.0.0.1:{port}/openid/v1/jwks"}
        elif self.path == "/openid/v1/jwks":
            body = type(self).jwks
        else:
            self.send_response(404)
            self.end_headers()
            return
        self.send_json(body)


@pytest.fixture
def api_server(key):
    FakeApiServer.jwks, FakeApiServer.hits, FakeApiServer.fail = {"keys": [jwk_of(key, "k1")]}, [], False
    with serving(FakeApiServer) as server:
        yield server.url


@pytest.fixture
def sa_dir(tmp_path) -> Path:
    d = tmp_path / "serviceaccount"
    d.mkdir()
    (d / "token").write_text("the-pods-own-token\n")
    return d


async def test_keys_and_issuer_from_the_api_server_with_the_pods_token(key, api_server, sa_dir):
    verifier = OidcVerifier(AUDIENCE, jwks_url=f"{api_server}/openid/v1/jwks", sa_dir=sa_dir)
    for _ in range(5):
        claims = await verifier.verify(token(key))
        assert claims["sub"] == SUB
    paths = [p for p, _ in FakeApiServer.hits]
    assert paths == ["/.well-known/openid-configuration", "/openid/v1/jwks"]     # discovered once, cached
    assert {a for _, a in FakeApiServer.hits} == {"Bearer the-pods-own-token"}
    # a token signed by a new key id fetches the keys again (the issuer rotated), at most every 30 s
    new = rsa_key()
    FakeApiServer.jwks = {"keys": [jwk_of(key, "k1"), jwk_of(new, "k2")]}
    verifier._tried_at -= 31
    assert (await verifier.verify(token(new, "k2")))["sub"] == SUB
    assert [p for p, _ in FakeApiServer.hits].count("/openid/v1/jwks") == 2
    from function.api.auth import OidcRefused
    for _ in range(3):                                          # unknown ids do not make a fetch each
        with pytest.raises(OidcRefused):
            await verifier.verify(token(rsa_key(), "k-unknown"))
    assert [p for p, _ in FakeApiServer.hits].count("/openid/v1/jwks") == 2


async def test_unreachable_keys_are_a_503_the_broker_retries(engine, key, api_server, sa_dir, monkeypatch):
    FakeApiServer.fail = True
    monkeypatch.setattr("function.api.auth.SA_DIR", sa_dir)
    async with client(engine, EVENTS_OIDC_AUDIENCE=AUDIENCE, EVENTS_OIDC_ISSUER=ISSUER,
                      EVENTS_OIDC_JWKS_URL=f"{api_server}/openid/v1/jwks") as c:
        h, b = event()
        r = await c.post("/", headers=h | bearer(token(key)), content=b)
    assert r.status_code == 503 and "retry-after" in r.headers
    assert r.json()["error"]["type"] == "service_unavailable_error"
    assert not engine.calls


# ================================================================================================ settings
@pytest.mark.parametrize("env, name", [
    ({"EVENTS_OIDC_JWKS_TTL_S": "5"}, "EVENTS_OIDC_JWKS_TTL_S"),
    ({"EVENTS_OIDC_JWKS_TTL_S": "nan"}, "EVENTS_OIDC_JWKS_TTL_S"),
    ({"EVENTS_OIDC_JWKS_TTL_S": "1e9"}, "EVENTS_OIDC_JWKS_TTL_S"),
    ({"EVENTS_OIDC_AUDIENCE": "a", "EVENTS_TRUST_NETWORK": "true"}, "EVENTS_TRUST_NETWORK"),
    ({"EVENTS_OIDC_AUDIENCE": "a", "EVENTS_OIDC_JWKS_FILE": "/x"}, "EVENTS_OIDC_ISSUER"),
    ({"EVENTS_OIDC_AUDIENCE": "a", "EVENTS_OIDC_JWKS_URL": "file:///x"}, "EVENTS_OIDC_JWKS_URL"),
])
def test_settings_are_checked_with_the_variable_named(env, name):
    with pytest.raises(ConfigError, match=name):
        Config.from_env(env)


def test_pyjwt_is_imported_only_when_oidc_is_configured():
    import subprocess
    import sys
    code = ("import sys; from function.api.app import build_app; from function.config import Config; "
            "from support.fake_engine import FakeEngine; build_app(Config.from_env({'API_KEY': 'k'}), FakeEngine()); "
            "print('jwt' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         cwd=Path(__file__).parent, env={"PYTHONPATH": str(Path(__file__).parents[1]),
                                                         "PATH": "/usr/bin:/bin"})
    assert out.stdout.strip() == "False", out.stderr[-2000:]
