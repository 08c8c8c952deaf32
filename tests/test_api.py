"""The HTTP/OpenAI layer in-process against the fake engine: raw httpx for the wire format, the real openai SDK for
client compatibility, direct ASGI calls for client disconnects."""
from __future__ import annotations

import asyncio
import json

import httpx
import openai
import pytest
from conftest import data_url, image_bytes, image_message, sse_events
from support.asgi import call_asgi, until
from support.fake_engine import FakeEngine, answer_for

from function.engine.protocol import ChatInput, SamplingParams
from function.errors import EngineDead, GenerationFailed, InvalidInput, NotReady, Overloaded, unready

MODEL = "autoglm-phone-9b"
HELLO = [{"role": "user", "content": "hello"}]


def chat(**kw) -> dict:
    return {"model": MODEL, "messages": HELLO, **kw}


def expected_text(engine: FakeEngine, i: int = 0) -> tuple[str, str, str]:
    """(raw text, reasoning, answer) the fake wrote for its i-th call."""
    reasoning, answer = answer_for(engine.calls[i][1])
    return f"<think>{reasoning}</think><answer>{answer}</answer>", reasoning, answer


def assert_error(r: httpx.Response, status: int, code: str, param: str | None = "any") -> dict:
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error"}
    err = body["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["code"] == code
    assert isinstance(err["message"], str) and err["message"]
    assert isinstance(err["type"], str) and err["type"]
    if param != "any":
        assert err["param"] == param, err
    return err


# --- non-streaming
async def test_non_stream_response_shape(client, engine):
    r = await client.post("/v1/chat/completions", json=chat())
    assert r.status_code == 200
    body = r.json()
    raw, _, _ = expected_text(engine)
    assert body["id"].startswith("chatcmpl-")
    assert body["object"] == "chat.completion"
    assert isinstance(body["created"], int)
    assert body["model"] == MODEL
    assert body["system_fingerprint"].startswith("fp_")
    (choice,) = body["choices"]
    assert choice["index"] == 0
    assert choice["finish_reason"] == "stop"
    assert choice["message"] == {"role": "assistant", "content": raw}   # the model's text as is, tags included
    usage = body["usage"]
    assert usage["completion_tokens"] == len(range(0, len(raw), engine.piece))
    assert usage["prompt_tokens"] == FakeEngine.prompt_tokens(engine.calls[0][1])
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    assert usage["prompt_tokens_details"] == {"cached_tokens": 0}
    assert engine.calls[0][0] == body["id"]


async def test_model_may_be_omitted_and_max_tokens_gives_length(client, engine):
    r = await client.post("/v1/chat/completions", json={"messages": HELLO, "max_tokens": 3})
    assert r.status_code == 200
    body = r.json()
    assert body["choices"][0]["finish_reason"] == "length"
    assert body["usage"]["completion_tokens"] == 3
    assert body["choices"][0]["message"]["content"] == expected_text(engine)[0][:3 * engine.piece]


async def test_sampling_params_reach_the_engine(client, engine):
    r = await client.post("/v1/chat/completions", json=chat(
        temperature=0, top_p=0.5, frequency_penalty=0.5, presence_penalty=-1.5, stop="###", seed=7,
        max_tokens=100, max_completion_tokens=50, top_k=-1, repetition_penalty=1.1, stop_token_ids=[5],
        ignore_eos=True, skip_special_tokens=True, user="u1"))
    assert r.status_code == 200
    params = engine.calls[0][2]
    assert params == SamplingParams(max_tokens=50, temperature=0.0, top_p=0.5, top_k=0, frequency_penalty=0.5,
                                    presence_penalty=-1.5, repetition_penalty=1.1, seed=7, stop=("###",),
                                    stop_token_ids=(5,), ignore_eos=True, skip_special_tokens=True)
    assert params.greedy


async def test_unset_params_keep_engine_defaults(client, engine):
    assert (await client.post("/v1/chat/completions", json=chat(stop=["a", "b"]))).status_code == 200
    assert engine.calls[0][2] == SamplingParams(stop=("a", "b"))


@pytest.mark.env(DEFAULT_MAX_TOKENS=2)
async def test_default_max_tokens_from_config(client, engine):
    r = await client.post("/v1/chat/completions", json=chat())
    assert engine.calls[0][2].max_tokens == 2
    assert r.json()["choices"][0]["finish_reason"] == "length"


async def test_unknown_fields_are_ignored(client):
    r = await client.post("/v1/chat/completions", json=chat(
        metadata={"a": "b"}, store=False, parallel_tool_calls=True, service_tier="auto",
        messages=[{"role": "user", "content": [{"type": "text", "text": "hi", "cache_control": {}}], "x": 1}]))
    assert r.status_code == 200, r.text


async def test_messages_reach_the_engine_in_transformers_format(client, engine):
    r = await client.post("/v1/chat/completions", json=chat(messages=[
        {"role": "developer", "content": "be brief"},
        {"role": "system", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
        {"role": "user", "content": "first"},
        {"role": "assistant", "content": "<think>x</think><answer>y</answer>"},
        {"role": "assistant", "content": None},
        {"role": "user", "content": [{"type": "text", "text": "second"}]},
    ]))
    assert r.status_code == 200, r.text
    assert engine.calls[0][1].messages == [
        {"role": "system", "content": "be brief"},              # the chat template knows no developer role
        {"role": "system", "content": "a\nb"},                  # the template renders system content as a string
        {"role": "user", "content": "first"},
        {"role": "assistant", "content": "<think>x</think><answer>y</answer>"},
        {"role": "assistant", "content": ""},
        {"role": "user", "content": [{"type": "text", "text": "second"}]},
    ]
    assert engine.calls[0][1].chat_template_kwargs == {}


# --- thinking and reasoning
async def test_reasoning_split_non_stream(client, engine):
    r = await client.post("/v1/chat/completions", json=chat(return_reasoning=True))
    _, reasoning, answer = expected_text(engine)
    assert r.json()["choices"][0]["message"] == {"role": "assistant", "content": answer,
                                                 "reasoning_content": reasoning}


async def test_reasoning_split_via_chat_template_kwargs(client, engine):
    r = await client.post("/v1/chat/completions", json=chat(
        chat_template_kwargs={"return_reasoning": True, "enable_thinking": True}))
    _, reasoning, answer = expected_text(engine)
    assert r.json()["choices"][0]["message"]["reasoning_content"] == reasoning
    assert r.json()["choices"][0]["message"]["content"] == answer
    assert engine.calls[0][1].chat_template_kwargs == {"enable_thinking": True}   # return_reasoning is ours


@pytest.mark.parametrize("body", [{"enable_thinking": False},
                                  {"chat_template_kwargs": {"enable_thinking": False}},
                                  {"enable_thinking": False, "chat_template_kwargs": {"enable_thinking": True}}])
async def test_enable_thinking_false_reaches_the_template(client, engine, body):
    assert (await client.post("/v1/chat/completions", json=chat(**body))).status_code == 200
    assert engine.calls[0][1].chat_template_kwargs == {"enable_thinking": False}


async def test_return_reasoning_false_wins_over_template_kwargs(client, engine):
    r = await client.post("/v1/chat/completions", json=chat(return_reasoning=False,
                                                            chat_template_kwargs={"return_reasoning": True}))
    assert r.json()["choices"][0]["message"] == {"role": "assistant", "content": expected_text(engine)[0]}


# --- streaming
async def stream(client, **kw) -> list:
    r = await client.post("/v1/chat/completions", json=chat(stream=True, **kw))
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("text/event-stream")
    return sse_events(r.text)


async def test_stream_wire_format(client, engine):
    events = await stream(client)
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    raw, _, _ = expected_text(engine)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    ids = {c["id"] for c in chunks}
    assert len(ids) == 1 and ids.pop().startswith("chatcmpl-")
    for c in chunks:
        assert c["object"] == "chat.completion.chunk"
        assert c["model"] == MODEL and c["system_fingerprint"].startswith("fp_")
        assert "usage" not in c
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == raw
    assert [c["choices"][0]["finish_reason"] for c in chunks] == [None] * (len(chunks) - 1) + ["stop"]


async def test_stream_include_usage(client, engine):
    events = await stream(client, stream_options={"include_usage": True}, max_tokens=2)
    usage_chunk = events[-2]
    assert usage_chunk["choices"] == []
    assert usage_chunk["usage"]["completion_tokens"] == 2
    assert usage_chunk["usage"]["total_tokens"] == usage_chunk["usage"]["prompt_tokens"] + 2
    assert events[-3]["choices"][0]["finish_reason"] == "length"


async def test_stream_reasoning_split(client, engine):
    engine.piece = 3     # splits the tags across increments
    events = (await stream(client, return_reasoning=True))[:-1]
    _, reasoning, answer = expected_text(engine)
    deltas = [c["choices"][0]["delta"] for c in events[1:]]
    assert "".join(d.get("reasoning_content", "") for d in deltas) == reasoning
    assert "".join(d.get("content", "") for d in deltas) == answer
    assert not any("<" in d.get("content", "") + d.get("reasoning_content", "") for d in deltas)


async def test_stream_refusal_is_an_http_error(client, engine):
    engine.fail_before = Overloaded("the server is at capacity", retry_after=2.0)
    r = await client.post("/v1/chat/completions", json=chat(stream=True))
    assert_error(r, 429, "overloaded")
    assert r.headers["retry-after"] == "2"


async def test_stream_failure_sends_error_event_then_done(client, engine):
    engine.fail_after = (2, GenerationFailed("CUDA out of memory"))
    events = await stream(client)
    assert events[-1] == "[DONE]"
    err = events[-2]["error"]
    assert err["code"] == "unavailable" and "out of memory" in err["message"]
    assert all("choices" in e for e in events[:-2])


async def test_abort_finish_is_an_error(client, engine):
    engine.finish_as = "abort"
    assert_error(await client.post("/v1/chat/completions", json=chat()), 503, "unavailable")
    events = await stream(client)
    assert events[-2]["error"]["code"] == "unavailable" and events[-1] == "[DONE]"


# --- images
async def test_image_reaches_the_engine_as_pil(client, engine):
    r = await client.post("/v1/chat/completions", json=chat(messages=[image_message(data_url(image_bytes()))]))
    assert r.status_code == 200, r.text
    got: ChatInput = engine.calls[0][1]
    (msg,) = got.messages
    assert [p["type"] for p in msg["content"]] == ["image", "text"]
    img = msg["content"][0]["image"]
    assert img.mode == "RGB" and img.size == (32, 48) and img.getpixel((0, 0)) == (40, 120, 200)
    assert len(got.image_digests) == 1
    assert "I see 1 image(s)" in r.json()["choices"][0]["message"]["content"]


async def test_same_pixels_same_digest_across_encodings(client, engine):
    png, webp = image_bytes("PNG"), image_bytes("WEBP", lossless=True)
    for url in (data_url(png), data_url(webp, "image/webp"), data_url(webp, "image/png")):  # declared type ignored
        r = await client.post("/v1/chat/completions", json=chat(messages=[image_message(url)]))
        assert r.status_code == 200, r.text
    assert len({c[1].image_digests[0] for c in engine.calls}) == 1


async def test_image_url_as_bare_string(client, engine):
    msg = {"role": "user", "content": [{"type": "image_url", "image_url": data_url(image_bytes())}]}
    assert (await client.post("/v1/chat/completions", json=chat(messages=[msg]))).status_code == 200
    assert len(engine.calls[0][1].image_digests) == 1


# --- bad input: every one a 4xx with the OpenAI error shape
async def test_malformed_json(client):
    r = await client.post("/v1/chat/completions", content=b'{"model": "x", "messages": [',
                          headers={"content-type": "application/json"})
    err = assert_error(r, 400, "invalid_request", None)
    assert "JSON" in err["message"]


async def test_body_without_content_type_is_read_as_json(client):
    r = await client.post("/v1/chat/completions", content=json.dumps(chat()).encode())
    assert r.status_code == 200, r.text


async def test_body_of_another_content_type(client):
    r = await client.post("/v1/chat/completions", content=json.dumps(chat()).encode(),
                          headers={"content-type": "application/x-www-form-urlencoded"})
    assert "Content-Type: application/json" in assert_error(r, 400, "invalid_request", None)["message"]


async def test_tools_with_tool_choice_none_are_accepted(client):
    r = await client.post("/v1/chat/completions", json=chat(tool_choice="none",
                                                            tools=[{"type": "function", "function": {"name": "f"}}]))
    assert r.status_code == 200, r.text


async def test_body_not_an_object(client):
    assert_error(await client.post("/v1/chat/completions", json=[1, 2]), 400, "invalid_request")


@pytest.mark.parametrize("body,param", [
    (chat(messages="hello"), "messages"),
    (chat(messages=[]), "messages"),
    ({"model": MODEL}, "messages"),
    (chat(messages=[{"role": "tool", "content": "x"}]), "messages[0].role"),
    (chat(messages=[{"role": "user"}]), "messages[0]"),
    (chat(messages=[{"role": "user", "content": 5}]), "messages[0].content"),
    (chat(messages=[{"role": "user", "content": [{"type": "input_video", "input_video": {}}]}]),
     "messages[0].content[0]"),
    (chat(messages=[{"role": "user", "content": [{"type": "input_audio", "input_audio": {}}]}]),
     "messages[0].content[0].input_audio.data"),
    (chat(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]),
     "messages[0].content[0].image_url.url"),
    (chat(messages=[{"role": "system", "content": [{"type": "image_url", "image_url": "data:,"}]}]), "messages[0]"),
    (chat(temperature="hot"), "temperature"),
    (chat(temperature=2.5), "temperature"),
    (chat(top_p=0), "top_p"),
    (chat(top_p=1.5), "top_p"),
    (chat(frequency_penalty=-3), "frequency_penalty"),
    (chat(presence_penalty=2.1), "presence_penalty"),
    (chat(max_tokens=0), "max_tokens"),
    (chat(max_completion_tokens=-1), "max_completion_tokens"),
    (chat(max_tokens=1.5), "max_tokens"),
    (chat(n=17), "n"),
    (chat(n=0), "n"),
    (chat(stop=["a", ""]), "stop"),
    (chat(stop=5), "stop"),
    (chat(stream="sometimes"), "stream"),
    (chat(logprobs=True, top_logprobs=21), "top_logprobs"),
    (chat(top_logprobs=2), "top_logprobs"),
    (chat(response_format={"type": "json_object"}), "response_format"),
    (chat(tools=[{"type": "function", "function": {"name": "f"}}]), "tools"),
    (chat(chat_template_kwargs={"add_generation_prompt": False}), "chat_template_kwargs"),
    (chat(seed=2**64), "seed"),
])
async def test_invalid_request_400(client, engine, body, param):
    assert_error(await client.post("/v1/chat/completions", json=body), 400, "invalid_request", param)
    assert engine.calls == []


async def test_n_over_the_limit_message_is_clear(client):
    err = assert_error(await client.post("/v1/chat/completions", json=chat(n=17)), 400, "invalid_request", "n")
    assert "16" in err["message"]


@pytest.mark.parametrize("url,fragment", [
    ("data:image/png;base64,iVBORw0KGgo$$$", "base64"),
    ("data:image/png,rawbytes", "base64"),
    (data_url(b"this is not an image at all"), "not a PNG, JPEG or WebP"),
    (data_url(image_bytes("GIF"), "image/gif"), "not a PNG, JPEG or WebP"),
    ("ftp://example.com/x.png", "data: URL"),
    ("https://example.com/x.png", "disabled"),
    ("file:///etc/passwd", "disabled"),
])
async def test_bad_image_400(client, engine, url, fragment):
    r = await client.post("/v1/chat/completions", json=chat(messages=[HELLO[0], image_message(url)]))
    err = assert_error(r, 400, "invalid_request", "messages[1].content[0].image_url")
    assert fragment in err["message"]
    assert engine.calls == []


@pytest.mark.env(MAX_IMAGE_BYTES=1000)
async def test_image_over_byte_cap(client):
    big = image_bytes("PNG", size=(200, 200), compress_level=0)
    r = await client.post("/v1/chat/completions", json=chat(messages=[image_message(data_url(big))]))
    assert "MAX_IMAGE_BYTES" in assert_error(r, 400, "invalid_request", "messages[0].content[0].image_url")["message"]


@pytest.mark.env(MAX_IMAGE_SOURCE_PIXELS=10000)
async def test_image_over_pixel_cap(client):
    r = await client.post("/v1/chat/completions",
                          json=chat(messages=[image_message(data_url(image_bytes(size=(101, 100))))]))
    err = assert_error(r, 400, "invalid_request", "messages[0].content[0].image_url")
    assert "101x100" in err["message"] and "MAX_IMAGE_SOURCE_PIXELS" in err["message"]


@pytest.mark.env(MAX_IMAGES_PER_REQUEST=2)
async def test_too_many_images(client, engine):
    url = data_url(image_bytes())
    msgs = [image_message(url), {"role": "assistant", "content": "ok"}, image_message(url), image_message(url)]
    err = assert_error(await client.post("/v1/chat/completions", json=chat(messages=msgs)), 400, "invalid_request",
                       "messages")
    assert "3 images" in err["message"] and engine.calls == []


async def test_prompt_plus_max_tokens_over_context(client, engine):
    engine.max_model_len = 100
    err = assert_error(await client.post("/v1/chat/completions", json=chat(max_tokens=200)), 400,
                       "invalid_request", "messages")
    assert "context length" in err["message"]


async def test_engine_invalid_input_keeps_its_param(client, engine):
    engine.fail_before = InvalidInput("max_tokens is too large", param="max_tokens")
    assert_error(await client.post("/v1/chat/completions", json=chat()), 400, "invalid_request", "max_tokens")


async def test_unknown_model_404(client, engine):
    err = assert_error(await client.post("/v1/chat/completions", json=chat(model="gpt-4o")), 404,
                       "model_not_found", "model")
    assert "gpt-4o" in err["message"] and engine.calls == []
    assert_error(await client.get("/v1/models/gpt-4o"), 404, "model_not_found", "model")


async def test_not_ready_503_with_retry_after(client, engine):
    engine.ready, engine.message = False, "loading: weights"
    for body in (chat(), chat(stream=True)):
        r = await client.post("/v1/chat/completions", json=body)
        err = assert_error(r, 503, "not_ready")
        assert "loading: weights" in err["message"]
        assert int(r.headers["retry-after"]) > 0
    assert engine.calls == []


async def test_dead_engine_is_a_retriable_503(client, engine):
    """A stopped engine turns liveness false and the container is restarted: clients, the activator and the
    broker retry a 503 with Retry-After (a 500 they would not)."""
    engine.alive, engine.ready, engine.message = False, False, "failed: OSError: no weights"
    r = await client.post("/v1/chat/completions", json=chat())
    err = assert_error(r, 503, "engine_stopped")
    assert "no weights" in err["message"] and int(r.headers["retry-after"]) > 0


def test_unready_is_one_rule_for_every_stage():
    """A stage whose thread died may still say ready: not alive wins (EngineDead), then not ready (NotReady)."""
    assert unready("the model", (True, True, "ready")) is None
    dead = unready("the model", (False, True, "engine stopped: boom"))
    assert isinstance(dead, EngineDead) and "boom" in dead.message
    loading = unready("the speech model", (True, False, "speech model loading: x"))
    assert isinstance(loading, NotReady) and loading.retry_after == 5.0 and "speech model" in loading.message


async def test_engine_not_ready_raised_by_generate(client, engine):
    engine.fail_before = NotReady("shutting down", retry_after=7)
    r = await client.post("/v1/chat/completions", json=chat())
    assert_error(r, 503, "not_ready")
    assert r.headers["retry-after"] == "7"


async def test_unexpected_error_is_a_500_in_the_openai_shape(app, engine):
    engine.fail_before = RuntimeError("a bug")      # not a ServiceError
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)   # Starlette re-raises for the server log
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
        err = assert_error(await c.post("/v1/chat/completions", json=chat()), 500, "internal")
    assert "a bug" not in err["message"]             # no internals leak to clients


