#!/usr/bin/env python3
"""Load generator for an OpenAI-compatible streaming chat endpoint (the AutoGLM-Phone-9B function, or anything else).

Sends `POST {base_url}/chat/completions` with `stream: true` and `stream_options.include_usage`, text-only or with a
synthetic 1080x2400 phone screenshot attached as a data URL, either at a fixed number of concurrent clients
(`--concurrency N`) or as an open-loop Poisson arrival process (`--request-rate R`). It parses the SSE stream itself
and reports the way vLLM's benchmarks/benchmark_serving.py does: successful/failed requests (failures by HTTP status),
duration, request and token throughput, TTFT / TPOT / ITL / E2E latency mean, median and percentiles.

    python scripts/loadtest.py --base-url http://localhost:8080/v1 --concurrency 8 --num-requests 200 \
        --image-ratio 0.5 --max-tokens 256 --json bench/results/c8.json

    # capacity sweep, written in the format scripts/plan_autoscaling.py reads (see docs/autoscaling.md)
    python scripts/loadtest.py --base-url http://.../v1 --sweep 1,2,4,8,16,32 --num-requests 64 \
        --capacity-out bench/capacity.json

Definitions (same as vLLM's benchmark_serving):
  TTFT  time from sending the request to the first chunk whose delta carries non-empty `content` or
        `reasoning_content` (the role-only first chunk does not count).
  TPOT  per request, (E2E - TTFT) / (output_tokens - 1); output_tokens from the final usage chunk
        (`completion_tokens`), or the number of token-bearing chunks when the server sends no usage.
  ITL   every gap between consecutive token-bearing chunks, pooled over all requests.
  E2E   time from sending the request to the end of the stream.

The module is importable (tests and locustfile.py use it): `SSEDecoder`, `StreamAccumulator`, `build_payload`,
`make_screenshot`, `send_request`, `run_benchmark`, `compute_metrics`, `format_report`.
"""
from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import math
import random
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Sequence

DEFAULT_MODEL = "autoglm-phone-9b"

TASKS = [
    "Open the Settings app and turn on Wi-Fi.",
    "Search for 'coffee near me' in the maps app and open the first result.",
    "Send the message 'running 10 minutes late' to Alice.",
    "Add milk and eggs to the shopping list.",
    "Open the latest email and archive it.",
    "Set an alarm for 7:30 tomorrow morning.",
    "Find the order history in the shopping app.",
    "Turn the screen brightness down to 30 percent.",
]

TEXT_PROMPTS = [
    "Explain in two sentences what an Android accessibility service can do.",
    "List three steps to enable developer options on an Android phone.",
    "What does the 'Back' gesture do on Android? Answer briefly.",
    "Summarise the purpose of a phone-use agent in one paragraph.",
]


# ----------------------------------------------------------------------------------------------------------------
# Synthetic phone screenshots
# ----------------------------------------------------------------------------------------------------------------

_APP_NAMES = ["Settings", "Messages", "Maps", "Mail", "Shop", "Clock", "Notes", "Music"]
_WORDS = ("account network battery display sound privacy location storage wallpaper bluetooth update "
          "order cart coffee train ticket weather calendar photo camera contact message draft inbox").split()


