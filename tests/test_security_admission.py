"""The 429 decision and the image limits come before any image is decoded (docs/security.md): a full server answers
429 without decompressing a pixel, through the chat route and through the response cache (which loads images for
its key before the route); count and dimension limits refuse from the headers. Decodes are counted by wrapping
`ImageLoader._decode`; the app runs in-process over ASGI with the fake engine holding requests before their first
chunk. Every wait is bounded."""
from __future__ import annotations

import asyncio

import httpx
import pytest
from conftest import data_url, image_bytes, image_message
from test_cache import cached_app, client_of, config
from test_images import png_header_only

from function import images
from function.api.app import build_app
from function.api.serving import Admission
from function.errors import InvalidInput
from function.images import ImageLoader

from support.fake_engine import FakeEngine

MODEL = "autoglm-phone-9b"
FULL = {"MAX_NUM_SEQS": 1, "MAX_QUEUE_SIZE": 1}
"""One slot and a queue of one: two requests waiting for their first chunk fill the server."""


@pytest.fixture
def decodes(monkeypatch) -> list[str]:
    seen: list[str] = []
    real = ImageLoader._decode

    def counting(self, img, param):
        seen.append(param)
        return real(self, img, param)
    monkeypatch.setattr(ImageLoader, "_decode", counting)
    return seen


def admission_of(cfg) -> Admission:
    return images._ADMISSIONS[id(cfg)].__self__


def image_chat(*urls: str, **kw) -> dict:
    content = [{"type": "image_url", "image_url": {"url": u}} for u in urls] + [{"type": "text", "text": "tap"}]
    return {"model": MODEL, "messages": [{"role": "user", "content": content}], "max_tokens": 4, **kw}


async def fill(c: httpx.AsyncClient, engine: FakeEngine, n: int = 2) -> list[asyncio.Task]:
    """`n` text requests that the engine holds before their first chunk."""
    engine.hold_after = 0
    tasks = [asyncio.ensure_future(c.post("/v1/chat/completions", json={
        "model": MODEL, "messages": [{"role": "user", "content": f"hold {i}"}], "max_tokens": 4}))
        for i in range(n)]
    async with asyncio.timeout(5):
        while len(engine.calls) < n:
            await asyncio.sleep(0.01)
    return tasks


@pytest.mark.parametrize("cached", [False, True], ids=["chat route", "through the response cache"])
async def test_a_full_server_answers_429_without_decoding_the_images(engine, decodes, cached):
    cfg = config(**FULL)
    app = build_app(cfg, engine)
    if cached:
        from function.front import install
        install(app, cfg)
    screenshot = data_url(image_bytes(size=(1080, 2400)))
    async with client_of(app) as c:
        held = await fill(c, engine)
        assert admission_of(cfg).full()
        # bounded: were it let through, the engine would hold it like the others
        r = await asyncio.wait_for(c.post("/v1/chat/completions", json=image_chat(screenshot, temperature=0)), 10)
        assert r.status_code == 429, r.text
        assert r.json()["error"]["type"] == "rate_limit_error" and r.headers["retry-after"] == "1"
        assert decodes == []                                     # not one pixel decompressed
        assert len(engine.calls) == 2                            # and the engine never saw it
        # the 400s still come first, also from the headers alone: too many images, too many pixels
        r = await c.post("/v1/chat/completions", json=image_chat(*[screenshot] * 9))
        assert r.status_code == 400 and "MAX_IMAGES_PER_REQUEST" in r.text
        r = await c.post("/v1/chat/completions", json=image_chat(data_url(png_header_only(60_000, 60_000))))
        assert r.status_code == 400 and "MAX_IMAGE_SOURCE_PIXELS" in r.text
        assert decodes == []
        engine.release.set()                                     # the held requests finish
        for t in held:
            assert (await asyncio.wait_for(t, 5)).status_code == 200
        r = await c.post("/v1/chat/completions", json=image_chat(screenshot, temperature=0))
        assert r.status_code == 200, r.text
        assert len(decodes) == 1
    a = admission_of(cfg)
    assert (a.pending, a.running) == (0, 0)


async def test_count_and_dimension_limits_refuse_before_decode(make_config, decodes):
    ldr = ImageLoader(make_config(MAX_IMAGES_PER_REQUEST=2))
    small = data_url(image_bytes())
    with pytest.raises(InvalidInput, match="MAX_IMAGES_PER_REQUEST"):
        await ldr.load_many([(small, f"p{i}") for i in range(3)])
    with pytest.raises(InvalidInput, match="MAX_IMAGE_SOURCE_PIXELS"):
        await ldr.load_many([(small, "p0"), (data_url(png_header_only(70_000, 70_000)), "p1")])
    assert decodes == []
    assert len(await ldr.load_many([(small, "p0"), (small, "p1")])) == 2 and decodes == ["p0", "p1"]


async def test_the_count_returns_to_zero_whatever_happens(engine):
    """Streams, errors before the first chunk, a client gone, n > 1: nothing stays counted."""
    cfg = config()
    app = build_app(cfg, engine)
    a = admission_of(cfg)
    shot = data_url(image_bytes())
    async with client_of(app) as c:
        assert (await c.post("/v1/chat/completions", json=image_chat(shot, n=2))).status_code == 200
        r = await c.post("/v1/chat/completions", json=image_chat(shot, stream=True))
        assert r.status_code == 200 and r.text.endswith("data: [DONE]\n\n")
        from function.errors import Overloaded
        engine.fail_before = Overloaded("the engine's own queue is full", retry_after=1.0)
        assert (await c.post("/v1/chat/completions", json=image_chat(shot))).status_code == 429
        engine.fail_before = None
        bad = await c.post("/v1/chat/completions", json=image_chat("data:image/png;base64,AAAA"))
        assert bad.status_code == 400
    assert (a.pending, a.running) == (0, 0)


def test_the_rule_is_the_engines():
    a = Admission(queue_limit=2, slots=3)
    a.running = 3
    a.pending = 1
    assert not a.full()
    a.pending = 2
    assert a.full()                  # no free slot and the queue is at its limit
    a.running = 1                    # two slots free: room for two more in the queue
    assert not a.full()
    a.pending = 4
    assert a.full()
