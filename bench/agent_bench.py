"""The workload of record: phone-agent turns through HTTP against the real server (func-python + hypercorn, started
as a subprocess exactly as the image's entrypoint runs it), on the random-weight full-size GLM-4.1V-9B that
bench/engine_bench.py builds, with naive transformers on the same turn in the same run.

An agent turn: one ~1.5k-token system prompt (the same for every agent, as one phone-agent app sends it), 0-4
earlier turns of this agent as text (~150 tokens each; old screenshots dropped), and a new 1080x2400 PNG screenshot
(random rectangles, so each differs); streamed with usage, greedy, ignore_eos, so every turn makes max_tokens.

    python3 bench/agent_bench.py all                        # build (if missing) -> naive -> agent 1/8/32 -> short
                                                            # -> soak, bounded by --deadline (540 s)
    python3 bench/agent_bench.py agent --clients 1,8,32 --turns-s 60 --quant none
    python3 bench/agent_bench.py naive --naive-turns 3      # plain transformers generate, one turn at a time
    python3 bench/agent_bench.py soak --minutes 5           # bursts, idle gaps, disconnects: PASS/FAIL
    python3 bench/agent_bench.py starts --n 20              # fresh server starts in a row
    python3 bench/agent_bench.py short --clients 64         # short text chats: output tokens/s
    python3 bench/agent_bench.py graphcheck                 # graphs == eager, in-process (GPU)
    python3 bench/agent_bench.py agent --tiny --clients 1,2 --turns-s 10 --max-tokens 8    # CPU smoke

Results go to $OUT/agent_bench.json after every measurement; server logs (their tails) to $OUT/server-*.log.
BENCH_MODEL_DIR (default /tmp/glm9b) is the checkpoint; --tiny serves the project's tiny model on CPU instead.
"""
from __future__ import annotations

import argparse
import asyncio
import base64
import collections
import io
import json
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import time
import traceback
from concurrent.futures import ProcessPoolExecutor

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "bench"))
import engine_bench as eb  # noqa: E402  (build, words: stdlib-only at import)

OUT = os.environ.get("OUT", "/tmp/out")
LOGS = "/tmp/agent_bench_logs"
RES: dict = {}
T0 = time.time()
DEADLINE = 540.0
JSON_NAME = "agent_bench.json"
# the Dockerfile's ENTRYPOINT; BENCH_GIL_SWITCH_S (a bench-only experiment) sets the interpreter's GIL switch
# interval first, to measure how long the engine thread waits for the GIL while the event loop streams
SERVE = ("import os, sys; s = os.environ.get('BENCH_GIL_SWITCH_S'); s and sys.setswitchinterval(float(s)); "
         "from func_python.http import serve; from function import new; serve(new)")
MODEL = "autoglm-phone-9b"


def log(key, value):
    RES[key] = value
    os.makedirs(OUT, exist_ok=True)
    with open(os.path.join(OUT, JSON_NAME), "w") as f:
        json.dump(RES, f, indent=1, default=str)
    print(f"[{time.time() - T0:6.1f}s] {key}: {json.dumps(value, default=str)[:1200]}", flush=True)


def left() -> float:
    return DEADLINE - (time.time() - T0)


def pct(xs, p, scale=1.0, nd=3):
    xs = sorted(x for x in xs if x is not None)
    if not xs:
        return None
    return round(xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))] * scale, nd)



def tail(path: str, max_bytes: int = 48_000) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, 2)
            size = f.tell()
            f.seek(max(0, size - max_bytes))
            return f.read().decode(errors="replace")
    except OSError:
        return ""


# ------------------------------------------------------------------------------------------------ settings
def model_dir(args) -> str:
    if args.tiny:
        return os.path.join(args.cache_dir, "tiny-glm4v")    # Config.tiny_model_dir: built by the first start
    return args.model_dir


def server_env(args, port: int, quant: str | None = None) -> dict:
    env = dict(os.environ)
    env.update(eb.IMAGE_ENV)
    env.update(LISTEN_ADDRESS=f"127.0.0.1:{port}", MODEL_CACHE_DIR=args.cache_dir, MAX_NUM_SEQS=str(args.max_num_seqs),
               MAX_MODEL_LEN=str(args.max_model_len), QUANTIZATION=quant or args.quant, PYTHONUNBUFFERED="1",
               HF_HUB_OFFLINE="1")
    if args.tiny:
        env.pop("MODEL_PATH", None)
        env["DEVICE"] = "cpu"
    else:
        env["MODEL_PATH"] = args.model_dir
    for kv in args.env:
        k, _, v = kv.partition("=")
        env[k] = v
    return env


