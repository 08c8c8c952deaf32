"""CloudEvents on `POST /` (and `/events`), in-process against the fake engine. Requests are made by the cloudevents
SDK's own encoders (the 2.x core API that func-python uses, and the 1.x API kept under `cloudevents.v1`), replies are
read back with its decoders; statuses are checked against Knative's retry rules (docs/events.md)."""
from __future__ import annotations

import asyncio
import json
import uuid
from datetime import datetime, timedelta, timezone

import httpx
import openai.types.chat
import pytest
from cloudevents.core.bindings.http import HTTPMessage, from_http, to_binary, to_structured
from cloudevents.core.formats.json import JSONFormat
from cloudevents.core.v1.event import CloudEvent
from cloudevents.v1 import conversion as legacy_conversion
from cloudevents.v1 import http as legacy_http
from conftest import data_url, image_bytes, image_message
from support.fake_engine import FakeEngine, answer_for

from function import metrics
from function.errors import EngineDead, GenerationFailed, Overloaded
from function.events import MAX_ERROR_MESSAGE, EncodedEvent, EventError, RecentReplies

REQUEST_TYPE = "com.autoglm.chat.completion.request"
RESPONSE_TYPE = "com.autoglm.chat.completion.response"
ERROR_TYPE = RESPONSE_TYPE + ".error"
REPLY_SOURCE = "/knative/autoglm-phone-9b"       # Config.ce_reply_source without CE_SOURCE / K_SERVICE
PHONE = "/fleet/phones/pixel-7"
HELLO = {"messages": [{"role": "user", "content": "hello"}]}
FORMAT = JSONFormat()


def request_event(data=HELLO, **attributes) -> CloudEvent:
    return CloudEvent({"type": REQUEST_TYPE, "source": PHONE, "id": str(uuid.uuid4()), **attributes}, data)


async def post(client: httpx.AsyncClient, message: HTTPMessage, path: str = "/") -> httpx.Response:
    return await client.post(path, headers=message.headers, content=message.body)


def decode(r: httpx.Response) -> CloudEvent:
    """The response's event, read by the SDK's decoder (binary or structured, as the response says)."""
    return from_http(HTTPMessage(headers=dict(r.headers), body=r.content), FORMAT)


def assert_reply(r: httpx.Response, request: CloudEvent) -> dict:
    """A 200 reply event in binary mode for `request`; returns its data (the completion)."""
    assert r.status_code == 200, r.text
    assert r.headers["ce-specversion"] == "1.0"        # binary mode: attributes in headers, data is the body
    assert r.headers["content-type"] == "application/json"
    reply = decode(r)
    assert reply.get_type() == RESPONSE_TYPE
    assert reply.get_source() == REPLY_SOURCE
    assert reply.get_id() and reply.get_id() != request.get_id()
    assert reply.get_extension("autoglmrequestid") == request.get_id()
    assert reply.get_extension("autoglmrequestsource") == request.get_source()
    assert reply.get_datacontenttype() == "application/json"
    assert abs(reply.get_time() - datetime.now(timezone.utc)) < timedelta(minutes=1)
    data = reply.get_data()
    assert data == json.loads(r.content)
    openai.types.chat.ChatCompletion.model_validate(data)    # the completion, as the openai SDK reads it
    return data


def assert_error_event(r: httpx.Response, status: int, code: str, request: CloudEvent | None = None,
                       param: str | None = "any") -> dict:
    """A failed delivery: the status Knative's retry rules need, and an error event (structured mode, so that the
    dead-letter sink's knativeerrordata holds all of it)."""
    assert r.status_code == status, r.text
    assert r.headers["content-type"] == "application/cloudevents+json"
    assert not any(k.startswith("ce-") for k in r.headers)
    event = decode(r)
    assert event.get_type() == ERROR_TYPE
    assert event.get_source() == REPLY_SOURCE
    assert event.get_datacontenttype() == "application/json"
    if request is None:
        assert event.get_extension("autoglmrequestid") is None
    else:
        assert event.get_id() != request.get_id()
        assert event.get_extension("autoglmrequestid") == request.get_id()
        assert event.get_extension("autoglmrequestsource") == request.get_source()
    (error,) = event.get_data().values()
    assert set(event.get_data()) == {"error"}
    assert set(error) == {"message", "type", "param", "code"}
    assert error["code"] == code and error["message"]
    if param != "any":
        assert error["param"] == param, error
    return error


