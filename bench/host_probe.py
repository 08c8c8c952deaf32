"""Where the engine thread's host time goes with many streams decoding, in-process (no HTTP): N concurrent
greedy text streams on the engine, a cProfile of the engine thread only (enabled and disabled on that thread through
`EngineCore.call`), beside the engine's own step counters. What call 13 could not attribute: ~5 ms of host work
inside each 64-row decode step (15.6 ms step, ~10 ms graph).  -> $OUT/host_probe.json

    python3 bench/host_probe.py [STREAMS] [NEW_TOKENS]      # GPU: the random-weight model in /tmp/glm9b
    python3 bench/host_probe.py 8 16 --tiny                 # CPU smoke on the project's tiny model
"""
from __future__ import annotations

import asyncio
import cProfile
import io
import json
import os
import pstats
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
OUT = os.environ.get("OUT", "/tmp/out")


def make_engine(tiny: bool, streams: int):
    from function.config import Config
    from function.engine.client import LocalEngine
    env = {"MAX_NUM_SEQS": str(max(streams, 2)), "MAX_MODEL_LEN": "4096", "WARMUP": "false"}
    if tiny:
        env.update(DEVICE="cpu", MODEL_CACHE_DIR=os.environ.get("MODEL_CACHE_DIR", "/tmp/host_probe_tiny"))
    else:
        env.update(MODEL_PATH=os.environ.get("BENCH_MODEL_DIR", "/tmp/glm9b"), MODEL_CACHE_DIR="/tmp/modelcache")
    e = LocalEngine(Config.from_env(env))
    e.start_loading()
    while not e.status()[1]:
        if e.error:
            raise RuntimeError(e.error)
        time.sleep(0.05)
    return e


async def run_streams(e, n: int, new: int, tag: str) -> float:
    from function.engine.protocol import ChatInput, SamplingParams
    params = SamplingParams(max_tokens=new, temperature=0.0, ignore_eos=True)

    async def one(i):
        chat = ChatInput(messages=[{"role": "user", "content": f"#{tag}-{i} open the settings and tap wifi " * 20}])
        async for _ in e.generate(f"{tag}-{i}", chat, params):
            pass
    t = time.perf_counter()
    await asyncio.gather(*(one(i) for i in range(n)))
    return time.perf_counter() - t


def main() -> None:
    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    tiny = "--tiny" in sys.argv
    streams = int(args[0]) if args else 64
    new = int(args[1]) if len(args) > 1 else 256
    e = make_engine(tiny, streams)
    core = e.core
    asyncio.run(run_streams(e, streams, 8, "warm"))   # the decode buckets of this batch, captured on first use
    while not e.idle():
        time.sleep(0.05)
    prof = cProfile.Profile()
    before = dict(core.stats)
    core.call(prof.enable).result()
    wall = asyncio.run(run_streams(e, streams, new, "run"))
    core.call(prof.disable).result()
    st = {k: round(core.stats[k] - before[k], 4) for k in before}
    steps = max(1, st["decode_steps"])
    buf = io.StringIO()
    ps = pstats.Stats(prof, stream=buf)
    rows = []
    for (file, line, fn), (cc, nc, tt, ct, _) in ps.stats.items():
        rows.append({"fn": f"{os.path.basename(file)}:{line}:{fn}", "calls": nc, "tottime_s": round(tt, 4),
                     "cumtime_s": round(ct, 4), "us_per_decode_step": round(1e6 * tt / steps, 1)})
    res = {"streams": streams, "new_tokens": new, "wall_s": round(wall, 2),
           "output_tok_s": round(streams * new / wall, 1), "engine": st,
           "decode_ms_per_step": round(1000 * st["decode_s"] / steps, 2),
           "mean_rows": round(st["decode_rows"] / steps, 1),
           "top_tottime": sorted(rows, key=lambda r: -r["tottime_s"])[:40],
           "top_cumtime": sorted(rows, key=lambda r: -r["cumtime_s"])[:40]}
    os.makedirs(OUT, exist_ok=True)
    with open(os.path.join(OUT, "host_probe.json"), "w") as f:
        json.dump(res, f, indent=1)
    print(json.dumps({k: v for k, v in res.items() if not k.startswith("top")}))
    for r in res["top_tottime"][:15]:
        print(r)
    e.shutdown()


if __name__ == "__main__":
    main()
