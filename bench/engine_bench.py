"""Engine speed on a GPU: this project's engine against naive transformers, both measured in the same run on the
same card, on a random-weight full-size GLM-4.1V-9B (`Glm4vForConditionalGeneration` from its config).

    python3 bench/engine_bench.py all [DEADLINE_S]     # everything below, results in $OUT/bench.json

Sections (each bounded in time, results written after every measurement):
  build    full-size config with the tokenizer/processor/chat template of the project's tiny model (same special
           tokens), random bf16 weights saved to /tmp/glm9b — a checkpoint directory the real loader reads.
  naive    transformers `generate` (bf16, sdpa): 256-token prompt, 64 new tokens, batch 1/8/32.
  engine   this engine via LocalEngine.generate (bf16, then nf4): concurrent streams 1/8/32/64 (256-token prompts,
           128 new tokens), TTFT p50/p99 with 8 closed-loop clients (text; 1080x2400 screenshot), agent turns with
           a shared prefix, GPU memory.
  cold     process exec -> ready in fresh processes: naive (import + from_pretrained + first generate) vs the
           function served by func-python (polling /health/readiness), bf16 and pre-quantized nf4.
"""
from __future__ import annotations

import asyncio
import json
import os
import random
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
import traceback
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
OUT = os.environ.get("OUT", "/tmp/out")
MODEL_DIR = os.environ.get("BENCH_MODEL_DIR", "/tmp/glm9b")
CACHE_DIR = "/tmp/modelcache"
RES: dict = {}
T0 = time.time()
DEADLINE = 560.0
# What the image's ENV sets for the server process beside the model settings (tests/test_manifests.py checks it
# against the Dockerfile): the benches that start a server run the process the image runs.
IMAGE_ENV = {"MALLOC_MMAP_THRESHOLD_": "1048576"}


def log(key, value):
    RES[key] = value
    with open(os.path.join(OUT, "bench.json"), "w") as f:
        json.dump(RES, f, indent=1)
    print(f"[{time.time() - T0:6.1f}s] {key}: {json.dumps(value)[:900]}", flush=True)


def left():
    return DEADLINE - (time.time() - T0)


class Timeout(BaseException):
    pass


def bounded(name, budget, fn, *a):
    secs = int(min(budget, left() - 5))
    if secs < 5:
        log(name + "_skipped", "no time left")
        return None

    def alarm(*_):
        raise Timeout(f"{name} exceeded {secs}s")
    signal.signal(signal.SIGALRM, alarm)
    signal.alarm(secs)
    try:
        return fn(*a)
    except BaseException as e:  # noqa: BLE001
        log(name + "_error", {"type": type(e).__name__, "msg": str(e)[:800], "tb": traceback.format_exc()[-2500:]})
        return None
    finally:
        signal.alarm(0)


def pct(xs, p):
    xs = sorted(xs)
    return round(xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))], 1) if xs else None


