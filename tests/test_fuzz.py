"""Fuzzing (issue 9): schemathesis against the app's own OpenAPI schema, and hypothesis against request parsing, with
the app in-process (fake engine, the in-process response cache in front as deployed). Zero 5xx, zero hangs (every
call has a deadline), and the number of cases run is printed in the test output."""
from __future__ import annotations

import json
import math
from concurrent.futures import ThreadPoolExecutor

import pytest
import schemathesis
from support.fake_engine import FakeEngine
from hypothesis import HealthCheck, given, settings, strategies as st
from hypothesis.errors import Unsatisfiable
from pydantic import ValidationError
from starlette.testclient import TestClient

from function.api.app import build_app
from function.api.protocol import MAX_STOP, MAX_STOP_CHARS, ChatCompletionRequest
from function.config import Config
from function.front import install as install_cache

CALL_DEADLINE_S = 10.0


def fuzz(examples: int) -> settings:
    """Deterministic (derandomized, no example database), no per-example deadline (hangs are caught per call)."""
    return settings(max_examples=examples, deadline=None, database=None, derandomize=True,
                    suppress_health_check=list(HealthCheck))


def make_app():
    config = Config.from_env({"MAX_REQUEST_BYTES": str(256 * 1024), "MAX_IMAGE_BYTES": str(64 * 1024)})
    app = build_app(config, FakeEngine(max_model_len=2048))
    install_cache(app, config)
    return app


APP = make_app()
SCHEMA = schemathesis.openapi.from_asgi("/openapi.json", APP)
OPERATIONS = [result.ok() for result in SCHEMA.get_all_operations()]
_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="fuzz-call")


def within_deadline(call):
    """`call()`'s result; a call that does not return in CALL_DEADLINE_S fails the test (a hang)."""
    return _pool.submit(call).result(timeout=CALL_DEADLINE_S)


def report(capsys: pytest.CaptureFixture, line: str) -> None:
    with capsys.disabled():
        print(f"\n{line}", end=" ")


@pytest.mark.parametrize("mode", [schemathesis.GenerationMode.POSITIVE, schemathesis.GenerationMode.NEGATIVE],
                         ids=lambda m: m.value)
def test_schemathesis_finds_no_5xx_and_no_hang(mode, capsys):
    assert {(op.method.upper(), op.path) for op in OPERATIONS} >= {("POST", "/v1/chat/completions"),
                                                                   ("GET", "/v1/models"), ("GET", "/health")}
    statuses: dict[int, int] = {}
    for op in OPERATIONS:
        examples = 120 if op.path == "/v1/chat/completions" else 15

        @fuzz(examples)
        @given(case=op.as_strategy(generation_mode=mode))
        def run(case) -> None:
            response = within_deadline(case.call)
            statuses[response.status_code] = statuses.get(response.status_code, 0) + 1
            assert response.status_code < 500, (case.method, case.path, case.body, response.text[:500])
        try:
            run()
        except Unsatisfiable:                  # negative mode: an operation without parameters has no bad input
            assert mode is schemathesis.GenerationMode.NEGATIVE
    report(capsys, f"schemathesis ({mode.value}): {sum(statuses.values())} cases over {len(OPERATIONS)} "
                   f"operations, statuses {dict(sorted(statuses.items()))}")


# ------------------------------------------------------------------------------------------- request parsing
_any_text = st.text(st.characters(exclude_categories=()), max_size=12)          # surrogates and controls too
_scalars = (st.none() | st.booleans() | st.integers(min_value=-2**80, max_value=2**80)
            | st.floats(allow_nan=True, allow_infinity=True) | _any_text)
_json_values = st.recursive(_scalars, lambda inner: st.lists(inner, max_size=4)
                            | st.dictionaries(_any_text, inner, max_size=4), max_leaves=12)