def counter(name: str, **labels: str) -> float:
    return metrics.REGISTRY.get_sample_value(name, labels) or 0.0


# --- replies
@pytest.mark.parametrize("path", ["/", "/events"])
async def test_binary_event_gets_a_reply_event(client, engine, path):
    event = request_event({**HELLO, "max_tokens": 3, "temperature": 0})
    r = await post(client, to_binary(event, FORMAT), path)
    data = assert_reply(r, event)
    assert data["object"] == "chat.completion" and data["id"].startswith("chatcmpl-")
    assert data["choices"][0]["finish_reason"] == "length" and data["usage"]["completion_tokens"] == 3
    (call,) = engine.calls
    assert call[0] == data["id"]
    assert call[2].max_tokens == 3 and call[2].greedy
    reasoning, answer = answer_for(call[1])
    assert data["choices"][0]["message"]["content"] == f"<think>{reasoning}</think><answer>{answer}</answer>"[:12]


async def test_structured_event_gets_a_binary_reply(client, engine):
    event = request_event({**HELLO, "return_reasoning": True})
    message = to_structured(event, FORMAT)
    assert message.headers["content-type"] == "application/cloudevents+json"
    data = assert_reply(await post(client, message), event)
    reasoning, answer = answer_for(engine.calls[0][1])
    assert data["choices"][0]["message"] == {"role": "assistant", "content": answer, "reasoning_content": reasoning}


async def test_reply_matches_the_http_api(client, engine):
    """An event's data is served exactly as the same body over POST /v1/chat/completions."""
    body = {**HELLO, "max_tokens": 5, "seed": 3}
    over_http = (await client.post("/v1/chat/completions", json=body)).json()
    event = request_event(body)
    over_events = assert_reply(await post(client, to_binary(event, FORMAT)), event)
    assert engine.calls[0][1:] == engine.calls[1][1:]
    strip = lambda d: {k: v for k, v in d.items() if k not in ("id", "created")}   # noqa: E731
    assert strip(over_events) == strip(over_http)


@pytest.mark.parametrize("mode", ["binary", "structured"])
async def test_the_1x_sdk_api_works_both_ways(client, mode):
    """Producers on the cloudevents 1.x API (cloudevents.conversion / cloudevents.http in 1.x)."""
    event = legacy_http.CloudEvent({"type": REQUEST_TYPE, "source": PHONE}, HELLO)
    encode = legacy_conversion.to_binary if mode == "binary" else legacy_conversion.to_structured
    headers, body = encode(event)
    r = await client.post("/", headers=headers, content=body)
    assert r.status_code == 200, r.text
    reply = legacy_http.from_http(dict(r.headers), r.content)
    assert reply["type"] == RESPONSE_TYPE and reply["source"] == REPLY_SOURCE
    assert reply["autoglmrequestid"] == event["id"] and reply["autoglmrequestsource"] == PHONE
    assert reply["datacontenttype"] == "application/json"
    assert reply.data["object"] == "chat.completion"


async def test_knative_style_binary_request(client):
    """What a broker's dispatcher sends: binary mode, its own extensions and a charset on the content type."""
    event = request_event()
    headers = {"ce-specversion": "1.0", "ce-type": REQUEST_TYPE, "ce-source": PHONE, "ce-id": event.get_id(),
               "ce-time": "2026-01-02T03:04:05.678Z", "ce-knativearrivaltime": "2026-01-02T03:04:05.9Z",
               "ce-traceparent": "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
               "content-type": "application/json; charset=utf-8", "prefer": "reply",
               "k-eventing-http-attr": '["callable"]'}
    r = await client.post("/", headers=headers, content=json.dumps(HELLO).encode())
    assert_reply(r, event)


async def test_images_travel_as_data_urls(client, engine):
    event = request_event({"messages": [image_message(data_url(image_bytes()))]})
    assert_reply(await post(client, to_binary(event, FORMAT)), event)
    assert len(engine.calls[0][1].image_digests) == 1