# ------------------------------------------------------------------------------------------------ build
def build():
    import torch
    import transformers
    from transformers import Glm4vConfig, Glm4vForConditionalGeneration
    from function.tiny_model import build_tiny_model

    log("versions", {"torch": torch.__version__, "transformers": transformers.__version__,
                     "gpu": torch.cuda.get_device_name(0), "python": sys.version.split()[0]})
    tiny = build_tiny_model("/tmp/tiny")
    tcfg = json.load(open(os.path.join(tiny, "config.json")))
    ids = {k: tcfg[k] for k in ("image_token_id", "image_start_token_id", "image_end_token_id", "video_token_id",
                                "video_start_token_id", "video_end_token_id")}
    eos = tcfg["text_config"]["eos_token_id"]
    rope = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [8, 12, 12], "partial_rotary_factor": 0.5}
    cfg = Glm4vConfig(text_config={"rope_parameters": rope, "pad_token_id": tcfg["pad_token_id"], "eos_token_id": eos,
                                   "max_position_embeddings": 65536}, **ids)
    t = time.time()
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = Glm4vForConditionalGeneration._from_config(cfg, dtype=torch.bfloat16)
    n = sum(p.numel() for p in model.parameters())
    # The tokenizer (the tiny model's) has 3,197 ids, the full-size vocabulary 151,552: a random lm_head samples
    # ids the tokenizer cannot decode 98 % of the time, so a stream would carry text for ~2 % of its tokens and
    # every "first content" and "gap between chunks" measured through HTTP would be inflated. Rows past the
    # tokenizer are zeroed (logit 0, below the best of 3,197 random logits): same shapes and GEMM cost as the real
    # head, and every sampled id has text, as with real weights.
    from transformers import AutoTokenizer
    n_tok = len(AutoTokenizer.from_pretrained(tiny))
    with torch.no_grad():
        model.lm_head.weight[n_tok:].zero_()
    model.save_pretrained(MODEL_DIR, max_shard_size="5GB")
    for f in os.listdir(tiny):
        if f not in ("config.json", "model.safetensors", "tiny_model.json") and not f.endswith(".safetensors"):
            shutil.copy2(os.path.join(tiny, f), os.path.join(MODEL_DIR, f))
    os.sync()
    log("build", {"params_B": round(n / 1e9, 3), "s": round(time.time() - t, 1)})
    del model
    torch.cuda.empty_cache()


# ------------------------------------------------------------------------------------------------ prompts
def words(rng, n):
    vocab = ["open", "the", "settings", "app", "tap", "search", "button", "screen", "点击", "返回", "设置", "微信",
             "scroll", "down", "message", "send", "wifi", "battery", "price", "order", "淘宝", "搜索", "home"]
    return " ".join(rng.choice(vocab) for _ in range(n))


def text_prompt(tok, rng, target=256):
    """A user message whose chat-templated prompt is about `target` tokens, unique per call."""
    n = target
    for _ in range(6):
        msg = f"#{rng.random():.12f} " + words(rng, n)
        text = tok.apply_chat_template([{"role": "user", "content": msg}], add_generation_prompt=True,
                                       tokenize=False)
        L = len(tok(text, add_special_tokens=False)["input_ids"])
        if abs(L - target) <= 2:
            break
        n = max(1, int(n * target / max(L, 1)))
    return msg


def screenshot(rng):
    from PIL import Image, ImageDraw
    img = Image.new("RGB", (1080, 2400), tuple(rng.randrange(256) for _ in range(3)))
    d = ImageDraw.Draw(img)
    for _ in range(30):
        x, y = rng.randrange(1000), rng.randrange(2300)
        d.rectangle([x, y, x + rng.randrange(40, 300), y + rng.randrange(20, 120)],
                    fill=tuple(rng.randrange(256) for _ in range(3)))
    return img


# ------------------------------------------------------------------------------------------------ naive
def naive():
    import torch
    from transformers import AutoModelForImageTextToText
    m = AutoModelForImageTextToText.from_pretrained(MODEL_DIR, dtype=torch.bfloat16, device_map="cuda",
                                                    attn_implementation="sdpa")
    res = {}
    for B in (1, 8, 32, 64):
        ids = torch.randint(10, 3000, (B, 256), device="cuda")
        with torch.no_grad():
            m.generate(input_ids=ids, max_new_tokens=4, min_new_tokens=4, do_sample=False)  # warm
            torch.cuda.synchronize()
            t = time.perf_counter()
            m.generate(input_ids=ids, max_new_tokens=1, min_new_tokens=1, do_sample=False)
            torch.cuda.synchronize()
            ttft = time.perf_counter() - t
            t = time.perf_counter()
            m.generate(input_ids=ids, max_new_tokens=64, min_new_tokens=64, do_sample=False)
            torch.cuda.synchronize()
            dt = time.perf_counter() - t
        res[B] = {"tok_s_agg": round(B * 64 / dt, 1), "tok_s_per_seq": round(64 / dt, 1),
                  "ttft_ms": round(ttft * 1000, 1)}
        log("naive_bf16", res)
    del m
    torch.cuda.empty_cache()