def make_screenshot(seed: int = 0, width: int = 1080, height: int = 2400, fmt: str = "PNG",
                    quality: int = 85) -> bytes:
    """A synthetic phone UI (status bar, app bar, search box, list cards with icons and text, a button, a
    navigation bar) rendered with PIL and encoded as PNG or JPEG. Deterministic for a given seed."""
    from PIL import Image, ImageDraw, ImageFont

    rng = random.Random(seed)
    s = width / 1080.0

    def font(px: float):
        try:
            return ImageFont.load_default(size=max(8, int(px * s)))
        except TypeError:  # Pillow without FreeType sizes
            return ImageFont.load_default()

    bg = (rng.randint(235, 255), rng.randint(235, 255), rng.randint(235, 255))
    accent = (rng.randint(0, 120), rng.randint(60, 180), rng.randint(150, 255))
    img = Image.new("RGB", (width, height), bg)
    d = ImageDraw.Draw(img)
    # status bar
    d.rectangle([0, 0, width, int(80 * s)], fill=(20, 20, 20))
    d.text((int(40 * s), int(18 * s)), f"{rng.randint(0, 23):02d}:{rng.randint(0, 59):02d}", fill="white",
           font=font(40))
    d.rectangle([width - int(150 * s), int(25 * s), width - int(60 * s), int(55 * s)], outline="white",
                width=max(1, int(3 * s)))
    d.rectangle([width - int(147 * s), int(28 * s), width - int(147 * s) + int(rng.randint(20, 84) * s),
                 int(52 * s)], fill="white")
    # app bar
    app = rng.choice(_APP_NAMES)
    d.rectangle([0, int(80 * s), width, int(260 * s)], fill=accent)
    d.text((int(60 * s), int(135 * s)), app, fill="white", font=font(64))
    # search box
    d.rounded_rectangle([int(40 * s), int(300 * s), width - int(40 * s), int(420 * s)], radius=int(60 * s),
                        fill=(225, 225, 230))
    d.text((int(110 * s), int(335 * s)), "Search " + app.lower(), fill=(110, 110, 110), font=font(44))
    # list cards
    y = int(460 * s)
    card_h = int(220 * s)
    while y + card_h < height - int(420 * s):
        d.rounded_rectangle([int(30 * s), y, width - int(30 * s), y + card_h - int(20 * s)], radius=int(24 * s),
                            fill="white", outline=(210, 210, 215), width=max(1, int(2 * s)))
        icon = (rng.randint(0, 255), rng.randint(0, 255), rng.randint(0, 255))
        d.ellipse([int(60 * s), y + int(40 * s), int(180 * s), y + int(160 * s)], fill=icon)
        title = " ".join(rng.choice(_WORDS) for _ in range(rng.randint(1, 3))).capitalize()
        sub = " ".join(rng.choice(_WORDS) for _ in range(rng.randint(3, 7)))
        d.text((int(220 * s), y + int(45 * s)), title, fill=(20, 20, 20), font=font(50))
        d.text((int(220 * s), y + int(115 * s)), sub, fill=(100, 100, 100), font=font(36))
        if rng.random() < 0.4:  # a toggle switch
            on = rng.random() < 0.5
            x0 = width - int(200 * s)
            d.rounded_rectangle([x0, y + int(70 * s), x0 + int(120 * s), y + int(130 * s)], radius=int(30 * s),
                                fill=accent if on else (190, 190, 190))
            cx = x0 + (int(90 * s) if on else int(30 * s))
            d.ellipse([cx - int(26 * s), y + int(74 * s), cx + int(26 * s), y + int(126 * s)], fill="white")
        y += card_h
    # floating action button
    d.rounded_rectangle([width - int(330 * s), height - int(400 * s), width - int(50 * s), height - int(260 * s)],
                        radius=int(40 * s), fill=accent)
    d.text((width - int(290 * s), height - int(360 * s)), "+ New", fill="white", font=font(50))
    # navigation bar
    d.rectangle([0, height - int(200 * s), width, height], fill=(245, 245, 248))
    for i in range(4):
        cx = int((i + 0.5) * width / 4)
        d.rounded_rectangle([cx - int(40 * s), height - int(170 * s), cx + int(40 * s), height - int(90 * s)],
                            radius=int(16 * s), fill=accent if i == 0 else (150, 150, 150))
    d.rounded_rectangle([width // 2 - int(140 * s), height - int(40 * s), width // 2 + int(140 * s),
                         height - int(28 * s)], radius=int(6 * s), fill=(40, 40, 40))
    buf = io.BytesIO()
    if fmt.upper() in ("JPG", "JPEG"):
        img.save(buf, format="JPEG", quality=quality)
    else:
        img.save(buf, format="PNG", optimize=False)
    return buf.getvalue()


def to_data_url(data: bytes, fmt: str = "PNG") -> str:
    mime = "image/jpeg" if fmt.upper() in ("JPG", "JPEG") else "image/png"
    return f"data:{mime};base64," + base64.b64encode(data).decode("ascii")