async def test_unexpected_error_mid_stream_is_an_error_event(client, engine):
    engine.fail_after = (1, RuntimeError("a bug"))
    events = await stream(client)
    assert events[-2]["error"]["code"] == "internal" and events[-1] == "[DONE]"


# chat and text completions share one rule for failures (function/api/generation.py); the two routes once answered
# the same bug mid-stream differently (internal vs engine_stopped)
GENERATE_ROUTES = {"/v1/chat/completions": chat, "/v1/completions": lambda **kw: {"model": MODEL, "prompt": [1, 2, 3],
                                                                                   **kw}}
FAILURES = [(RuntimeError("a bug"), 500, "internal"), (EngineDead("engine died"), 503, "engine_stopped"),
            (GenerationFailed("CUDA out of memory"), 503, "unavailable")]


@pytest.mark.parametrize("route", GENERATE_ROUTES)
@pytest.mark.parametrize("error, status, code", FAILURES, ids=lambda v: getattr(v, "__name__", None))
async def test_a_failure_mid_stream_is_the_same_error_event_on_every_route(client, engine, route, error, status,
                                                                            code):
    engine.fail_after = (1, error)
    r = await client.post(route, json=GENERATE_ROUTES[route](stream=True))
    assert r.status_code == 200, r.text
    events = sse_events(r.text)
    assert events[-1] == "[DONE]" and events[-2]["error"]["code"] == code
    assert "a bug" not in events[-2]["error"]["message"]             # no internals leak to clients
    assert engine.aborted == []                # the failed request ended on the engine; nothing left to abort


