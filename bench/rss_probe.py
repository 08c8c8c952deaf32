"""Host-memory (RSS) probe of the real server under agent-like traffic, on CPU with the tiny model.

The server is started as the image's entrypoint runs it (func-python + hypercorn, `serve(new)`), with a small
in-process hook installed first (this file's `server_main`): a daemon thread that answers commands dropped into
$RSS_PROBE_DIR (`snap-N` files) with a JSON report: VmRSS / RssAnon, glibc's mallinfo2 (arena bytes, bytes in
use, free bytes kept in arenas, mmapped bytes), the live objects of the request path (prepared prompts, image
tensors, PIL images, numpy arrays, torch tensors: counts and bytes), the response cache, gc counts by type, the
thread count, tracemalloc's top growth since the previous snap (RSS_PROBE_TRACEMALLOC=1), and, for `trim-N`, the
RSS before and after `malloc_trim(0)` (how much of the RSS is freed memory that glibc kept).

The driver sends `--requests` requests at `--concurrency`: agent turns (a 1.5k-token-ish system prompt, 0-4 old
turns as text, a fresh text nonce and a 1080x2400 PNG screenshot of mostly noise, so PNGs are ~5-7 MB and base64
bodies ~9 MB), ~10 % text chats, ~10 % streams that the client drops after 1-3 chunks, ~10 % non-streamed turns;
samples the server's RSS every `--sample-s`; takes snaps after the warm-up, at every quarter and after an idle
gap; writes everything to --out (JSON).

    python bench/rss_probe.py --requests 200 --concurrency 8 --out /tmp/rss_default.json
    python bench/rss_probe.py --env MALLOC_ARENA_MAX=2 --out /tmp/rss_arena2.json
    python bench/rss_probe.py --env MALLOC_MMAP_THRESHOLD_=1048576 --out /tmp/rss_mmap1m.json
"""
from __future__ import annotations

import argparse
import asyncio
import base64
import collections
import ctypes
import gc
import io
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ProcessPoolExecutor

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "bench"))
from engine_bench import free_port, words  # noqa: E402  (stdlib-only at import)

MODEL = "autoglm-phone-9b"


# ---------------------------------------------------------------------------------------------- in the server
class _MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                               "fsmblks", "uordblks", "fordblks", "keepcost")]


def _libc():
    if "malloc" in os.environ.get("LD_PRELOAD", ""):     # jemalloc/tcmalloc: glibc's malloc stats are not theirs
        return None
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None


def _proc_status() -> dict:
    out = {}
    with open("/proc/self/status") as f:
        for ln in f:
            k, _, v = ln.partition(":")
            if k in ("VmRSS", "RssAnon", "RssFile", "VmHWM", "Threads"):
                out[k] = int(v.split()[0]) // 1024 if k != "Threads" else int(v.split()[0])
    return out


def _mallinfo() -> dict:
    libc = _libc()
    if libc is None or not hasattr(libc, "mallinfo2"):
        return {}
    libc.mallinfo2.restype = _MallInfo2
    m = libc.mallinfo2()
    mb = 1 / 2**20
    return {"arena_mb": round(m.arena * mb, 1), "in_use_mb": round(m.uordblks * mb, 1),
            "free_in_arenas_mb": round(m.fordblks * mb, 1), "mmapped_mb": round(m.hblkhd * mb, 1),
            "mmapped_chunks": m.hblks, "top_releasable_mb": round(m.keepcost * mb, 1)}


def _arena_count() -> int | None:
    """Number of glibc arenas (malloc_info's <heap nr=...> entries)."""
    libc = _libc()
    if libc is None:
        return None
    try:
        libc.open_memstream.restype = ctypes.c_void_p
        buf, size = ctypes.c_char_p(), ctypes.c_size_t()
        fp = libc.open_memstream(ctypes.byref(buf), ctypes.byref(size))
        libc.malloc_info(0, ctypes.c_void_p(fp))
        libc.fclose(ctypes.c_void_p(fp))
        text = ctypes.string_at(buf, size.value).decode()
        libc.free(buf)
        return text.count("<heap nr=")
    except Exception:   # noqa: BLE001 - diagnostics only
        return None