def parse_size(text: str) -> tuple[int, int]:
    w, _, h = text.lower().partition("x")
    return int(w), int(h)


def screenshot_pool(n: int = 4, fmt: str = "PNG", size: tuple[int, int] = (1080, 2400), seed: int = 0) -> list[str]:
    """`n` distinct screenshots as data URLs (generated once; requests reuse them)."""
    return [to_data_url(make_screenshot(seed + i, size[0], size[1], fmt), fmt) for i in range(n)]


# ----------------------------------------------------------------------------------------------------------------
# Requests
# ----------------------------------------------------------------------------------------------------------------

def build_payload(model: str = DEFAULT_MODEL, prompt: str | None = None, image_url: str | None = None,
                  max_tokens: int = 256, temperature: float = 0.0, stream: bool = True,
                  include_usage: bool = True, ignore_eos: bool = False, extra: dict | None = None) -> dict:
    """An OpenAI chat-completions body; with `image_url` the user turn is [text, image_url] content parts."""
    if prompt is None:
        prompt = TEXT_PROMPTS[0]
    if image_url is not None:
        content: Any = [{"type": "text", "text": prompt}, {"type": "image_url", "image_url": {"url": image_url}}]
    else:
        content = prompt
    body: dict[str, Any] = {
        "model": model,
        "messages": [{"role": "user", "content": content}],
        "max_tokens": max_tokens,
        "temperature": temperature,
        "stream": stream,
    }
    if stream and include_usage:
        body["stream_options"] = {"include_usage": True}
    if ignore_eos:
        body["ignore_eos"] = True
    if extra:
        body.update(extra)
    return body


def agent_prompt(rng: random.Random) -> str:
    return ("You are a phone-use agent. Task: " + rng.choice(TASKS) +
            " Look at the current screenshot and output your reasoning and the next action.")


class RequestFactory:
    """Draws request bodies: a screenshot with probability `image_ratio`, else a text-only prompt."""

    def __init__(self, model: str = DEFAULT_MODEL, max_tokens: int = 256, image_ratio: float = 0.0,
                 images: Sequence[str] = (), temperature: float = 0.0, seed: int = 0, ignore_eos: bool = False):
        if image_ratio > 0 and not images:
            raise ValueError("image_ratio > 0 needs a non-empty image pool")
        self.model, self.max_tokens, self.image_ratio = model, max_tokens, image_ratio
        self.images, self.temperature, self.ignore_eos = list(images), temperature, ignore_eos
        self.rng = random.Random(seed)

    def next(self) -> tuple[dict, bool]:
        if self.image_ratio > 0 and self.rng.random() < self.image_ratio:
            body = build_payload(self.model, agent_prompt(self.rng), self.rng.choice(self.images), self.max_tokens,
                                 self.temperature, ignore_eos=self.ignore_eos)
            return body, True
        return build_payload(self.model, self.rng.choice(TEXT_PROMPTS), None, self.max_tokens, self.temperature,
                             ignore_eos=self.ignore_eos), False


# ----------------------------------------------------------------------------------------------------------------
# SSE parsing
# ----------------------------------------------------------------------------------------------------------------

class SSEDecoder:
    """Incremental text/event-stream decoder. `feed(text)` returns the `data` payloads of the events completed by
    that text (multi-line data joined with newlines; comments and other fields ignored; CRLF/CR/LF line ends)."""

    def __init__(self) -> None:
        self._buf = ""
        self._data: list[str] = []

    def feed(self, text: str) -> list[str]:
        self._buf += text
        out: list[str] = []
        while True:
            i_n = self._buf.find("\n")
            i_r = self._buf.find("\r")
            if i_n < 0 and i_r < 0:
                break
            if i_r >= 0 and (i_n < 0 or i_r < i_n):
                if i_r == len(self._buf) - 1:  # a CR at the end may be the first half of CRLF: wait
                    break
                line, skip = self._buf[:i_r], (2 if self._buf[i_r + 1] == "\n" else 1)
                self._buf = self._buf[i_r + skip:]
            else:
                line, self._buf = self._buf[:i_n], self._buf[i_n + 1:]
            self._line(line, out)
        return out

    def flush(self) -> list[str]:
        """End of stream: a final event without the trailing blank line still counts."""
        out: list[str] = []
        if self._buf:
            self._line(self._buf.rstrip("\r"), out)
            self._buf = ""
        self._line("", out)
        return out

    def _line(self, line: str, out: list[str]) -> None:
        if line == "":
            if self._data:
                out.append("\n".join(self._data))
                self._data = []
            return
        if line.startswith(":"):
            return
        name, sep, value = line.partition(":")
        if not sep:
            name, value = line, ""
        elif value.startswith(" "):
            value = value[1:]
        if name == "data":
            self._data.append(value)