@pytest.mark.parametrize("route", GENERATE_ROUTES)
@pytest.mark.parametrize("error, status, code", FAILURES, ids=lambda v: getattr(v, "__name__", None))
async def test_a_failure_before_the_first_chunk_is_the_same_status_on_every_route(app, engine, route, error,
                                                                                  status, code):
    engine.fail_before = error
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)   # Starlette re-raises for the server log
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
        r = await c.post(route, json=GENERATE_ROUTES[route]())
    err = assert_error(r, status, code)
    assert "a bug" not in err["message"]
    assert ("retry-after" in r.headers) == (code == "engine_stopped")


async def test_ignored_fields_are_logged_at_debug(client, caplog):
    with caplog.at_level("DEBUG", logger="function.api.protocol"):
        assert (await client.post("/v1/chat/completions", json=chat(store=False))).status_code == 200
    assert "['store']" in caplog.text


async def test_unknown_route_and_method(client):
    assert_error(await client.get("/v1/nope"), 404, "not_found")
    assert_error(await client.get("/v1/chat/completions"), 405, "method_not_allowed")


# --- the real openai SDK
async def test_openai_sdk_non_stream(oai, engine):
    r = await oai.chat.completions.create(model=MODEL, messages=HELLO, temperature=0, seed=1)
    raw, _, _ = expected_text(engine)
    assert r.choices[0].message.content == raw
    assert r.choices[0].finish_reason == "stop"
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    assert r.id.startswith("chatcmpl-") and r.system_fingerprint


