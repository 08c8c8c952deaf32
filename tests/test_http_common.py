"""function/http_common.py: the body reader, the disconnect race, the SSE framing, the readiness of stages."""
from __future__ import annotations

import asyncio

import pytest
from support.fake_engine import FakeEngine
from support.fake_speech import FakeSpeech
from pydantic import BaseModel

from function.api.gate import Drain
from function.http_common import (SSE_DONE, Readiness, Replay, read_body, sse_event, unless_disconnected,
                                  until_disconnected)


def receiver(*messages):
    inbox = list(messages)

    async def receive():
        if inbox:
            return inbox.pop(0)
        await asyncio.get_running_loop().create_future()      # nothing more, ever
    return receive


def part(body: bytes, more: bool = True) -> dict:
    return {"type": "http.request", "body": body, "more_body": more}


async def test_read_body_joins_the_parts_and_keeps_the_messages():
    body = await read_body(receiver(part(b"ab"), part(b"cd"), part(b"", more=False)), limit=4)
    assert (body.data, body.size, body.gone, len(body.messages)) == (b"abcd", 4, False, 3)


async def test_read_body_stops_at_the_limit_and_when_the_client_leaves():
    over = await read_body(receiver(part(b"abc"), part(b"de"), part(b"never read")), limit=4)
    assert (over.data, over.size, over.gone, len(over.messages)) == (None, 5, False, 2)
    gone = await read_body(receiver(part(b"ab"), {"type": "http.disconnect"}), limit=4)
    assert (gone.data, gone.gone, gone.messages[-1]["type"]) == (None, True, "http.disconnect")


async def test_read_body_reads_on_past_the_limit_keeping_nothing():
    dropped = await read_body(receiver(part(b"abc"), part(b"de"), part(b"f", more=False)), limit=4, read_on_to=8)
    assert (dropped.data, dropped.size, dropped.gone, dropped.messages) == (None, 6, False, [])
    stopped = await read_body(receiver(part(b"abcde"), part(b"fghij"), part(b"never read")), limit=4, read_on_to=8)
    assert (stopped.data, stopped.size, stopped.messages) == (None, 10, [])
    within = await read_body(receiver(part(b"ab"), part(b"cd", more=False)), limit=4, read_on_to=8)
    assert within.data == b"abcd"
    gone = await read_body(receiver(part(b"abcde"), {"type": "http.disconnect"}), limit=4, read_on_to=8)
    assert (gone.gone, gone.messages) == (True, [{"type": "http.disconnect"}])


async def test_replay_gives_the_read_messages_then_the_channel():
    replay = Replay([part(b"ab"), part(b"cd", more=False)], receiver({"type": "http.disconnect"}))
    assert replay.body == b"abcd"
    scope = replay.replace({"headers": [(b"content-length", b"4"), (b"x", b"y")]}, b"edited")
    assert scope["headers"] == [(b"x", b"y"), (b"content-length", b"6")]
    assert [await replay() for _ in range(2)] == [part(b"edited", more=False), {"type": "http.disconnect"}]
    assert await Replay.of(b"whole", replay)() == part(b"whole", more=False)


async def test_until_disconnected_skips_other_messages():
    await asyncio.wait_for(until_disconnected(receiver(part(b""), {"type": "http.disconnect"})), 1)


async def test_unless_disconnected_gives_the_result_or_gone():
    left = asyncio.Event()

    async def disconnected():
        await left.wait()

    assert await unless_disconnected(asyncio.sleep(0, "done"), disconnected) == "done"
    cancelled = asyncio.Event()

    async def long_work():
        try:
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            cancelled.set()
            raise
    left.set()
    assert await unless_disconnected(long_work(), disconnected, gone="gone") == "gone"
    assert cancelled.is_set()                                  # the loser is cancelled...


async def test_unless_disconnected_leaves_a_shared_future_alone_and_times_out():
    shared = asyncio.get_running_loop().create_future()
    with pytest.raises(TimeoutError):
        await unless_disconnected(shared, None, timeout=0.01, cancel=False)
    assert not shared.done()                                   # ...unless others wait for it too
    shared.set_result(1)
    assert await unless_disconnected(shared, None) == 1


async def test_unless_disconnected_raises_what_the_work_raised():
    async def fails():
        raise ValueError("boom")
    with pytest.raises(ValueError, match="boom"):
        await unless_disconnected(fails(), lambda: asyncio.sleep(60))


def test_sse_event_frames_text_and_models():
    class Chunk(BaseModel):
        n: int
    assert sse_event('{"a":1}') == 'data: {"a":1}\n\n'
    assert sse_event(Chunk(n=2)) == 'data: {"n":2}\n\n'
    assert SSE_DONE == "data: [DONE]\n\n"


def test_readiness_names_the_first_stage_not_ready_and_any_dead_one():
    asr, engine, drain = FakeSpeech(), FakeEngine(ready=False), Drain()
    readiness = Readiness([asr, engine], drain)
    assert readiness.status() == (True, False, "speech model loading: x")
    asr.finish()
    assert readiness.status() == (True, False, "loading: weights")
    engine.finish_loading()
    assert readiness.status() == (True, True, "ready")
    asr.state = (False, False, "speech model failed: boom")
    assert readiness.alive() == (False, "speech model failed: boom")
    drain.begin()
    assert readiness.status() == (False, False, "shutting down")
    assert Readiness([], Drain()).status() == (True, True, "ready")


def test_the_old_import_places_still_work():
    from function.api.app import CLIENT_CLOSED, HttpMetrics
    from function.front import CacheLayer, ModelProxy, build_front_app, install, sse_events   # noqa: F401
    from function.http_common import HttpMetrics as shared
    assert HttpMetrics is shared and CLIENT_CLOSED == 499
