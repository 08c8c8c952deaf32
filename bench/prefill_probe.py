"""Where an agent turn's first token goes, in-process (no HTTP): one agent's turns (shared system prompt, 0-4 earlier
turns as text, a new 1080x2400 screenshot) through `LocalEngine.generate`, max_tokens=1, on the random-weight
full-size model. Per turn: preparation time (the processor, template, M-RoPE positions), queue + prefill time, the
prefix reused. Around the turns: a sampling profiler of the engine and preparation threads (which Python functions
the time is in), the torch profiler of one fresh and one prefix-hit turn (CPU ops vs GPU kernels), and SDPA's first
call on a new shape per backend (cuDNN builds an execution plan per shape).   -> $OUT/prefill_probe.json

    python3 bench/prefill_probe.py [seconds-budget]
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

OUT = os.environ.get("OUT", "/tmp/out")
BUDGET = float(sys.argv[1]) if len(sys.argv) > 1 else 150.0
T0 = time.time()
res: dict = {}


def save():
    os.makedirs(OUT, exist_ok=True)
    json.dump(res, open(os.path.join(OUT, "prefill_probe.json"), "w"), indent=1, default=str)


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
    try:
        res["processors"] = processors()
    except Exception as ex:  # noqa: BLE001
        res["processors"] = f"failed: {type(ex).__name__}: {ex}"
    print("processors", res["processors"], flush=True)
    e, load_s = eb.make_engine("none")
    res["load_s"] = load_s
    core = e.core
    runner = core.runner
    t = time.time()
    while runner.has_idle_work() and time.time() - t < 60:
        time.sleep(0.2)
    res["idle_captures_wait_s"] = round(time.time() - t, 1)
    res["graphs"] = sorted(str(k) for k in runner.graphs)
    if torch.cuda.is_available():
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
    shots = [ab.shot_url(100 + i, 1080, 2400) for i in range(14)]

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
        for i in range(12):
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
    msgs, user = agent.messages(shots[12])
    for name, m in (("fresh", fresh_sys + msgs[1:]), ("hit", agent.messages(shots[13])[0])):
        with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])) as prof:
            r = asyncio.run(turn(m))
        ka = prof.key_averages()
        cuda_total = sum(x.self_device_time_total for x in ka) / 1000
        res[f"profile_{name}"] = {
            "turn": r, "gpu_kernel_ms": round(cuda_total, 1),
            "top_self_cpu": [(x.key, round(x.self_cpu_time_total / 1000, 1), x.count)
                             for x in sorted(ka, key=lambda x: -x.self_cpu_time_total)[:25]],
            "top_gpu": [(x.key[:90], round(x.self_device_time_total / 1000, 1), x.count)
                        for x in sorted(ka, key=lambda x: -x.self_device_time_total)[:15]]}
        print(name, r, "gpu ms", round(cuda_total, 1), flush=True)
        save()
    e.shutdown()


if __name__ == "__main__":
    try:
        main()
    except BaseException:
        res["error"] = traceback.format_exc()
        print(res["error"], flush=True)
    finally:
        res["wall_s"] = round(time.time() - T0, 1)
        save()
