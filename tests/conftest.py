"""Shared fixtures: configs, the fake engine, the app in-process (httpx and the openai SDK over ASGITransport),
and the session's model cache directory (the tiny model is built once per test session)."""
from __future__ import annotations

import base64
import io
import json
from pathlib import Path
from typing import Callable

import httpx
import openai
import pytest
from fastapi import FastAPI
from PIL import Image

from function.api.app import build_app
from function.config import Config

from support.fake_engine import FakeEngine

BASE = "http://testserver"


@pytest.fixture(scope="session")
def model_cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """MODEL_CACHE_DIR for every real-engine test of the session: the tiny model is built into it once."""
    return tmp_path_factory.mktemp("model-cache")


@pytest.fixture(scope="session")
def tiny_dir(model_cache_dir: Path) -> Path:
    """The tiny checkpoint in the session's MODEL_CACHE_DIR, built beforehand (a start that builds it imports
    transformers' modeling for the build, which fresh-process import checks must not count)."""
    from function.tiny_model import build_tiny_model

    return Path(build_tiny_model(Config.from_env({"MODEL_CACHE_DIR": str(model_cache_dir)}).tiny_model_dir))


@pytest.fixture
def make_config() -> Callable[..., Config]:
    """Config from env-style keyword arguments: make_config(MAX_IMAGE_BYTES="100")."""
    return lambda **env: Config.from_env({k: str(v) for k, v in env.items()})


@pytest.fixture
def engine() -> FakeEngine:
    return FakeEngine()


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "env(**settings): settings of the in-process app, e.g. MAX_IMAGE_BYTES=100")


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    """A failing test that used a subprocess server (test_e2e_servers) shows the tail of that server's log."""
    report = yield
    server = getattr(item, "funcargs", {}).get("server")
    if report.failed and hasattr(server, "log"):
        report.sections.append((f"{server.kind} server log (tail)", server.log()[-5000:]))
    return report


@pytest.fixture
def app(request: pytest.FixtureRequest, engine: FakeEngine, make_config) -> FastAPI:
    marker = request.node.get_closest_marker("env")
    return build_app(make_config(**(marker.kwargs if marker else {})), engine)


@pytest.fixture
async def client(app: FastAPI):
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url=BASE) as c:
        yield c


@pytest.fixture
async def oai(app: FastAPI):
    """The real openai SDK, talking to the app in-process."""
    http = httpx.AsyncClient(transport=httpx.ASGITransport(app=app))
    async with openai.AsyncOpenAI(base_url=f"{BASE}/v1", api_key="EMPTY", http_client=http, max_retries=0) as c:
        yield c


def image_bytes(fmt: str = "PNG", size: tuple[int, int] = (32, 48), color=(40, 120, 200), **save) -> bytes:
    img = Image.new("RGBA" if fmt == "PNG" and save.pop("alpha", False) else "RGB", size, color)
    buf = io.BytesIO()
    img.save(buf, format=fmt, **save)
    return buf.getvalue()


def data_url(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def image_message(url: str, text: str = "open the app") -> dict:
    return {"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                        {"type": "text", "text": text}]}


def sse_events(body: str) -> list:
    """The `data:` payloads of an SSE body, JSON-decoded, with "[DONE]" kept as the string."""
    out = []
    for block in body.split("\n\n"):
        if block.startswith("data: "):
            payload = block[len("data: "):]
            out.append(payload if payload == "[DONE]" else json.loads(payload))
        else:
            assert block == "", f"unexpected SSE block {block!r}"
    return out
