"""Where a decode step's time goes, in-process (no HTTP): the runner's graphed step alone, then whole engine steps
(sampling, host work) for one stream, on the random-weight full-size model.  -> $OUT/decode_probe.json"""
import asyncio
import json
import os
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "bench"))
import engine_bench as eb  # noqa: E402

import torch  # noqa: E402

from function.engine.protocol import ChatInput, SamplingParams  # noqa: E402

res = {}
e, load_s = eb.make_engine("none")
res["load_s"] = load_s
runner = e.runner
core = e.core


def runner_step_ms(B, pos):
    def step():
        return e.runner.decode(list(range(B)), [pos] * B, [0] * B)
    e.runner.feed(torch.arange(B, device=e.runner.device), torch.full((B,), 11, device=e.runner.device))
    step()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(30):
        step()
    torch.cuda.synchronize()
    return round((time.perf_counter() - t) / 30 * 1000, 2)


res["runner_decode_ms"] = core.call(lambda: {f"B{b}_pos{p}": runner_step_ms(b, p)
                                             for b in (1, 8, 32) for p in (500, 5200)}).result()
res["graphs"] = sorted(str(k) for k in runner.graphs)
print(res, flush=True)


async def one(params, text):
    gaps, last = [], None
    async for _ in e.generate(f"p{time.time()}", ChatInput(messages=[{"role": "user", "content": text}]), params):
        now = time.perf_counter()
        if last is not None:
            gaps.append((now - last) * 1000)
        last = now
    return gaps


text = "open the settings app and tap wifi " * 700
for name, p in (("greedy_plain", SamplingParams(max_tokens=96, temperature=0.0, ignore_eos=True)),
                ("checkpoint_defaults", SamplingParams(max_tokens=96, temperature=1.0, top_k=2, top_p=1e-5,
                                                       repetition_penalty=1.1, ignore_eos=True))):
    before = dict(core.stats)
    gaps = asyncio.run(one(p, text))
    st = {k: core.stats[k] - before[k] for k in ("decode_steps", "decode_s")}
    res[name] = {"gap_p50_ms": round(statistics.median(gaps), 2), "gap_p90_ms": round(sorted(gaps)[int(.9 * len(gaps))], 2),
                 "engine_decode_ms_per_step": round(st["decode_s"] / max(1, st["decode_steps"]) * 1000, 2)}
    print(name, res[name], flush=True)
os.makedirs(os.environ.get("OUT", "/tmp/out"), exist_ok=True)
json.dump(res, open(os.path.join(os.environ.get("OUT", "/tmp/out"), "decode_probe.json"), "w"), indent=1)
e.shutdown()