# ------------------------------------------------------------------------------------------------ engine
def make_engine(quant, max_num_seqs=64, env: dict | None = None):
    """A LocalEngine on the built model, ready; `env`: further settings (e.g. QUANTIZE_VISION)."""
    from function.config import Config
    from function.engine.client import LocalEngine
    cfg = Config.from_env({"MODEL_PATH": MODEL_DIR, "MODEL_CACHE_DIR": CACHE_DIR, "QUANTIZATION": quant,
                           "MAX_NUM_SEQS": str(max_num_seqs), "MAX_MODEL_LEN": "8192", **(env or {})})
    e = LocalEngine(cfg)
    t = time.time()
    e.start_loading()
    while True:
        alive, ready, msg = e.status()
        if ready:
            break
        if e.error:
            raise RuntimeError(e.error)
        time.sleep(0.05)
    return e, round(time.time() - t, 2)


async def _one(e, rid, chat, params, rec):
    t = time.perf_counter()
    first, n, last = None, 0, None
    async for c in e.generate(rid, chat, params):
        if first is None:
            first = time.perf_counter()
        n = c.completion_tokens
        last = c
    end = time.perf_counter()
    rec.append({"ttft": (first - t) * 1000, "e2e": end - t, "n": n, "cached": last.cached_prompt_tokens,
                "prompt": last.prompt_tokens})