@pytest.mark.env(K_SERVICE="autoglm", K_REVISION="autoglm-00007", CE_RESPONSE_TYPE="org.example.answer",
                 CE_REQUEST_TYPE="org.example.ask")
async def test_types_and_source_come_from_the_config(client):
    event = request_event(type="org.example.ask")
    r = await post(client, to_binary(event, FORMAT))
    reply = decode(r)
    assert (r.status_code, reply.get_type(), reply.get_source()) == (200, "org.example.answer",
                                                                     "/knative/autoglm/autoglm-00007")
    r = await post(client, to_binary(request_event(), FORMAT))       # the default type is now an unknown one
    assert r.status_code == 400
    error = decode(r)
    assert error.get_type() == "org.example.answer.error" and error.get_source() == "/knative/autoglm/autoglm-00007"
    assert error.get_data()["error"]["code"] == "unsupported_event_type"


@pytest.mark.env(CE_SOURCE="https://models.example.com/autoglm")
async def test_ce_source_overrides_the_reply_source(client):
    r = await post(client, to_binary(request_event(), FORMAT))
    assert decode(r).get_source() == "https://models.example.com/autoglm"


# --- redelivery
async def test_redelivery_replays_the_same_reply(client, engine):
    event = request_event({**HELLO, "temperature": 1.0})     # sampled: a second generation could differ
    replayed_before = counter("autoglm_events_replied_total", replayed="true")
    first = await post(client, to_binary(event, FORMAT))
    assert_reply(first, event)
    again = await post(client, to_structured(event, FORMAT))     # same source + id, whatever the content mode
    assert (again.status_code, again.content) == (200, first.content)
    assert decode(again).get_attributes() == decode(first).get_attributes()      # the reply's own id included
    assert len(engine.calls) == 1
    assert counter("autoglm_events_replied_total", replayed="true") == replayed_before + 1


async def test_same_id_from_another_source_is_another_event(client, engine):
    event = request_event()
    other = request_event(id=event.get_id(), source="/fleet/phones/other")
    a, b = await post(client, to_binary(event, FORMAT)), await post(client, to_binary(other, FORMAT))
    assert_reply(a, event)
    assert_reply(b, other)
    assert decode(a).get_id() != decode(b).get_id() and len(engine.calls) == 2


async def test_concurrent_redelivery_waits_for_the_first(client, engine):
    engine.hold_after = 2
    event = request_event()
    first = asyncio.create_task(post(client, to_binary(event, FORMAT)))
    while not engine.calls:
        await asyncio.sleep(0.01)
    second = asyncio.create_task(post(client, to_binary(event, FORMAT)))
    await asyncio.sleep(0.05)
    assert not first.done() and not second.done()
    engine.release.set()
    a, b = await asyncio.wait_for(asyncio.gather(first, second), 10)
    assert_reply(a, event)
    assert (b.status_code, b.content, b.headers["ce-id"]) == (200, a.content, a.headers["ce-id"])
    assert len(engine.calls) == 1


async def test_a_failed_event_is_computed_again_when_redelivered(client, engine):
    event = request_event()
    engine.fail_before = Overloaded("the queue is full")
    assert_error_event(await post(client, to_binary(event, FORMAT)), 429, "overloaded", event)
    engine.fail_before = None
    assert_reply(await post(client, to_binary(event, FORMAT)), event)
    assert len(engine.calls) == 2


# --- failures, by Knative's retry rules
@pytest.mark.parametrize("headers, body", [
    ({"content-type": "application/json"}, json.dumps(HELLO).encode()),     # a chat request, not an event
    ({}, b""),
    ({"content-type": "text/plain"}, b"hello"),
], ids=["plain-json", "empty", "text"])
async def test_a_request_that_is_not_a_cloudevent_gets_400(client, engine, headers, body):
    before = counter("autoglm_events_received_total", type="invalid")
    r = await client.post("/", headers=headers, content=body)
    error = assert_error_event(r, 400, "not_a_cloudevent")
    assert "CloudEvent" in error["message"] and "/v1/chat/completions" in error["message"]
    assert engine.calls == []
    assert counter("autoglm_events_received_total", type="invalid") == before + 1


