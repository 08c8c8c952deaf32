"""Response-cache hit latency against a miss on the tiny model, all in one run on loopback (CPU only).

    python bench/cache_bench.py [--n 300] [--servers func-python,uvicorn] [--out bench/cache_results.json]

Starts a redis-server (--save '' --appendonly no), then per server kind (func-python: what the image runs;
uvicorn: scripts/run_autoglm_server.sh) the model server with the tiny model and its in-process cache, a cache front
with Redis only (RESPONSE_CACHE=off, so every hit is a Redis GET) and a cache front as k8s/cache-front.yaml runs it
(in-process LRU before Redis). One keep-alive client sends requests one after another and times each until the
last byte, so the numbers are what a client on the same host sees, HTTP included.

Rows: misses (a new greedy question each time, max_tokens 16, to the model and through the front), hits as JSON
and as SSE (stream: true), and hits on a 1080x2400 screenshot: the same bytes again (the digest memo answers) and
the same pixels in new bytes each time (the image is decoded to find its digest). Prints a markdown table and writes
the JSON (the lead copies it into bench/RESULTS.md). Targets: in-process hit p50 <= 2 ms, front + Redis hit p50 <= 5 ms.
"""
from __future__ import annotations

import argparse
import base64
import io
import json
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
from PIL import Image, PngImagePlugin

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
from engine_bench import free_port  # noqa: E402  (stdlib-only at import)
MODEL = "autoglm-phone-9b"
TARGETS_MS = {"in-process hit p50": 2.0, "front + Redis hit p50": 5.0}


class Proc:
    def __init__(self, name: str, argv: list[str], env: dict[str, str], logdir: Path):
        self.name = name
        self.log_path = logdir / f"{name}.log"
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                         start_new_session=True)

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)

    def fail(self, why: str) -> None:
        raise SystemExit(f"{self.name}: {why}\n{self.log_path.read_text(errors='replace')[-4000:]}")


def start_redis(logdir: Path) -> tuple[Proc, str]:
    binary = shutil.which("redis-server") or "/usr/bin/redis-server"
    port = free_port()
    proc = Proc("redis", [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                          "--dir", str(logdir)], dict(os.environ), logdir)
    deadline = time.monotonic() + 10
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
                s.sendall(b"PING\r\n")
                if s.recv(64).startswith(b"+PONG"):
                    return proc, f"redis://127.0.0.1:{port}/0"
        except OSError:
            pass
        if proc.proc.poll() is not None or time.monotonic() > deadline:
            proc.fail("did not start")
        time.sleep(0.05)