def engine_section(quant):
    import torch
    from function.engine.protocol import ChatInput, SamplingParams
    e, load_s = make_engine(quant)
    tag = f"engine_{quant}"
    t = time.time()
    while e.runner.pending:   # measure the steady state: the engine captures its other graphs when idle
        time.sleep(0.05)
    idle_capture_s = round(time.time() - t, 2)
    info = {"load_to_ready_s": load_s, "idle_graph_capture_after_ready_s": idle_capture_s, "timings": e.timings, "slots": e.num_slots, "max_model_len": e.max_model_len,
            "gpu_mem_alloc_GB": round(torch.cuda.memory_allocated() / 1e9, 2),
            "gpu_mem_reserved_GB": round(torch.cuda.memory_reserved() / 1e9, 2)}
    log(tag + "_load", info)
    tok = e.tokenizer
    rng = random.Random(1)
    res = {}

    def stats_delta(before):
        now = e.stats()
        d = {k: round(now[k] - before[k], 3) for k in now}
        if d["decode_steps"]:
            d["decode_ms_per_step"] = round(1000 * d["decode_s"] / d["decode_steps"], 2)
            d["mean_batch"] = round(d["decode_rows"] / d["decode_steps"], 1)
        if d["prefills"]:
            d["prefill_ms_mean"] = round(1000 * d["prefill_s"] / d["prefills"], 1)
        return d

    async def streams(N, new=128):
        chats = [ChatInput(messages=[{"role": "user", "content": text_prompt(tok, rng)}]) for _ in range(N)]
        p = SamplingParams(max_tokens=new, temperature=0.0, ignore_eos=True)
        rec = []
        before = e.stats()
        t = time.perf_counter()
        await asyncio.gather(*(_one(e, f"s{N}-{i}-{rng.random()}", c, p, rec) for i, c in enumerate(chats)))
        dt = time.perf_counter() - t
        res[f"stats_{N}"] = stats_delta(before)
        decode_s = [(r["e2e"] - r["ttft"] / 1000) / max(1, r["n"] - 1) for r in rec]
        return {"tok_s_agg": round(sum(r["n"] for r in rec) / dt, 1),
                "tok_s_per_seq": round(sum(r["n"] for r in rec) / dt / N, 1),
                "decode_tok_s_per_seq": round(1 / statistics.median(decode_s), 1),
                "ttft_p50_ms": pct([r["ttft"] for r in rec], 50), "wall_s": round(dt, 2)}

    async def closed_loop(clients, per_client, make_chat, new=32):
        p = SamplingParams(max_tokens=new, temperature=0.0, ignore_eos=True)
        rec = []
        before = e.stats()

        async def client(ci):
            for j in range(per_client):
                await _one(e, f"c{ci}-{j}-{rng.random()}", make_chat(), p, rec)
        await asyncio.gather(*(client(i) for i in range(clients)))
        return {"stats": stats_delta(before), "ttft_p50_ms": pct([r["ttft"] for r in rec], 50), "ttft_p99_ms": pct([r["ttft"] for r in rec], 99),
                "n": len(rec), "prompt_tokens": rec[0]["prompt"],
                "cached_tokens_mean": round(statistics.mean(r["cached"] for r in rec), 1)}

    async def run():
        for N in (1, 8, 32, 64):
            res[f"streams_{N}"] = await streams(N)
            log(tag, res)
        res["ttft_text_8clients"] = await closed_loop(8, 4, lambda: ChatInput(
            messages=[{"role": "user", "content": text_prompt(tok, rng)}]))
        log(tag, res)
        imgs = [screenshot(rng) for _ in range(8)]

        def shot():
            return ChatInput(messages=[{"role": "user", "content": [
                {"type": "image", "image": rng.choice(imgs)},
                {"type": "text", "text": f"#{rng.random():.9f} tap the search button"}]}])
        # unique text before the image -> no prefix reuse of the image
        def shot_unique():
            return ChatInput(messages=[{"role": "system", "content": f"session {rng.random():.12f}"},
                                       {"role": "user", "content": [{"type": "image", "image": rng.choice(imgs)},
                                                                    {"type": "text", "text": "tap search"}]}])
        res["ttft_screenshot_8clients"] = await closed_loop(8, 3, shot_unique)
        log(tag, res)
        # agent turns: the same long system prompt + history, a new screenshot each turn (prefix reuse)
        system = "You are a phone agent. " + words(random.Random(5), 600)

        def agent():
            return ChatInput(messages=[{"role": "system", "content": system},
                                       {"role": "user", "content": [{"type": "image", "image": rng.choice(imgs)},
                                                                    {"type": "text", "text": "next step?"}]}])
        res["ttft_agent_shared_prefix_8clients"] = await closed_loop(8, 3, agent)
        log(tag, res)
        # one new request at a time while 8 streams decode (a phone sending its next screenshot into a busy pod)
        bg_params = SamplingParams(max_tokens=4000, temperature=0.0, ignore_eos=True)
        bg = [asyncio.ensure_future(_one(e, f"bg-{i}-{rng.random()}", ChatInput(
            messages=[{"role": "user", "content": text_prompt(tok, rng)}]), bg_params, [])) for i in range(8)]
        await asyncio.sleep(1.0)
        p1 = SamplingParams(max_tokens=1, temperature=0.0)
        for name, make in (("text", lambda: ChatInput(messages=[{"role": "user", "content": text_prompt(tok, rng)}])),
                           ("screenshot", shot_unique)):
            rec = []
            for j in range(6):
                await _one(e, f"probe-{name}-{j}-{rng.random()}", make(), p1, rec)
            res[f"ttft_{name}_while_8_streams_decode"] = {"ttft_p50_ms": pct([r["ttft"] for r in rec], 50),
                                                          "ttft_max_ms": pct([r["ttft"] for r in rec], 100),
                                                          "n": len(rec)}
        for t in bg:
            t.cancel()
        await asyncio.gather(*bg, return_exceptions=True)
        # and on an idle engine
        for name, make in (("text", lambda: ChatInput(messages=[{"role": "user", "content": text_prompt(tok, rng)}])),
                           ("screenshot", shot_unique)):
            rec = []
            for j in range(4):
                await _one(e, f"idle-{name}-{j}-{rng.random()}", make(), p1, rec)
            res[f"ttft_{name}_idle"] = {"ttft_p50_ms": pct([r["ttft"] for r in rec], 50), "n": len(rec)}
        log(tag, res)
        del shot

    asyncio.run(run())
    res["profile"] = {B: profile_decode(e.runner, B, e.core.sampler) for B in (1, 32)}
    res["gpu_mem_peak_GB"] = round(torch.cuda.max_memory_allocated() / 1e9, 2)
    res["graphs"] = len(e.runner.graphs)
    log(tag, res)
    e.shutdown()
    del e
    import gc
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()


