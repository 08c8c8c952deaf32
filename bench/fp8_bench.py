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
  check     Fp8Linear on torch._scaled_mm against its fp32 emulation (rows 1, 8, 64, 300) and replayed in a CUDA
            graph (bit-identical to eager): the GPU half of tests/test_fp8.py, which CI runs on CPU.
"""
from __future__ import annotations

import copy
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


def _accuracy(model, q, tok, device, prompts=2, steps=128, length=256):
    """bf16 (model) vs fp8 (q) on the same prompts."""
    import torch
    rng = random.Random(3)
    out = []
    for i in range(prompts):
        msg = eb.text_prompt(tok, rng, target=length)
        text = tok.apply_chat_template([{"role": "user", "content": msg}], add_generation_prompt=True, tokenize=False)
        ids = tok(text, return_tensors="pt", add_special_tokens=False).input_ids.to(device)
        L = ids.shape[1]
        with torch.no_grad():
            kw = dict(max_new_tokens=steps, min_new_tokens=steps, do_sample=False)
            seq = model.generate(input_ids=ids, **kw)
            seq_q = q.generate(input_ids=ids, **kw)
            a = model(input_ids=seq, output_hidden_states=True)
            b = q(input_ids=seq, output_hidden_states=True)
        ha, hb = a.hidden_states[-1].float(), b.hidden_states[-1].float()
        la, lb = a.logits.float(), b.logits.float()
        gen = slice(L - 1, seq.shape[1] - 1)        # the positions that predicted the 128 greedy tokens
        agree = (lb[0, gen].argmax(-1) == seq[0, L:]).float().mean()
        diff = (seq_q[0, L:] != seq[0, L:]).nonzero()
        out.append({"prompt_tokens": L,
                    "hidden_rel_err": round(float((ha - hb).norm() / ha.norm()), 4),
                    "logits_rel_err": round(float((la - lb).norm() / la.norm()), 4),
                    "logits_rel_err_generated": round(float((la[0, gen] - lb[0, gen]).norm() / la[0, gen].norm()), 4),
                    "top1_agreement_teacher_forced": round(float(agree), 4),
                    "free_running_identical_steps": int(diff[0]) if len(diff) else steps,
                    "steps": steps})
        del a, b
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
            toks = {s: 11 for s in range(B)}
            for step in range(3):       # capture + warm
                runner.decode(toks, {s: len(ids) + step for s in range(B)}, {s: 0 for s in range(B)})
            torch.cuda.synchronize()
            t = time.perf_counter()
            n = 20
            for step in range(n):
                runner.decode(toks, {s: len(ids) + 3 + step for s in range(B)}, {s: 0 for s in range(B)})
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
    st = torch.cuda.Stream()
    st.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(st):
        m(static)
    torch.cuda.current_stream().wait_stream(st)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = m(static)
    static.copy_(torch.randn(8, 4096, generator=g).to("cuda", torch.bfloat16))
    graph.replay()
    same = bool(torch.equal(y, m(static)))
    eb.log("check", {"rel_err_vs_emulation": rel, "pass_rel_err_below_1e-2": max(rel.values()) < 1e-2,
                     "graph_equals_eager": same})


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


def main():
    what = set((sys.argv[1] if len(sys.argv) > 1 else "all").split(","))
    if "smoke" in what:
        return smoke()
    if "all" in what:
        what |= {"build", "gemm", "accuracy", "decode", "engine", "cold", "check"}
    eb.DEADLINE = float(sys.argv[2]) if len(sys.argv) > 2 else 1800.0
    os.makedirs(eb.OUT, exist_ok=True)
    if "build" in what and not os.path.exists(os.path.join(eb.MODEL_DIR, "config.json")):
        eb.bounded("build", 200, eb.build)
    if "gemm" in what:
        eb.bounded("gemm", 200, gemm)
    if "accuracy" in what:
        eb.bounded("accuracy", 300, accuracy)
    if "decode" in what:
        eb.bounded("decode", 200, decode)
    if "engine" in what:
        eb.bounded("engine_none", 200, eb.engine_section, "none")
        eb.bounded("engine_fp8", 200, eb.engine_section, "fp8")
    if "cold" in what:
        cold()
    if "check" in what:
        eb.bounded("check", 60, check)
    eb.log("done", round(time.time() - eb.T0, 1))


if __name__ == "__main__":
    main()
