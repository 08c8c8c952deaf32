"""The real server as a subprocess on loopback, under both ways of serving it: func-python (hypercorn, what
`func deploy` images run) and uvicorn (scripts/run_autoglm_server.sh). The real LocalEngine serves the tiny model
(built once per session into a shared MODEL_CACHE_DIR); clients are the openai SDK, LangChain and httpx.

Every server start and request has a timeout, and a failing test shows the server's log (see conftest)."""
from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import httpx
import openai
import pytest
from conftest import data_url, image_bytes, image_message

ROOT = Path(__file__).resolve().parents[1]
MODEL = "autoglm-phone-9b"
START_TIMEOUT_S = 300       # first start builds the tiny model
STOP_TIMEOUT_S = 60
REQUEST_TIMEOUT_S = 120


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def command(kind: str, port: int) -> tuple[list[str], dict[str, str]]:
    if kind == "func-python":
        return ([sys.executable, "-c", "from func_python.http import serve; from function import new; serve(new)"],
                {"LISTEN_ADDRESS": f"127.0.0.1:{port}"})
    return ["bash", str(ROOT / "scripts" / "run_autoglm_server.sh")], {"HOST": "127.0.0.1", "PORT": str(port),
                                                                     "PYTHON": sys.executable}


@dataclass
class Server:
    kind: str
    url: str
    proc: subprocess.Popen
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> int:
        """SIGTERM, as Kubernetes sends it; SIGKILL only if it does not exit in time. Returns the exit code."""
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        return self.proc.returncode


def wait_ready(server: Server) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if server.proc.poll() is not None:
            pytest.fail(f"{server.kind} server exited with {server.proc.returncode}:\n{server.log()[-5000:]}")
        try:
            if httpx.get(f"{server.url}/health/readiness", timeout=5).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    pytest.fail(f"{server.kind} server not ready after {START_TIMEOUT_S} s:\n{server.log()[-5000:]}")


@contextlib.contextmanager
def running_server(kind: str, model_cache_dir: Path, log_dir: Path, settings: dict[str, str]) -> Iterator[Server]:
    """The real server of `kind` as a subprocess on a free loopback port, with the tiny model (MODEL_PATH unset)
    and `settings` as its environment; ready when yielded, stopped after."""
    port = free_port()
    cmd, extra = command(kind, port)
    env = {k: v for k, v in os.environ.items() if k != "MODEL_PATH"}      # empty MODEL_PATH: the tiny model
    env.update(extra, **settings, MODEL_CACHE_DIR=str(model_cache_dir), HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    log_path = log_dir / "server.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
    srv = Server(kind, f"http://127.0.0.1:{port}", proc, log_path)
    try:
        wait_ready(srv)
        yield srv
    finally:
        srv.stop()


@pytest.fixture(scope="module", params=["func-python", "uvicorn"])
def server(request: pytest.FixtureRequest, model_cache_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    with running_server(request.param, model_cache_dir, tmp_path_factory.mktemp(f"server-{request.param}"),
                        {"MAX_NUM_SEQS": "4", "MAX_MODEL_LEN": "4096", "DEFAULT_MAX_TOKENS": "32"}) as srv:
        yield srv


@pytest.fixture
def oai(server: Server):
    with openai.OpenAI(base_url=f"{server.url}/v1", api_key="EMPTY", timeout=REQUEST_TIMEOUT_S,
                       max_retries=0) as c:
        yield c


def test_script_help():
    r = subprocess.run(["bash", str(ROOT / "scripts" / "run_autoglm_server.sh"), "--help"], capture_output=True,
                       text=True, timeout=30)
    assert r.returncode == 0 and "PORT" in r.stdout and "8000" in r.stdout


def test_health_models_and_startup_lines(server: Server):
    r = httpx.get(f"{server.url}/health", timeout=10)
    assert (r.status_code, r.json()) == (200, {"status": "ok", "model": MODEL})
    assert httpx.get(f"{server.url}/health/liveness", timeout=10).status_code == 200
    models = httpx.get(f"{server.url}/v1/models", timeout=10).json()
    assert [m["id"] for m in models["data"]] == [MODEL]
    assert models["data"][0]["max_model_len"] == 4096
    if server.kind == "uvicorn":
        log = server.log()
        for line in ("Started server process", "Waiting for application startup.", "Application startup complete.",
                     f"Uvicorn running on {server.url}"):
            assert line in log, line


def test_openai_non_stream(oai):
    r = oai.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "打开微信"}], max_tokens=8,
                                    temperature=0)
    (choice,) = r.choices
    assert isinstance(choice.message.content, str)
    assert choice.finish_reason in ("stop", "length")
    assert 0 < r.usage.completion_tokens <= 8 and r.usage.prompt_tokens > 0
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    assert r.id.startswith("chatcmpl-") and r.system_fingerprint and r.model == MODEL


