"""FP8 against bf16 on one GPU, in the same run, on the random-weight full-size GLM-4.1V-9B of bench/engine_bench.py.

    python3 bench/fp8_bench.py all [DEADLINE_S]       # GPU: every section below, results in $OUT/bench.json
    python3 bench/fp8_bench.py build,gemm,accuracy 570   # some sections (a device call lasts at most 600 s)
    python3 bench/fp8_bench.py smoke                  # CPU: accuracy on the tiny model (emulated FP8), JSON on stdout

Sections:
  build     the random-weight full-size checkpoint (engine_bench's build), once per machine.
  gemm      the decoder's matrix products (q, k/v, o, gate_up, down) at M = 1, 8, 64, 5500 tokens, each replayed
            in a CUDA graph: bf16 F.linear, the Fp8Linear call (activation quantization + torch._scaled_mm), the
            same with torch-op activation quantization, _scaled_mm alone, _scaled_mm with use_fast_accum; and the
            sum over the 40 layers (GEMM time per decode step).
  accuracy  bf16 vs fp8 on the same prompts: relative error of the final hidden states and logits, top-1 agreement
            of greedy tokens over 128 steps (teacher-forced on bf16's tokens, and free-running: steps until the
            first difference), weights on the card.
  decode    the engine's ModelRunner (CUDA graphs) decode step, ms per step at B = 1, 8, 32, 64, bf16 vs fp8.
  engine    engine_bench's engine section (streams 1/8/32/64, TTFT with 8 clients, agent turns) for none and fp8.
  cold      process exec -> ready: bf16, fp8 first start (convert + write the copy), fp8 from the pre-quantized copy.
  prefill   prefill sizes (M = 512, 2048, 4096, 5400 rows) of the same projections: bf16 (nn.Linear -> F.linear),
            the Fp8Linear call as the engine makes it (activation quantization + torch._scaled_mm), the quantization
            kernel alone, _scaled_mm alone on pre-quantized inputs (and with use_fast_accum), each in a CUDA graph
            (GPU time) and eagerly (wall and host issue time per call, as continuing prefill chunks run); ratios to
            bf16; sums over the 40 layers and the 40 layers' projections run eagerly in order; a torch.profiler
            table (top kernels by GPU time, top host ops) of one layer's fp8 and bf16 calls at 2048 rows and fp8's
            at 2000 (no multiple of 256); first-call times of the weight-only path at row counts new to its launch
            config (Triton specialization). ~30 s; runs before accuracy.
  gemv      decode sizes (M = 1, 2, 4, 8, 16, 32, 64 rows) of the same projections, each in a CUDA graph: bf16
            F.linear, the `_scaled_mm` path (activation quantization + torch._scaled_mm), the weight-only Triton
            kernel (function/engine/fp8_gemv.py) with its launch config; max and norm relative error of each against
            an fp32 reference; weight bytes per second; the sum over the 40 layers (GEMM time of one decode step).
  gemv_tune the weight-only kernel's launch configs swept per shape and M (fills fp8.GEMV_TABLE); slow (compiles).
  warm      start-up kernel work of the fp8 path, in two fresh processes sharing one new TRITON_CACHE_DIR (empty,
            then warm): fp8.device_support's probes, fp8.warm_kernels on a 2-layer native GLM-4.1V-9B (random
            weights, the decoder's shapes, q/k/v fused as the engine runs them) for MAX_NUM_SEQS=32's row classes,
            then the first call of every projection at row counts serving meets (1, 3, 20, 32, 37, 48, 64): with
            the kernels warmed none of them should compile (ms, not the 280-550 ms of a compile). ~1 min.
  check     Fp8Linear on torch._scaled_mm against its fp32 emulation (rows 1, 8, 64, 300) and replayed in a CUDA
            graph (bit-identical to eager), and the weight-only path at 1..64 rows against its fp32 reference, eager
            and in a graph: the GPU half of tests/test_fp8.py, which CI runs on CPU.

    python3 bench/fp8_bench.py gemv,check 120         # the weight-only kernel against bf16 and _scaled_mm (~1 min)
    python3 bench/fp8_bench.py prefill 80             # where the prefill-size fp8 path spends its time (< 1 min)
"""
from __future__ import annotations

import copy
import dataclasses
import gc
import json
import os
import random
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "bench"))

import engine_bench as eb  # noqa: E402  (its log/bounded/build/engine_section/cold, same OUT and model dir)

# GLM-4.1V-9B text decoder: hidden 4096, 32 heads x 128, 2 KV heads, intermediate 13696, 40 layers. (K, N) per call.
SHAPES = {"q_proj": (4096, 4096), "k_proj": (4096, 256), "v_proj": (4096, 256), "o_proj": (4096, 4096),
          "gate_up_proj": (4096, 2 * 13696), "down_proj": (13696, 4096)}
LAYERS = 40
ROWS = (1, 8, 64, 5500)