# ------------------------------------------------------------------------------------------------ the server
class Server:
    """The function served by func-python in a subprocess on a loopback port; its log in LOGS, its tail in $OUT."""

    def __init__(self, name: str, args, quant: str | None = None, out_log: str | None = None):
        self.name, self.args = name, args
        self.port = eb.free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = server_env(args, self.port, quant)
        os.makedirs(LOGS, exist_ok=True)
        self.log_path = os.path.join(LOGS, f"server-{name}.log")
        self.out_log = out_log or os.path.join(OUT, f"server-{name}.log")
        self.proc: subprocess.Popen | None = None
        self.t_exec = 0.0

    def start(self) -> None:
        with open(self.log_path, "wb") as f:
            self.t_exec = time.perf_counter()
            self.proc = subprocess.Popen([sys.executable, "-c", SERVE], cwd=ROOT, env=self.env, stdout=f,
                                         stderr=subprocess.STDOUT, start_new_session=True)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def engine_steps(self) -> dict:
        """The engine's own step counters from /metrics (autoglm_engine_step_seconds _sum/_count per phase)."""
        import httpx
        try:
            text = httpx.get(f"{self.url}/metrics", timeout=5, trust_env=False).text
        except httpx.HTTPError:
            return {}
        from prometheus_client.parser import text_string_to_metric_families
        out = {}
        for fam in text_string_to_metric_families(text):
            if fam.name != "autoglm_engine_step_seconds":
                continue
            for smp in fam.samples:
                ph = smp.labels.get("phase")
                if smp.name.endswith(("_sum", "_count")):
                    out[f"{ph}_{smp.name.rsplit('_', 1)[1]}"] = smp.value
                elif smp.name.endswith("_bucket"):
                    out.setdefault(f"{ph}_buckets", []).append((float(smp.labels["le"]), smp.value))
        return out

    def wait_ready(self, timeout: float) -> dict:
        """Poll /health/readiness until 200, a failure message, the process' exit, or `timeout`."""
        import httpx
        listening = None
        msg = ""
        end = time.perf_counter() + timeout
        with httpx.Client(timeout=3, trust_env=False) as c:
            while time.perf_counter() < end:
                if not self.alive():
                    return {"ready": False, "failure": f"exited with {self.proc.returncode}",
                            "log_tail": tail(self.log_path, 2500)}
                try:
                    r = c.get(f"{self.url}/health/readiness")
                    if listening is None:
                        listening = time.perf_counter() - self.t_exec
                    msg = r.text[:500]
                    if r.status_code == 200:
                        return {"ready": True, "exec_to_listening_s": round(listening, 2),
                                "exec_to_ready_s": round(time.perf_counter() - self.t_exec, 2)}
                    low = msg.lower()
                    if low.startswith("failed") or "configuration error" in low or "engine stopped" in low:
                        return {"ready": False, "failure": msg, "exec_to_listening_s": round(listening, 2),
                                "exec_to_failed_s": round(time.perf_counter() - self.t_exec, 2)}
                except httpx.TransportError:
                    pass
                time.sleep(0.1)
        return {"ready": False, "failure": f"not ready after {timeout:.0f}s (readiness: {msg!r})",
                "exec_to_listening_s": listening}

    def rss_mb(self) -> float | None:
        try:
            with open(f"/proc/{self.pid}/status") as f:
                for ln in f:
                    if ln.startswith("VmRSS:"):
                        return round(int(ln.split()[1]) / 1024, 1)
        except OSError:
            return None
        return None

    def stop(self, timeout: float = 30.0, log_bytes: int = 48_000) -> int | None:
        """SIGTERM to the process group (as the kubelet does), SIGKILL past `timeout`; the log tail to $OUT."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
            except ProcessLookupError:
                pass
        self.save_log(log_bytes)
        return self.proc.returncode

    def save_log(self, max_bytes: int = 48_000) -> None:
        os.makedirs(OUT, exist_ok=True)
        with open(self.out_log, "a") as f:
            f.write(f"===== server {self.name} (pid {self.proc.pid}, exit {self.proc.returncode}) =====\n")
            f.write(tail(self.log_path, max_bytes))


def start_server(name, args, quant=None, out_log=None) -> tuple[Server, dict]:
    srv = Server(name, args, quant, out_log)
    srv.start()
    info = srv.wait_ready(min(args.ready_timeout, max(10.0, left() - 10)))
    info["pid"] = srv.pid
    return srv, info


def gpu_mem_mb() -> float | None:
    if not shutil.which("nvidia-smi"):
        return None
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=10).stdout
        return float(out.split()[0])
    except (OSError, ValueError, IndexError, subprocess.SubprocessError):
        return None


# ------------------------------------------------------------------------------------------------ the workload
def token_counter(mdir: str):
    path = os.path.join(mdir, "tokenizer.json")
    if os.path.exists(path):
        from tokenizers import Tokenizer
        tok = Tokenizer.from_file(path)
        return lambda s: len(tok.encode(s, add_special_tokens=False).ids)
    return lambda s: int(len(s.split()) * 1.3)


def fit_text(count, rng, target: int, prefix: str = "") -> str:
    """`prefix` + random app words, about `target` tokens long."""
    n = max(1, target)
    text = prefix
    for _ in range(8):
        text = prefix + eb.words(rng, n)
        t = count(text)
        if abs(t - target) <= max(2, target // 50):
            break
        n = max(1, int(n * target / max(t, 1)))
    return text


class Workload:
    """The shared system prompt and the per-turn texts, sized with the checkpoint's tokenizer."""

    def __init__(self, mdir: str, system_tokens=1500, user_tokens=30, reply_tokens=120):
        count = token_counter(mdir)
        self.system = fit_text(count, random.Random(5), system_tokens,
                               "You are a phone-operating agent. Read the screenshot and answer with "
                               "<think>reasoning</think><answer>do(action=...)</answer>. Rules: ")
        self.count = count
        self.user_tokens, self.reply_tokens = user_tokens, reply_tokens

    def user_text(self, rng, label: str) -> str:
        return fit_text(self.count, rng, self.user_tokens, f"[{label}] ")

    def reply(self, rng) -> str:
        x, y = rng.randrange(1000), rng.randrange(2000)
        return "<think>" + fit_text(self.count, rng, self.reply_tokens - 25) + \
            f"</think><answer>do(action=\"Tap\", element=[{x},{y}])</answer>"