def profile_decode(runner, B, sampler):
    """Where a decode step's time goes: graph replay alone, the whole step as the engine runs it (staging, graph,
    greedy sampling, the host sync), and the eager step's kernels (count, GPU time, top)."""
    import torch
    from torch.profiler import ProfilerActivity, profile
    from function.engine.protocol import SamplingParams
    from function.engine.sampling import RowState
    slots, positions, deltas = list(range(B)), [300] * B, [0] * B    # each slot feeds token 100
    runner.feed(torch.arange(B, device=runner.device), torch.full((B,), 100, device=runner.device))
    rows_state = [RowState(SamplingParams(temperature=0.0))] * B

    def full_step():
        rows = runner.stage_rows(list(range(B)))
        logits = runner.decode(slots, positions, deltas)
        return sampler.sample(logits.index_select(0, rows), rows, rows_state).tolist()
    for _ in range(3):
        full_step()
    t = time.perf_counter()
    for _ in range(50):
        full_step()
    full_ms = (time.perf_counter() - t) / 50 * 1000
    with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof_full:
        for _ in range(3):
            full_step()
    cpu_top = sorted(prof_full.key_averages(), key=lambda k: k.cpu_time_total, reverse=True)[:10]
    for _ in range(3):
        runner.decode(slots, positions, deltas)
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(50):
        runner.decode(slots, positions, deltas)
    torch.cuda.synchronize()
    replay_ms = (time.perf_counter() - t) / 50 * 1000
    use, runner.use_graphs = runner.use_graphs, False
    runner.decode(slots, positions, deltas)
    torch.cuda.synchronize()
    t = time.perf_counter()
    with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
        runner.decode(slots, positions, deltas)
        torch.cuda.synchronize()
    eager_ms = (time.perf_counter() - t) * 1000
    runner.use_graphs = use
    kern = [k for k in prof.key_averages() if str(getattr(k, "device_type", "")).endswith("CUDA")]
    dt = lambda k: getattr(k, "device_time_total", None) or getattr(k, "cuda_time_total", 0)  # noqa: E731
    total_us = sum(dt(k) for k in kern)
    top = sorted(kern, key=dt, reverse=True)[:8]
    return {"graph_step_ms": round(replay_ms, 2), "full_step_ms": round(full_ms, 2),
            "full_step_cpu_top": [(k.key[:50], k.count, round(k.cpu_time_total / 1000, 2)) for k in cpu_top],
            "eager_step_ms_profiled": round(eager_ms, 1),
            "kernels_per_step": int(sum(k.count for k in kern)), "gpu_kernel_ms": round(total_us / 1000, 2),
            "top": [(k.key[:70], k.count, round(dt(k) / 1000, 2)) for k in top]}


# ------------------------------------------------------------------------------------------------ cold start
NAIVE_COLD = r"""
import time, sys, json
t0 = time.time()
import torch, transformers
from transformers import AutoModelForImageTextToText, BitsAndBytesConfig
torch.zeros(1, device="cuda")
kw = dict(dtype=torch.bfloat16, device_map="cuda")
if sys.argv[2] == "nf4":
    kw["quantization_config"] = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                   bnb_4bit_compute_dtype=torch.bfloat16)
m = AutoModelForImageTextToText.from_pretrained(sys.argv[1], **kw)
ids = torch.randint(10, 3000, (1, 64), device="cuda")
with torch.no_grad():
    m.generate(input_ids=ids, max_new_tokens=4, min_new_tokens=4, do_sample=False)
torch.cuda.synchronize()
print(json.dumps({"ready_s": round(time.time() - t0, 2)}))
"""


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    p = s.getsockname()[1]
    s.close()
    return p