async def test_openai_sdk_stream_with_reasoning_and_usage(oai, engine):
    s = await oai.chat.completions.create(model=MODEL, messages=HELLO, stream=True,
                                          stream_options={"include_usage": True},
                                          extra_body={"return_reasoning": True})
    content, reasoning, usage, finish = "", "", None, None
    async for chunk in s:
        if chunk.usage:
            usage = chunk.usage
        for c in chunk.choices:
            content += c.delta.content or ""
            reasoning += getattr(c.delta, "reasoning_content", None) or ""
            finish = c.finish_reason or finish
    _, want_reasoning, want_answer = expected_text(engine)
    assert (content, reasoning, finish) == (want_answer, want_reasoning, "stop")
    assert usage.completion_tokens > 0


async def test_openai_sdk_image(oai, engine):
    r = await oai.chat.completions.create(model=MODEL, messages=[image_message(data_url(image_bytes("JPEG"),
                                                                                       "image/jpeg"))])
    assert "I see 1 image(s)" in r.choices[0].message.content
    assert engine.calls[0][1].messages[0]["content"][0]["image"].size == (32, 48)


async def test_openai_sdk_errors(oai, engine):
    with pytest.raises(openai.BadRequestError) as e:
        await oai.chat.completions.create(model=MODEL, messages=[image_message("data:image/png;base64,AAAA")])
    assert e.value.status_code == 400 and e.value.code == "invalid_request"
    assert e.value.param == "messages[0].content[0].image_url"
    with pytest.raises(openai.NotFoundError) as e:
        await oai.chat.completions.create(model="gpt-4o", messages=HELLO)
    assert e.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError):
        await oai.chat.completions.create(model=MODEL, messages=HELLO, n=17)
    engine.fail_before = Overloaded("full")
    with pytest.raises(openai.RateLimitError):
        await oai.chat.completions.create(model=MODEL, messages=HELLO)
    engine.fail_before = None
    engine.ready = False
    with pytest.raises(openai.InternalServerError) as e:
        await oai.chat.completions.create(model=MODEL, messages=HELLO)
    assert e.value.status_code == 503