_parts = st.one_of(
    st.fixed_dictionaries({"type": st.just("text"), "text": _any_text}),
    st.fixed_dictionaries({"type": st.just("image_url"),
                           "image_url": st.fixed_dictionaries({"url": st.sampled_from([
                               "data:image/png;base64,", "data:image/png;base64,!!!", "file:///etc/passwd",
                               "http://169.254.169.254/latest/", "data:text/html;base64,PGgxPg==", ""])})}),
    st.fixed_dictionaries({"type": st.sampled_from(["input_audio", "video", "", None]), "input_audio": _json_values}),
    st.fixed_dictionaries({"type": _json_values}, optional={"text": _json_values, "image_url": _json_values}),
    _json_values)
_messages = st.lists(st.fixed_dictionaries(
    {"role": st.sampled_from(["user", "system", "developer", "assistant", "tool", "", None])},
    optional={"content": st.one_of(_any_text, st.lists(_parts, max_size=3), _json_values), "name": _any_text}),
    max_size=4)
_FIELDS = {
    "model": st.sampled_from(["autoglm-phone-9b", "gpt-4o", ""]) | _any_text,
    "max_tokens": st.integers(min_value=-5, max_value=2**70) | _json_values,
    "max_completion_tokens": st.integers(min_value=-5, max_value=5000),
    "temperature": st.floats(allow_nan=True, allow_infinity=True) | _json_values,
    "top_p": st.floats(allow_nan=True, allow_infinity=True),
    "top_k": st.integers(min_value=-2**70, max_value=2**70),
    "frequency_penalty": st.floats(allow_nan=True, allow_infinity=True),
    "presence_penalty": st.floats(-3, 3),
    "repetition_penalty": st.floats(allow_nan=True, allow_infinity=True),
    "seed": st.integers(min_value=-2**70, max_value=2**70),
    "stop": _any_text | st.lists(_any_text, max_size=20) | _json_values,
    "stop_token_ids": st.lists(st.integers(min_value=-2**70, max_value=2**70), max_size=4),
    "n": st.integers(-2, 3),
    "stream": st.booleans() | _json_values,
    "stream_options": st.fixed_dictionaries({"include_usage": st.booleans()}) | _json_values,
    "logprobs": st.booleans(),
    "tools": _json_values,
    "tool_choice": _json_values,
    "response_format": st.fixed_dictionaries({"type": _any_text}) | _json_values,
    "chat_template_kwargs": st.dictionaries(st.sampled_from(["enable_thinking", "return_reasoning", "messages",
                                                             "tokenize", "x"]) | _any_text, _json_values,
                                            max_size=3) | _json_values,
    "enable_thinking": _json_values,
    "return_reasoning": st.booleans(),
    "ignore_eos": _json_values,
}
_text = st.text(max_size=40)                                                    # valid Unicode, controls included
_VALID_FIELDS = {
    "model": st.just("autoglm-phone-9b"),
    "max_tokens": st.integers(1, 64),
    "temperature": st.floats(0, 2),
    "top_p": st.floats(0.01, 1),
    "top_k": st.integers(-1, 2**62),
    "frequency_penalty": st.floats(-2, 2),
    "presence_penalty": st.floats(-2, 2),
    "repetition_penalty": st.floats(0.01, 1e6),
    "seed": st.integers(-2**63, 2**63 - 1),
    "stop": st.text(min_size=1, max_size=8) | st.lists(st.text(min_size=1, max_size=8), max_size=4),
    "stop_token_ids": st.lists(st.integers(0, 2**40), max_size=4),
    "stream": st.booleans(),
    "stream_options": st.fixed_dictionaries({"include_usage": st.booleans()}),
    "chat_template_kwargs": st.fixed_dictionaries({}, optional={"enable_thinking": st.booleans(),
                                                                "return_reasoning": st.booleans()}),
    "enable_thinking": st.booleans(),
    "return_reasoning": st.booleans(),
    "ignore_eos": st.booleans(),
    "user": _text,
}
_valid_messages = st.lists(st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "assistant"]),
                                                  "content": _text}), min_size=1, max_size=4)