def start_server(name: str, kind: str, settings: dict[str, str], logdir: Path) -> tuple[Proc, str]:
    port = free_port()
    env = {k: v for k, v in os.environ.items()
           if k not in ("MODEL_PATH", "ROLE", "MODEL_URL") and not k.startswith("RESPONSE_CACHE")}
    env.update(settings, HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1", LOG_LEVEL="WARNING")
    if kind == "func-python":
        argv = [sys.executable, "-c", "from func_python.http import serve; from function import new; serve(new)"]
        env["LISTEN_ADDRESS"] = f"127.0.0.1:{port}"
    else:
        argv = [sys.executable, "-m", "uvicorn", "--factory", "function.func:create_app", "--host", "127.0.0.1",
                "--port", str(port), "--log-level", "warning", "--no-access-log"]
    proc = Proc(f"{name}-{kind}", argv, env, logdir)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 600
    while True:
        if proc.proc.poll() is not None:
            proc.fail(f"exited with {proc.proc.returncode}")
        try:
            if httpx.get(f"{url}/health/readiness", timeout=5).status_code == 200:
                return proc, url
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            proc.fail("not ready in 600 s")
        time.sleep(0.3)


def screenshot() -> Image.Image:
    """A 1080x2400 phone-screen-sized image that does not compress to nothing (bars of noise and flat areas)."""
    img = Image.new("RGB", (1080, 2400), (245, 245, 245))
    noise = Image.effect_noise((1080, 300), 40).convert("RGB")
    for y in range(0, 2400, 600):
        img.paste(noise, (0, y))
    return img


def png_url(img: Image.Image, tag: int | None = None) -> str:
    buf = io.BytesIO()
    info = None
    if tag is not None:                          # same pixels, other bytes
        info = PngImagePlugin.PngInfo()
        info.add_text("n", str(tag))
    img.save(buf, format="PNG", pnginfo=info, compress_level=1)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def body(text: str, image: str | None = None, **kw) -> dict:
    content = text if image is None else [{"type": "image_url", "image_url": {"url": image}},
                                          {"type": "text", "text": text}]
    return {"model": MODEL, "messages": [{"role": "user", "content": content}], "temperature": 0, "max_tokens": 16,
            **kw}


def timed(client: httpx.Client, url: str, payload: dict | bytes, expect: str | None) -> float:
    kw = {"content": payload, "headers": {"content-type": "application/json"}} if isinstance(payload, bytes) \
        else {"json": payload}
    started = time.perf_counter()
    with client.stream("POST", f"{url}/v1/chat/completions", **kw) as r:
        for _ in r.iter_raw():
            pass
    elapsed = time.perf_counter() - started
    if r.status_code != 200 or (expect and r.headers.get("x-cache") != expect):
        raise SystemExit(f"{url}: status {r.status_code}, X-Cache {r.headers.get('x-cache')}, expected {expect}")
    return elapsed


def stats(samples: list[float]) -> dict:
    ms = sorted(s * 1000 for s in samples)
    p99 = ms[min(len(ms) - 1, max(0, round(0.99 * len(ms)) - 1))]
    return {"n": len(ms), "p50_ms": round(statistics.median(ms), 3), "p99_ms": round(p99, 3),
            "mean_ms": round(statistics.fmean(ms), 3)}


def hits(client: httpx.Client, url: str, payload: dict, n: int) -> dict:
    raw = json.dumps(payload).encode()
    timed(client, url, raw, None)                # stores it (or it is there already)
    for _ in range(20):                          # warm-up
        timed(client, url, raw, "hit")
    return stats([timed(client, url, raw, "hit") for _ in range(n)])


def run_kind(kind: str, redis_url: str, n: int, logdir: Path, cache_dir: str) -> list[dict]:
    rows: list[dict] = []
    procs = []
    try:
        model, model_url = start_server("model", kind, dict(MODEL_CACHE_DIR=cache_dir, MAX_NUM_SEQS="4",
                                                            MAX_MODEL_LEN="8192"), logdir)
        procs.append(model)
        front_redis, redis_front_url = start_server("front-redis", kind, dict(
            ROLE="cache-front", MODEL_URL=model_url, RESPONSE_CACHE="off", RESPONSE_CACHE_URL=redis_url), logdir)
        procs.append(front_redis)
        front_both, both_url = start_server("front-memory-redis", kind, dict(
            ROLE="cache-front", MODEL_URL=model_url, RESPONSE_CACHE_URL=redis_url), logdir)
        procs.append(front_both)

        def row(scenario: str, where: str, result: dict) -> None:
            rows.append({"server": kind, "scenario": scenario, "path": where, **result})
            print(f"  {kind:11} {scenario:44} {result}", flush=True)

        shot = screenshot()
        same_bytes = png_url(shot)
        with httpx.Client(timeout=600) as c:
            timed(c, model_url, body("warm up"), None)
            m = max(10, n // 10)
            row("miss: tiny model, new question", "model",
                stats([timed(c, model_url, body(f"question {kind} {i}"), "miss") for i in range(m)]))
            row("miss: through the front (proxied)", "front (Redis)",
                stats([timed(c, redis_front_url, body(f"front question {kind} {i}"), "miss") for i in range(m)]))
            text = body("打开微信，给张三发消息：明天见")
            row("in-process hit, JSON", "model", hits(c, model_url, text, n))
            row("in-process hit, SSE", "model", hits(c, model_url, text | {"stream": True}, n))
            row("front + Redis hit, JSON", "front (Redis)", hits(c, redis_front_url, text, n))
            row("front + Redis hit, SSE", "front (Redis)", hits(c, redis_front_url, text | {"stream": True}, n))
            row("front, memory before Redis, hit, JSON", "front (memory + Redis)", hits(c, both_url, text, n))
            shot_body = body("点击设置", same_bytes)
            row("in-process hit, screenshot, same bytes", "model", hits(c, model_url, shot_body, max(20, n // 5)))
            row("front + Redis hit, screenshot, same bytes", "front (Redis)",
                hits(c, redis_front_url, shot_body, max(20, n // 5)))
            k = max(10, n // 30)
            reencoded = [json.dumps(body("点击设置", png_url(shot, i))).encode() for i in range(k)]
            row("in-process hit, screenshot, new bytes each time", "model",
                stats([timed(c, model_url, r, "hit") for r in reencoded]))
            row("front + Redis hit, screenshot, new bytes each time", "front (Redis)",
                stats([timed(c, redis_front_url, r, "hit") for r in reencoded]))
    finally:
        for p in reversed(procs):
            p.stop()
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=300, help="hits timed per text row")
    ap.add_argument("--servers", default="func-python,uvicorn")
    ap.add_argument("--out", default=str(ROOT / "bench" / "cache_results.json"))
    ap.add_argument("--model-cache-dir", default=os.path.join(tempfile.gettempdir(), "autoglm-bench-model-cache"),
                    help="where the tiny model is built (kept between runs)")
    args = ap.parse_args()
    logdir = Path(tempfile.mkdtemp(prefix="cache-bench-"))
    redis, redis_url = start_redis(logdir)
    rows = []
    try:
        for kind in args.servers.split(","):
            print(f"{kind}:", flush=True)
            rows += run_kind(kind, redis_url, args.n, logdir, args.model_cache_dir)
    finally:
        redis.stop()
    version = subprocess.run([shutil.which("redis-server") or "/usr/bin/redis-server", "--version"],
                             capture_output=True, text=True).stdout.split()
    targets = {}
    for kind in args.servers.split(","):
        by = {r["scenario"]: r for r in rows if r["server"] == kind}
        targets[kind] = {
            "in-process hit p50 <= 2 ms": by["in-process hit, JSON"]["p50_ms"] <= TARGETS_MS["in-process hit p50"],
            "front + Redis hit p50 <= 5 ms": by["front + Redis hit, JSON"]["p50_ms"] <= TARGETS_MS[
                "front + Redis hit p50"]}
    result = {
        "what": "client-side latency to the last byte, one keep-alive client, sequential, loopback, CPU only",
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform(),
                    "redis": next((v for v in version if v.startswith("v=")), "?")},
        "date": time.strftime("%Y-%m-%d"), "rows": rows, "targets_met": targets}
    Path(args.out).write_text(json.dumps(result, indent=1, ensure_ascii=False) + "\n")
    print()
    print("| server | scenario | path | n | p50 ms | p99 ms | mean ms |")
    print("|---|---|---|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['server']} | {r['scenario']} | {r['path']} | {r['n']} | {r['p50_ms']:.2f} | {r['p99_ms']:.2f} "
              f"| {r['mean_ms']:.2f} |")
    print()
    for kind, met in targets.items():
        print(f"{kind}: " + ", ".join(f"{k}: {'met' if v else 'NOT met'}" for k, v in met.items()))
    print(f"\nwritten to {args.out}")


if __name__ == "__main__":
    main()
