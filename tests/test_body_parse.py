"""Request bodies are parsed off the event loop when large (issue 19, docs/security.md): the POST routes read the raw
body and run `json.loads` + `model_validate` in a worker thread above `INLINE_BYTES`, at most `PARSE_THREADS` at a
time, with exactly the errors FastAPI gave when it parsed them. In-process over ASGI with the fake engine; "while
it is parsed" is made certain by holding the validation (a wrapped `model_validate`) until the probe has answered,
so the tests assert on what happened, not on how long it took. Every wait is bounded."""
from __future__ import annotations

import asyncio
import json
import threading

import httpx
import pytest
from fastapi import FastAPI
from starlette.requests import Request

from function.api import errors
from function.api.app import INLINE_BYTES, PARSE_THREADS, BodyParser, build_app
from function.api.protocol import ChatCompletionRequest, CompletionRequest, DetokenizeRequest, TokenizeRequest
from function.config import Config

from support.asgi import until
from support.fake_engine import FakeEngine

MODEL = "autoglm-phone-9b"
HELLO = [{"role": "user", "content": "hello"}]
WAIT_S = 10.0
"""Bound on every wait for the other side (never reached when the code is right)."""


def client_of(app: FastAPI) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://testserver", timeout=60)


def big_chat(n: int = 95_000, item: int = 250) -> bytes:
    """A valid chat request of about n * item bytes: a long list of strings in a field the server ignores (extra
    fields are allowed), within MAX_JSON_ELEMENTS (each item and its comma count) and MAX_REQUEST_BYTES."""
    return json.dumps({"model": MODEL, "messages": HELLO, "max_tokens": 4, "padding": ["x" * item] * n}).encode()


class HeldValidation:
    """Wraps ChatCompletionRequest.model_validate: notes the thread each call runs on and, once `hold()` is called,
    keeps every call waiting for `release` (bounded), noting whether the release came."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch):
        self.threads: list[int] = []
        self.released: list[bool] = []
        self.held = False
        self.release = threading.Event()
        real = ChatCompletionRequest.model_validate

        def validate(cls, obj, **kw):
            self.threads.append(threading.get_ident())
            if self.held:
                self.released.append(self.release.wait(WAIT_S))
            return real(obj, **kw)
        monkeypatch.setattr(ChatCompletionRequest, "model_validate", classmethod(validate))

    def hold(self) -> HeldValidation:
        self.held = True
        return self


@pytest.fixture
def held(monkeypatch) -> HeldValidation:
    return HeldValidation(monkeypatch)


# ------------------------------------------------------------------------------------------ off the event loop
async def test_a_probe_answers_while_a_25_mb_body_is_parsed(held):
    """The big body's validation is held in its worker thread until the liveness probe has answered: inline, the
    probe could not answer (the loop would be inside the held call) and the hold would end unreleased."""
    body = big_chat()
    assert 20e6 < len(body) < 30e6
    held.hold()
    loop_thread = threading.get_ident()
    async with client_of(build_app(Config.from_env({}), FakeEngine())) as c:
        big = asyncio.ensure_future(c.post("/v1/chat/completions", content=body,
                                           headers={"content-type": "application/json"}))
        await until(lambda: held.threads or big.done(), WAIT_S)
        assert not big.done(), big.result().text
        probe = await c.get("/health/liveness")
        models = await c.get("/v1/models")
        answered_first = not big.done()                # both answered while the big body was still being parsed
        held.release.set()
        r = await asyncio.wait_for(big, WAIT_S * 3)
    assert probe.status_code == 200 and models.status_code == 200 and answered_first
    assert held.released == [True]                     # the probe's answer, not the bound, ended the hold
    assert held.threads and held.threads[0] != loop_thread
    assert r.status_code == 200, r.text                # and the big request itself was served in full
    assert r.json()["choices"][0]["message"]["content"]


async def test_small_bodies_are_parsed_inline_and_large_ones_in_a_thread(held):
    loop_thread = threading.get_ident()
    small = json.dumps({"model": MODEL, "messages": HELLO, "max_tokens": 4}).encode()
    large = big_chat(n=INLINE_BYTES // 100 + 1, item=100)
    assert len(small) <= INLINE_BYTES < len(large)
    async with client_of(build_app(Config.from_env({}), FakeEngine())) as c:
        for body in (small, large):
            r = await c.post("/v1/chat/completions", content=body, headers={"content-type": "application/json"})
            assert r.status_code == 200, r.text
    assert len(held.threads) == 2
    assert held.threads[0] == loop_thread and held.threads[1] != loop_thread


async def test_parse_threads_are_bounded_and_the_loop_stays_free(held):
    """More large bodies than PARSE_THREADS: that many are parsed at once, the others wait for a thread (without
    holding one), a probe still answers, and all are served once the parses go on."""
    n = PARSE_THREADS + 2
    body = big_chat(n=INLINE_BYTES // 50, item=100)
    held.hold()
    app = build_app(Config.from_env({}), FakeEngine())
    limiter = app.state.body_parser.limiter
    async with client_of(app) as c:
        tasks = [asyncio.ensure_future(c.post("/v1/chat/completions", content=body)) for _ in range(n)]
        await until(lambda: limiter.statistics().tasks_waiting == n - PARSE_THREADS
                    and len(held.threads) == PARSE_THREADS or any(t.done() for t in tasks), WAIT_S)
        assert not any(t.done() for t in tasks)
        assert limiter.statistics().borrowed_tokens == PARSE_THREADS and len(held.threads) == PARSE_THREADS
        assert (await c.get("/health/liveness")).status_code == 200
        held.release.set()
        responses = await asyncio.wait_for(asyncio.gather(*tasks), WAIT_S * 3)
    assert [r.status_code for r in responses] == [200] * n
    assert held.released == [True] * n and len(held.threads) == n


# ------------------------------------------------------------------------------------------ the same errors
def reference_app() -> FastAPI:
    """The routes as they were: FastAPI parses the body itself (a model parameter), with the app's handlers."""
    app = FastAPI(strict_content_type=False)
    errors.install(app)
    for path, model in ROUTES.items():
        async def route(body) -> dict:
            return {"parsed": True}
        route.__annotations__ = {"body": model, "return": dict}
        app.add_api_route(path, route, methods=["POST"])
    return app