async def test_openai_sdk_mid_stream_error(oai, engine):
    engine.fail_after = (3, GenerationFailed("step failed"))
    s = await oai.chat.completions.create(model=MODEL, messages=HELLO, stream=True)
    with pytest.raises(openai.APIError, match="step failed"):
        async for _ in s:
            pass


async def test_openai_sdk_models(oai):
    models = await oai.models.list()
    assert [m.id for m in models.data] == [MODEL]


# --- client disconnects abort the engine request


@pytest.mark.parametrize("stream", [False, True])
async def test_disconnect_before_first_token_aborts(app, engine, stream):
    engine.hold_after = 0                             # the engine never produces a token
    disconnect, sent = asyncio.Event(), []
    task = asyncio.create_task(call_asgi(app, chat(stream=stream), disconnect, sent))
    await until(lambda: engine.calls)
    disconnect.set()
    await task
    rid = engine.calls[0][0]
    assert rid in engine.aborted
    assert sent[0]["status"] == 499


async def test_stream_disconnect_mid_stream_aborts(app, engine):
    engine.hold_after = 2                             # two pieces, then the stream waits for the next one
    disconnect, sent = asyncio.Event(), []
    task = asyncio.create_task(call_asgi(app, chat(stream=True), disconnect, sent))
    await until(lambda: sum(m["type"] == "http.response.body" for m in sent) >= 3)   # role chunk + 2 pieces
    disconnect.set()
    await task
    rid = engine.calls[0][0]
    assert rid in engine.aborted
    assert sent[0]["status"] == 200
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body").decode()
    assert "[DONE]" not in body