def _smaps() -> dict:
    """Resident anonymous memory by kind of mapping: the main heap, glibc thread-arena heaps (64 MiB reservations),
    other anonymous mappings (mmapped malloc chunks, torch/numpy buffers, thread stacks), and file mappings."""
    kinds = collections.Counter()
    big = []
    cur = None
    with open("/proc/self/smaps") as f:
        for ln in f:
            first = ln.split(None, 1)[0]
            if "-" in first and not first.endswith(":"):
                parts = ln.split()
                lo, hi = (int(x, 16) for x in parts[0].split("-"))
                name = parts[5] if len(parts) > 5 else ""
                cur = {"size_mb": (hi - lo) / 2**20, "name": name, "aligned64": lo % (64 << 20) == 0}
            elif first == "Rss:" and cur is not None:
                rss = int(ln.split()[1]) / 1024
                name = cur["name"]
                if name == "[heap]":
                    k = "main_heap"
                elif name.startswith("["):
                    k = name
                elif name:
                    k = "file"
                elif cur["aligned64"] and cur["size_mb"] <= 64:
                    k = "arena_heap_64M"
                else:
                    k = "anon_other"
                kinds[k] += rss
                if rss >= 16 and k != "file":
                    big.append((round(rss, 1), round(cur["size_mb"], 1), k))
    return {"rss_mb_by_kind": {k: round(v, 1) for k, v in kinds.most_common()},
            "largest_anon": sorted(big, reverse=True)[:12]}


def _objects() -> dict:
    """Live objects of the request path, by type: counts and bytes."""
    import numpy as np
    try:
        import torch
    except ImportError:
        torch = None
    from PIL import Image
    counts = collections.Counter()
    tensors = collections.Counter()
    t_bytes = collections.Counter()
    np_n = np_bytes = 0
    pil_n = pil_bytes = 0
    interesting = {"PreparedPrompt", "PromptImage", "Sequence", "LoadedImage", "ChatInput", "OutputText",
                   "Chunk", "PrefillItem", "_Recorder", "Recorder", "CompletionChunk", "Task", "Future"}
    named = collections.Counter()
    stores = []
    for o in gc.get_objects():
        t = type(o)
        counts[t.__name__] += 1
        if t.__name__ in interesting:
            named[t.__name__] += 1
        if torch is not None and isinstance(o, torch.Tensor):
            try:
                if o.device.type == "cpu" and not o.is_meta:
                    key = f"{o.dtype}"
                    nb = o.untyped_storage().nbytes()
                    if nb >= 1 << 20:
                        tensors[key + " >=1MB"] += 1
                        t_bytes[key + " >=1MB"] += nb
            except Exception:   # noqa: BLE001
                pass
        elif isinstance(o, np.ndarray):
            if o.base is None and o.nbytes >= 1 << 20:
                np_n += 1
                np_bytes += o.nbytes
        elif isinstance(o, Image.Image):
            pil_n += 1
            try:
                pil_bytes += o.width * o.height * len(o.getbands())
            except Exception:   # noqa: BLE001
                pass
        if t.__name__ == "MemoryStore":
            stores.append({"entries": len(o), "bytes": o.bytes})
    mb = 1 / 2**20
    return {"request_objects": dict(named), "tensors_cpu_ge_1mb": {k: [tensors[k], round(t_bytes[k] * mb, 1)]
                                                                    for k in tensors},
            "numpy_ge_1mb": [np_n, round(np_bytes * mb, 1)], "pil_images": [pil_n, round(pil_bytes * mb, 1)],
            "response_cache": stores, "gc_top": counts.most_common(25), "gc_total": sum(counts.values())}


_PREV_TM = None


def _tracemalloc_diff() -> dict | None:
    global _PREV_TM
    import tracemalloc
    if not tracemalloc.is_tracing():
        return None
    snap = tracemalloc.take_snapshot().filter_traces([tracemalloc.Filter(False, tracemalloc.__file__)])
    cur, peak = tracemalloc.get_traced_memory()
    out = {"traced_mb": round(cur / 2**20, 1), "peak_mb": round(peak / 2**20, 1)}
    if _PREV_TM is not None:
        stats = snap.compare_to(_PREV_TM, "lineno")
        out["growth_top"] = [f"{s.size_diff / 2**20:+.2f} MB ({s.count_diff:+d}) {s.traceback}" for s in stats[:15]]
    out["size_top"] = [f"{s.size / 2**20:.2f} MB ({s.count}) {s.traceback}" for s in snap.statistics("lineno")[:15]]
    tracemalloc.reset_peak()
    _PREV_TM = snap
    return out


