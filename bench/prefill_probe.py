"""Where an agent turn's first token goes, in-process (no HTTP): one agent's turns (shared system prompt, 0-4 earlier
turns as text, a new 1080x2400 screenshot) through `LocalEngine.generate`, max_tokens=1, on the random-weight
full-size model. Per turn: preparation time (the processor, template, M-RoPE positions), queue + prefill time, the
prefix reused. Around the turns: a sampling profiler of the engine and preparation threads (which Python functions
the time is in), the torch profiler of one fresh and one prefix-hit turn (CPU ops vs GPU kernels), and SDPA's first
call on a new shape per backend (cuDNN builds an execution plan per shape).   -> $OUT/prefill_probe.json

    python3 bench/prefill_probe.py [seconds-budget] [--quant fp8] [--env QUANTIZE_VISION=true] [--agents 8]

Phases (issue 15's "GPU kernel time by phase"): the runner's vision-tower calls, text prefill (its prefill forwards
less the vision work inside them), decode steps, sampling and prefix copies are wrapped in `record_function`
ranges, so the torch profiler of a turn splits its kernel time by phase; and under `--agents N` in-process agents
(closed loop, 128 new tokens, no HTTP) CUDA events around the same calls give each phase's stream time over a
window, beside the wall time (what is left is the GPU idle or busy with work outside the phases).
-> $OUT/prefill_probe[-TAG].json
"""
import asyncio
import collections
import json
import os
import random
import statistics
import sys
import threading
import time
import traceback

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "bench"))
import agent_bench as ab  # noqa: E402
import engine_bench as eb  # noqa: E402

import torch  # noqa: E402

from function.engine.protocol import ChatInput, SamplingParams  # noqa: E402

import argparse  # noqa: E402
import contextlib  # noqa: E402

OUT = os.environ.get("OUT", "/tmp/out")
_ap = argparse.ArgumentParser()
_ap.add_argument("budget", nargs="?", type=float, default=150.0)
_ap.add_argument("--quant", default="none")
_ap.add_argument("--env", action="append", default=[], help="engine setting K=V (repeatable)")
_ap.add_argument("--agents", type=int, default=0, help="in-process agents for the phase window (0: none)")
_ap.add_argument("--window", type=float, default=20.0, help="seconds of the agents' window")
_ap.add_argument("--turns", type=int, default=12, help="one agent's turns, max_tokens=1")
_ap.add_argument("--shot", default="1080x2400")
_ap.add_argument("--tag", default="")
_ap.add_argument("--skip", default="", help="comma list of: processors,sdpa")
ARGS = _ap.parse_args()
BUDGET = ARGS.budget
SHOT = tuple(int(x) for x in ARGS.shot.split("x"))
T0 = time.time()
res: dict = {"quant": ARGS.quant, "env": ARGS.env}


def save():
    os.makedirs(OUT, exist_ok=True)
    name = f"prefill_probe-{ARGS.tag}.json" if ARGS.tag else "prefill_probe.json"
    json.dump(res, open(os.path.join(OUT, name), "w"), indent=1, default=str)