def test_openai_greedy_is_deterministic(oai):
    ask = dict(model=MODEL, messages=[{"role": "user", "content": "hello"}], max_tokens=8, temperature=0)
    assert oai.chat.completions.create(**ask).choices[0].message.content == \
        oai.chat.completions.create(**ask).choices[0].message.content


def test_openai_stream_with_usage(oai):
    stream = oai.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hello"}], max_tokens=8,
                                         stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes in (["stop"], ["length"])
    assert chunks[-1].choices == [] and 0 < chunks[-1].usage.completion_tokens <= 8
    assert len({c.id for c in chunks}) == 1


async def test_concurrent_streams_all_complete(server: Server):
    """More concurrent streams than batch slots (MAX_NUM_SEQS=4): all are served, each with its own usage."""
    async with openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key="EMPTY", timeout=REQUEST_TIMEOUT_S,
                                  max_retries=0) as client:
        async def one(i: int) -> tuple[str, int]:
            s = await client.chat.completions.create(
                model=MODEL, messages=[{"role": "user", "content": f"request {i}"}], max_tokens=6, seed=i,
                stream=True, stream_options={"include_usage": True})
            text, usage = "", None
            async for chunk in s:
                text += "".join(c.delta.content or "" for c in chunk.choices)
                usage = chunk.usage or usage
            return text, usage.completion_tokens
        results = await asyncio.wait_for(asyncio.gather(*(one(i) for i in range(10))), REQUEST_TIMEOUT_S)
    assert all(0 < n <= 6 for _, n in results)


def test_openai_image_data_url(oai):
    msg = image_message(data_url(image_bytes("PNG", size=(224, 448))), "点击屏幕上的设置图标")
    r = oai.chat.completions.create(model=MODEL, messages=[msg], max_tokens=4, temperature=0)
    assert r.choices[0].finish_reason in ("stop", "length")
    text_only = oai.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "点击屏幕上的设置图标"}],
                                            max_tokens=4, temperature=0)
    assert r.usage.prompt_tokens > text_only.usage.prompt_tokens + 10       # the image became image tokens


def test_openai_reasoning_split_and_thinking_off(oai):
    ask = dict(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=8, temperature=0)
    default = oai.chat.completions.create(**ask)
    off = oai.chat.completions.create(**ask, extra_body={"return_reasoning": True, "enable_thinking": False})
    assert off.usage.prompt_tokens > default.usage.prompt_tokens    # the empty think block pre-filled in the prompt
    assert "<answer>" not in off.choices[0].message.content and "</answer>" not in off.choices[0].message.content


def test_openai_errors(server: Server, oai):
    with pytest.raises(openai.BadRequestError) as e:
        oai.chat.completions.create(model=MODEL, messages=[image_message("data:image/png;base64,not-base64!")])
    assert e.value.param == "messages[0].content[0].image_url"
    with pytest.raises(openai.BadRequestError) as e:
        oai.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}], max_tokens=5000)
    assert "context length" in str(e.value)
    with pytest.raises(openai.NotFoundError) as e:
        oai.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "x"}])
    assert e.value.code == "model_not_found"
    r = httpx.post(f"{server.url}/v1/chat/completions", content=b"{not json", timeout=10,
                   headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_request"


def test_langchain_exactly_as_the_guide(server: Server):
    from langchain_openai import ChatOpenAI

    llm = ChatOpenAI(model="autoglm-phone-9b", temperature=0.5, base_url=f"{server.url}/v1", api_key="EMPTY",
                     extra_body={"enable_thinking": True, "return_reasoning": True}, streaming=True,
                     timeout=REQUEST_TIMEOUT_S, max_retries=0)
    msg = llm.invoke("你是谁？")
    assert isinstance(msg.content, str)
    assert msg.response_metadata["finish_reason"] in ("stop", "length")
    assert msg.response_metadata["model_name"] == MODEL


def test_metrics(server: Server, oai):
    oai.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}], max_tokens=2)
    r = httpx.get(f"{server.url}/metrics", timeout=10)
    assert r.status_code == 200
    text = r.text
    assert 'http_requests_total{method="POST",route="/v1/chat/completions",status="200"}' in text
    assert "autoglm_generation_tokens_total" in text and "autoglm_time_to_first_token_seconds_count" in text
    assert 'autoglm_model_info{attn_implementation="sdpa",device="cpu",dtype="float32",model="autoglm-phone-9b"' \
        in text
    assert 'autoglm_cold_start_phase_seconds{phase="total"}' in text


def test_sigterm_shuts_down_cleanly(server: Server):
    """Last in the module: stops the server the way Kubernetes does and expects a prompt exit that ran stop()."""
    code = server.stop()
    # uvicorn re-raises the signal once its graceful shutdown is done, so its exit status is the signal's
    assert code == (-signal.SIGTERM if server.kind == "uvicorn" else 0), server.log()[-3000:]
    assert "shutting down the engine" in server.log()