@dataclass
class StreamAccumulator:
    """Turns (timestamp, SSE data payload) pairs of one streamed completion into TTFT / ITL / token counts.
    Timestamps are absolute (time.perf_counter()); `t_start` is when the request was sent."""
    t_start: float
    ttft: float | None = None
    itl: list[float] = field(default_factory=list)
    chunks_with_tokens: int = 0
    content_chars: int = 0
    reasoning_chars: int = 0
    usage: dict | None = None
    finish_reason: str | None = None
    done: bool = False
    error: str | None = None
    t_last_token: float | None = None
    t_end: float | None = None

    def on_data(self, t: float, data: str) -> None:
        self.t_end = t
        if data.strip() == "[DONE]":
            self.done = True
            return
        try:
            obj = json.loads(data)
        except json.JSONDecodeError:
            self.error = self.error or f"bad JSON in stream: {data[:80]!r}"
            return
        if not isinstance(obj, dict):
            return
        if "error" in obj and not obj.get("choices"):
            err = obj["error"]
            self.error = (err.get("message") if isinstance(err, dict) else str(err)) or "stream error"
            return
        if obj.get("usage"):
            self.usage = obj["usage"]
        choices = obj.get("choices") or []
        if not choices:
            return
        ch = choices[0] or {}
        if ch.get("finish_reason"):
            self.finish_reason = ch["finish_reason"]
        delta = ch.get("delta") or {}
        text = delta.get("content") or ""
        reasoning = delta.get("reasoning_content") or ""
        if not text and not reasoning:
            return
        self.content_chars += len(text)
        self.reasoning_chars += len(reasoning)
        self.chunks_with_tokens += 1
        if self.ttft is None:
            self.ttft = t - self.t_start
        else:
            self.itl.append(t - self.t_last_token)
        self.t_last_token = t

    @property
    def output_tokens(self) -> int:
        if self.usage and isinstance(self.usage.get("completion_tokens"), int):
            return self.usage["completion_tokens"]
        return self.chunks_with_tokens

    @property
    def prompt_tokens(self) -> int:
        if self.usage and isinstance(self.usage.get("prompt_tokens"), int):
            return self.usage["prompt_tokens"]
        return 0

    @property
    def complete(self) -> bool:
        return self.done or self.finish_reason is not None


@dataclass
class RequestResult:
    ok: bool
    status: int                   # HTTP status; 0 when no response (connection error, timeout)
    error: str = ""               # "" on success; else "http_429", "timeout", "connection_error", ...
    t_start: float = 0.0          # seconds since the benchmark began
    ttft: float | None = None
    e2e: float | None = None
    itl: list[float] = field(default_factory=list)
    output_tokens: int = 0
    prompt_tokens: int = 0
    has_image: bool = False

    @property
    def tpot(self) -> float | None:
        if not self.ok or self.ttft is None or self.e2e is None or self.output_tokens < 2:
            return None
        return (self.e2e - self.ttft) / (self.output_tokens - 1)

    @property
    def failure_key(self) -> str:
        return str(self.status) if self.status and self.status != 200 else (self.error or "error")