ROUTES = {"/v1/chat/completions": ChatCompletionRequest, "/v1/completions": CompletionRequest,
          "/tokenize": TokenizeRequest, "/detokenize": DetokenizeRequest}
JSON = "application/json"
CASES = [
    ("/v1/chat/completions", b'{"model": "x", "messages": [', JSON),          # truncated
    ("/v1/chat/completions", b'{"model": "x", "messages": [}', JSON),
    ("/v1/chat/completions", b"", JSON),                                       # empty
    ("/v1/chat/completions", b"", None),
    ("/v1/chat/completions", b"[1, 2]", JSON),                                 # not an object
    ("/v1/chat/completions", b'"hello"', JSON),
    ("/v1/chat/completions", b"null", JSON),
    ("/v1/chat/completions", b'{"a": "\xff"}', JSON),                         # not UTF-8
    ("/v1/chat/completions", b'{"max_tokens": ' + b"1" * 5000 + b"}", JSON),   # an int too long to convert
    ("/v1/chat/completions", json.dumps({"model": MODEL, "messages": HELLO}).encode(), "text/plain"),
    ("/v1/chat/completions", json.dumps({"model": MODEL, "messages": "hi"}).encode(), "application/vnd.x+json"),
    ("/v1/chat/completions", json.dumps({"model": MODEL, "messages": "hello"}).encode(), None),
    ("/v1/chat/completions", json.dumps({"model": MODEL, "messages": []}).encode(), JSON),
    ("/v1/chat/completions", json.dumps({"model": MODEL}).encode(), JSON),
    ("/v1/chat/completions", json.dumps({"messages": [{"role": "tool", "content": "x"}]}).encode(), JSON),
    ("/v1/chat/completions", json.dumps({"messages": [{"role": "user", "content": 5}]}).encode(), JSON),
    ("/v1/chat/completions", json.dumps({"messages": [{"role": "user", "content": [
        {"type": "text", "text": "a"}, {"type": "image_url"}, {"type": "video"}]}]}).encode(), JSON),
    ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "hi"}], "temperature": NaN}', JSON),
    ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "hi"}], "top_p": 1e999}', JSON),
    ("/v1/chat/completions", json.dumps({"messages": HELLO, "top_logprobs": 3}).encode(), JSON),
    ("/v1/chat/completions", json.dumps({"messages": HELLO, "tools": [{"type": "function"}]}).encode(), JSON),
    ("/v1/chat/completions", json.dumps({"messages": HELLO, "max_tokens": "many", "n": 0}).encode(), JSON),
    ("/v1/completions", json.dumps({"prompt": 5}).encode(), JSON),
    ("/v1/completions", json.dumps({"prompt": []}).encode(), JSON),
    ("/v1/completions", b'{"prompt": "a",', JSON),
    ("/tokenize", json.dumps({}).encode(), JSON),                                # the model validator
    ("/tokenize", json.dumps({"prompt": "a", "messages": HELLO}).encode(), JSON),
    ("/detokenize", json.dumps({"tokens": [-1]}).encode(), JSON),
    ("/detokenize", json.dumps({"tokens": "x"}).encode(), None),
]