# --- models, health, metrics
async def test_models(client, engine):
    r = await client.get("/v1/models")
    assert r.status_code == 200
    (card,) = r.json()["data"]
    assert r.json()["object"] == "list"
    assert card["id"] == MODEL and card["object"] == "model" and card["max_model_len"] == engine.max_model_len
    assert (await client.get(f"/v1/models/{MODEL}")).json()["id"] == MODEL


async def test_health(client, engine):
    r = await client.get("/health")
    assert (r.status_code, r.json()) == (200, {"status": "ok", "model": MODEL})
    engine.ready, engine.message = False, "loading: weights"
    r = await client.get("/health")
    assert r.status_code == 503 and r.headers["retry-after"]
    assert r.json() == {"status": "loading", "model": MODEL, "message": "loading: weights"}
    engine.alive, engine.message = False, "failed: boom"
    assert (await client.get("/health")).json()["status"] == "failed"


async def test_liveness_and_readiness_like_func_python(client, engine):
    r = await client.get("/health/readiness")
    assert (r.status_code, r.text) == (200, "ready")
    engine.ready, engine.message = False, "loading: weights"
    r = await client.get("/health/readiness")
    assert (r.status_code, r.text, r.headers["content-type"].split(";")[0]) == (500, "loading: weights",
                                                                                "text/plain")
    assert (await client.get("/health/liveness")).status_code == 200
    engine.alive = False
    assert (await client.get("/health/liveness")).status_code == 500


