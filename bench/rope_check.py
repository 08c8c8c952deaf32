"""The rotary kernels of engine/rope.py on the card, against the torch ops they replace (GLM-4.1V-9B's shapes):
bit-identical outputs, eager and replayed from a CUDA graph, and the time per call (CUDA events, median of 50).

    python3 bench/rope_check.py          -> $OUT/rope_check.json
"""
import json
import os
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402

from function.engine import rope  # noqa: E402

OUT = os.environ.get("OUT", "/tmp/out")


def timed(fn, reps=50):
    ts = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        ts.append(a.elapsed_time(b) * 1000)
    return round(statistics.median(ts), 1)


def main():
    dev, dt = torch.device("cuda"), torch.bfloat16
    res = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__}
    t = time.perf_counter()
    res["self_check"] = rope.self_check(dev, dt, (32, 2, 128), (12, 128), 64)
    res["self_check_s"] = round(time.perf_counter() - t, 3)
    g = torch.Generator(device="cpu").manual_seed(0)
    cases = {"text decode B=8": ("pairs", 8, 1), "text decode B=32": ("pairs", 32, 1),
             "text prefill L=3512": ("pairs", 1, 3512), "vision N=13416": ("halves", 1, 13416)}
    for name, (kind, B, L) in cases.items():
        if kind == "pairs":
            qkv = (4 * torch.randn(B, L, 36, 128, generator=g)).to(dev, dt)
            ang = (50 * torch.randn(B, L, 64, generator=g)).to(dev)
            cos, sin = ang.cos().to(dt), ang.sin().to(dt)

            def views(t):
                return t[:, :, :32].transpose(1, 2), t[:, :, 32:34].transpose(1, 2)
            ref = lambda t: rope.mrope_torch(*views(t), cos, sin)  # noqa: E731
            fused = lambda t: rope.mrope(*views(t), cos, sin)  # noqa: E731
        else:
            qkv = (4 * torch.randn(L, 3, 12, 128, generator=g)).to(dev, dt)
            ang = (50 * torch.randn(L, 128, generator=g)).to(dev)
            cos, sin = ang.cos(), ang.sin()
            ref = lambda t: rope.vision_torch(t[:, 0], t[:, 1], cos, sin)  # noqa: E731
            fused = lambda t: rope.vision(t[:, 0], t[:, 1], cos, sin)  # noqa: E731
        want = ref(qkv)
        buf = qkv.clone()
        got = fused(buf)
        row = {"equal_eager": all(torch.equal(a, b) for a, b in zip(got, want))}
        # the same call captured in a CUDA graph (as inside the engine's decode graphs), replayed on fresh inputs
        static = qkv.clone()
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            fused(static.clone())
        torch.cuda.current_stream().wait_stream(s)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = fused(static)
        static.copy_(qkv)
        graph.replay()
        torch.cuda.synchronize()
        row["equal_graph"] = all(torch.equal(a, b) for a, b in zip(out, want))
        scratch = qkv.clone()
        row["torch_us"] = timed(lambda: ref(scratch))
        row["kernel_us"] = timed(lambda: fused(scratch))
        row["speedup"] = round(row["torch_us"] / row["kernel_us"], 2) if row["kernel_us"] else None
        res[name] = row
        print(name, row, flush=True)
    os.makedirs(OUT, exist_ok=True)
    json.dump(res, open(os.path.join(OUT, "rope_check.json"), "w"), indent=1)
    print(json.dumps(res), flush=True)


if __name__ == "__main__":
    main()