# half well-formed requests (to reach the engine and the stream), half anything around the request's shape
_requests = (st.fixed_dictionaries({"messages": _valid_messages}, optional=_VALID_FIELDS)
             | st.fixed_dictionaries({"messages": _messages | _json_values},
                                     optional={**_FIELDS, **{f"x_{i}": _json_values for i in range(2)}}))


def _utf8(s: str) -> bool:
    try:
        s.encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


def test_hypothesis_request_parsing_accepts_only_what_the_engine_can_take(capsys):
    """A request either fails validation (a 400) or maps to engine parameters the engine can hold: finite numbers,
    integers that fit its tensors, valid Unicode, bounded stop strings."""
    cases = {"valid": 0, "invalid": 0}

    @fuzz(400)
    @given(data=_requests)
    def run(data) -> None:
        try:
            request = ChatCompletionRequest.model_validate(data)
        except ValidationError:
            cases["invalid"] += 1
            return
        cases["valid"] += 1
        params = request.to_sampling_params(16)
        for value in (params.temperature, params.top_p, params.frequency_penalty, params.presence_penalty,
                      params.repetition_penalty):
            assert math.isfinite(value)
        assert -2**63 <= params.top_k < 2**63 and (params.seed is None or -2**63 <= params.seed < 2**63)
        assert params.max_tokens is None or params.max_tokens >= 1
        assert len(params.stop) <= MAX_STOP and all(0 < len(s) <= MAX_STOP_CHARS and _utf8(s) for s in params.stop)
        assert all(_utf8(m.text()) for m in request.messages) and (request.model is None or _utf8(request.model))
        request.template_kwargs()
    run()
    report(capsys, f"hypothesis (request parsing): {sum(cases.values())} requests, {cases}")


_mangle = st.sampled_from(["none", "truncate", "flip", "nan", "utf16", "garbage"])


def _encode(data, how: str, seed: int) -> bytes:
    body = json.dumps(data, allow_nan=True).encode("utf-8", "surrogatepass")
    if how == "truncate":
        return body[:seed % (len(body) + 1)]
    if how == "flip" and body:
        i = seed % len(body)
        return body[:i] + bytes([body[i] ^ 0x80]) + body[i + 1:]
    if how == "nan":
        return body.replace(b"0", b"NaN", 1)
    if how == "utf16":
        return json.dumps(data).encode("utf-16")
    if how == "garbage":
        return bytes((seed * 7919 + i * 104729) % 256 for i in range(seed % 64))
    return body


@pytest.fixture(scope="module")
def asgi_client():
    with TestClient(APP, raise_server_exceptions=False) as client:
        yield client


def test_hypothesis_raw_bodies_get_no_5xx_and_no_hang(asgi_client, capsys):
    statuses: dict[int, int] = {}

    @fuzz(400)
    @given(data=_requests, how=_mangle, seed=st.integers(0, 10**6), stream=st.booleans(),
           content_type=st.sampled_from(["application/json", "text/plain", "application/json; charset=latin-1",
                                         None]))
    def run(data, how: str, seed: int, stream: bool, content_type: str | None) -> None:
        if isinstance(data, dict) and stream:
            data = {**data, "stream": True}
        headers = {"content-type": content_type} if content_type else {}
        body = _encode(data, how, seed)
        r = within_deadline(lambda: asgi_client.post("/v1/chat/completions", content=body, headers=headers))
        statuses[r.status_code] = statuses.get(r.status_code, 0) + 1
        assert r.status_code < 500, (body[:300], r.text[:300])
        if r.status_code >= 400:
            assert set(r.json()["error"]) == {"message", "type", "param", "code"}
        elif r.headers["content-type"].startswith("text/event-stream"):
            assert r.text.endswith("data: [DONE]\n\n")
    run()
    report(capsys, f"hypothesis (raw bodies): {sum(statuses.values())} posted, "
                   f"statuses {dict(sorted(statuses.items()))}")