async def test_metrics(client, engine):
    await client.post("/v1/chat/completions", json=chat())
    await client.post("/v1/chat/completions", json=chat(n=3))
    await client.get("/v1/nope")
    r = await client.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    text = r.text
    assert 'http_requests_total{method="POST",route="/v1/chat/completions",status="200"}' in text
    assert 'http_requests_total{method="POST",route="/v1/chat/completions",status="400"}' in text
    assert 'http_requests_total{method="GET",route="other",status="404"}' in text
    for name in ("http_request_duration_seconds_bucket", "http_requests_in_flight", "autoglm_prompt_tokens_total",
                 "autoglm_generation_tokens_total", "autoglm_time_to_first_token_seconds_bucket",
                 "autoglm_inter_token_latency_seconds_bucket", "autoglm_queue_depth", "autoglm_running_requests",
                 "autoglm_engine_busy_ratio", "autoglm_prefix_cache_hit_tokens_total",
                 "autoglm_prefix_cache_queried_tokens_total", "autoglm_gpu_memory_used_bytes",
                 "autoglm_gpu_memory_reserved_bytes"):
        assert name in text, name


async def test_openapi_schema_documents_the_chat_route(client):
    spec = (await client.get("/openapi.json")).json()
    op = spec["paths"]["/v1/chat/completions"]["post"]
    assert {"200", "400", "404", "429", "503"} <= set(op["responses"])