def shot_png(seed: int, w: int, h: int) -> bytes:
    """A w x h screenshot-like PNG: a background and 30 random rectangles (so every one differs)."""
    from PIL import Image, ImageDraw
    rng = random.Random(seed)
    img = Image.new("RGB", (w, h), tuple(rng.randrange(256) for _ in range(3)))
    d = ImageDraw.Draw(img)
    for _ in range(30):
        x, y = rng.randrange(max(1, w - w // 12)), rng.randrange(max(1, h - h // 20))
        d.rectangle([x, y, x + rng.randrange(w // 27 + 1, w // 3 + 2), y + rng.randrange(h // 120 + 1, h // 20 + 2)],
                    fill=tuple(rng.randrange(256) for _ in range(3)))
    b = io.BytesIO()
    img.save(b, "PNG")
    return b.getvalue()


def shot_url(seed: int, w: int, h: int) -> str:
    return "data:image/png;base64," + base64.b64encode(shot_png(seed, w, h)).decode()


class Shots:
    """New screenshots made off the event loop (a process pool), one per turn."""

    def __init__(self, size: tuple[int, int], workers: int = 4):
        self.w, self.h = size
        self.pool = ProcessPoolExecutor(max_workers=workers)
        self.seed = random.randrange(1 << 30)

    async def new(self) -> str:
        self.seed += 1
        return await asyncio.get_running_loop().run_in_executor(self.pool, shot_url, self.seed, self.w, self.h)

    def close(self):
        self.pool.shutdown(wait=False, cancel_futures=True)


class Agent:
    """One phone: a task, its earlier turns as text (0-4: after a turn with 4 earlier ones a new task starts)."""

    def __init__(self, i: int, wl: Workload, seed: int):
        self.i, self.wl = i, wl
        self.rng = random.Random(seed)
        self.episode = 0
        self.history: list[tuple[str, str]] = []
        for _ in range(self.rng.randrange(5)):      # agents start at different steps of their tasks
            self.history.append((self._user(len(self.history)), wl.reply(self.rng)))

    def _user(self, step: int) -> str:
        return self.wl.user_text(self.rng, f"agent {self.i} task {self.episode} step {step + 1}")

    def messages(self, image_url: str) -> tuple[list, str]:
        msgs = [{"role": "system", "content": self.wl.system}]
        for u, a in self.history:
            msgs += [{"role": "user", "content": u + " (screenshot omitted)"}, {"role": "assistant", "content": a}]
        u = self._user(len(self.history))
        msgs.append({"role": "user", "content": [{"type": "text", "text": u},
                                                 {"type": "image_url", "image_url": {"url": image_url}}]})
        return msgs, u

    def advance(self, user: str) -> None:
        if len(self.history) >= 4:
            self.history, self.episode = [], self.episode + 1
        else:
            self.history.append((user, self.wl.reply(self.rng)))


def body(messages, max_tokens: int, stream: bool = True) -> dict:
    b = {"model": MODEL, "messages": messages, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
         "stream": stream}
    if stream:
        b["stream_options"] = {"include_usage": True}
    return b


# ------------------------------------------------------------------------------------------------ the client
def http_client(n: int):
    import httpx
    return httpx.AsyncClient(timeout=httpx.Timeout(900, connect=15), trust_env=False,
                             limits=httpx.Limits(max_connections=n + 8, max_keepalive_connections=n + 8))


async def chat(client, url: str, req: dict, disconnect_after: int | None = None) -> dict:
    """One chat completion; streamed ones record TTFT (first content delta) and the gaps between content chunks."""
    import httpx
    rec = {"status": None, "ttft": None, "e2e": None, "gaps": [], "done": False, "error": None, "usage": None,
           "chunks": 0, "disconnected": False, "transport_error": False, "stream": bool(req.get("stream"))}
    t0 = time.perf_counter()
    try:
        if req.get("stream"):
            async with client.stream("POST", f"{url}/v1/chat/completions", json=req) as r:
                rec["status"] = r.status_code
                if r.status_code != 200:
                    rec["error"] = (await r.aread()).decode(errors="replace")[:300]
                else:
                    last = None
                    async for line in r.aiter_lines():
                        if not line.startswith("data:"):
                            continue
                        data = line[5:].strip()
                        if data == "[DONE]":
                            rec["done"] = True
                            break
                        ev = json.loads(data)
                        if "error" in ev:
                            rec["error"] = str(ev["error"].get("message"))[:300]
                            rec["error_code"] = ev["error"].get("code")
                            continue
                        if ev.get("usage"):
                            rec["usage"] = ev["usage"]
                        for ch in ev.get("choices") or []:
                            d = ch.get("delta") or {}
                            if d.get("content") or d.get("reasoning_content"):
                                now = time.perf_counter()
                                if rec["ttft"] is None:
                                    rec["ttft"] = now - t0
                                else:
                                    rec["gaps"].append(now - last)
                                last = now
                                rec["chunks"] += 1
                        if disconnect_after and rec["chunks"] >= disconnect_after:
                            rec["disconnected"] = True      # closing the response drops the connection
                            break
        else:
            r = await client.post(f"{url}/v1/chat/completions", json=req)
            rec["status"] = r.status_code
            if r.status_code == 200:
                rec["usage"] = r.json().get("usage")
                rec["done"] = True
            else:
                rec["error"] = r.text[:300]
    except (httpx.HTTPError, json.JSONDecodeError) as e:
        rec["transport_error"] = True
        rec["error"] = f"{type(e).__name__}: {e}"[:300]
    rec["e2e"] = time.perf_counter() - t0
    return rec


def step_delta(before: dict, after: dict) -> dict:
    """Engine steps during a section: count and mean wall ms per phase (what the engine spent, vs the gaps a
    client saw)."""
    res = {}
    for ph in ("prefill", "decode"):
        n = after.get(f"{ph}_count", 0) - before.get(f"{ph}_count", 0)
        t = after.get(f"{ph}_sum", 0) - before.get(f"{ph}_sum", 0)
        res[f"{ph}_steps"] = int(n)
        res[f"{ph}_step_mean_ms"] = round(1000 * t / n, 2) if n else None
        res[f"{ph}_s"] = round(t, 2)
        # p50/p99 as the upper bound of the histogram bucket they fall in (cumulative counts, this section only)
        b0 = dict(before.get(f"{ph}_buckets", []))
        cum = [(le, c - b0.get(le, 0)) for le, c in after.get(f"{ph}_buckets", [])]
        for q in (50, 99):
            res[f"{ph}_step_p{q}_le_ms"] = next((round(le * 1000, 1) for le, c in cum if n and c >= n * q / 100),
                                                None)
    return res


def summarize(recs: list[dict], wall: float, max_tokens: int | None = None) -> dict:
    ok = [r for r in recs if r["status"] == 200 and not r["error"] and not r["transport_error"]]
    full = [r for r in ok if not r["disconnected"]]
    usage = [r["usage"] for r in full if r["usage"]]
    prompt = sum(u["prompt_tokens"] for u in usage)
    cached = sum((u.get("prompt_tokens_details") or {}).get("cached_tokens", 0) for u in usage)
    out_tok = sum(u["completion_tokens"] for u in usage)
    gaps = [g for r in full for g in r["gaps"]]
    codes = collections.Counter(str(r["status"]) for r in recs)
    s = {"turns": len(full), "requests": len(recs), "wall_s": round(wall, 2),
         "ttft_p50_s": pct([r["ttft"] for r in full], 50), "ttft_p95_s": pct([r["ttft"] for r in full], 95),
         "turn_p50_s": pct([r["e2e"] for r in full], 50), "turn_p95_s": pct([r["e2e"] for r in full], 95),
         "turns_per_min": round(60 * len(full) / wall, 1) if wall else None,
         "output_tok_s": round(out_tok / wall, 1) if wall else None,
         "itl_p50_ms": pct(gaps, 50, 1000, 1), "itl_p99_ms": pct(gaps, 99, 1000, 1),
         "itl_max_ms": pct(gaps, 100, 1000, 1),
         # ~1.0 when every token carries text (the premise of TTFT-at-first-content and the gaps above)
         "content_chunks_per_token": round(sum(r["chunks"] for r in full if r["usage"]) / out_tok, 3)
         if out_tok else None,
         "prompt_tokens_mean": round(prompt / len(usage), 1) if usage else None,
         "cached_tokens_mean": round(cached / len(usage), 1) if usage else None,
         "prefix_hit_rate": round(cached / prompt, 3) if prompt else None,
         "turns_with_hit": sum(1 for u in usage if (u.get("prompt_tokens_details") or {}).get("cached_tokens")),
         "status_codes": dict(codes),
         "n_5xx": sum(1 for r in recs if r["status"] is not None and r["status"] >= 500),
         "n_non200": sum(1 for r in recs if r["status"] != 200),
         "stream_errors": sum(1 for r in recs if r["status"] == 200 and r["error"]),
         "transport_errors": sum(1 for r in recs if r["transport_error"]),
         "streams_without_done": sum(1 for r in recs if r["stream"] and r["status"] == 200 and not r["done"]
                                     and not r["disconnected"]),
         "all_streams_done": all(r["done"] for r in recs if r["stream"] and r["status"] == 200
                                 and not r["disconnected"])}
    if max_tokens:
        s["wrong_length"] = sum(1 for u in usage if u["completion_tokens"] != max_tokens)
    errs = collections.Counter(r["error"] for r in recs if r["error"])
    if errs:
        s["errors"] = errs.most_common(5)
    return s


async def run_agents(url: str, agents: list[Agent], shots: Shots, seconds: float, max_tokens: int,
                     think_s: float = 0.0) -> tuple:
    """Closed loop: every agent sends its next turn as soon as the last one ended (think_s=0), or after the phone
    has acted on the answer: `think_s` seconds x uniform(0.5, 1.5) per turn, seeded per agent. Open-AutoGLM's
    phone agent sleeps `default_tap_delay` = 1.0 s after a tap (phone_agent/config/timing.py) before it takes the
    next screenshot, so think_s=1.0 is the order of events one of its phones produces; 0 is the saturating
    stress loop the targets were first set on. Until `seconds` are up."""
    recs: list[dict] = []
    t0 = time.perf_counter()
    end = t0 + seconds
    async with http_client(len(agents)) as client:
        async def loop(a: Agent):
            rng = random.Random(7919 * a.i + 1)
            while time.perf_counter() < end:
                msgs, user = a.messages(await shots.new())
                rec = await chat(client, url, body(msgs, max_tokens))
                rec["history"] = len(a.history)
                recs.append(rec)
                a.advance(user)
                if think_s > 0:
                    await asyncio.sleep(think_s * rng.uniform(0.5, 1.5))
        await asyncio.gather(*(loop(a) for a in agents))
    return recs, time.perf_counter() - t0


# ------------------------------------------------------------------------------------------------ sections
def agent_section(args, srv: Server, tag: str) -> None:
    wl = Workload(model_dir(args))
    shots = Shots(args.shot)
    res = {"server": srv.name, "max_tokens": args.max_tokens, "screenshot": list(args.shot),
           "system_prompt_tokens": wl.count(wl.system)}
    try:
        for n in args.clients:
            secs = min(args.turns_s, left() - 30)
            if secs < 5:
                res[f"agents_{n}"] = "skipped: no time left"
                break
            agents = [Agent(i, wl, seed=1000 * n + i) for i in range(n)]
            before = srv.engine_steps()
            recs, wall = asyncio.run(run_agents(srv.url, agents, shots, secs, args.max_tokens, args.think_s))
            s = summarize(recs, wall, args.max_tokens)
            s["think_s"] = args.think_s
            s["engine"] = step_delta(before, srv.engine_steps())
            by_hist = collections.defaultdict(list)
            for r in recs:
                if r["ttft"] is not None:
                    by_hist[r["history"]].append(r["ttft"])
            s["ttft_p50_by_earlier_turns"] = {k: pct(v, 50) for k, v in sorted(by_hist.items())}
            s["server_alive"] = srv.alive()
            res[f"agents_{n}"] = s
            log(tag, res)
    finally:
        shots.close()


def short_section(args, srv: Server, tag: str) -> None:
    wl = Workload(model_dir(args))
    rng = random.Random(7)

    async def go(n, new):
        async with http_client(n) as client:
            reqs = [body([{"role": "user", "content": f"#{rng.random():.12f} " + eb.words(rng, 200)}], new)
                    for _ in range(n)]
            t = time.perf_counter()
            recs = await asyncio.gather(*(chat(client, srv.url, r) for r in reqs))
            return list(recs), time.perf_counter() - t
    n = args.short_clients
    asyncio.run(go(n, 8))       # the 64-row decode buckets are captured on first use, not in the measurement
    rounds = []
    for _ in range(max(1, args.short_rounds)):     # later rounds: every graph of the run captured
        before = srv.engine_steps()
        recs, wall = asyncio.run(go(n, args.short_tokens))
        s = summarize(recs, wall, args.short_tokens)
        s.update(clients=n, new_tokens=args.short_tokens, prompt_words=200,
                 engine=step_delta(before, srv.engine_steps()))
        rounds.append(s)
        time.sleep(1.0)
    s = dict(rounds[-1], rounds=[{k: r[k] for k in ("output_tok_s", "ttft_p50_s", "itl_p50_ms", "engine")}
                                 for r in rounds])
    log(tag, s)
    del wl


def soak_section(args, srv: Server, tag: str, minutes: float) -> dict:
    """Bursts of 8-32 agents (1-3 turns each) with 5-20 s idle gaps; ~10% text-only chats, ~10% clients that
    disconnect after a few chunks, ~10% non-streamed turns. PASS: zero 5xx, no stream errors, every completed
    stream ended with [DONE], the server process never died or changed, liveness always 200."""
    import httpx
    wl = Workload(model_dir(args))
    shots = Shots(args.shot)
    rng = random.Random(11)
    tiny = args.tiny
    pool = [Agent(i, wl, seed=50_000 + i) for i in range(32 if not tiny else 4)]
    lo, hi = (8, 32) if not tiny else (1, 3)
    gap_lo, gap_hi = (5, 20) if not tiny else (1, 3)
    samples: list[dict] = []
    recs: list[dict] = []
    pid = srv.pid
    end = time.perf_counter() + minutes * 60
    t_start = time.perf_counter()
    stop = asyncio.Event()

    async def monitor():
        async with httpx.AsyncClient(timeout=5, trust_env=False) as c:
            while True:
                smp = {"t": round(time.perf_counter() - t_start, 1), "gpu_mb": gpu_mem_mb(), "rss_mb": srv.rss_mb(),
                       "alive": srv.alive(), "pid": srv.pid}
                for probe in ("liveness", "readiness"):
                    try:
                        smp[probe] = (await c.get(f"{srv.url}/health/{probe}")).status_code
                    except httpx.HTTPError as e:
                        smp[probe] = type(e).__name__
                samples.append(smp)
                try:
                    await asyncio.wait_for(stop.wait(), 10 if not tiny else 2)
                    return
                except asyncio.TimeoutError:
                    pass

    async def turn(client, a: Agent):
        x = rng.random()
        if x < 0.10:       # a text-only chat
            req = body([{"role": "user", "content": f"#{rng.random():.12f} " + eb.words(rng, 120)}], 64)
            rec = await chat(client, srv.url, req)
            rec["kind"] = "text"
        else:
            msgs, user = a.messages(await shots.new())
            if x < 0.20:
                rec = await chat(client, srv.url, body(msgs, args.max_tokens), disconnect_after=rng.randint(1, 5))
                rec["kind"] = "disconnect"
            elif x < 0.30:
                rec = await chat(client, srv.url, body(msgs, args.max_tokens, stream=False))
                rec["kind"] = "non_stream"
            else:
                rec = await chat(client, srv.url, body(msgs, args.max_tokens))
                rec["kind"] = "agent"
            a.advance(user)
        rec["t"] = round(time.perf_counter() - t_start, 1)
        recs.append(rec)

    async def main():
        mon = asyncio.ensure_future(monitor())
        bursts, idle = 0, 0.0
        async with http_client(hi) as client:
            while time.perf_counter() < end - 5:
                chosen = rng.sample(pool, rng.randint(lo, min(hi, len(pool))))
                n_turns = rng.randint(1, 3)

                async def agent_burst(a):
                    for _ in range(n_turns):
                        if time.perf_counter() >= end:
                            return
                        await turn(client, a)
                await asyncio.gather(*(agent_burst(a) for a in chosen))
                bursts += 1
                gap = min(rng.uniform(gap_lo, gap_hi), max(0.0, end - time.perf_counter()))
                idle += gap
                await asyncio.sleep(gap)
        stop.set()
        await mon
        return bursts, idle

    try:
        bursts, idle = asyncio.run(main())
    finally:
        shots.close()
    wall = time.perf_counter() - t_start
    s = summarize(recs, wall, None)
    by_kind = collections.Counter(r.get("kind") for r in recs)
    agent_recs = [r for r in recs if r.get("kind") == "agent"]
    live_bad = [smp for smp in samples if smp["liveness"] != 200 or not smp["alive"] or smp["pid"] != pid]

    def series(key):
        xs = [smp[key] for smp in samples if smp[key] is not None]
        return {"first": xs[0], "last": xs[-1], "max": max(xs), "min": min(xs)} if xs else None
    s.update(minutes=round(wall / 60, 2), bursts=bursts, idle_s=round(idle, 1), kinds=dict(by_kind),
             agent_turns=len(agent_recs), agent_ttft_p50_s=pct([r["ttft"] for r in agent_recs], 50),
             agent_turn_p50_s=pct([r["e2e"] for r in agent_recs], 50),
             disconnects=sum(1 for r in recs if r["disconnected"]),
             server_restarts_or_death=int(not srv.alive() or srv.pid != pid),
             liveness_failures=len(live_bad), gpu_mem_mb=series("gpu_mb"), server_rss_mb=series("rss_mb"),
             samples=[{k: smp[k] for k in ("t", "gpu_mb", "rss_mb", "liveness", "readiness")} for smp in samples])
    fails = [k for k in ("n_5xx", "stream_errors", "streams_without_done", "transport_errors",
                         "server_restarts_or_death", "liveness_failures") if s[k]]
    s["verdict"] = "PASS" if not fails and recs else "FAIL"
    s["failed_on"] = fails if recs else ["no requests were made"]
    log(tag, s)
    print(f"SOAK {s['verdict']}" + (f": {fails}" if fails else ""), flush=True)
    return s


def starts_section(args, tag: str) -> None:
    """Fresh server starts in a row: start, wait for readiness (200, failure or timeout), one streamed request,
    SIGTERM. Server logs: the tail of each start into one $OUT/server-starts.log."""
    out_log = os.path.join(OUT, "server-starts.log")
    runs = []
    for i in range(args.n):
        if left() < 40:
            break
        srv, info = start_server(f"start{i}", args, out_log=out_log)
        rec = {"i": i, **{k: v for k, v in info.items() if k != "log_tail"}}
        try:
            if info["ready"]:
                async def one():
                    async with http_client(1) as client:
                        return await chat(client, srv.url, body(
                            [{"role": "user", "content": f"start {i}: open the settings app"}], 16))
                r = asyncio.run(one())
                rec["request_status"] = r["status"]
                rec["request_error"] = r["error"]
                rec["request_done"] = r["done"]
                if r["ttft"] is not None:
                    rec["exec_to_first_token_s"] = round(info["exec_to_ready_s"] + r["ttft"], 2)
                    rec["first_request_ttft_s"] = round(r["ttft"], 3)
            else:
                rec["log_tail"] = info.get("log_tail", tail(srv.log_path, 1500))[-1500:]
        finally:
            t = time.perf_counter()
            rec["exit_code"] = srv.stop(timeout=20, log_bytes=6000)
            rec["stop_s"] = round(time.perf_counter() - t, 2)
        runs.append(rec)
        ready = [r for r in runs if r["ready"] and r.get("request_status") == 200 and not r.get("request_error")]
        log(tag, {"n": len(runs), "ready_and_served": len(ready), "failed": len(runs) - len(ready),
                  "exec_to_ready_p50_s": pct([r.get("exec_to_ready_s") for r in ready], 50),
                  "exec_to_ready_max_s": pct([r.get("exec_to_ready_s") for r in ready], 100),
                  "exec_to_first_token_p50_s": pct([r.get("exec_to_first_token_s") for r in ready], 50),
                  "exec_to_first_token_max_s": pct([r.get("exec_to_first_token_s") for r in ready], 100),
                  "failures": [{"i": r["i"], "failure": r.get("failure"), "request_error": r.get("request_error")}
                               for r in runs if r not in ready],
                  "runs": runs})


# ------------------------------------------------------------------------------------------------ naive
def naive_section(args, tag: str) -> None:
    """The same agent turn through plain transformers, one request at a time: the model's own processor and chat
    template, `generate` (bf16, sdpa). TTFT: preprocessing + generate(max_new_tokens=1); turn: preprocessing +
    generate(max_new_tokens=N, min_new_tokens=N)."""
    import torch
    from PIL import Image
    from transformers import AutoModelForImageTextToText, AutoProcessor
    mdir = model_dir(args)
    if args.tiny and not os.path.exists(os.path.join(mdir, "config.json")):
        from function.tiny_model import build_tiny_model
        build_tiny_model(mdir)
    dev = "cuda" if torch.cuda.is_available() and not args.tiny else "cpu"
    dtype = torch.bfloat16 if dev == "cuda" else torch.float32
    t = time.perf_counter()
    model = AutoModelForImageTextToText.from_pretrained(mdir, dtype=dtype, attn_implementation="sdpa").to(dev)
    model.eval()
    try:
        proc = AutoProcessor.from_pretrained(mdir)
    except ImportError:     # no torchvision (the CPU venv): the same processor without its video part
        from pathlib import Path
        from function.engine.loader import load_processor
        proc = load_processor(Path(mdir))
    res = {"load_s": round(time.perf_counter() - t, 1), "device": dev, "dtype": str(dtype),
           "max_new_tokens": args.max_tokens, "turns": []}
    wl = Workload(mdir)
    agent = Agent(0, wl, seed=3)
    agent.history = agent.history[:0]

    def hf_messages(img):
        msgs, user = agent.messages("x")
        out = []
        for m in msgs:     # as function/api/serving.py converts them: strings, and parts for the user turn
            if isinstance(m["content"], str):
                out.append({"role": m["role"], "content": m["content"]})
            else:
                out.append({"role": "user", "content": [{"type": "text", "text": m["content"][0]["text"]},
                                                        {"type": "image", "image": img}]})
        return out, user

    def run(msgs, n):
        if dev == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        enc = proc.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True, return_dict=True,
                                       return_tensors="pt").to(dev)
        t1 = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(**enc, max_new_tokens=n, min_new_tokens=n, do_sample=False)
        if dev == "cuda":
            torch.cuda.synchronize()
        t2 = time.perf_counter()
        return t1 - t0, t2 - t0, int(enc["input_ids"].shape[1]), int(out.shape[1] - enc["input_ids"].shape[1])

    w, h = args.shot
    img = Image.open(io.BytesIO(shot_png(1, w, h))).convert("RGB")
    msgs, _ = hf_messages(img)
    run(msgs, 2)                      # warm: kernels, allocator
    for k in range(args.naive_turns):
        if left() < 10:
            break
        img = Image.open(io.BytesIO(shot_png(100 + k, w, h))).convert("RGB")
        msgs, user = hf_messages(img)
        prep, ttft, L, _ = run(msgs, 1)
        prep2, turn, _, n_out = run(msgs, args.max_tokens)
        res["turns"].append({"earlier_turns": len(agent.history), "prompt_tokens": L, "prep_s": round(prep, 3),
                             "ttft_s": round(ttft, 3), "turn_s": round(turn, 3), "new_tokens": n_out})
        agent.advance(user)
        ts = res["turns"]
        res.update(ttft_p50_s=pct([x["ttft_s"] for x in ts], 50), turn_p50_s=pct([x["turn_s"] for x in ts], 50),
                   prep_p50_s=pct([x["prep_s"] for x in ts], 50),
                   output_tok_s=round(sum(x["new_tokens"] for x in ts) / sum(x["turn_s"] for x in ts), 1))
        log(tag, res)


# ------------------------------------------------------------------------------------------------ graph == eager
def _engine(args, graphs: bool):
    from function.config import Config
    from function.engine.client import LocalEngine
    env = {"MODEL_CACHE_DIR": args.cache_dir, "QUANTIZATION": args.quant, "MAX_NUM_SEQS": str(args.max_num_seqs),
           "MAX_MODEL_LEN": str(args.max_model_len), "CUDA_GRAPHS": "true" if graphs else "false"}
    if args.tiny:
        env["DEVICE"] = "cpu"
    else:
        env["MODEL_PATH"] = args.model_dir
    e = LocalEngine(Config.from_env(env))
    t = time.time()
    e.start_loading()
    while not e.status()[1]:
        if e.error:
            raise RuntimeError(e.error)
        if time.time() - t > args.ready_timeout:
            raise RuntimeError(f"engine not ready after {args.ready_timeout}s: {e.status()}")
        time.sleep(0.05)
    return e, round(time.time() - t, 1)


def _script(args, wl: Workload):
    """The request-level cases (a list of batches; each batch is submitted at once): text, screenshot, prefix hit,
    a mixed batch, and concurrent batches for the decode buckets at the short and the long length bucket."""
    from PIL import Image
    from function.engine.protocol import ChatInput
    rng = random.Random(21)
    w, h = args.shot

    def img(seed):
        return Image.open(io.BytesIO(shot_png(seed, w, h))).convert("RGB")

    def text(n_tok, label):
        return ChatInput(messages=[{"role": "user", "content": fit_text(wl.count, rng, n_tok, f"[{label}] ")}])

    def turn(label, history, seed):
        msgs = [{"role": "system", "content": wl.system}]
        for u, a in history:
            msgs += [{"role": "user", "content": u}, {"role": "assistant", "content": a}]
        msgs.append({"role": "user", "content": [{"type": "text", "text": f"[{label}] what next?"},
                                                 {"type": "image", "image": img(seed)}]})
        return ChatInput(messages=msgs)
    hist = [(f"step {k}", wl.reply(random.Random(k))) for k in range(3)]
    cases = [("text", [[text(n, f"t{n}")] for n in (40, 200, 450, 1000)]),
             ("screenshot", [[turn("shot", [], 1)]]),
             ("prefix_hit", [[turn("agent", hist[:1], 2)], [turn("agent", hist[:1] + [("agent", "ok")], 3)]]),
             ("mixed_batch", [[text(60, "m1"), text(300, "m2"), turn("agent", hist[:2], 4), text(900, "m3"),
                               turn("agent", hist[:1] + [("agent", "ok")], 5)]])]
    sizes = [b for b in (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64) if b <= args.max_num_seqs]
    cases.append(("decode_buckets_short", [[text(30, f"d{b}-{i}") for i in range(b)] for b in sizes]))
    cases.append(("decode_buckets_long", [[text(1300, f"L{b}-{i}") for i in range(b)] for b in sizes[::3]]))
    return cases


def _run_script(e, cases, new_tokens: int) -> dict:
    from function.engine.protocol import SamplingParams
    p = SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True)
    out: dict = {}

    async def one(rid, chat):
        toks, cached = [], 0
        async for c in e.generate(rid, chat, p):
            toks += c.token_ids
            cached = c.cached_prompt_tokens
        return [toks, cached]

    async def go():
        for name, batches in cases:
            res = []
            for bi, batch in enumerate(batches):
                res.append(await asyncio.gather(*(one(f"{name}-{bi}-{i}", c) for i, c in enumerate(batch))))
            out[name] = res
    asyncio.run(go())
    return out


def _compare_tokens(a: dict, b: dict) -> dict:
    res = {}
    for name in a:
        pairs = [(x[0], y[0]) for ba, bb in zip(a[name], b[name]) for x, y in zip(ba, bb)]
        cached = [[x[1] for x in ba] for ba in a[name]]
        common = []
        for x, y in pairs:
            k = 0
            while k < min(len(x), len(y)) and x[k] == y[k]:
                k += 1
            common.append(k / max(1, len(x)))
        res[name] = {"requests": len(pairs), "first_token_agree": round(sum(x[:1] == y[:1] for x, y in pairs)
                                                                         / max(1, len(pairs)), 3),
                     "identical": sum(x == y for x, y in pairs),
                     "mean_common_prefix_frac": round(statistics.mean(common), 3) if common else None,
                     "cached_prompt_tokens_graphed": cached if len(cached) <= 4 else "-"}
    return res


def _logit_cmp(g, e, eager_again=None) -> dict:
    """Graph vs eager logits of the same rows: max |diff|, relative to max |logit|, and top-1 agreement on the
    rows where the eager top-1 leads the runner-up by more than twice the max |diff| (decisive rows)."""
    import torch
    g, e = g.float(), e.float()
    diff = (g - e).abs().max(dim=-1).values
    top2 = e.topk(2, dim=-1).values
    margin = top2[:, 0] - top2[:, 1]
    decisive = margin > 2 * diff
    agree = g.argmax(-1) == e.argmax(-1)
    r = {"rows": int(g.shape[0]), "max_abs_diff": round(float(diff.max()), 5),
         "rel_diff": round(float(diff.max() / e.abs().max().clamp(min=1e-6)), 5),
         "top1_agree": int(agree.sum()), "decisive_rows": int(decisive.sum()),
         "decisive_disagree": int((decisive & ~agree).sum()), "finite": bool(torch.isfinite(g).all())}
    if eager_again is not None:
        r["eager_vs_eager_max_abs_diff"] = round(float((eager_again.float() - e).abs().max()), 5)
    r["ok"] = r["finite"] and r["decisive_disagree"] == 0 and r["rel_diff"] < 0.05
    return r


def _runner_checks(args, e, tag, res) -> None:
    """On the graphed engine, its thread stopped so that this thread owns the runner: for every captured graph,
    the same static inputs replayed vs run eagerly; then the stale-input scenario of issue 14 (a big graphed
    prefill, then the capture of smaller buckets) must leave a live slot's K/V unchanged."""
    import torch
    from function.engine.runner import PrefillItem
    runner = e.runner
    e.core.stop()
    dev = runner.device
    gen = torch.Generator().manual_seed(0)
    vocab = min(runner.vocab, 50_000)

    def items_for(nb, qb):
        its = []
        for r in range(nb):
            L = qb if r == 0 else int(torch.randint(1, qb + 1, (1,), generator=gen))
            ids = torch.randint(10, vocab, (L,), generator=gen).tolist()
            its.append(PrefillItem(slot=r, token_ids=ids, start=0,
                                   position_ids=torch.arange(L).view(1, L).expand(3, L).clone(), images=[]))
        return its

    def with_mode(graphs, static, fn):
        saved = (runner.use_graphs, runner.static_prefill)
        runner.use_graphs, runner.static_prefill = graphs, static
        try:
            return fn().float().clone()
        finally:
            runner.use_graphs, runner.static_prefill = saved
    if runner.use_graphs:
        keys = sorted(runner.graphs, key=str)
    else:   # CPU: the graphed prefill's static-buffer path, run eagerly, stands in for the graph
        keys = [("prefill", nb, qb) for nb in (1, 2, 4) for qb in (64, 256) if qb <= runner.max_len]
    res["runner_graphs"] = len(keys)
    out = {}
    for key in keys:
        try:
            if key[0] == "prefill":
                _, nb, qb = key
                its = items_for(nb, qb)
                g = with_mode(runner.use_graphs, not runner.use_graphs, lambda: runner.prefill(its))
                s = with_mode(False, True, lambda: runner.prefill(its))
                ea = with_mode(False, False, lambda: runner.prefill(its))
                eb2 = with_mode(False, False, lambda: runner.prefill(its))
                out[str(key)] = {"graph_vs_eager": _logit_cmp(g, ea, eb2), "graph_vs_static_eager": _logit_cmp(g, s)}
            else:
                B, Ln = key
                top = min(Ln - 2, runner.max_len - 1)
                pos = [int(torch.randint(0, top + 1, (1,), generator=gen)) for _ in range(B)]
                pos[B - 1] = top
                runner.feed(torch.arange(B, device=runner.device),
                            torch.randint(10, vocab, (B,), generator=gen).to(runner.device))
                slots, dl = list(range(B)), [0] * B      # rope deltas 0
                if runner.bucket(B - 1, top) != (B, Ln):
                    out[str(key)] = {"skipped": f"inputs map to bucket {runner.bucket(B - 1, top)}"}
                    continue
                g = with_mode(True, False, lambda: runner.decode(slots, pos, dl)[:B])
                ea = with_mode(False, False, lambda: runner.decode(slots, pos, dl)[:B])
                eb2 = with_mode(False, False, lambda: runner.decode(slots, pos, dl)[:B])
                out[str(key)] = _logit_cmp(g, ea, eb2)
        except Exception as ex:  # noqa: BLE001
            out[str(key)] = {"error": f"{type(ex).__name__}: {ex}"[:400]}
        res["runner_graph_vs_eager"] = out
    res["runner_all_ok"] = all(v.get("ok", v.get("graph_vs_eager", {}).get("ok", False)) for v in out.values()
                               if "skipped" not in v) if out else None
    log(tag, res)
    if not runner.use_graphs:
        return
    # the stale-input scenario: a live slot, a big graphed prefill, then small buckets captured afresh
    try:
        live = min(runner.num_slots - 1, 9)
        L = 700
        ids = torch.randint(10, vocab, (L,), generator=gen).tolist()
        with_mode(False, False, lambda: runner.prefill([PrefillItem(
            slot=live, token_ids=ids, start=0, position_ids=torch.arange(L).view(1, L).expand(3, L).clone(),
            images=[])]))
        snap = [(k[live, :, :L].clone(), v[live, :, :L].clone()) for k, v in zip(runner.cache.k, runner.cache.v)]
        big = max((k for k in runner.graphs if k[0] == "prefill"), key=lambda k: k[1] * k[2], default=None)
        if big is not None:
            its = items_for(big[1], big[2])
            with_mode(True, False, lambda: runner.prefill(its))       # leaves its inputs in the static buffers
        redo = [k for k in runner.graphs if k[0] == "prefill" and (big is None or k[1] * k[2] < big[1] * big[2])]
        redo += [k for k in runner.graphs if k[0] != "prefill" and k[0] <= 2][:2]
        for k in redo:
            del runner.graphs[k]
        with torch.inference_mode():
            for k in redo:
                runner.capture(k)
        torch.cuda.synchronize()
        changed = sum(int(not (torch.equal(k[live, :, :L], a) and torch.equal(v[live, :, :L], b)))
                      for (k, v), (a, b) in zip(zip(runner.cache.k, runner.cache.v), snap))
        after = {}
        for k in redo:
            if k[0] == "prefill":
                its = items_for(k[1], k[2])
                g = with_mode(True, False, lambda: runner.prefill(its))
                ea = with_mode(False, False, lambda: runner.prefill(its))
                after[str(k)] = _logit_cmp(g, ea)
        res["stale_capture"] = {"big_prefill": str(big), "recaptured": [str(k) for k in redo],
                                "live_slot_layers_changed": changed, "after_recapture": after,
                                "ok": changed == 0 and all(v["ok"] for v in after.values())}
    except Exception as ex:  # noqa: BLE001 - a device-side assert ends the CUDA context: report it
        res["stale_capture"] = {"error": f"{type(ex).__name__}: {ex}"[:600], "ok": False}
    log(tag, res)
    del dev


def graphcheck_section(args, tag: str) -> None:
    """Graphs on, then graphs off, each engine in its own child process (so the second gets the whole card);
    the same scripted requests through both, greedy tokens compared; the runner-level logit checks run in the
    graphed child."""
    if args.phase:
        graphs = args.phase == "graphs"
        e, load_s = _engine(args, graphs=graphs)
        res: dict = {"load_s": load_s}
        wl = Workload(model_dir(args))      # after the load: --tiny builds its checkpoint there
        cases = _script(args, wl)
        t = time.time()
        while e.runner.pending and time.time() - t < 120:     # every planned graph captured first
            time.sleep(0.1)
        res.update(idle_capture_wait_s=round(time.time() - t, 1), pending_left=len(e.runner.pending),
                   use_graphs=e.runner.use_graphs, slots=e.num_slots)
        toks = _run_script(e, cases, args.check_tokens)
        res["graphs_captured"] = sorted(str(k) for k in e.runner.graphs)
        with open(os.path.join(LOGS, f"graphcheck-{args.phase}.json"), "w") as f:
            json.dump(toks, f)
        log(tag, res)
        if graphs:
            _runner_checks(args, e, tag, res)
        return
    extra = common_args(args) + ["--check-tokens", str(args.check_tokens), "--quant", args.quant]
    for phase in ("graphs", "eager"):
        path = os.path.join(LOGS, f"graphcheck-{phase}.json")
        if os.path.exists(path):
            os.remove(path)
        subsection(args, "graphcheck", extra + ["--phase", phase], 300, name=f"graphcheck_{phase}")
    try:
        toks = [json.load(open(os.path.join(LOGS, f"graphcheck-{p}.json"))) for p in ("graphs", "eager")]
    except OSError as ex:
        log(tag + "_requests", {"error": f"a phase wrote no tokens: {ex}"})
        return
    log(tag + "_requests_graph_vs_eager", _compare_tokens(*toks))


# ------------------------------------------------------------------------------------------------ orchestration
def subsection(args, what: str, extra: list[str], budget: float, name: str | None = None) -> None:
    """Run a section in a child process (GPU memory is freed when it exits); merge its JSON into ours."""
    name = name or what
    secs = min(budget, left() - 10)
    if secs < 20:
        log(name + "_skipped", "no time left")
        return
    child_out = os.path.join(LOGS, f"child-{name}")
    shutil.rmtree(child_out, ignore_errors=True)
    os.makedirs(child_out, exist_ok=True)
    cmd = [sys.executable, os.path.abspath(__file__), what, "--deadline", str(int(secs - 5))] + extra
    env = dict(os.environ, OUT=child_out, PYTHONUNBUFFERED="1")
    logf = os.path.join(OUT, f"{name}.log")
    with open(logf, "w") as f:
        try:
            rc = subprocess.run(cmd, env=env, stdout=f, stderr=subprocess.STDOUT, timeout=secs, cwd=ROOT).returncode
        except subprocess.TimeoutExpired:
            rc = "timeout"
    try:
        with open(os.path.join(child_out, JSON_NAME)) as f:
            for k, v in json.load(f).items():
                if k not in ("args", "done"):
                    log(k, v)
    except (OSError, ValueError):
        pass
    if rc != 0:
        log(name + "_error", {"rc": rc, "log_tail": tail(logf, 2500)})
    with open(logf) as f:
        text = f.read()
    if len(text) > 30_000:
        with open(logf, "w") as f:
            f.write(text[-30_000:])


def common_args(args) -> list[str]:
    out = ["--model-dir", args.model_dir, "--cache-dir", args.cache_dir, "--max-tokens", str(args.max_tokens),
           "--shot", f"{args.shot[0]}x{args.shot[1]}", "--naive-turns", str(args.naive_turns),
           "--max-num-seqs", str(args.max_num_seqs), "--max-model-len", str(args.max_model_len)]
    return out + (["--tiny"] if args.tiny else [])


def with_server(args, name: str, fn, quant=None) -> None:
    srv, info = start_server(name, args, quant)
    log(f"server_{name}", info)
    try:
        if info["ready"]:
            fn(srv)
    finally:
        rc = srv.stop()
        log(f"server_{name}_exit", {"exit_code": rc, "alive_until_stop": rc is not None})


def main():
    global DEADLINE
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", choices=["all", "build", "naive", "agent", "soak", "starts", "short", "graphcheck"])
    ap.add_argument("--tiny", action="store_true", help="the project's tiny model on CPU (smoke test)")
    ap.add_argument("--model-dir", default=os.environ.get("BENCH_MODEL_DIR", "/tmp/glm9b"))
    ap.add_argument("--cache-dir", default=None, help="MODEL_CACHE_DIR (default /tmp/modelcache; tiny: "
                                                      "/tmp/agent_bench_tiny)")
    ap.add_argument("--quant", default="none", help="QUANTIZATION for the server (none = bf16, nf4, ...)")
    ap.add_argument("--clients", default="1,8,32")
    ap.add_argument("--turns-s", type=float, default=60.0, help="seconds of closed-loop turns per concurrency")
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--think-s", type=float, default=0.0, help="agent: the phone's action time between a turn's "
                    "end and its next request, x uniform(0.5, 1.5) (0: closed loop; Open-AutoGLM's tap delay: 1.0)")
    ap.add_argument("--shot", default=None, help="screenshot WxH (default 1080x2400; tiny: 270x600)")
    ap.add_argument("--minutes", type=float, default=5.0, help="soak length")
    ap.add_argument("--n", type=int, default=20, help="starts: how many")
    ap.add_argument("--short-clients", "--short", type=int, default=64, dest="short_clients")
    ap.add_argument("--short-tokens", type=int, default=256)
    ap.add_argument("--short-rounds", type=int, default=2, help="measured rounds of --short-clients chats")
    ap.add_argument("--naive-turns", type=int, default=3)
    ap.add_argument("--check-tokens", type=int, default=16, help="graphcheck: greedy tokens per request")
    ap.add_argument("--max-num-seqs", type=int, default=None, help="MAX_NUM_SEQS (default 64; tiny: 8)")
    ap.add_argument("--max-model-len", type=int, default=8192)
    ap.add_argument("--ready-timeout", type=float, default=300.0)
    ap.add_argument("--env", action="append", default=[], help="extra server setting K=V (repeatable)")
    ap.add_argument("--sections", default="naive,agent,short,soak", help="all: which sections after build")
    ap.add_argument("--phase", default="", help=argparse.SUPPRESS)   # graphcheck's children
    ap.add_argument("--deadline", type=float, default=540.0, help="seconds for the whole run")
    args = ap.parse_args()
    DEADLINE = args.deadline
    if args.cache_dir is None:
        args.cache_dir = "/tmp/agent_bench_tiny" if args.tiny else "/tmp/modelcache"
    if args.max_num_seqs is None:
        args.max_num_seqs = 8 if args.tiny else 64
    args.shot = tuple(int(x) for x in (args.shot or ("270x600" if args.tiny else "1080x2400")).split("x"))
    if args.what == "short" and "--clients" in sys.argv:
        args.short_clients = int(args.clients.split(",")[0])
    args.clients = [int(x) for x in args.clients.split(",") if x]
    os.makedirs(OUT, exist_ok=True)
    q = "tiny" if args.tiny else ("bf16" if args.quant == "none" else args.quant)
    what = args.what
    log("args", {k: v for k, v in vars(args).items()})
    try:
        if what == "build":
            eb.MODEL_DIR, eb.log = args.model_dir, log
            eb.build()
        elif what == "naive":
            naive_section(args, f"naive_{q}")
        elif what == "agent":
            with_server(args, f"agent-{q}", lambda s: agent_section(args, s, f"agent_{q}"))
        elif what == "short":
            with_server(args, f"short-{q}", lambda s: short_section(args, s, f"short_{q}"))
        elif what == "soak":
            with_server(args, f"soak-{q}", lambda s: soak_section(args, s, f"soak_{q}",
                                                                   min(args.minutes, (left() - 40) / 60)))
        elif what == "starts":
            starts_section(args, f"starts_{q}")
        elif what == "graphcheck":
            graphcheck_section(args, f"graphcheck_{q}" + (f"_{args.phase}" if args.phase else ""))
        elif what == "all":
            sections = args.sections.split(",")
            if not args.tiny and not os.path.exists(os.path.join(args.model_dir, "config.json")):
                subsection(args, "build", ["--model-dir", args.model_dir], 200)
            if "naive" in sections:
                subsection(args, "naive", common_args(args), 150)

            def served(srv):
                if "agent" in sections:
                    agent_section(args, srv, f"agent_{q}")
                if "short" in sections and left() > 60:
                    short_section(args, srv, f"short_{q}")
                if "soak" in sections and left() > 60:
                    soak_section(args, srv, f"soak_{q}", min(args.minutes, (left() - 40) / 60))
            with_server(args, f"{q}", served)
    except BaseException as e:  # noqa: BLE001 - what was measured is already in the JSON
        log(f"{what}_error", {"type": type(e).__name__, "msg": str(e)[:800], "tb": traceback.format_exc()[-2500:]})
        raise
    finally:
        log("done", round(time.time() - T0, 1))


if __name__ == "__main__":
    main()