class Phases:
    """Wraps the runner's and the engine's calls by phase: each call runs inside `record_function("phase.NAME")`
    (the torch profiler attributes the kernels it launches to that range) and, while `timing`, between two CUDA
    events on the current stream (its stream time; events never synchronise the host). A vision call inside a
    prefill forward (the encode `_place_images` does) is counted as vision and taken out of text prefill."""

    NAMES = ("vision", "prefill", "decode", "sample", "prefix_copy")

    def __init__(self, core):
        self.core, self.runner = core, core.runner
        self.timing = False
        self.events: list = []       # (name, inside prefill, start event, end event)
        self._stack = threading.local()
        self._undo: list = []

    def _wrap(self, obj, attr: str, name: str):
        fn = getattr(obj, attr)
        cuda = torch.cuda.is_available()
        me = self

        def wrapped(*a, **k):
            stack = getattr(me._stack, "s", None) or []
            me._stack.s = stack
            outer = stack[-1] if stack else None
            if outer == name or (name == "vision" and outer == "vision"):
                return fn(*a, **k)          # nested call of the same phase (encode -> _encode_whole)
            stack.append(name)
            label = "vision_in_prefill" if name == "vision" and "prefill" in stack[:-1] else name
            try:
                with torch.profiler.record_function(f"phase.{label}"):
                    if me.timing and cuda:
                        e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                        e0.record()
                        out = fn(*a, **k)
                        e1.record()
                        me.events.append((name, "prefill" in stack[:-1], e0, e1))
                        return out
                    return fn(*a, **k)
            finally:
                stack.pop()
        setattr(obj, attr, wrapped)
        self._undo.append((obj, attr))

    def __enter__(self):
        r = self.runner
        self._wrap(r, "encode", "vision")
        self._wrap(r, "_encode_whole", "vision")
        self._wrap(r, "prefill", "prefill")
        self._wrap(r, "decode", "decode")
        self._wrap(r, "copy_prefix", "prefix_copy")
        self._wrap(self.core, "_sample", "sample")
        return self

    def __exit__(self, *a):
        for obj, attr in reversed(self._undo):
            with contextlib.suppress(AttributeError):
                delattr(obj, attr)     # the instance attribute goes; the class's method is back
        self._undo = []

    def summary(self) -> dict:
        """Stream ms per phase over the recorded calls (sync first); text prefill excludes the vision inside it."""
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        tot = collections.Counter()
        calls = collections.Counter()
        vis_in_prefill = 0.0
        for name, in_prefill, e0, e1 in self.events:
            ms = e0.elapsed_time(e1)
            tot[name] += ms
            calls[name] += 1
            if name == "vision" and in_prefill:
                vis_in_prefill += ms
        out = {n: {"stream_ms": round(tot[n], 1), "calls": calls[n]} for n in self.NAMES if calls[n]}
        if "prefill" in out:
            out["text_prefill"] = {"stream_ms": round(tot["prefill"] - vis_in_prefill, 1),
                                   "calls": calls["prefill"], "note": "prefill forwards less the vision inside them"}
        return out

    @staticmethod
    def from_profile(ka) -> dict:
        """Kernel ms per phase from a profiler's key_averages (device time of the phase.* ranges, inclusive)."""
        got = {x.key[len("phase."):]: x for x in ka if x.key.startswith("phase.")}
        out = {k: {"kernel_ms": round(v.device_time_total / 1000, 1), "host_ms": round(v.cpu_time_total / 1000, 1),
                   "calls": v.count} for k, v in got.items()}
        if "prefill" in out:
            out["text_prefill_kernel_ms"] = round(out["prefill"]["kernel_ms"] - (
                out.get("vision_in_prefill", {}).get("kernel_ms", 0.0)), 1)
        return out


class StackSampler:
    """Every `interval` s, the innermost frames of the named threads: inclusive time per function (file:function),
    a poor man's py-spy that needs no package."""

    def __init__(self, prefixes=("engine", "prepare"), interval=0.002, depth=40):
        self.prefixes, self.interval, self.depth = prefixes, interval, depth
        self.counts = {p: collections.Counter() for p in prefixes}
        self.leaf = {p: collections.Counter() for p in prefixes}
        self.samples = collections.Counter()
        self._stop = threading.Event()

    def __enter__(self):
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()
        return self

    def __exit__(self, *a):
        self._stop.set()
        self._t.join()

    def _run(self):
        while not self._stop.wait(self.interval):
            names = {t.ident: t.name for t in threading.enumerate()}
            for ident, frame in sys._current_frames().items():
                name = names.get(ident, "")
                p = next((p for p in self.prefixes if name.startswith(p)), None)
                if p is None:
                    continue
                self.samples[p] += 1
                seen, f, k = set(), frame, 0
                while f is not None and k < self.depth:
                    c = f.f_code
                    key = f"{os.path.basename(c.co_filename)}:{c.co_name}"
                    if k == 0:
                        self.leaf[p][key] += 1
                    if key not in seen:
                        self.counts[p][key] += 1
                        seen.add(key)
                    f, k = f.f_back, k + 1

    def report(self, top=30):
        out = {}
        for p in self.prefixes:
            n = max(1, self.samples[p])
            out[p] = {"samples": self.samples[p], "sample_ms": self.interval * 1000,
                      "inclusive": [(k, round(v / n, 3)) for k, v in self.counts[p].most_common(top)],
                      "leaf": [(k, round(v / n, 3)) for k, v in self.leaf[p].most_common(15)]}
        return out


