"""scripts/loadtest.py and locustfile.py against a tiny fake OpenAI streaming server on loopback."""
from __future__ import annotations

import asyncio
import base64
import csv
import io
import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

import loadtest as lt  # noqa: E402

FIRST_TOKEN_DELAY = 0.05
GAP = 0.02


def make_app():
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse, StreamingResponse
    from starlette.routing import Route

    state = {"n": 0, "fail_every": 0, "fail_code": 429, "bodies": []}

    async def chat(request: Request):
        body = await request.json()
        state["n"] += 1
        state["bodies"].append(body)
        if state["fail_every"] and state["n"] % state["fail_every"] == 0:
            return JSONResponse({"error": {"message": "busy", "type": "rate_limit"}}, status_code=state["fail_code"])

        def chunk(delta, finish=None):
            return {"id": "c1", "object": "chat.completion.chunk", "model": body.get("model"),
                    "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}

        async def gen():
            yield f"data: {json.dumps(chunk({'role': 'assistant', 'content': ''}))}\n\n"
            await asyncio.sleep(FIRST_TOKEN_DELAY)
            yield f"data: {json.dumps(chunk({'reasoning_content': 'think'}))}\n\n"
            for word in ("Tap", "(540,", "1200)"):
                await asyncio.sleep(GAP)
                yield f"data: {json.dumps(chunk({'content': word}))}\n\n"
            yield f"data: {json.dumps(chunk({}, 'stop'))}\n\n"
            if (body.get("stream_options") or {}).get("include_usage"):
                usage = {"id": "c1", "object": "chat.completion.chunk", "choices": [],
                         "usage": {"prompt_tokens": 7, "completion_tokens": 4, "total_tokens": 11}}
                yield f"data: {json.dumps(usage)}\n\n"
            yield "data: [DONE]\n\n"

        return StreamingResponse(gen(), media_type="text/event-stream")

    app = Starlette(routes=[Route("/v1/chat/completions", chat, methods=["POST"])])
    app.state.fake = state
    return app


@pytest.fixture(scope="module")
def server():
    import uvicorn

    app = make_app()
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", lifespan="off"))
    th = threading.Thread(target=srv.run, daemon=True)
    th.start()
    deadline = time.time() + 10
    while not srv.started:
        assert time.time() < deadline, "fake server did not start"
        time.sleep(0.01)
    port = srv.servers[0].sockets[0].getsockname()[1]
    yield f"http://127.0.0.1:{port}", app.state.fake
    srv.should_exit = True
    th.join(timeout=5)


@pytest.fixture
def fake(server):
    url, state = server
    state.update(n=0, fail_every=0, fail_code=429, bodies=[])
    return url, state


# ----------------------------------------------------------------------------------------------------------------
# pure parts
# ----------------------------------------------------------------------------------------------------------------

def test_sse_decoder_handles_split_chunks_crlf_comments_and_multiline():
    d = lt.SSEDecoder()
    out = []
    for piece in ['data: {"a"', ':1}\r', '\n\r\n: keep-alive\n\ndata: x\nda', 'ta: y\n\nevent: e\ndata: [DONE]']:
        out += d.feed(piece)
    out += d.flush()
    assert out == ['{"a":1}', "x\ny", "[DONE]"]


def test_stream_accumulator_ttft_itl_from_chunk_times():
    def ch(delta, finish=None):
        return json.dumps({"choices": [{"index": 0, "delta": delta, "finish_reason": finish}]})

    acc = lt.StreamAccumulator(t_start=100.0)
    acc.on_data(100.10, ch({"role": "assistant", "content": ""}))       # role-only: not a token
    acc.on_data(100.50, ch({"reasoning_content": "hmm"}))               # first token: TTFT 0.5
    acc.on_data(100.75, ch({"content": "A"}))                           # ITL 0.25
    acc.on_data(101.25, ch({"content": "B"}))                           # ITL 0.5
    acc.on_data(101.30, ch({}, "stop"))
    acc.on_data(101.31, json.dumps({"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 5}}))
    acc.on_data(101.32, "[DONE]")
    assert acc.ttft == pytest.approx(0.5)
    assert acc.itl == pytest.approx([0.25, 0.5])
    assert acc.output_tokens == 5 and acc.prompt_tokens == 3            # usage wins over chunk count
    assert acc.complete and acc.error is None
    r = lt.result_from_stream(acc, 200, t_end=101.5, t0_bench=99.0)
    assert r.ok and r.e2e == pytest.approx(1.5) and r.t_start == pytest.approx(1.0)
    assert r.tpot == pytest.approx((1.5 - 0.5) / 4)
    # without a usage chunk, tokens = token-bearing chunks
    acc2 = lt.StreamAccumulator(0.0)
    acc2.on_data(1.0, ch({"content": "x"}))
    acc2.on_data(2.0, "[DONE]")
    assert acc2.output_tokens == 1


def test_compute_metrics_counts_failures_by_status():
    ok = lt.RequestResult(ok=True, status=200, ttft=0.1, e2e=1.0, itl=[0.1, 0.3], output_tokens=3)
    res = [ok, ok, lt.RequestResult(ok=False, status=429, error="http_429"),
           lt.RequestResult(ok=False, status=503, error="http_503"),
           lt.RequestResult(ok=False, status=0, error="timeout")]
    m = lt.compute_metrics(res, duration=2.0, percentiles=[50, 99])
    assert m["completed"] == 2 and m["failed"] == 3
    assert m["failures_by_status"] == {"429": 1, "503": 1, "timeout": 1}
    assert m["request_throughput"] == pytest.approx(1.0)
    assert m["output_throughput"] == pytest.approx(3.0)
    assert m["mean_ttft_ms"] == pytest.approx(100.0)
    assert m["median_itl_ms"] == pytest.approx(200.0)
    assert m["mean_tpot_ms"] == pytest.approx(450.0)                    # (1.0 - 0.1) / 2
    text = lt.format_report(m)
    assert "Successful requests:" in text and "P99 TTFT (ms):" in text and "failed (429):" in text


def test_screenshot_is_a_phone_sized_image():
    from PIL import Image

    for fmt in ("PNG", "JPEG"):
        data = lt.make_screenshot(seed=1, fmt=fmt)
        img = Image.open(io.BytesIO(data))
        assert img.size == (1080, 2400) and img.format == fmt
    assert lt.make_screenshot(seed=2) == lt.make_screenshot(seed=2)
    url = lt.to_data_url(b"x", "JPEG")
    assert url.startswith("data:image/jpeg;base64,")


# ----------------------------------------------------------------------------------------------------------------
# against the fake server
# ----------------------------------------------------------------------------------------------------------------

def test_fixed_concurrency_counts_and_429s(fake):
    url, state = fake
    state["fail_every"] = 5
    factory = lt.RequestFactory(max_tokens=16, image_ratio=0.0)
    results, dur = asyncio.run(lt.run_benchmark(url + "/v1", factory, num_requests=20, concurrency=4))
    m = lt.compute_metrics(results, dur)
    assert len(results) == 20 and state["n"] == 20
    assert m["completed"] == 16 and m["failed"] == 4
    assert m["failures_by_status"] == {"429": 4}
    assert m["total_output_tokens"] == 16 * 4                          # from the usage chunks
    for r in results:
        if r.ok:
            assert r.ttft >= FIRST_TOKEN_DELAY                          # the role-only chunk at t~0 is skipped
            # one gap per token after the first; a busy machine may deliver two chunks together, so only the
            # largest gap is sure to show the server's pause
            assert len(r.itl) == 3 and max(r.itl) >= GAP * 0.9
            assert r.e2e >= r.ttft
    body = state["bodies"][0]
    assert body["stream"] is True and body["stream_options"] == {"include_usage": True}
    assert body["model"] == "autoglm-phone-9b" and body["max_tokens"] == 16


def test_poisson_rate_with_images_and_503s(fake, tmp_path):
    url, state = fake
    state.update(fail_every=3, fail_code=503)
    out = tmp_path / "r.json"
    rc = lt.main(["--base-url", url + "/v1", "--request-rate", "100", "--num-requests", "9", "--image-ratio", "1",
                  "--num-images", "1", "--image-format", "jpeg", "--max-tokens", "8", "--json", str(out)])
    assert rc == 0
    doc = json.loads(out.read_text())
    assert doc["completed"] == 6 and doc["failed"] == 3
    assert doc["failures_by_status"] == {"503": 3}
    assert doc["requests_with_image"] == 9 and len(doc["ttfts"]) == 9
    parts = state["bodies"][0]["messages"][0]["content"]
    assert parts[0]["type"] == "text" and parts[1]["type"] == "image_url"
    b64 = parts[1]["image_url"]["url"].split(",", 1)[1]
    from PIL import Image
    assert Image.open(io.BytesIO(base64.b64decode(b64))).size == (1080, 2400)


def test_connection_refused_is_a_failure_not_a_crash():
    factory = lt.RequestFactory()
    results, _ = asyncio.run(lt.run_benchmark("http://127.0.0.1:9/v1", factory, num_requests=2, concurrency=2,
                                              timeout=5))
    assert [r.ok for r in results] == [False, False]
    assert lt.compute_metrics(results, 1.0)["failures_by_status"] == {"connection_error": 2}


def test_sweep_writes_capacity_levels(fake, tmp_path):
    url, _ = fake
    cap = tmp_path / "capacity.json"
    cap.write_text(json.dumps({"source": "old", "cold_start_s": {"samples": [60]},
                               "levels": [{"concurrency": 1, "cpu_util": 0.3}]}))
    assert lt.main(["--base-url", url + "/v1", "--sweep", "1,2", "--num-requests", "4", "--capacity-out",
                    str(cap)]) == 0
    doc = json.loads(cap.read_text())
    assert doc["cold_start_s"] == {"samples": [60]}                     # kept
    assert [lv["concurrency"] for lv in doc["levels"]] == [1, 2]
    assert doc["levels"][0]["cpu_util"] == 0.3                          # kept for the same level
    assert doc["levels"][0]["ttft_s"]["p50"] >= FIRST_TOKEN_DELAY
    assert "loadtest.py --sweep" in doc["source"]
    sys.path.insert(0, str(ROOT / "scripts"))
    import plan_autoscaling as pa
    doc["levels"][1]["cpu_util"] = 0.4
    assert pa.Capacity.from_dict(doc).concurrency == [1.0, 2.0]        # the planner reads what the sweep wrote


def test_locustfile_headless_against_fake_server(fake, tmp_path):
    url, _ = fake
    locust = Path(sys.executable).parent / "locust"
    prefix = tmp_path / "run"
    proc = subprocess.run([str(locust), "-f", str(ROOT / "locustfile.py"), "--headless", "-u", "3", "-r", "3",
                           "--run-time", "3s", "--host", url, "--csv", str(prefix), "--image-ratio", "0.5",
                           "--think-time", "0.05,0.1", "--max-tokens", "8", "--only-summary"],
                          capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = list(csv.DictReader(open(f"{prefix}_stats.csv")))
    types = {(r["Type"], r["Name"]) for r in rows}
    assert ("TTFT", "chat[text]") in types or ("TTFT", "chat[image]") in types
    posts = [r for r in rows if r["Type"] == "POST"]
    assert posts and sum(int(r["Request Count"]) for r in posts) > 0
    assert sum(int(r["Failure Count"]) for r in posts) == 0
    ttft = [r for r in rows if r["Type"] == "TTFT"]
    # TTFT (>= 50 ms by construction) is shorter than the whole stream's response time
    assert all(float(r["Median Response Time"]) >= FIRST_TOKEN_DELAY * 1000 * 0.9 for r in ttft)