def _binary_headers(**override: str | None) -> dict[str, str]:
    h = {"ce-specversion": "1.0", "ce-type": REQUEST_TYPE, "ce-source": PHONE, "ce-id": "e-1",
         "content-type": "application/json"}
    h.update(override)
    return {k: v for k, v in h.items() if v is not None}


def _structured(**attributes) -> bytes:
    event = {"specversion": "1.0", "type": REQUEST_TYPE, "source": PHONE, "id": "e-1", "data": HELLO}
    event.update(attributes)
    return json.dumps({k: v for k, v in event.items() if v is not None}).encode()


STRUCTURED = {"content-type": "application/cloudevents+json"}


@pytest.mark.parametrize("headers, body, says", [
    (_binary_headers(**{"ce-id": None}), json.dumps(HELLO).encode(), "ce-id"),
    (_binary_headers(**{"ce-specversion": None}), json.dumps(HELLO).encode(), "ce-specversion"),
    (_binary_headers(**{"ce-source": None, "ce-type": None}), json.dumps(HELLO).encode(), "ce-source, ce-type"),
    (_binary_headers(**{"ce-specversion": "0.3"}), json.dumps(HELLO).encode(), "specversion '0.3'"),
    (_binary_headers(**{"ce-id": ""}), json.dumps(HELLO).encode(), "id"),
    (_binary_headers(**{"ce-time": "yesterday"}), json.dumps(HELLO).encode(), "binary-mode"),
    (_binary_headers(**{"ce-bad_name": "x"}), json.dumps(HELLO).encode(), "bad_name"),
    (STRUCTURED, b"{not json", "structured-mode"),
    (STRUCTURED, b"[1, 2]", "structured-mode"),
    (STRUCTURED, _structured(id=None), "no id attribute"),
    (STRUCTURED, _structured(specversion="2.0"), "specversion '2.0'"),
    ({"content-type": "application/cloudevents-batch+json"}, b"[" + _structured() + b"]", "batched"),
    ({"content-type": "application/cloudevents+xml"}, b"<event/>", "application/cloudevents+json"),
], ids=["no-id", "no-specversion", "no-source-type", "v0.3", "empty-id", "bad-time", "bad-extension",
        "structured-not-json", "structured-array", "structured-no-id", "structured-v2", "batch", "xml"])
async def test_an_invalid_event_gets_400(client, engine, headers, body, says):
    error = assert_error_event(await client.post("/", headers=headers, content=body), 400, "invalid_event")
    assert says in error["message"], error["message"]
    assert engine.calls == []


async def test_an_unknown_event_type_gets_400(client, engine):
    before = counter("autoglm_events_received_total", type="other")
    event = request_event(type="com.example.something.else")
    error = assert_error_event(await post(client, to_binary(event, FORMAT)), 400, "unsupported_event_type", event,
                               param="type")
    assert REQUEST_TYPE in error["message"]
    assert engine.calls == []
    assert counter("autoglm_events_received_total", type="other") == before + 1


def _raw_binary(body: bytes, content_type: str | None = "application/json") -> dict:
    return {"headers": _binary_headers(**{"content-type": content_type, "ce-id": str(uuid.uuid4())}),
            "content": body}


@pytest.mark.parametrize("send, param, says", [
    (_raw_binary(b'{"messages": [}'), "data", "not valid JSON"),
    (_raw_binary(b"[1, 2]"), "data", "JSON object"),
    (_raw_binary(b""), "data", "no data"),
    (_raw_binary(b"hello", "text/plain"), "datacontenttype", "not JSON"),
    (_raw_binary(b'{"messages": []}'), "messages", "at least 1"),
    (_raw_binary(b'{"messages": [{"role": "user", "content": "x"}], "n": 17}'), "n", "16"),
    (_raw_binary(json.dumps({"messages": [image_message("data:image/png;base64,not-base64!")]}).encode()),
     "messages[0].content[0].image_url", "image"),
    (_raw_binary(json.dumps({**HELLO, "stream": True, "stream_options": {"include_usage": True}}).encode()),
     "stream", "stream: true is not available"),
], ids=["not-json", "array", "no-data", "text-data", "no-messages", "n-2", "bad-image", "stream"])
async def test_invalid_request_data_gets_400_error_event(client, engine, send, param, says):
    r = await client.post("/", **send)
    request = CloudEvent({"id": send["headers"]["ce-id"], "source": PHONE, "type": REQUEST_TYPE})
    error = assert_error_event(r, 400, "invalid_request", request, param=param)
    assert says in error["message"], error["message"]
    assert error["type"] == "invalid_request_error"
    assert engine.calls == []