def _report(cmd: str) -> dict:
    rep = {"cmd": cmd, "t": time.time()}
    gc.collect()
    rep["status"] = _proc_status()
    rep["mallinfo"] = _mallinfo()
    rep["arenas"] = _arena_count()
    try:
        rep["smaps"] = _smaps()
    except Exception as e:  # noqa: BLE001
        rep["smaps"] = f"{type(e).__name__}: {e}"
    rep["threads"] = sorted(collections.Counter(t.name.rstrip("0123456789_-") for t in threading.enumerate())
                            .items())
    try:
        rep["objects"] = _objects()
    except Exception as e:  # noqa: BLE001
        rep["objects"] = f"{type(e).__name__}: {e}"
    rep["tracemalloc"] = _tracemalloc_diff()
    libc = _libc()
    if cmd.startswith("trim") and libc is not None:
        before = _proc_status()["VmRSS"]
        t = time.perf_counter()
        libc.malloc_trim(0)
        rep["trim"] = {"rss_before_mb": before, "rss_after_mb": _proc_status()["VmRSS"],
                       "seconds": round(time.perf_counter() - t, 3), "mallinfo_after": _mallinfo()}
    return rep


def _hook_thread(cmd_dir: str) -> None:
    os.makedirs(cmd_dir, exist_ok=True)
    while True:
        for name in sorted(os.listdir(cmd_dir)):
            if name.endswith(".json") or name.startswith("."):
                continue
            path = os.path.join(cmd_dir, name)
            try:
                rep = _report(name)
            except Exception as e:  # noqa: BLE001
                rep = {"cmd": name, "error": f"{type(e).__name__}: {e}"}
            with open(path + ".json.tmp", "w") as f:
                json.dump(rep, f, default=str)
            os.replace(path + ".json.tmp", path + ".json")
            os.remove(path)
        time.sleep(0.2)


def server_main() -> None:
    """The server's entrypoint with the probe hook: serve(new) as the Dockerfile does."""
    if os.environ.get("RSS_PROBE_TRACEMALLOC") == "1":
        import tracemalloc
        tracemalloc.start(int(os.environ.get("RSS_PROBE_TRACEMALLOC_FRAMES", "1")))
    threading.Thread(target=_hook_thread, args=(os.environ["RSS_PROBE_DIR"],), name="rss-probe",
                     daemon=True).start()
    from func_python.http import serve
    from function import new
    serve(new)


# ---------------------------------------------------------------------------------------------- the driver
def shot_png(seed: int, w: int, h: int) -> bytes:
    """A screenshot-sized PNG that does not compress: noise, with a few flat bars (status bar, buttons)."""
    import numpy as np
    from PIL import Image
    rng = np.random.default_rng(seed)
    a = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    r = random.Random(seed)
    for _ in range(12):
        y = r.randrange(h - 80)
        a[y:y + r.randrange(20, 80)] = [r.randrange(256) for _ in range(3)]
    b = io.BytesIO()
    Image.fromarray(a).save(b, "PNG", compress_level=1)
    return b.getvalue()


def shot_url(seed: int, w: int, h: int) -> str:
    return "data:image/png;base64," + base64.b64encode(shot_png(seed, w, h)).decode()





SYSTEM = ("You are a phone-operating agent. Read the screenshot and answer with <think>reasoning</think>"
          "<answer>do(action=...)</answer>. Rules: " + words(random.Random(5), 1100))



def rss_of(pid: int) -> dict | None:
    try:
        out = {}
        with open(f"/proc/{pid}/status") as f:
            for ln in f:
                k, _, v = ln.partition(":")
                if k in ("VmRSS", "RssAnon", "Threads"):
                    out[k] = int(v.split()[0]) // 1024 if k != "Threads" else int(v.split()[0])
        return out
    except OSError:
        return None