def cold(name, quant):
    env = dict(os.environ, MODEL_PATH=MODEL_DIR, MODEL_CACHE_DIR=CACHE_DIR, QUANTIZATION=quant, MAX_NUM_SEQS="64",
               MAX_MODEL_LEN="8192")
    if name.startswith("naive"):
        t = time.time()
        p = subprocess.run([sys.executable, "-c", NAIVE_COLD, MODEL_DIR, quant if quant != "none" else "bf16"],
                           capture_output=True, text=True, env=env, timeout=max(10, left() - 5))
        line = [ln for ln in p.stdout.splitlines() if ln.startswith("{")]
        return {"exec_to_ready_s": round(time.time() - t, 2), **(json.loads(line[-1]) if line else
                                                                  {"err": p.stderr[-800:]})}
    port = free_port()
    env["LISTEN_ADDRESS"] = f"127.0.0.1:{port}"
    t = time.time()
    proc = subprocess.Popen([sys.executable, "-c", "from func_python.http import serve; from function import new; "
                             "serve(new)"], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    listening = None
    try:
        while time.time() - t < left() - 5:
            if proc.poll() is not None:
                return {"err": proc.stdout.read()[-1500:]}
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health/readiness", timeout=1) as r:
                    if listening is None:
                        listening = time.time() - t
                    if r.status == 200:
                        break
            except urllib.error.HTTPError:
                if listening is None:
                    listening = time.time() - t
            except OSError:
                pass
            time.sleep(0.05)
        ready = time.time() - t
        # one real request through HTTP
        body = json.dumps({"model": "autoglm-phone-9b", "max_tokens": 8,
                           "messages": [{"role": "user", "content": "hello"}]}).encode()
        req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/chat/completions", data=body,
                                     headers={"Content-Type": "application/json"})
        t1 = time.time()
        with urllib.request.urlopen(req, timeout=60) as r:
            ok = r.status
        first = time.time() - t1
        return {"exec_to_listening_s": round(listening or -1, 2), "exec_to_ready_s": round(ready, 2),
                "first_request_s": round(first, 3), "status": ok}
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            out, _ = proc.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, _ = proc.communicate()
        lines = [ln for ln in out.splitlines() if "engine ready" in ln or "model loaded" in ln]
        RES.setdefault("cold_logs", {})[name] = lines[-2:]


def importtime():
    """Where import time goes in a fresh process (the biggest cumulative entries of -X importtime)."""
    p = subprocess.run([sys.executable, "-X", "importtime", "-c",
                        "import torch, transformers; from transformers import AutoModelForImageTextToText, "
                        "AutoProcessor; import function.engine.runner"], cwd=ROOT, capture_output=True, text=True)
    rows = []
    for ln in p.stderr.splitlines():
        parts = ln.split("|")
        if len(parts) == 3 and parts[1].strip().isdigit():
            rows.append((int(parts[1]), parts[2].rstrip()))
    top = sorted(rows, reverse=True)[:25]
    log("importtime_top_cumulative_ms", [(round(us / 1000), name) for us, name in top])


def main():
    global DEADLINE
    what = set((sys.argv[1] if len(sys.argv) > 1 else "all").split(","))
    if "all" in what:
        what |= {"build", "naive", "engine", "importtime", "cold"}
    DEADLINE = float(sys.argv[2]) if len(sys.argv) > 2 else DEADLINE
    os.makedirs(OUT, exist_ok=True)
    if "build" in what and not os.path.exists(os.path.join(MODEL_DIR, "config.json")):
        bounded("build", 150, build)
    if "naive" in what:
        bounded("naive", 120, naive)
    if "engine" in what:
        bounded("engine_none", 150, engine_section, "none")
        bounded("engine_nf4", 150, engine_section, "nf4")
    if "importtime" in what:
        bounded("importtime", 40, importtime)
    if "cold" in what:
        import glob
        runs = [("naive_bf16", "none"), ("function_bf16", "none"), ("naive_nf4_quantize", "nf4")]
        if not glob.glob(os.path.join(CACHE_DIR, "prequantized", "*", "prequantized.json")):
            runs.append(("function_nf4_first_start_quantize_and_save", "nf4"))
        runs.append(("function_nf4_prequantized", "nf4"))
        for name, q in runs:
            r = bounded("cold_" + name, 90, cold, name, q)
            if r is not None:
                log("cold_" + name, r)
    log("done", round(time.time() - T0, 1))


if __name__ == "__main__":
    main()