def result_from_stream(acc: StreamAccumulator, status: int, t_end: float, t0_bench: float,
                       has_image: bool = False) -> RequestResult:
    ok = status == 200 and acc.error is None and acc.complete
    err = "" if ok else (acc.error and "stream_error") or ("incomplete_stream" if status == 200 else f"http_{status}")
    return RequestResult(ok=ok, status=status, error=err, t_start=acc.t_start - t0_bench, ttft=acc.ttft,
                         e2e=t_end - acc.t_start, itl=list(acc.itl), output_tokens=acc.output_tokens,
                         prompt_tokens=acc.prompt_tokens, has_image=has_image)


async def send_request(client, url: str, body: dict, t0_bench: float = 0.0, has_image: bool = False,
                       headers: dict | None = None) -> RequestResult:
    """POST one streaming chat request with an httpx.AsyncClient and measure it. Never raises for HTTP or
    transport errors: 429/503/... and exceptions come back as a failed RequestResult."""
    import httpx

    t_start = time.perf_counter()
    acc = StreamAccumulator(t_start)
    status = 0
    try:
        async with client.stream("POST", url, json=body, headers=headers) as resp:
            status = resp.status_code
            if status != 200:
                await resp.aread()
                return RequestResult(ok=False, status=status, error=f"http_{status}", t_start=t_start - t0_bench,
                                     e2e=time.perf_counter() - t_start, has_image=has_image)
            dec = SSEDecoder()
            async for text in resp.aiter_text():
                now = time.perf_counter()
                for data in dec.feed(text):
                    acc.on_data(now, data)
            now = time.perf_counter()
            for data in dec.flush():
                acc.on_data(now, data)
    except httpx.TimeoutException:
        return RequestResult(ok=False, status=status, error="timeout", t_start=t_start - t0_bench,
                             e2e=time.perf_counter() - t_start, has_image=has_image)
    except (httpx.HTTPError, OSError):
        return RequestResult(ok=False, status=status, error="connection_error" if not status else "read_error",
                             t_start=t_start - t0_bench, e2e=time.perf_counter() - t_start, has_image=has_image,
                             ttft=acc.ttft)
    return result_from_stream(acc, status, time.perf_counter(), t0_bench, has_image)


def chat_url(base_url: str) -> str:
    base = base_url.rstrip("/")
    if base.endswith("/chat/completions"):
        return base
    return base + "/chat/completions"


async def run_benchmark(base_url: str, factory: RequestFactory, num_requests: int | None = None,
                        duration: float | None = None, concurrency: int | None = None,
                        request_rate: float | None = None, max_concurrency: int | None = None,
                        burstiness: float = 1.0, seed: int = 0, timeout: float = 600.0,
                        api_key: str | None = None, progress: bool = False) -> tuple[list[RequestResult], float]:
    """Run one benchmark. Exactly one of `concurrency` (closed loop: N clients each sending back-to-back) or
    `request_rate` (open loop: Poisson arrivals, or gamma with `burstiness` != 1, like vLLM; math.inf sends all at
    once) must be given. Stops issuing after `num_requests` or `duration` seconds (whichever is given/first) and
    waits for requests in flight. Returns (results, wall duration)."""
    import httpx

    if (concurrency is None) == (request_rate is None):
        raise ValueError("give exactly one of concurrency or request_rate")
    if num_requests is None and duration is None:
        num_requests = 100
    if request_rate == math.inf and num_requests is None:
        raise ValueError("request_rate=inf needs num_requests")
    url = chat_url(base_url)
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else None
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    results: list[RequestResult] = []
    issued = 0
    t0 = time.perf_counter()

    def may_issue() -> bool:
        if num_requests is not None and issued >= num_requests:
            return False
        if duration is not None and time.perf_counter() - t0 >= duration:
            return False
        return True

    async with httpx.AsyncClient(timeout=httpx.Timeout(timeout, connect=min(timeout, 30.0)), limits=limits,
                                 http2=False) as client:
        async def one() -> None:
            body, has_img = factory.next()
            r = await send_request(client, url, body, t0, has_img, headers)
            results.append(r)
            if progress and len(results) % 10 == 0:
                print(f"  {len(results)} done", file=sys.stderr)

        if concurrency is not None:
            async def worker() -> None:
                nonlocal issued
                while may_issue():
                    issued += 1
                    await one()
            await asyncio.gather(*(worker() for _ in range(max(1, concurrency))))
        else:
            rng = random.Random(seed)
            sem = asyncio.Semaphore(max_concurrency) if max_concurrency else None
            tasks = []

            async def limited() -> None:
                if sem is None:
                    await one()
                else:
                    async with sem:
                        await one()

            next_t = 0.0
            while may_issue():
                if request_rate not in (None, math.inf) and request_rate > 0:
                    delay = next_t - (time.perf_counter() - t0)
                    if delay > 0:
                        await asyncio.sleep(delay)
                    if duration is not None and time.perf_counter() - t0 >= duration:
                        break
                    theta = 1.0 / (request_rate * burstiness)
                    next_t += rng.gammavariate(burstiness, theta)
                issued += 1
                tasks.append(asyncio.create_task(limited()))
            if tasks:
                await asyncio.gather(*tasks)
    return results, time.perf_counter() - t0