class Probe:
    def __init__(self, args):
        self.args = args
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.cmd_dir = os.path.join(args.work, f"cmd-{self.port}")
        self.log_path = os.path.join(args.work, f"server-{self.port}.log")
        self.proc = None
        self.samples: list[dict] = []
        self.snaps: list[dict] = []
        self.events: list[tuple[float, str]] = []
        self.t0 = time.perf_counter()
        self._stop = threading.Event()
        self._n = 0

    def now(self) -> float:
        return round(time.perf_counter() - self.t0, 1)

    def start(self) -> None:
        env = dict(os.environ)
        env.update(LISTEN_ADDRESS=f"127.0.0.1:{self.port}", MODEL_CACHE_DIR=self.args.cache_dir,
                   MAX_NUM_SEQS=str(self.args.max_num_seqs), MAX_MODEL_LEN=str(self.args.max_model_len),
                   PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1", DEVICE="cpu", RSS_PROBE_DIR=self.cmd_dir,
                   PYTHONPATH=os.pathsep.join([ROOT, os.path.join(ROOT, "bench")]))
        env.pop("MODEL_PATH", None)
        if self.args.tracemalloc:
            env["RSS_PROBE_TRACEMALLOC"] = "1"
        for kv in self.args.env:
            k, _, v = kv.partition("=")
            env[k] = v
        os.makedirs(self.args.work, exist_ok=True)
        with open(self.log_path, "wb") as f:
            self.proc = subprocess.Popen([sys.executable, "-c", "import rss_probe; rss_probe.server_main()"],
                                         cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT,
                                         start_new_session=True)
        threading.Thread(target=self._sampler, daemon=True).start()

    def _sampler(self) -> None:
        while not self._stop.is_set():
            r = rss_of(self.proc.pid)
            if r is None:
                return
            self.samples.append({"t": self.now(), **r})
            self._stop.wait(self.args.sample_s)

    def wait_ready(self, timeout: float = 300) -> None:
        import httpx
        end = time.perf_counter() + timeout
        while time.perf_counter() < end:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited {self.proc.returncode}; see {self.log_path}")
            try:
                if httpx.get(f"{self.url}/health/readiness", timeout=3, trust_env=False).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        raise RuntimeError("server not ready")

    def snap(self, label: str, trim: bool = False) -> dict:
        self._n += 1
        name = f"{'trim' if trim else 'snap'}-{self._n:03d}"
        path = os.path.join(self.cmd_dir, name)
        open(path, "w").close()
        end = time.time() + 120
        while not os.path.exists(path + ".json"):
            if time.time() > end:
                raise RuntimeError("no snap answer")
            time.sleep(0.1)
        with open(path + ".json") as f:
            rep = json.load(f)
        rep["label"], rep["t_probe"] = label, self.now()
        self.snaps.append(rep)
        st, mi = rep.get("status", {}), rep.get("mallinfo", {})
        obj = rep.get("objects") if isinstance(rep.get("objects"), dict) else {}
        print(f"[{self.now():6.1f}s] snap {label}: rss {st.get('VmRSS')} MB anon {st.get('RssAnon')} | malloc "
              f"in use {mi.get('in_use_mb')} free-in-arenas {mi.get('free_in_arenas_mb')} mmapped "
              f"{mi.get('mmapped_mb')} arenas {rep.get('arenas')} | tensors {obj.get('tensors_cpu_ge_1mb')} "
              f"np {obj.get('numpy_ge_1mb')} pil {obj.get('pil_images')} req {obj.get('request_objects')} "
              f"cache {obj.get('response_cache')} | smaps {(rep.get('smaps') or {}).get('rss_mb_by_kind')}" + (f" | trim {rep['trim']['rss_before_mb']} -> "
                                                     f"{rep['trim']['rss_after_mb']} MB" if trim else ""),
              flush=True)
        return rep

    def stop(self) -> None:
        self._stop.set()
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)


async def chat(client, url: str, req: dict, disconnect_after: int | None = None) -> dict:
    import httpx
    rec = {"status": None, "error": None, "kind": None}
    t0 = time.perf_counter()
    try:
        if req.get("stream"):
            async with client.stream("POST", f"{url}/v1/chat/completions", json=req) as r:
                rec["status"] = r.status_code
                chunks = 0
                async for line in r.aiter_lines():
                    if line.startswith("data:") and line[5:].strip() != "[DONE]":
                        chunks += 1
                        if disconnect_after and chunks >= disconnect_after:
                            break
        else:
            r = await client.post(f"{url}/v1/chat/completions", json=req)
            rec["status"] = r.status_code
            if r.status_code != 200:
                rec["error"] = r.text[:200]
    except httpx.HTTPError as e:
        rec["error"] = f"{type(e).__name__}: {e}"[:200]
    rec["s"] = round(time.perf_counter() - t0, 2)
    return rec