def sdpa_first_calls():
    """SDPA on a fresh prefill's shapes (40 layers' worth of calls is 40x this): first call on a new length vs a
    repeat, per backend."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    import torch.nn.functional as F
    out = {}
    backends = {"default": None, "cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION,
                "efficient": SDPBackend.EFFICIENT_ATTENTION}
    base = 5231
    for name, be in backends.items():
        rows = []
        for i, L in enumerate((base + 7, base + 13, base + 29)):
            q = torch.randn(1, 32, L, 128, device="cuda", dtype=torch.bfloat16)
            k = torch.randn(1, 2, L, 128, device="cuda", dtype=torch.bfloat16)
            v = torch.randn_like(k)
            times = []
            for _ in range(3):
                torch.cuda.synchronize()
                t = time.perf_counter()
                try:
                    if be is None:
                        F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
                    else:
                        with sdpa_kernel([be]):
                            F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
                    torch.cuda.synchronize()
                except RuntimeError as e:
                    times = [f"refused: {str(e)[:120]}"]
                    break
                times.append(round((time.perf_counter() - t) * 1000, 2))
            rows.append({"L": L, "ms_first_then_repeats": times})
        out[name] = rows
        base += 101
    return out


def processors():
    """The two image processor backends on one 1080x2400 screenshot: time per image and how far apart their
    pixel values are (the engine serves the torchvision one where torchvision imports)."""
    import io
    from PIL import Image
    from function.engine.loader import image_processor_class
    from transformers.models.glm4v.image_processing_pil_glm4v import Glm4vImageProcessorPil
    img = Image.open(io.BytesIO(ab.shot_png(7, 1080, 2400))).convert("RGB")
    out, pv = {"served": image_processor_class().__name__}, {}
    for cls in {Glm4vImageProcessorPil, image_processor_class()}:
        p = cls.from_pretrained(eb.MODEL_DIR)
        times = []
        for _ in range(5):
            t = time.perf_counter()
            r = p(images=[img], return_tensors="pt")
            times.append(time.perf_counter() - t)
        pv[cls.__name__] = r["pixel_values"]
        out[cls.__name__] = {"ms_median": round(statistics.median(times) * 1000, 1),
                             "grid": r["image_grid_thw"].tolist()}
    if len(pv) == 2:
        a, b = pv.values()
        out["max_abs_diff"] = round((a - b).abs().max().item(), 4) if a.shape == b.shape else f"{a.shape} vs {b.shape}"
        out["mean_abs_diff"] = round((a - b).abs().mean().item(), 5) if a.shape == b.shape else None
    return out


def main():
    skip = set(ARGS.skip.split(",")) - {""}
    if "processors" not in skip:
        try:
            res["processors"] = processors()
        except Exception as ex:  # noqa: BLE001
            res["processors"] = f"failed: {type(ex).__name__}: {ex}"
        print("processors", res["processors"], flush=True)
    env = dict(kv.split("=", 1) for kv in ARGS.env)
    e, load_s = eb.make_engine(ARGS.quant, env=env)
    res["load_s"] = load_s
    core = e.core
    runner = core.runner
    t = time.time()
    while runner.has_idle_work() and time.time() - t < 60:
        time.sleep(0.2)
    res["idle_captures_wait_s"] = round(time.time() - t, 1)
    res["graphs"] = sorted(str(k) for k in runner.graphs)
    if torch.cuda.is_available() and "sdpa" not in skip:
        res["sdpa"] = core.call(sdpa_first_calls).result()
    print("sdpa", res.get("sdpa"), flush=True)
    save()

    prep = e.preparer
    orig = prep.prepare
    prep_times: dict = {}

    def timed_prepare(chat, params, *a, **k):
        t = time.perf_counter()
        p = orig(chat, params, *a, **k)
        prep_times[id(chat)] = time.perf_counter() - t
        return p
    prep.prepare = timed_prepare

    wl = ab.Workload(eb.MODEL_DIR)
    agent = ab.Agent(0, wl, seed=3)
    agent.history = []
    n_turns = max(2, ARGS.turns)
    shots = [ab.shot_url(100 + i, *SHOT) for i in range(n_turns + 2)]

    def as_served(msgs):
        """Image parts as the API hands them to the engine: a decoded PIL image and the digest of its bytes."""
        import base64
        import hashlib
        import io
        from PIL import Image
        out, digests = [], []
        for m in msgs:
            if isinstance(m["content"], list):
                parts = []
                for p in m["content"]:
                    if p.get("type") == "image_url":
                        raw = base64.b64decode(p["image_url"]["url"].split(",", 1)[1])
                        parts.append({"type": "image", "image": Image.open(io.BytesIO(raw)).convert("RGB")})
                        digests.append(hashlib.sha256(raw).hexdigest())
                    else:
                        parts.append(p)
                m = {"role": m["role"], "content": parts}
            out.append(m)
        return ChatInput(messages=out, image_digests=digests)

    async def turn(msgs, max_tokens=1):
        chat = as_served(msgs)
        before = dict(core.stats)
        t = time.perf_counter()
        first = last = None
        async for c in e.generate(f"probe-{time.time_ns()}", chat, SamplingParams(max_tokens=max_tokens,
                                                                                 temperature=0.0, ignore_eos=True)):
            first = first or time.perf_counter()
            last = c
        await asyncio.sleep(0.05)   # the step's stats are added after its tokens are emitted
        d = {k: round(core.stats[k] - before[k], 4) for k in ("prefills", "prefill_tokens", "prefill_s")}
        return {"ttft_s": round(first - t, 4), "prepare_s": round(prep_times.pop(id(chat), float("nan")), 4),
                "prompt": last.prompt_tokens, "cached": last.cached_prompt_tokens, **d}

    turns = []
    with StackSampler() as sampler:
        for i in range(n_turns):
            msgs, user = agent.messages(shots[i])
            r = asyncio.run(turn(msgs))
            r["history"] = len(agent.history)
            turns.append(r)
            print("turn", r, flush=True)
            agent.advance(user)
    res["turns"] = turns
    res["sampler"] = sampler.report()
    hit = [r for r in turns[1:] if r["cached"]]
    res["summary"] = {
        "ttft_p50_s": statistics.median(r["ttft_s"] for r in turns[1:]),
        "prepare_p50_s": statistics.median(r["prepare_s"] for r in turns[1:]),
        "prefill_step_p50_s": statistics.median(r["prefill_s"] for r in turns[1:]),
        "hit_turns": len(hit)}
    print("summary", res["summary"], flush=True)
    save()

    # a fresh turn (a system prompt nobody has sent) and a hit, under the torch profiler
    from torch.profiler import ProfilerActivity, profile
    fresh_sys = [{"role": "system", "content": "Unseen rules. " + wl.system[::-1]}]
    msgs, user = agent.messages(shots[n_turns])
    phases = Phases(core)
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    for name, m in (("fresh", fresh_sys + msgs[1:]), ("hit", agent.messages(shots[n_turns + 1])[0])):
        # started and stopped on the engine thread: this build's profiler records CPU ops (the phase ranges) only
        # on the thread that starts it; CUDA kernels are recorded from every thread
        prof = profile(activities=acts)
        with phases:
            core.call(prof.start).result()
            try:
                r = asyncio.run(turn(m))
            finally:
                core.call(prof.stop).result()
        ka = prof.key_averages()
        cuda_total = sum(x.self_device_time_total for x in ka) / 1000
        res[f"profile_{name}"] = {
            "turn": r, "gpu_kernel_ms": round(cuda_total, 1), "phases": Phases.from_profile(ka),
            "top_self_cpu": [(x.key, round(x.self_cpu_time_total / 1000, 1), x.count)
                             for x in sorted(ka, key=lambda x: -x.self_cpu_time_total)[:25]],
            "top_gpu": [(x.key[:90], round(x.self_device_time_total / 1000, 1), x.count)
                        for x in sorted(ka, key=lambda x: -x.self_device_time_total)[:15]]}
        print(name, r, "gpu ms", round(cuda_total, 1), res[f"profile_{name}"]["phases"], flush=True)
        save()
    if ARGS.agents > 0:
        res[f"agents_{ARGS.agents}"] = agents_window(e, core, wl, ARGS.agents, ARGS.window, as_served)
        print("agents", res[f"agents_{ARGS.agents}"], flush=True)
        save()
    e.shutdown()


def agents_window(e, core, wl, n: int, window: float, as_served) -> dict:
    """n in-process agents in a closed loop (128 new tokens, greedy, ignore_eos) for `window` s, after one warm-up
    turn each; CUDA events time every phase call of the window. The decode step of a step with a prefill beside
    it is counted in decode; GPU time outside the phases (idle, or work between the calls) is wall - their sum."""
    shots = ab.Shots(SHOT)
    agents = [ab.Agent(i, wl, seed=500 + i) for i in range(n)]
    recs: list = []

    async def run(seconds: float, keep: bool):
        end = time.perf_counter() + seconds

        async def loop(a):
            while time.perf_counter() < end:
                msgs, user = a.messages(await shots.new())
                chat = as_served(msgs)
                t = time.perf_counter()
                first = last = None
                async for c in e.generate(f"w-{time.time_ns()}", chat, SamplingParams(
                        max_tokens=128, temperature=0.0, ignore_eos=True)):
                    first = first or time.perf_counter()
                    last = c
                if keep:
                    recs.append({"ttft": first - t, "turn": time.perf_counter() - t,
                                 "cached": last.cached_prompt_tokens, "prompt": last.prompt_tokens})
                a.advance(user)
                if not keep:
                    return
        await asyncio.gather(*(loop(a) for a in agents))

    try:
        asyncio.run(run(60.0, keep=False))          # one turn each: decode buckets of this batch captured
        phases = Phases(core)
        before = dict(core.stats)
        with phases:
            phases.timing = True
            t = time.perf_counter()
            asyncio.run(run(window, keep=True))
            wall = time.perf_counter() - t
            out = phases.summary()
    finally:
        shots.close()
    stats = {k: round(core.stats[k] - before[k], 3) for k in before if isinstance(before[k], (int, float))}
    busy = sum(v["stream_ms"] for k, v in out.items() if k in ("vision", "prefill", "decode", "sample",
                                                               "prefix_copy"))
    ttfts = sorted(r["ttft"] for r in recs)
    return {"agents": n, "wall_s": round(wall, 2), "turns": len(recs),
            "turns_per_min": round(60 * len(recs) / wall, 1),
            "ttft_p50_s": round(statistics.median(ttfts), 3) if ttfts else None,
            "ttft_p95_s": round(ttfts[int(0.95 * (len(ttfts) - 1))], 3) if ttfts else None,
            "turn_p50_s": round(statistics.median(r["turn"] for r in recs), 3) if recs else None,
            "prefix_hit_rate": round(sum(r["cached"] for r in recs) / max(1, sum(r["prompt"] for r in recs)), 3),
            "phases": out, "phase_sum_ms": round(busy, 1),
            "outside_phases_ms": round(wall * 1000 - busy, 1),
            "per_turn_ms": {k: round(v["stream_ms"] / max(1, len(recs)), 1) for k, v in out.items()},
            "engine_stats": stats}


if __name__ == "__main__":
    try:
        main()
    except BaseException:
        res["error"] = traceback.format_exc()
        print(res["error"], flush=True)
    finally:
        res["wall_s"] = round(time.time() - T0, 1)
        save()