# ----------------------------------------------------------------------------------------------------------------
# Metrics and report
# ----------------------------------------------------------------------------------------------------------------

def percentile(values: Sequence[float], p: float) -> float:
    """Linear-interpolated percentile (numpy's default method); 0.0 for no values."""
    if not values:
        return 0.0
    xs = sorted(values)
    k = (len(xs) - 1) * p / 100.0
    lo, hi = math.floor(k), math.ceil(k)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def _stats(prefix: str, values_s: Sequence[float], percentiles: Sequence[float]) -> dict[str, float]:
    vals = [v * 1000.0 for v in values_s]
    n = len(vals)
    mean = sum(vals) / n if n else 0.0
    std = math.sqrt(sum((v - mean) ** 2 for v in vals) / n) if n else 0.0
    out = {f"mean_{prefix}_ms": mean, f"median_{prefix}_ms": percentile(vals, 50), f"std_{prefix}_ms": std}
    for p in percentiles:
        out[f"p{_pname(p)}_{prefix}_ms"] = percentile(vals, p)
    return out


def _pname(p: float) -> str:
    return str(int(p)) if float(p).is_integer() else str(p)


def compute_metrics(results: Sequence[RequestResult], duration: float,
                    percentiles: Sequence[float] = (50, 99)) -> dict[str, Any]:
    ok = [r for r in results if r.ok]
    failed = [r for r in results if not r.ok]
    by_code: dict[str, int] = {}
    for r in failed:
        by_code[r.failure_key] = by_code.get(r.failure_key, 0) + 1
    out_tokens = sum(r.output_tokens for r in ok)
    in_tokens = sum(r.prompt_tokens for r in ok)
    dur = max(duration, 1e-9)
    m: dict[str, Any] = {
        "duration": duration,
        "completed": len(ok),
        "failed": len(failed),
        "failures_by_status": dict(sorted(by_code.items())),
        "total_input_tokens": in_tokens,
        "total_output_tokens": out_tokens,
        "request_throughput": len(ok) / dur,
        "output_throughput": out_tokens / dur,
        "total_token_throughput": (in_tokens + out_tokens) / dur,
        "requests_with_image": sum(1 for r in results if r.has_image),
    }
    m.update(_stats("ttft", [r.ttft for r in ok if r.ttft is not None], percentiles))
    m.update(_stats("tpot", [t for t in (r.tpot for r in ok) if t is not None], percentiles))
    m.update(_stats("itl", [g for r in ok for g in r.itl], percentiles))
    m.update(_stats("e2el", [r.e2e for r in ok if r.e2e is not None], percentiles))
    m["percentiles"] = list(percentiles)
    return m