async def drive(p: Probe, shots: list[str], n: int, conc: int, rng: random.Random, recs: list) -> None:
    import httpx
    a = p.args
    queue = list(range(n))
    async with httpx.AsyncClient(timeout=httpx.Timeout(600, connect=15), trust_env=False,
                                 limits=httpx.Limits(max_connections=conc + 4)) as client:
        async def worker(w: int):
            hist = rng.randrange(5)
            while queue:
                i = queue.pop()
                x = rng.random()
                nonce = f"[agent {w} req {i} {rng.random():.9f}]"
                if x < 0.10:
                    req = {"model": MODEL, "max_tokens": a.max_tokens, "temperature": 0, "ignore_eos": True,
                           "stream": True, "messages": [{"role": "user", "content": nonce + " " + words(rng, 120)}]}
                    kind, disc = "text", None
                else:
                    msgs = [{"role": "system", "content": SYSTEM}]
                    for k in range(hist):
                        msgs += [{"role": "user", "content": f"step {k} " + words(rng, 25) + " (screenshot omitted)"},
                                 {"role": "assistant", "content": "<think>" + words(rng, 90) +
                                  "</think><answer>do(action=\"Tap\", element=[500,800])</answer>"}]
                    msgs.append({"role": "user", "content": [
                        {"type": "text", "text": nonce + " " + words(rng, 20)},
                        {"type": "image_url", "image_url": {"url": shots[rng.randrange(len(shots))]}}]})
                    hist = 0 if hist >= 4 else hist + 1
                    stream = x >= 0.20
                    req = {"model": MODEL, "max_tokens": a.max_tokens, "temperature": 0, "ignore_eos": True,
                           "stream": stream, "messages": msgs}
                    if stream:
                        req["stream_options"] = {"include_usage": True}
                    kind = "non_stream" if x < 0.20 else ("disconnect" if x < 0.30 else "agent")
                    disc = rng.randint(1, 3) if kind == "disconnect" else None
                rec = await chat(client, p.url, req, disc)
                rec["kind"], rec["t"] = kind, p.now()
                recs.append(rec)
        await asyncio.gather(*(worker(w) for w in range(conc)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=200)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=8)
    ap.add_argument("--shots", type=int, default=12, help="distinct screenshots (made before the server starts)")
    ap.add_argument("--shot", default="1080x2400")
    ap.add_argument("--max-num-seqs", type=int, default=8)
    ap.add_argument("--max-model-len", type=int, default=8192)
    ap.add_argument("--sample-s", type=float, default=2.0)
    ap.add_argument("--idle-s", type=float, default=20.0, help="idle gap after the load, before the last snap")
    ap.add_argument("--tracemalloc", action="store_true", help="RSS_PROBE_TRACEMALLOC=1 in the server")
    ap.add_argument("--env", action="append", default=[], help="extra server env K=V (repeatable)")
    ap.add_argument("--cache-dir", default="/tmp/agent_bench_tiny")
    ap.add_argument("--work", default="/tmp/rss_probe")
    ap.add_argument("--out", default="/tmp/rss_probe/result.json")
    args = ap.parse_args()
    w, h = (int(x) for x in args.shot.split("x"))
    t = time.perf_counter()
    with ProcessPoolExecutor(2) as pool:
        shots = list(pool.map(shot_url, range(args.shots), [w] * args.shots, [h] * args.shots))
    print(f"{len(shots)} screenshots {w}x{h}, data URLs {min(map(len, shots)) / 1e6:.1f}-"
          f"{max(map(len, shots)) / 1e6:.1f} MB, made in {time.perf_counter() - t:.1f}s", flush=True)
    p = Probe(args)
    recs: list[dict] = []
    result = {"args": vars(args), "shot_url_mb": round(sum(map(len, shots)) / len(shots) / 1e6, 2)}
    try:
        p.start()
        p.wait_ready()
        time.sleep(3)           # the after-ready warm-up
        p.snap("ready")
        rng = random.Random(7)
        quarter = max(1, args.requests // 4)
        t_load = time.perf_counter()
        for q in range(4):
            asyncio.run(drive(p, shots, quarter, args.concurrency, rng, recs))
            p.snap(f"after {len(recs)} requests")
        result["load_s"] = round(time.perf_counter() - t_load, 1)
        time.sleep(args.idle_s)
        p.snap(f"idle {args.idle_s:.0f}s")
        p.snap("malloc_trim", trim=True)
        time.sleep(2)
        result["rss_after_trim_2s"] = rss_of(p.proc.pid)
    finally:
        p.stop()
        codes = collections.Counter(f"{r['kind']}:{r['status']}" for r in recs)
        result.update(requests=len(recs), codes=dict(codes), errors=collections.Counter(
            r["error"] for r in recs if r["error"]).most_common(3), samples=p.samples, snaps=p.snaps)
        rs = [s["VmRSS"] for s in p.samples]
        if rs:
            result["rss_mb"] = {"first": rs[0], "max": max(rs), "last": rs[-1]}
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1, default=str)
        print(json.dumps({k: result.get(k) for k in ("requests", "codes", "errors", "load_s", "rss_mb",
                                                    "rss_after_trim_2s")}), flush=True)
        print("series (t, VmRSS MB):", [(s["t"], s["VmRSS"]) for s in p.samples[::3]], flush=True)


if __name__ == "__main__":
    main()