async def test_stream_false_is_served(client):
    event = request_event({**HELLO, "stream": False})
    assert_reply(await post(client, to_binary(event, FORMAT)), event)


async def test_a_model_this_service_does_not_serve_is_400_not_a_retried_404(client, engine):
    event = request_event({**HELLO, "model": "gpt-4o"})
    assert_error_event(await post(client, to_binary(event, FORMAT)), 400, "model_not_found", event, param="model")


async def test_context_overflow_is_400(client, engine):
    event = request_event({**HELLO, "max_tokens": 5000})
    error = assert_error_event(await post(client, to_binary(event, FORMAT)), 400, "invalid_request", event)
    assert "context length" in error["message"]


@pytest.mark.parametrize("retry_after, header", [(3.2, "3"), (None, "1")])
async def test_overload_is_429_with_retry_after(client, engine, retry_after, header):
    engine.fail_before = Overloaded("the queue is full (MAX_QUEUE_SIZE)", retry_after=retry_after)
    event = request_event()
    r = await post(client, to_binary(event, FORMAT))
    error = assert_error_event(r, 429, "overloaded", event)
    assert r.headers["retry-after"] == header
    assert error["type"] == "rate_limit_error"


async def test_not_ready_is_503_with_retry_after(client, engine):
    engine.ready, engine.message = False, "loading: weights"
    event = request_event()
    r = await post(client, to_binary(event, FORMAT))
    error = assert_error_event(r, 503, "not_ready", event)
    assert r.headers["retry-after"] == "5" and "loading" in error["message"]
    assert engine.calls == []


@pytest.mark.parametrize("setup, status, code", [
    (lambda e: setattr(e, "alive", False), 503, "engine_stopped"),                   # the engine thread died
    (lambda e: setattr(e, "fail_before", GenerationFailed("CUDA out of memory")), 503, "unavailable"),
    (lambda e: setattr(e, "fail_after", (2, EngineDead("engine died"))), 503, "engine_stopped"),
    (lambda e: setattr(e, "finish_as", "error"), 503, "unavailable"),
    (lambda e: setattr(e, "fail_before", RuntimeError("a bug")), 500, "internal"),
], ids=["engine-dead", "generation-failed", "dies-mid-generation", "finish-error", "unexpected"])
async def test_model_failures_are_retried_5xx(client, engine, setup, status, code):
    setup(engine)
    event = request_event()
    r = await post(client, to_binary(event, FORMAT))
    assert_error_event(r, status, code, event)
    assert ("retry-after" in r.headers) == (code == "engine_stopped")   # a stopped engine: retry elsewhere/later


@pytest.mark.env(MAX_REQUEST_BYTES=2048)
async def test_an_event_over_max_request_bytes_is_413(client, engine):
    event = request_event({"messages": [{"role": "user", "content": "x" * 4096}]})
    error = assert_error_event(await post(client, to_binary(event, FORMAT)), 413, "request_too_large")
    assert "MAX_REQUEST_BYTES" in error["message"]
    assert engine.calls == []


async def test_error_events_fit_what_knative_keeps_of_a_failed_response(client):
    """Knative copies the first 1,024 bytes of a failed response into the dead-letter event."""
    event = request_event(type="com.example." + "x" * 3000)
    r = await post(client, to_binary(event, FORMAT))
    error = assert_error_event(r, 400, "unsupported_event_type", event)
    assert len(error["message"]) == MAX_ERROR_MESSAGE and error["message"].endswith("…")
    assert len(r.content) < 1024


async def test_other_methods_are_405(client):
    assert (await client.get("/")).status_code == 405
    assert (await client.put("/events", content=b"")).status_code == 405