def format_report(m: dict[str, Any], title: str = "Serving Benchmark Result") -> str:
    w = 50
    lines = [f" {title} ".center(w, "=")]

    def row(label: str, value: Any, fmt: str = "{:<10.2f}") -> None:
        v = fmt.format(value) if not isinstance(value, str) else value
        lines.append(f"{label:<40} {v}")

    row("Successful requests:", m["completed"], "{:<10}")
    row("Failed requests:", m["failed"], "{:<10}")
    for code, n in m["failures_by_status"].items():
        row(f"  failed ({code}):", n, "{:<10}")
    row("Benchmark duration (s):", m["duration"])
    row("Total input tokens:", m["total_input_tokens"], "{:<10}")
    row("Total generated tokens:", m["total_output_tokens"], "{:<10}")
    row("Request throughput (req/s):", m["request_throughput"])
    row("Output token throughput (tok/s):", m["output_throughput"])
    row("Total Token throughput (tok/s):", m["total_token_throughput"])
    for key, head, name in (("ttft", "Time to First Token", "TTFT"),
                            ("tpot", "Time per Output Token (excl. 1st token)", "TPOT"),
                            ("itl", "Inter-token Latency", "ITL"),
                            ("e2el", "End-to-end Latency", "E2EL")):
        lines.append(head.center(w, "-"))
        row(f"Mean {name} (ms):", m[f"mean_{key}_ms"])
        row(f"Median {name} (ms):", m[f"median_{key}_ms"])
        for p in m.get("percentiles", (99,)):
            if float(p) != 50.0:  # the median row is P50
                row(f"P{_pname(p)} {name} (ms):", m[f"p{_pname(p)}_{key}_ms"])
    lines.append("=" * w)
    return "\n".join(lines)


def results_json(results: Sequence[RequestResult], metrics: dict, config: dict) -> dict:
    return {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "backend": "openai-chat",
        **config,
        **metrics,
        "ttfts": [r.ttft for r in results],
        "e2els": [r.e2e for r in results],
        "itls": [r.itl for r in results],
        "output_lens": [r.output_tokens for r in results],
        "input_lens": [r.prompt_tokens for r in results],
        "statuses": [r.status for r in results],
        "errors": [r.error for r in results],
        "has_image": [r.has_image for r in results],
    }


def capacity_level(concurrency: int, m: dict[str, Any]) -> dict[str, Any]:
    """One `levels` entry of bench/capacity.json from a fixed-concurrency run's metrics."""
    def q(key: str, p: str) -> float:
        return round(m.get(f"{p}_{key}_ms", 0.0) / 1000.0, 4)
    return {
        "concurrency": concurrency,
        "output_tokens_per_s": round(m["output_throughput"], 2),
        "ttft_s": {"p50": q("ttft", "median"), "p99": q("ttft", "p99")},
        "tpot_s": {"p50": q("tpot", "median"), "p99": q("tpot", "p99")},
        "e2e_s": {"p50": q("e2el", "median"), "p99": q("e2el", "p99")},
        "requests": m["completed"],
        "failed": m["failed"],
    }


def write_capacity(path: str, levels: list[dict], source: str, workload: dict | None = None) -> dict:
    """Write (or update) a capacity file: replaces `levels` and `source`, keeps cold start / CPU fields already
    there. cpu_util of a level is kept from the old file when that concurrency was present."""
    try:
        with open(path) as f:
            doc = json.load(f)
    except (OSError, json.JSONDecodeError):
        doc = {}
    old = {lv.get("concurrency"): lv for lv in doc.get("levels", [])}
    for lv in levels:
        if "cpu_util" in old.get(lv["concurrency"], {}):
            lv["cpu_util"] = old[lv["concurrency"]]["cpu_util"]
    doc["source"] = source
    doc["levels"] = levels
    if workload:
        doc.setdefault("workload", {}).update(workload)
    with open(path, "w") as f:
        json.dump(doc, f, indent=2)
        f.write("\n")
    return doc


