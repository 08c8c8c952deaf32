"""CloudEvents against the function as `func deploy` images run it: func-python's server (hypercorn) in a subprocess on
loopback, the real LocalEngine serving the tiny model (the session's MODEL_CACHE_DIR, built once). Events are made
by the cloudevents SDK as a Knative broker sends them; replies are read back by its decoder."""
from __future__ import annotations

import json
import os
import subprocess
import uuid
from pathlib import Path

import httpx
import pytest
from cloudevents.core.bindings.http import HTTPMessage, from_http, to_binary, to_structured
from cloudevents.core.formats.json import JSONFormat
from cloudevents.core.v1.event import CloudEvent
from test_e2e_servers import REQUEST_TIMEOUT_S, ROOT, Server, command, free_port, wait_ready

REQUEST_TYPE = "com.autoglm.chat.completion.request"
RESPONSE_TYPE = "com.autoglm.chat.completion.response"
SOURCE = "/knative/autoglm-phone-9b/autoglm-phone-9b-00001"
FORMAT = JSONFormat()


@pytest.fixture(scope="module")
def server(model_cache_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    port = free_port()
    cmd, extra = command("func-python", port)
    env = {k: v for k, v in os.environ.items() if k not in ("MODEL_PATH", "CE_SOURCE")}
    env.update(extra, MODEL_CACHE_DIR=str(model_cache_dir), MAX_NUM_SEQS="2", MAX_MODEL_LEN="4096",
               DEFAULT_MAX_TOKENS="8", HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1",
               K_SERVICE="autoglm-phone-9b", K_REVISION="autoglm-phone-9b-00001")     # as Knative sets them
    log_path = tmp_path_factory.mktemp("events-server") / "server.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
    srv = Server("func-python", f"http://127.0.0.1:{port}", proc, log_path)
    try:
        wait_ready(srv)
        yield srv
    finally:
        srv.stop()


def send(server: Server, message: HTTPMessage) -> httpx.Response:
    return httpx.post(f"{server.url}/", headers=message.headers, content=message.body, timeout=REQUEST_TIMEOUT_S)


def request_event(**data) -> CloudEvent:
    body = {"messages": [{"role": "user", "content": "打开微信"}], "max_tokens": 4, **data}
    return CloudEvent({"type": REQUEST_TYPE, "source": "/fleet/phones/1", "id": str(uuid.uuid4())}, body)


def assert_reply(r: httpx.Response, request: CloudEvent) -> CloudEvent:
    assert r.status_code == 200, r.text
    assert r.headers["ce-specversion"] == "1.0" and r.headers["content-type"] == "application/json"
    reply = from_http(HTTPMessage(headers=dict(r.headers), body=r.content), FORMAT)
    assert reply.get_type() == RESPONSE_TYPE and reply.get_source() == SOURCE
    assert reply.get_id() != request.get_id()
    assert reply.get_extension("autoglmrequestid") == request.get_id()
    assert reply.get_extension("autoglmrequestsource") == request.get_source()
    assert reply.get_datacontenttype() == "application/json"
    data = reply.get_data()
    assert data["object"] == "chat.completion" and data["model"] == "autoglm-phone-9b"
    (choice,) = data["choices"]
    assert isinstance(choice["message"]["content"], str) and choice["finish_reason"] in ("stop", "length")
    assert 0 < data["usage"]["completion_tokens"] <= 4 and data["usage"]["prompt_tokens"] > 0
    return reply


def test_binary_event_gets_a_reply_event(server: Server):
    event = request_event(temperature=0)
    assert_reply(send(server, to_binary(event, FORMAT)), event)


def test_structured_event_gets_a_reply_event(server: Server):
    event = request_event(temperature=0)
    assert_reply(send(server, to_structured(event, FORMAT)), event)


def test_redelivery_gets_the_same_reply(server: Server):
    event = request_event(temperature=1.0)      # sampled: only a replay makes the two answers equal
    first = send(server, to_binary(event, FORMAT))
    assert_reply(first, event)
    again = send(server, to_binary(event, FORMAT))
    assert (again.status_code, again.headers["ce-id"], again.content) == (200, first.headers["ce-id"],
                                                                          first.content)


def test_failures_are_error_events(server: Server):
    event = request_event(stream=True)
    r = send(server, to_binary(event, FORMAT))
    assert r.status_code == 400 and r.headers["content-type"] == "application/cloudevents+json"
    error = from_http(HTTPMessage(headers=dict(r.headers), body=r.content), FORMAT)
    assert error.get_type() == RESPONSE_TYPE + ".error" and error.get_extension("autoglmrequestid") == event.get_id()
    assert error.get_data()["error"]["param"] == "stream"
    r = httpx.post(f"{server.url}/", json={"messages": [{"role": "user", "content": "hi"}]}, timeout=10)
    assert r.status_code == 400
    assert json.loads(r.content)["data"]["error"]["code"] == "not_a_cloudevent"
    metrics = httpx.get(f"{server.url}/metrics", timeout=10).text
    assert f'autoglm_events_received_total{{type="{REQUEST_TYPE}"}}' in metrics
    assert 'autoglm_events_failed_total{reason="not_a_cloudevent"} 1.0' in metrics