async def test_metrics_count_received_replied_and_failed(client, engine):
    def snapshot():
        return (counter("autoglm_events_received_total", type=REQUEST_TYPE),
                counter("autoglm_events_replied_total", replayed="false"),
                counter("autoglm_events_replied_total", replayed="true"),
                counter("autoglm_events_failed_total", reason="invalid_request"),
                counter("autoglm_events_failed_total", reason="overloaded"))
    before = snapshot()
    event = request_event()
    await post(client, to_binary(event, FORMAT))
    await post(client, to_binary(event, FORMAT))
    await post(client, to_binary(request_event({"messages": []}), FORMAT))
    engine.fail_before = Overloaded("full")
    await post(client, to_binary(request_event(), FORMAT))
    assert [a - b for a, b in zip(snapshot(), before)] == [4, 1, 1, 1, 1]
    text = (await client.get("/metrics")).text
    assert 'autoglm_events_failed_total{reason="overloaded"}' in text
    assert 'http_requests_total{method="POST",route="/",status="429"}' in text


# --- RecentReplies, alone
def _reply(body: bytes = b"{}") -> EncodedEvent:
    return EncodedEvent(200, {"ce-id": str(uuid.uuid4())}, body)


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


async def test_recent_replies_expire_after_their_ttl():
    clock, computed = Clock(), []

    async def compute():
        computed.append(1)
        return _reply()

    replies = RecentReplies(ttl_s=60, clock=clock)
    first, replayed = await replies.get_or_compute(("s", "1"), compute)
    assert not replayed
    clock.now += 59
    assert await replies.get_or_compute(("s", "1"), compute) == (first, True)
    clock.now += 1
    again, replayed = await replies.get_or_compute(("s", "1"), compute)
    assert not replayed and again != first and len(computed) == 2


async def test_recent_replies_are_bounded_by_count_and_bytes():
    replies = RecentReplies(max_entries=3, max_bytes=10_000)
    for i in range(5):
        await replies.get_or_compute(("s", str(i)), lambda: asyncio.sleep(0, _reply()))
    assert len(replies) == 3
    assert (await replies.get_or_compute(("s", "0"), lambda: asyncio.sleep(0, _reply())))[1] is False   # evicted
    assert (await replies.get_or_compute(("s", "4"), lambda: asyncio.sleep(0, _reply())))[1] is True
    big = RecentReplies(max_entries=100, max_bytes=3000)
    for i in range(5):
        await big.get_or_compute(("s", str(i)), lambda: asyncio.sleep(0, _reply(b"x" * 1000)))
    assert len(big) == 2
    await big.get_or_compute(("s", "huge"), lambda: asyncio.sleep(0, _reply(b"x" * 5000)))
    assert len(big) == 2        # larger than the whole budget: served, not kept


async def test_recent_replies_share_a_failure_but_do_not_keep_it():
    gate, calls = asyncio.Event(), []

    async def failing():
        calls.append(1)
        await gate.wait()
        raise EventError("overloaded", "full")

    replies = RecentReplies()
    waiters = [asyncio.create_task(replies.get_or_compute(("s", "1"), failing)) for _ in range(3)]
    await asyncio.sleep(0.01)
    assert replies.running == 1
    gate.set()
    results = await asyncio.gather(*waiters, return_exceptions=True)
    assert all(isinstance(e, EventError) and e.code == "overloaded" for e in results) and calls == [1]
    assert len(replies) == 0 and replies.running == 0


async def test_a_computation_outlives_the_request_that_started_it():
    """The broker gave up on an attempt (timeout): the generation finishes and its redelivery gets the reply."""
    gate, calls = asyncio.Event(), []

    async def slow():
        calls.append(1)
        await gate.wait()
        return _reply(b'{"done": true}')

    replies = RecentReplies()
    waiter = asyncio.create_task(replies.get_or_compute(("s", "1"), slow))
    await asyncio.sleep(0.01)
    waiter.cancel()
    await asyncio.gather(waiter, return_exceptions=True)
    gate.set()
    await asyncio.sleep(0.01)
    reply, replayed = await replies.get_or_compute(("s", "1"), slow)
    assert replayed and reply.body == b'{"done": true}' and calls == [1]