# ----------------------------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base-url", required=True, help="OpenAI base URL, e.g. http://host:port/v1")
    p.add_argument("--model", default=DEFAULT_MODEL)
    p.add_argument("--api-key", default=None)
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--concurrency", type=int, help="closed loop: N clients sending back-to-back")
    mode.add_argument("--request-rate", type=float, help="open loop: Poisson arrivals per second (inf: all at once)")
    mode.add_argument("--sweep", help="comma-separated concurrency levels to run one after another (capacity sweep)")
    p.add_argument("--burstiness", type=float, default=1.0, help="gamma shape for --request-rate (1 = Poisson)")
    p.add_argument("--max-concurrency", type=int, default=None, help="cap on in-flight requests with --request-rate")
    p.add_argument("--num-requests", type=int, default=None, help="requests to send (per level with --sweep)")
    p.add_argument("--duration", type=float, default=None, help="seconds to keep issuing requests")
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--ignore-eos", action="store_true", help="send ignore_eos=true (fixed output length)")
    p.add_argument("--image-ratio", type=float, default=0.0, help="fraction of requests carrying a screenshot")
    p.add_argument("--image-format", choices=["png", "jpeg"], default="png")
    p.add_argument("--image-size", default="1080x2400")
    p.add_argument("--num-images", type=int, default=4, help="distinct screenshots generated and reused")
    p.add_argument("--percentiles", default="50,99", help="comma-separated percentiles to report")
    p.add_argument("--timeout", type=float, default=600.0, help="per-request timeout, seconds")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", dest="json_out", default=None, help="write results (vLLM-like keys) to this file")
    p.add_argument("--capacity-out", default=None, help="with --sweep: write/update a capacity file")
    p.add_argument("--progress", action="store_true")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.concurrency is None and args.request_rate is None and not args.sweep:
        args.concurrency = 1
    pcts = [float(x) for x in args.percentiles.split(",") if x.strip()]
    images: list[str] = []
    if args.image_ratio > 0:
        images = screenshot_pool(args.num_images, args.image_format.upper(), parse_size(args.image_size), args.seed)
    factory = RequestFactory(args.model, args.max_tokens, args.image_ratio, images, args.temperature, args.seed,
                             args.ignore_eos)
    common = dict(base_url=args.base_url, model=args.model, max_tokens=args.max_tokens,
                  image_ratio=args.image_ratio, image_format=args.image_format, image_size=args.image_size)

    def run(**kw):
        return asyncio.run(run_benchmark(args.base_url, factory, num_requests=kw.pop("num_requests", None),
                                         duration=args.duration, burstiness=args.burstiness, seed=args.seed,
                                         timeout=args.timeout, api_key=args.api_key, progress=args.progress, **kw))

    if args.sweep:
        levels_in = [int(x) for x in args.sweep.split(",") if x.strip()]
        levels, runs = [], []
        for c in levels_in:
            n = args.num_requests if args.num_requests is not None else (None if args.duration else max(4 * c, 16))
            results, dur = run(concurrency=c, num_requests=n)
            m = compute_metrics(results, dur, pcts)
            print(format_report(m, f"concurrency {c}"))
            levels.append(capacity_level(c, m))
            runs.append({"concurrency": c, **m})
        if args.capacity_out:
            src = (f"measured by scripts/loadtest.py --sweep {args.sweep} against {args.base_url} on "
                   f"{datetime.now(timezone.utc).date()} (max_tokens={args.max_tokens}, "
                   f"image_ratio={args.image_ratio})")
            write_capacity(args.capacity_out, levels, src)
            print(f"wrote {args.capacity_out}")
        if args.json_out:
            with open(args.json_out, "w") as f:
                json.dump({"config": common, "levels": levels, "runs": runs}, f, indent=2)
        return 0

    results, dur = run(concurrency=args.concurrency, request_rate=args.request_rate,
                       max_concurrency=args.max_concurrency, num_requests=args.num_requests)
    m = compute_metrics(results, dur, pcts)
    print(format_report(m))
    if args.json_out:
        cfg = {**common, "concurrency": args.concurrency, "request_rate": args.request_rate,
               "burstiness": args.burstiness, "max_concurrency": args.max_concurrency,
               "num_requests": args.num_requests, "duration_limit": args.duration}
        with open(args.json_out, "w") as f:
            json.dump(results_json(results, m, cfg), f, indent=2, default=float)
    return 0 if m["completed"] > 0 else 1


if __name__ == "__main__":
    sys.exit(main())