def padded(body: bytes) -> bytes:
    """The same body over INLINE_BYTES (leading whitespace is JSON), so that it is parsed in a worker thread."""
    return body and b" " * (INLINE_BYTES + 1) + body


@pytest.mark.parametrize("size", ["inline", "thread"])
@pytest.mark.parametrize("path,body,content_type", CASES, ids=range(len(CASES)))
async def test_errors_are_exactly_fastapis(path, body, content_type, size):
    body = padded(body) if size == "thread" else body
    headers = {"content-type": content_type} if content_type else {}
    async with client_of(reference_app()) as ref, client_of(build_app(Config.from_env({}), FakeEngine())) as c:
        expected = await ref.post(path, content=body, headers=headers)
        got = await c.post(path, content=body, headers=headers)
    assert expected.status_code == 400, expected.text        # each case fails in parsing or validation
    assert (got.status_code, got.json()) == (expected.status_code, expected.json())
    error = got.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["code"] == "invalid_request"


async def test_a_client_gone_before_its_body_is_a_499_not_a_400():
    sent: list[dict] = []

    async def receive():
        return {"type": "http.disconnect"}

    async def send(message):
        sent.append(message)

    app = build_app(Config.from_env({}), FakeEngine())
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
             "path": "/v1/chat/completions", "raw_path": b"/v1/chat/completions", "root_path": "",
             "query_string": b"", "headers": [(b"content-type", b"application/json")],
             "client": ("127.0.0.1", 1), "server": ("testserver", 80)}
    await asyncio.wait_for(app(scope, receive, send), WAIT_S)
    assert sent[0]["type"] == "http.response.start" and sent[0]["status"] == 499


async def test_the_parser_keeps_the_body_limit_without_the_gate():
    """Behind the request gate a body over MAX_REQUEST_BYTES never reaches a route; the parser still refuses it
    (through http_common.read_body) rather than parsing it."""
    chunks = [{"type": "http.request", "body": b"[" * 600, "more_body": True},
              {"type": "http.request", "body": b"]" * 600, "more_body": False}]

    async def receive():
        return chunks.pop(0)
    request = Request({"type": "http", "method": "POST", "path": "/", "headers": []}, receive)
    with pytest.raises(Exception) as e:
        await BodyParser(1024)(request, DetokenizeRequest)
    assert getattr(e.value, "status_code", None) == 413 and "1024" in e.value.detail


# ------------------------------------------------------------------------------------------ the schema
async def test_openapi_still_documents_each_request_model():
    async with client_of(build_app(Config.from_env({}), FakeEngine())) as c:
        spec = (await c.get("/openapi.json")).json()
        docs = await c.get("/docs")
    assert docs.status_code == 200
    schemas = spec["components"]["schemas"]
    for path, model in ROUTES.items():
        body = spec["paths"][path]["post"]["requestBody"]
        assert body["required"] is True
        assert body["content"]["application/json"]["schema"] == {"$ref": f"#/components/schemas/{model.__name__}"}
        assert set(model.model_fields) <= set(schemas[model.__name__]["properties"]), path
    assert {"ChatMessage", "TextPart", "ImagePart", "AudioPart", "ImageURL"} <= set(schemas)   # what they use
    refs = {r.rsplit("/", 1)[1] for r in _refs(spec)}
    assert refs <= set(schemas), refs - set(schemas)                                          # all resolve


def _refs(node):
    if isinstance(node, dict):
        for k, v in node.items():
            if k == "$ref":
                yield v
            else:
                yield from _refs(v)
    elif isinstance(node, list):
        for v in node:
            yield from _refs(v)
