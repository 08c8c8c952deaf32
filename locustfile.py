"""Locust load test for the AutoGLM-Phone-9B function's OpenAI-compatible streaming API.

    locust -f locustfile.py --headless -u 100 -r 10 --run-time 5m --host http://autoglm.default.example.com

`--host` may be the service root (requests go to /v1/chat/completions) or already end in /v1. Each user sends
streaming chat requests (a synthetic 1080x2400 phone screenshot on a fraction of them), reads the SSE stream to the
end and waits a think time between requests, like a phone agent stepping through a task. Locust's statistics get:

  POST chat[image] / chat[text]   response time = end-to-end (whole stream), failures by HTTP status
  TTFT chat[image] / chat[text]   custom event: time to the first content/reasoning token
  TPOT chat[image] / chat[text]   custom event: (E2E - TTFT) / (output tokens - 1)

Options (also as environment variables): --image-ratio (LOCUST_IMAGE_RATIO, default 0.3), --max-tokens
(LOCUST_MAX_TOKENS, 256), --model (LOCUST_MODEL, autoglm-phone-9b), --image-format (LOCUST_IMAGE_FORMAT, png),
--think-time "MIN,MAX" seconds (LOCUST_THINK_TIME, "1,3"), --api-key (LOCUST_API_KEY).
The request building and SSE parsing are scripts/loadtest.py's.
"""
from __future__ import annotations

import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent / "scripts"))

from locust import HttpUser, events, task  # noqa: E402

import loadtest  # noqa: E402  (scripts/loadtest.py)

_IMAGES: dict[str, list[str]] = {}


@events.init_command_line_parser.add_listener
def _add_options(parser) -> None:
    parser.add_argument("--image-ratio", type=float, env_var="LOCUST_IMAGE_RATIO", default=0.3,
                        help="fraction of requests that carry a phone screenshot")
    parser.add_argument("--max-tokens", type=int, env_var="LOCUST_MAX_TOKENS", default=256)
    parser.add_argument("--model", type=str, env_var="LOCUST_MODEL", default=loadtest.DEFAULT_MODEL)
    parser.add_argument("--image-format", type=str, env_var="LOCUST_IMAGE_FORMAT", default="png",
                        choices=["png", "jpeg"])
    parser.add_argument("--think-time", type=str, env_var="LOCUST_THINK_TIME", default="1,3",
                        help="MIN,MAX seconds between a user's requests")
    parser.add_argument("--api-key", type=str, env_var="LOCUST_API_KEY", default="")


def _images(fmt: str) -> list[str]:
    if fmt not in _IMAGES:
        _IMAGES[fmt] = loadtest.screenshot_pool(4, fmt.upper())
    return _IMAGES[fmt]


@events.test_start.add_listener
def _prepare(environment, **_kw) -> None:
    opts = environment.parsed_options
    if opts is not None and getattr(opts, "image_ratio", 0) > 0:
        _images(opts.image_format)


def _opt(env, name: str, default):
    opts = getattr(env, "parsed_options", None)
    return getattr(opts, name, default) if opts is not None else default


class ChatUser(HttpUser):
    """One phone agent: a streaming chat request, read to the end, then think time."""

    def on_start(self) -> None:
        env = self.environment
        self.rng = random.Random()
        self.image_ratio = float(_opt(env, "image_ratio", 0.3))
        self.max_tokens = int(_opt(env, "max_tokens", 256))
        self.model = _opt(env, "model", loadtest.DEFAULT_MODEL)
        self.image_format = _opt(env, "image_format", "png")
        lo, _, hi = str(_opt(env, "think_time", "1,3")).partition(",")
        self.think = (float(lo), float(hi or lo))
        key = _opt(env, "api_key", "")
        self.headers = {"Authorization": f"Bearer {key}"} if key else {}
        host = (self.host or "").rstrip("/")
        self.path = "/chat/completions" if host.endswith("/v1") else "/v1/chat/completions"

    def wait_time(self) -> float:
        return self.rng.uniform(*self.think)

    @task
    def chat(self) -> None:
        with_image = self.image_ratio > 0 and self.rng.random() < self.image_ratio
        if with_image:
            body = loadtest.build_payload(self.model, loadtest.agent_prompt(self.rng),
                                          self.rng.choice(_images(self.image_format)), self.max_tokens)
        else:
            body = loadtest.build_payload(self.model, self.rng.choice(loadtest.TEXT_PROMPTS), None, self.max_tokens)
        name = "chat[image]" if with_image else "chat[text]"
        t0 = time.perf_counter()
        acc = loadtest.StreamAccumulator(t0)
        with self.client.post(self.path, json=body, headers=self.headers, stream=True, catch_response=True,
                              name=name) as resp:
            if resp.status_code != 200:
                resp.failure(f"HTTP {resp.status_code}")
                return
            try:
                dec = loadtest.SSEDecoder()
                for raw in resp.iter_content(chunk_size=None, decode_unicode=False):
                    now = time.perf_counter()
                    for data in dec.feed(raw.decode("utf-8", errors="replace")):
                        acc.on_data(now, data)
                now = time.perf_counter()
                for data in dec.flush():
                    acc.on_data(now, data)
            except Exception as e:  # connection dropped mid-stream
                resp.failure(f"stream read failed: {e!r}")
                return
            e2e = time.perf_counter() - t0
            resp.request_meta["response_time"] = e2e * 1000.0        # whole stream, not just headers
            resp.request_meta["response_length"] = acc.output_tokens
            if acc.error or not acc.complete:
                resp.failure(acc.error or "stream ended without [DONE]/finish_reason")
                return
            resp.success()
        fire = self.environment.events.request.fire
        if acc.ttft is not None:
            fire(request_type="TTFT", name=name, response_time=acc.ttft * 1000.0,
                 response_length=acc.output_tokens, exception=None, context={})
            if acc.output_tokens > 1:
                fire(request_type="TPOT", name=name,
                     response_time=(e2e - acc.ttft) / (acc.output_tokens - 1) * 1000.0,
                     response_length=acc.output_tokens, exception=None, context={})