def _graph_us(fn, reps):
    """Microseconds per call of `fn`, captured `reps` times in one CUDA graph (launch costs as in the engine)."""
    import torch
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(reps):
            fn()
    g.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(5):
        start.record()
        g.replay()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) * 1000 / reps)
    del g
    return round(sorted(times)[len(times) // 2], 2)


def gemm():
    import torch
    from torch import nn
    from function.engine import fp8

    support = fp8.device_support("cuda")
    eb.log("fp8_support", {"scaled_mm": support.scaled_mm, "fuse_bias": support.fuse_bias,
                           "triton_quant": support.triton, "reason": support.reason,
                           "capability": list(torch.cuda.get_device_capability())})
    res, per_step = {}, {}
    for name, (K, N) in SHAPES.items():
        lin = nn.Linear(K, N, bias=name in ("q_proj", "k_proj", "v_proj"), device="cuda", dtype=torch.bfloat16)
        m = fp8.Fp8Linear.from_linear(lin, scaled_mm=support.scaled_mm)
        m.fuse_bias = support.fuse_bias
        for M in ROWS:
            x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
            reps = 20 if M * K * N < 5e10 else 5
            r = {"bf16_us": _graph_us(lambda: lin(x), reps)}
            r["fp8_us"] = _graph_us(lambda: m(x), reps)
            qx, sx = fp8.quantize_rows(x)
            sw = m.weight_scale.view(1, -1)
            r["quant_only_us"] = _graph_us(lambda: fp8.quantize_rows(x), reps)
            r["scaled_mm_only_us"] = _graph_us(lambda: torch._scaled_mm(qx, m.weight.t(), scale_a=sx, scale_b=sw,
                                                                        out_dtype=torch.bfloat16), reps)
            try:
                r["scaled_mm_fast_accum_us"] = _graph_us(lambda: torch._scaled_mm(
                    qx, m.weight.t(), scale_a=sx, scale_b=sw, out_dtype=torch.bfloat16, use_fast_accum=True), reps)
            except RuntimeError as e:
                r["scaled_mm_fast_accum_us"] = f"unsupported: {str(e)[:120]}"
            saved = fp8._triton_quant
            fp8._triton_quant = None
            r["fp8_torch_quant_us"] = _graph_us(lambda: m(x), reps)
            fp8._triton_quant = saved
            r["speedup"] = round(r["bf16_us"] / r["fp8_us"], 2)
            r["bf16_TBps_weights"] = round(K * N * 2 / (r["bf16_us"] * 1e-6) / 1e12, 2)
            r["fp8_TFLOPs"] = round(2 * M * K * N / (r["fp8_us"] * 1e-6) / 1e12, 1)
            res[f"{name}_M{M}"] = r
            for k in ("bf16_us", "fp8_us", "fp8_torch_quant_us", "scaled_mm_only_us"):
                per_step.setdefault(M, {}).setdefault(k, 0.0)
                per_step[M][k] += r[k] * LAYERS / 1000
            eb.log("gemm", res)
        del lin, m
        torch.cuda.empty_cache()
    eb.log("gemm_per_step_ms_40_layers", {M: {k.replace("_us", "_ms"): round(v, 2) for k, v in d.items()}
                                          for M, d in per_step.items()})


PREFILL_ROWS = (512, 2048, 4096, 5400)     # prefill chunk sizes: 2048 beside decoding streams, up to 8192 idle
PROFILE_ROWS = 2048                        # the profiled calls
PROFILE_ROWS_ODD = 2000                    # ... and fp8's again at a row count that is no multiple of 256
DEVICE = "cuda"                            # the prefill section's tensors (a CPU dry run of its logic sets "cpu")


def _eager_us(fn, reps):
    """(wall, host) microseconds per call of `fn` run eagerly `reps` times back to back: wall from CUDA events around
    the loop (the larger of launch-bound and GPU-bound, as an eager prefill chunk runs), host the CPU time to issue
    one call (perf_counter around the loop, before the sync)."""
    import torch
    for _ in range(2):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    walls, hosts = [], []
    for _ in range(3):
        torch.cuda.synchronize()
        start.record()
        t = time.perf_counter()
        for _ in range(reps):
            fn()
        hosts.append((time.perf_counter() - t) * 1e6 / reps)
        end.record()
        torch.cuda.synchronize()
        walls.append(start.elapsed_time(end) * 1000 / reps)
    return round(sorted(walls)[1], 2), round(sorted(hosts)[1], 2)


def _kernel_table(prof, top=15):
    """The profile's top entries by GPU time (kernels) and by host self time (ops, launches)."""
    ka = prof.key_averages()

    def dev(e):
        return getattr(e, "self_device_time_total", None) or getattr(e, "self_cuda_time_total", 0) or 0
    gpu_total = sum(dev(e) for e in ka)
    return {"gpu_us_total": round(gpu_total, 1),
            "top_gpu": [{"name": e.key[:120], "count": e.count, "gpu_us": round(dev(e), 1),
                         "share": round(dev(e) / gpu_total, 3) if gpu_total else None}
                        for e in sorted(ka, key=lambda e: -dev(e))[:top] if dev(e) > 0],
            "top_host": [{"name": e.key[:120], "count": e.count, "self_cpu_us": round(e.self_cpu_time_total, 1)}
                         for e in sorted(ka, key=lambda e: -e.self_cpu_time_total)[:top]]}


def _decoder_modules(support):
    """One bf16 nn.Linear and its Fp8Linear per decoder projection (SHAPES), weights ~N(0, 0.02), q/k/v with bias."""
    import torch
    from torch import nn
    from function.engine import fp8
    mods = {}
    for i, (name, (K, N)) in enumerate(SHAPES.items()):
        torch.manual_seed(i)
        lin = nn.Linear(K, N, bias=name in ("q_proj", "k_proj", "v_proj"), device=DEVICE, dtype=torch.bfloat16)
        with torch.no_grad():
            lin.weight.normal_(0, 0.02)
            if lin.bias is not None:
                lin.bias.normal_(0, 0.1)
        m = fp8.Fp8Linear.from_linear(lin, scaled_mm=support.scaled_mm)
        m.fuse_bias, m.small_m = support.fuse_bias, support.small_m
        mods[name] = (lin, m)
    return mods


def prefill():
    """Prefill-size products of the decoder's projections (the module docstring's `prefill`): a torch.profiler table
    of one layer's calls first, then per shape and M the CUDA-graph (GPU) and eager (wall, host) times and their sums
    over the 40 layers, then first-call times of the weight-only path at row counts new to its launch config."""
    import torch
    from function.engine import fp8

    t0 = time.time()
    if not torch.cuda.is_available():
        eb.log("prefill", {"skipped": "no CUDA device"})
        return
    support = fp8.device_support(DEVICE)
    eb.log("prefill_support", {"scaled_mm": support.scaled_mm, "fuse_bias": support.fuse_bias,
                               "triton_quant": support.triton, "small_m": support.small_m, "reason": support.reason,
                               "probe_s": round(time.time() - t0, 1), "torch": torch.__version__,
                               "triton": _triton_version(), "cuda": torch.version.cuda,
                               "device": torch.cuda.get_device_name()})
    if not support.scaled_mm:
        eb.log("prefill", {"skipped": support.reason})
        return
    mods = _decoder_modules(support)
    # what runs: one layer's six fp8 calls (and bf16's for comparison), 3 times, under the profiler; fp8 also at a
    # row count that is no multiple of 256 (torch's rowwise CUTLASS path then pads and copies the activation scales)
    from torch.profiler import ProfilerActivity, profile
    prof_out = {}
    for rows, kind, i in ((PROFILE_ROWS, "fp8", 1), (PROFILE_ROWS, "bf16", 0), (PROFILE_ROWS_ODD, "fp8", 1)):
        xs = {K: torch.randn(rows, K, device=DEVICE, dtype=torch.bfloat16) for K in {k for k, _ in SHAPES.values()}}

        def one_layer(i=i, xs=xs):
            for name, (K, _) in SHAPES.items():
                mods[name][i](xs[K])
        one_layer()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(3):
                one_layer()
            torch.cuda.synchronize()
        prof_out[f"{kind}_M{rows}"] = _kernel_table(prof, 15 if kind == "fp8" else 8)
        eb.log("prefill_profile", prof_out)

    res, per = {}, {M: {} for M in PREFILL_ROWS}
    for M in PREFILL_ROWS:
        if eb.left() < 15:
            eb.log("prefill_cut", f"deadline: rows {M} and above not measured")
            break
        inputs = {K: torch.randn(M, K, device=DEVICE, dtype=torch.bfloat16) for K in {k for k, _ in SHAPES.values()}}
        for name, (K, N) in SHAPES.items():
            lin, m = mods[name]
            x = inputs[K]
            reps = 20 if M * K * N < 5e10 else 5
            r = {"path": m.path(M, True, torch.bfloat16)}
            qx, sx = fp8.quantize_rows(x)
            wt, sw, b = m.weight.t(), m.weight_scale.view(1, -1), m.bias if m.fuse_bias else None

            def smm(fast=False):
                return torch._scaled_mm(qx, wt, scale_a=sx, scale_b=sw, bias=b, out_dtype=torch.bfloat16,
                                        use_fast_accum=fast)
            calls = {"bf16": lambda: lin(x), "fp8": lambda: m(x), "quant": lambda: fp8.quantize_rows(x),
                     "scaled_mm": smm}
            for k, fn in calls.items():
                r[k + "_us"] = _graph_us(fn, reps)
            for k, fn in calls.items():
                r[k + "_eager_us"], r[k + "_host_us"] = _eager_us(fn, reps)
            try:
                r["scaled_mm_fast_accum_us"] = _graph_us(lambda: smm(True), reps)
            except RuntimeError as e:
                r["scaled_mm_fast_accum_us"] = f"unsupported: {str(e)[:120]}"
            r["fp8_speedup"] = round(r["bf16_us"] / r["fp8_us"], 3)
            r["scaled_mm_speedup"] = round(r["bf16_us"] / r["scaled_mm_us"], 3)
            r["fp8_eager_speedup"] = round(r["bf16_eager_us"] / r["fp8_eager_us"], 3)
            r["quant_share_of_fp8"] = round(r["quant_us"] / r["fp8_us"], 3)
            r["fp8_minus_parts_us"] = round(r["fp8_us"] - r["quant_us"] - r["scaled_mm_us"], 2)
            r["quant_TBps"] = round(M * K * 3 / (r["quant_us"] * 1e-6) / 1e12, 2)   # bf16 read + fp8 write
            r["bf16_TFLOPs"] = round(2 * M * K * N / (r["bf16_us"] * 1e-6) / 1e12, 1)
            r["scaled_mm_TFLOPs"] = round(2 * M * K * N / (r["scaled_mm_us"] * 1e-6) / 1e12, 1)
            res[f"{name}_M{M}"] = r
            for k, v in r.items():
                if k.endswith("_us") and isinstance(v, float):
                    per[M][k[:-3] + "_ms"] = per[M].get(k[:-3] + "_ms", 0.0) + v * LAYERS / 1000
        eb.log("prefill", res)
        d = per[M]
        for k in list(d):
            d[k] = round(d[k], 2)
        d["fp8_speedup"] = round(d["bf16_ms"] / d["fp8_ms"], 3)
        d["scaled_mm_speedup"] = round(d["bf16_ms"] / d["scaled_mm_ms"], 3)
        d["fp8_eager_speedup"] = round(d["bf16_eager_ms"] / d["fp8_eager_ms"], 3)
        d["quant_share_of_fp8"] = round(d["quant_ms"] / d["fp8_ms"], 3)
        # q, k and v quantize the same input: two of the three quantizations are repeated work
        d["qkv_repeat_quant_ms"] = round(2 * res[f"q_proj_M{M}"]["quant_us"] * LAYERS / 1000, 2)
        # the 40 layers' projections in the model's order, eagerly (q, k, v, o, gate_up, down per layer)
        seq = [(name, inputs[K]) for name, (K, _) in SHAPES.items()]
        for kind, i in (("bf16", 0), ("fp8", 1)):
            def layers(i=i):
                for _ in range(LAYERS):
                    for name, xin in seq:
                        mods[name][i](xin)
            d[f"layers40_{kind}_eager_ms"], d[f"layers40_{kind}_host_ms"] = (
                round(v / 1000, 2) for v in _eager_us(layers, 1))
        d["layers40_eager_speedup"] = round(d["layers40_bf16_eager_ms"] / d["layers40_fp8_eager_ms"], 3)
        eb.log("prefill_per_40_layers", {str(k): v for k, v in per.items() if v})
        del inputs
        torch.cuda.empty_cache()

    # row counts new to a weight-only launch config (an eager prefill tail of 37 or 20 tokens, after decode graphs
    # of 48/64 and 32 rows): Triton specializes integer arguments (M == 1, M % 16 == 0), so such a first call may
    # compile a kernel in the middle of a step; the later calls of the same M are the warm time
    first = {}
    lin, m = mods["o_proj"]
    for M in (64, 48, 37, 37, 32, 20, 20):
        x = torch.randn(M, SHAPES["o_proj"][0], device=DEVICE, dtype=torch.bfloat16)
        torch.cuda.synchronize()
        t = time.perf_counter()
        m(x)
        torch.cuda.synchronize()
        first.setdefault(f"M{M}", []).append(round((time.perf_counter() - t) * 1000, 2))
    first["path_M37"] = m.path(37, True, torch.bfloat16)
    eb.log("prefill_small_m_first_call_ms", first)
    eb.log("prefill_s", round(time.time() - t0, 1))


GEMV_ROWS = (1, 2, 4, 8, 16, 32, 64)


def _errors(out, ref):
    out = out.float()
    return {"max_rel": round(float((out - ref).abs().max() / ref.abs().max()), 5),
            "norm_rel": round(float((out - ref).norm() / ref.norm()), 5)}


def _graph_replay_equals_eager(mod, x, g, before_eager=lambda: None) -> bool:
    """Warm `mod` on a side stream, capture `mod(x)` in a CUDA graph, refill `x` with new values and replay: whether
    the replay equals an eager call on the new `x` (made after `before_eager`, which may switch the eager path)."""
    import torch
    st = torch.cuda.Stream()
    st.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(st):
        mod(x)
    torch.cuda.current_stream().wait_stream(st)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = mod(x)
    x.copy_(torch.randn(x.shape, generator=g).to(x.device, x.dtype))
    graph.replay()
    before_eager()
    return bool(torch.equal(y, mod(x)))


def _err_str(e):
    return f"{type(e).__name__}: {str(e)[:300]}"


def gemv():
    """Decode-size products: bf16, _scaled_mm path, weight-only kernel; per shape and M, and per decode step."""
    import torch
    from torch import nn
    from function.engine import fp8

    t0 = time.time()
    support = fp8.device_support("cuda")
    eb.log("gemv_support", {"scaled_mm": support.scaled_mm, "fuse_bias": support.fuse_bias, "small_m": support.small_m,
                            "fast_dequant": fp8._FAST_DEQUANT, "table_entries": len(fp8.GEMV_TABLE),
                            "reason": support.reason, "probe_s": round(time.time() - t0, 1),
                            "torch": torch.__version__, "triton": _triton_version()})
    res, per_step = {}, {M: {"bf16_ms": 0.0, "scaled_mm_ms": 0.0, "weight_only_ms": 0.0, "dispatch_ms": 0.0}
                         for M in GEMV_ROWS}
    for i, (name, (K, N)) in enumerate(SHAPES.items()):
        try:
            torch.manual_seed(i)
            lin = nn.Linear(K, N, bias=name in ("q_proj", "k_proj", "v_proj"), device="cuda", dtype=torch.bfloat16)
            with torch.no_grad():
                lin.weight.normal_(0, 0.02)
                if lin.bias is not None:
                    lin.bias.normal_(0, 0.1)
            m = fp8.Fp8Linear.from_linear(lin, scaled_mm=support.scaled_mm)
            m.fuse_bias = support.fuse_bias
            w32 = lin.weight.float()
        except Exception as e:  # noqa: BLE001
            res[name] = {"error": _err_str(e)}
            continue
        for M in GEMV_ROWS:
            r = {}
            try:
                x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
                b32 = lin.bias.float() if lin.bias is not None else None
                ref_bf16 = x.float() @ w32.t() + (b32 if b32 is not None else 0)
                ref_fp8 = fp8.weight_only_reference(x, m.weight, m.weight_scale, m.bias)
                r["bf16_us"] = _graph_us(lambda: lin(x), 20)
                r["bf16_err"] = _errors(lin(x), ref_bf16)
                m.small_m = 0
                r["scaled_mm_us"] = _graph_us(lambda: m(x), 20)
                r["scaled_mm_err"] = _errors(m(x), ref_fp8)
                r["scaled_mm_err_vs_bf16_weights"] = _errors(m(x), ref_bf16)
                m.small_m = fp8.SMALL_M_MAX
                if fp8._w8a16 is not None:
                    cfg = fp8.gemv_config(M, N, K)
                    r["config"] = str(cfg) if cfg else f"scaled_mm (table); kernel timed with {fp8._heuristic(M, N, K)}"
                    cfg = cfg or fp8._heuristic(M, N, K)
                    r["dispatch"] = m.path(M, True, torch.bfloat16)
                    r["dispatch_us"] = _graph_us(lambda: m(x), 20)

                    def wo():
                        return fp8._w8a16(x, m.weight, m.weight_scale, m.bias, cfg)
                    r["weight_only_us"] = _graph_us(wo, 20)
                    r["weight_only_err"] = _errors(wo(), ref_fp8)
                    r["weight_only_err_vs_bf16_weights"] = _errors(wo(), ref_bf16)
                    r["weight_only_TBps"] = round(N * K / (r["weight_only_us"] * 1e-6) / 1e12, 2)
                    r["speedup_vs_bf16"] = round(r["bf16_us"] / r["weight_only_us"], 2)
                    r["speedup_vs_scaled_mm"] = round(r["scaled_mm_us"] / r["weight_only_us"], 2)
                    r["dispatch_speedup_vs_bf16"] = round(r["bf16_us"] / r["dispatch_us"], 2)
                r["bf16_TBps"] = round(N * K * 2 / (r["bf16_us"] * 1e-6) / 1e12, 2)
                for k in ("bf16", "scaled_mm", "weight_only", "dispatch"):
                    if isinstance(r.get(k + "_us"), float):
                        per_step[M][k + "_ms"] += r[k + "_us"] * LAYERS / 1000
            except Exception as e:  # noqa: BLE001 - one shape's failure is recorded, the section goes on
                r["error"] = _err_str(e)
            res[f"{name}_M{M}"] = r
        eb.log("gemv", res)
        del lin, m, w32
        torch.cuda.empty_cache()
    for M, d in per_step.items():
        for k in list(d):
            d[k] = round(d[k], 3)
        if d["weight_only_ms"]:
            d["weight_only_speedup_vs_bf16"] = round(d["bf16_ms"] / d["weight_only_ms"], 2)
            d["weight_only_speedup_vs_scaled_mm"] = round(d["scaled_mm_ms"] / d["weight_only_ms"], 2)
        if d["dispatch_ms"]:
            d["fp8_dispatch_speedup_vs_bf16"] = round(d["bf16_ms"] / d["dispatch_ms"], 2)
    eb.log("gemv_per_step_ms_40_layers", per_step)
    eb.log("gemv_s", round(time.time() - t0, 1))


def _triton_version():
    try:
        import triton
        return triton.__version__
    except Exception as e:  # noqa: BLE001
        return _err_str(e)


def _candidates(M, N, K):
    from function.engine import fp8
    C = fp8.GemvConfig
    heur = fp8.gemv_config(M, N, K) or fp8._heuristic(M, N, K)
    out = [heur, dataclasses.replace(heur, fast=not heur.fast)]

    def splits(bn, bk, kind, warps=4, stages=4):
        split = 1
        while split < 8 and (N // bn) * split < 132 and K // (split * 2) >= 2 * bk:
            split *= 2
        return [C(kind, bn, bk, s, warps, stages) for s in sorted({1, split, max(1, split // 2)})]

    if M <= 8:
        bm = fp8._pow2(M)
        for bn in (2, 4, 8, 16):
            for bk in (512, 1024):
                if 8 <= bm * bn * bk // 128 <= 128:
                    out += splits(bn, bk, "fma", 4, 3)
    for bn in (16, 32, 64):
        for bk in (64, 128, 256):
            if bn * bk <= 8192 and not (M >= 32 and bk == 64):
                out += splits(bn, bk, "dot")
    for bn in (64, 128):
        for bk in (64, 128, 256):
            if bn * bk <= 16384:
                out += splits(bn, bk, "dot_t")
    out += [C("dot_t", 64, 128, 1, 8, 4), C("dot", 32, 256, 1, 8, 4)]
    seen, uniq = set(), []
    for c in out:
        if c not in seen:
            seen.add(c)
            uniq.append(c)
    return uniq


def gemv_tune():
    """Sweep the weight-only kernel's launch configs per (shape, M) in CUDA graphs; log the best of each."""
    import torch
    from function.engine import fp8

    support = fp8.device_support("cuda")
    if fp8._w8a16 is None:
        eb.log("gemv_tune", {"skipped": support.reason})
        return
    shapes = {}
    for name, (K, N) in SHAPES.items():
        shapes.setdefault((N, K), name)
    best, table = {}, {}
    for (N, K), name in shapes.items():
        codes = (torch.randn(N, K, device="cuda") * 50).to(fp8.FP8_DTYPE)
        scale = torch.rand(N, device="cuda") * 1e-3
        bias = torch.randn(N, device="cuda", dtype=torch.bfloat16) if name == "q_proj" else None
        for M in GEMV_ROWS:
            x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
            ref = fp8.weight_only_reference(x, codes, scale, bias)
            tried = {}
            for cfg in _candidates(M, N, K):
                try:
                    out = fp8._w8a16(x, codes, scale, bias, cfg)
                    err = _errors(out, ref)["norm_rel"]
                    if not err < 1e-2:
                        tried[str(cfg)] = f"wrong: {err:.3g}"
                        continue
                    tried[str(cfg)] = _graph_us(lambda: fp8._w8a16(x, codes, scale, bias, cfg), 10)
                except Exception as e:  # noqa: BLE001
                    tried[str(cfg)] = _err_str(e)[:160]
            ok = {k: v for k, v in tried.items() if isinstance(v, float)}
            key = f"{name}_N{N}_K{K}_M{M}"
            if ok:
                win = min(ok, key=ok.get)
                now = fp8.gemv_config(M, N, K) or fp8._heuristic(M, N, K)
                best[key] = {"best": win, "us": ok[win], "current": str(now), "current_us": tried.get(str(now))}
                table[f"({fp8._bucket(M)}, {N}, {K})"] = win
            eb.log(f"gemv_tune_{key}", tried)
            eb.log("gemv_tune_best", best)
        del codes
        torch.cuda.empty_cache()
    eb.log("gemv_tune_table", table)


def _forward(model, seq):
    """Final hidden states and logits of a whole text sequence [1, L] (no cache: the reference path)."""
    h = model.model.language_model(input_ids=seq).last_hidden_state
    return h, model.lm_head(h)


def _greedy(model, ids, steps):
    """`steps` greedy tokens after `ids` [1, L], recomputing the whole sequence each step (no cache, no engine)."""
    import torch
    seq = ids
    for _ in range(steps):
        nxt = _forward(model, seq)[1][:, -1].argmax(-1, keepdim=True)
        seq = torch.cat([seq, nxt], 1)
    return seq


def _accuracy(model, q, tok, device, prompts=2, steps=128, length=256):
    """bf16 (model) vs fp8 (q) on the same prompts."""
    import torch
    rng = random.Random(3)
    out = []
    for i in range(prompts):
        msg = eb.text_prompt(tok, rng, target=length)
        ids = tok.apply_chat_template([{"role": "user", "content": msg}], add_generation_prompt=True,
                                      return_tensors="pt", return_dict=False).to(device)
        L = ids.shape[1]
        with torch.no_grad():
            seq = _greedy(model, ids, steps)
            seq_q = _greedy(q, ids, steps)
            ha, la = (t.float() for t in _forward(model, seq))
            hb, lb = (t.float() for t in _forward(q, seq))
        gen = slice(L - 1, seq.shape[1] - 1)        # the positions that predicted the greedy tokens
        agree = (lb[0, gen].argmax(-1) == seq[0, L:]).float().mean()
        diff = (seq_q[0, L:] != seq[0, L:]).nonzero()
        out.append({"prompt_tokens": L,
                    "hidden_rel_err": round(float((ha - hb).norm() / ha.norm()), 4),
                    "logits_rel_err": round(float((la - lb).norm() / la.norm()), 4),
                    "logits_rel_err_generated": round(float((la[0, gen] - lb[0, gen]).norm() / la[0, gen].norm()), 4),
                    "top1_agreement_teacher_forced": round(float(agree), 4),
                    "free_running_identical_steps": int(diff[0]) if len(diff) else steps,
                    "steps": steps})
        del ha, hb, la, lb
    return out


def accuracy():
    import torch
    from function.config import Config
    from function.engine import fp8, loader

    loaded = loader.load(Config.from_env({"MODEL_PATH": eb.MODEL_DIR, "MODEL_CACHE_DIR": eb.CACHE_DIR,
                                          "QUANTIZATION": "none"}))
    model = loaded.model
    base = torch.cuda.memory_allocated()
    q = copy.deepcopy(model)
    info = fp8.convert(q)
    eb.log("fp8_convert", {**info, "weights": fp8.weight_report(q), "bf16_weights": fp8.weight_report(model),
                           "fp8_copy_GB_on_card": round((torch.cuda.memory_allocated() - base) / 1e9, 2)})
    eb.log("accuracy_full_size_random", _accuracy(model, q, loaded.tokenizer, "cuda"))
    del model, q, loaded
    gc.collect()
    torch.cuda.empty_cache()


def decode():
    import torch
    from function.config import Config
    from function.engine import fp8, loader
    from function.engine.runner import ModelRunner, PrefillItem

    res = {}
    for quant in ("none", "fp8"):
        loaded = loader.load(Config.from_env({"MODEL_PATH": eb.MODEL_DIR, "MODEL_CACHE_DIR": eb.CACHE_DIR,
                                              "QUANTIZATION": quant, "PREQUANTIZED_CACHE": "false"}))
        runner = ModelRunner(loaded.model, num_slots=64, max_len=2048, use_graphs=True)
        rng = random.Random(0)
        ids = [rng.randrange(100, 50000) for _ in range(200)]
        pos = torch.arange(len(ids)).view(1, -1).expand(3, -1).contiguous()
        for s0 in range(0, 64, 8):
            runner.prefill([PrefillItem(slot=s, token_ids=ids, start=0, position_ids=pos, images=[])
                            for s in range(s0, s0 + 8)])
        r = {}
        for B in (1, 8, 32, 64):
            slots = list(range(B))
            runner.feed(torch.arange(B, device=runner.device), torch.full((B,), 11, device=runner.device))
            for step in range(3):       # capture + warm
                runner.decode(slots, [len(ids) + step] * B, [0] * B)
            torch.cuda.synchronize()
            t = time.perf_counter()
            n = 20
            for step in range(n):
                runner.decode(slots, [len(ids) + 3 + step] * B, [0] * B)
            torch.cuda.synchronize()
            r[f"B{B}_ms_per_step"] = round((time.perf_counter() - t) * 1000 / n, 2)
        r["weights"] = fp8.weight_report(loaded.model)
        res[quant] = r
        eb.log("decode_step", res)
        del runner, loaded
        gc.collect()
        torch.cuda.empty_cache()
    res["speedup"] = {k: round(res["none"][k] / res["fp8"][k], 2) for k in res["none"] if k.endswith("per_step")}
    eb.log("decode_step", res)


def cold():
    import glob
    import shutil
    for d in glob.glob(os.path.join(eb.CACHE_DIR, "prequantized", "*-fp8-*")):
        shutil.rmtree(d, ignore_errors=True)
    for name, q in (("function_bf16", "none"), ("function_fp8_first_start_convert_and_save", "fp8"),
                    ("function_fp8_prequantized", "fp8")):
        r = eb.bounded("cold_" + name, 120, eb.cold, name, q)
        if r is not None:
            eb.log("cold_" + name, r)


def check():
    """Fp8Linear's _scaled_mm path against its emulation, and inside a CUDA graph."""
    import torch
    from torch import nn
    from function.engine import fp8
    from function.engine.fp8 import Fp8Linear

    support = fp8.device_support("cuda")
    if not support.scaled_mm:
        eb.log("check", {"skipped": support.reason})
        return
    g = torch.Generator().manual_seed(3)
    lin = nn.Linear(4096, 1024).to("cuda", torch.bfloat16)
    m = Fp8Linear.from_linear(lin, scaled_mm=True)
    m.fuse_bias = support.fuse_bias
    rel = {}
    for rows in (1, 8, 64, 300):
        x = torch.randn(rows, 4096, generator=g).to("cuda", torch.bfloat16)
        out, ref = m(x).float(), m._emulated(x).float()
        rel[rows] = float((out - ref).norm() / ref.norm())
    static = torch.randn(8, 4096, generator=g).to("cuda", torch.bfloat16)

    def scaled_mm_eager():
        m.small_m = 0
    same = _graph_replay_equals_eager(m, static, g, before_eager=scaled_mm_eager)
    out = {"rel_err_vs_emulation": rel, "pass_rel_err_below_1e-2": max(rel.values()) < 1e-2,
           "graph_equals_eager": same, "small_m": support.small_m}
    # the weight-only path: rows 1..64 eager against its fp32 reference, the path each row count takes, and every
    # decode shape's kernel replayed in a CUDA graph (bit-identical to eager, split-K included)
    wo = {}
    if support.small_m:
        m.small_m = support.small_m
        for rows in (1, 2, 3, 4, 5, 8, 13, 16, 31, 32, 64, 65):
            try:
                x = torch.randn(rows, 4096, generator=g).to("cuda", torch.bfloat16)
                ref = fp8.weight_only_reference(x, m.weight, m.weight_scale, m.bias)
                wo[rows] = {"path": m.path(rows, True, torch.bfloat16),
                            "norm_rel": round(float((m(x).float() - ref).norm() / ref.norm()), 5)}
            except Exception as e:  # noqa: BLE001
                wo[rows] = _err_str(e)
        out["weight_only_eager"] = wo
        ok = all(isinstance(v, dict) and (v["path"] != "weight_only" or v["norm_rel"] < 1e-2) for v in wo.values())
        graphs = {}
        for name, (K, N) in SHAPES.items():
            lin2 = nn.Linear(K, N, bias=name in ("q_proj", "k_proj", "v_proj"), device="cuda", dtype=torch.bfloat16)
            m2 = Fp8Linear.from_linear(lin2, scaled_mm=True)
            m2.fuse_bias, m2.small_m = support.fuse_bias, support.small_m
            for rows in (1, 8, 64):
                try:
                    xs = torch.randn(rows, K, generator=g).to("cuda", torch.bfloat16)
                    graphs[f"{name}_M{rows}"] = _graph_replay_equals_eager(m2, xs, g)
                except Exception as e:  # noqa: BLE001
                    graphs[f"{name}_M{rows}"] = _err_str(e)
            del lin2, m2
        out["weight_only_graph_equals_eager"] = graphs
        out["pass_weight_only"] = ok and all(v is True for v in graphs.values())
    eb.log("check", out)


def warm():
    """The `warm` section: `_warm_child` in two fresh processes on one new Triton cache directory."""
    import subprocess
    import tempfile

    cache = tempfile.mkdtemp(prefix="triton-cache-")
    for name in ("empty_cache", "warm_cache"):
        env = dict(os.environ, TRITON_CACHE_DIR=cache, PYTHONPATH=ROOT)
        r = subprocess.run([sys.executable, os.path.abspath(__file__), "_warm_child"], env=env, capture_output=True,
                           text=True, timeout=max(30, int(eb.left()) - 10))
        lines = r.stdout.strip().splitlines()
        try:
            eb.log(f"warm_{name}", json.loads(lines[-1]))
        except (IndexError, ValueError):
            eb.log(f"warm_{name}_error", {"rc": r.returncode, "stderr": r.stderr[-3000:]})


def _warm_child():
    import logging

    import torch
    from function.engine import fp8, glm4v

    logging.basicConfig(level=logging.INFO)
    out = {}
    t = time.perf_counter()
    support = fp8.device_support("cuda")
    out["probe_s"] = round(time.perf_counter() - t, 3)
    out["support"] = support.reason
    cfg = glm4v.Glm4vNativeConfig(text_config={"num_hidden_layers": 2}, vision_config={"depth": 1})
    model = glm4v.build_empty(cfg).to_empty(device="cuda").to(torch.bfloat16)
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02)
    glm4v.finish_load(model, "cuda")
    info = fp8.convert(model, support=support)
    out["convert_s_2_layers"] = info["convert_s"]
    rows = fp8.row_classes(32)
    out["rows"] = rows
    out["warm_kernels"] = fp8.warm_kernels(model, rows)
    model.fuse_projections()
    layer = model.model.language_model.layers[0]
    mods = {"qkv": layer.self_attn.__dict__["_qkv"], "o": layer.self_attn.o_proj, "gate_up": layer.mlp.gate_up_proj,
            "down": layer.mlp.down_proj}
    first = {}
    for M in (1, 3, 20, 32, 37, 48, 64):
        for name, m in mods.items():
            x = torch.randn(M, m.in_features, device="cuda", dtype=torch.bfloat16)
            torch.cuda.synchronize()
            t = time.perf_counter()
            m(x)
            torch.cuda.synchronize()
            first[f"{name}_M{M}"] = [round((time.perf_counter() - t) * 1000, 2), m.path(M, True, torch.bfloat16)]
    out["first_call_ms"] = first
    out["max_first_call_ms"] = max(v[0] for v in first.values())
    print(json.dumps(out))


def smoke():
    """CPU: the accuracy section on the tiny model (FP8 emulated in fp32), as JSON on stdout."""
    from function.config import Config
    from function.engine import fp8, loader

    cache = os.environ.get("MODEL_CACHE_DIR", "/tmp/fp8-smoke")
    loaded = loader.load(Config.from_env({"MODEL_CACHE_DIR": cache, "QUANTIZATION": "none", "DEVICE": "cpu"}))
    q = copy.deepcopy(loaded.model)
    info = fp8.convert(q)
    acc = _accuracy(loaded.model, q, loaded.tokenizer, "cpu", prompts=2, steps=32, length=64)
    print(json.dumps({"convert": info, "accuracy_tiny_cpu": acc}, indent=1))


SECTIONS = ("build", "gemm", "prefill", "accuracy", "decode", "engine", "cold", "gemv", "check", "warm", "gemv_tune")
ALL = frozenset(SECTIONS) - {"gemv_tune"}


def parse_args(argv):
    """`fp8_bench.py [SECTION[,SECTION...]] [DEADLINE_S]` -> (sections, deadline seconds): "all" (the default) adds
    every section but gemv_tune; "smoke" is the CPU run; an unknown name is an error."""
    what = {w for w in (argv[1] if len(argv) > 1 else "all").split(",") if w}
    unknown = what - set(SECTIONS) - {"all", "smoke", "_warm_child"}
    if unknown:
        raise SystemExit(f"fp8_bench: unknown section(s) {', '.join(sorted(unknown))}; known: "
                         f"{', '.join(SECTIONS)}, all, smoke")
    if "all" in what:
        what |= ALL
    return what, float(argv[2]) if len(argv) > 2 else 1800.0


def main():
    what, eb.DEADLINE = parse_args(sys.argv)
    if "smoke" in what:
        return smoke()
    if "_warm_child" in what:
        return _warm_child()
    os.makedirs(eb.OUT, exist_ok=True)
    if "build" in what and not os.path.exists(os.path.join(eb.MODEL_DIR, "config.json")):
        eb.bounded("build", 200, eb.build)
    if "gemm" in what:
        eb.bounded("gemm", 200, gemm)
    if "prefill" in what:
        eb.bounded("prefill", 90, prefill)
    if "accuracy" in what:
        eb.bounded("accuracy", 300, accuracy)
    if "decode" in what:
        eb.bounded("decode", 200, decode)
    if "engine" in what:
        eb.bounded("engine_none", 200, eb.engine_section, "none")
        eb.bounded("engine_fp8", 200, eb.engine_section, "fp8")
    if "cold" in what:
        cold()
    if "gemv" in what:
        eb.bounded("gemv", 300, gemv)
    if "check" in what:
        eb.bounded("check", 90, check)
    if "warm" in what:
        eb.bounded("warm", 240, warm)
    if "gemv_tune" in what:
        eb.bounded("gemv_tune", 540, gemv_tune)
    eb.log("done", round(time.time() - eb.T0, 1))

if __name__ == "__main__":
    main()
