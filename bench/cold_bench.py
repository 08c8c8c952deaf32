"""Scale from zero: process exec -> first streamed token, in fresh processes of the same run.

    python3 bench/cold_bench.py [--model DIR] [--quant none,nf4,fp8] [--cold] [--repeat N] [--skip-naive]

  naive     `python -c`: import torch + transformers, from_pretrained (bf16, or nf4 quantizing while loading),
            generate 1 token. exec -> that token.
  function  the function as the Dockerfile serves it (func-python + hypercorn): exec -> listening ->
            /health/readiness 200 -> first streamed token of a real chat request over HTTP; the engine's phase
            timings from its log. nf4/fp8 run twice when no pre-quantized copy exists yet (first start writes it).
  --cold    before every run, drop the page cache (`echo 3 > /proc/sys/vm/drop_caches`, root) or, where that is not
            allowed, evict the checkpoint's and the pre-quantized copy's files (posix_fadvise DONTNEED); without it
            the page cache is warm (one untimed read first).
  disk      read speed of the checkpoint files, cold (where the cache can be dropped) and warm, for reference.

Results: one JSON object on stdout and in $OUT/cold.json. Defaults: the random-weight full-size model that
bench/engine_bench.py's `build` writes to /tmp/glm9b (built here if missing and a GPU is present); on a machine
without a GPU, the project's tiny model (a smoke check of the whole path).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
from engine_bench import IMAGE_ENV, free_port  # noqa: E402  (stdlib-only at import)
OUT = Path(os.environ.get("OUT", "/tmp/out"))
RES: dict = {}

NAIVE = r"""
import sys, time, json
t0 = time.time()
import torch, transformers
from transformers import AutoModelForImageTextToText, BitsAndBytesConfig
dev = "cuda" if torch.cuda.is_available() else "cpu"
kw = dict(dtype=torch.bfloat16 if dev == "cuda" else torch.float32, device_map=dev)
if sys.argv[2] == "nf4":
    kw["quantization_config"] = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                   bnb_4bit_compute_dtype=torch.bfloat16)
t1 = time.time()
m = AutoModelForImageTextToText.from_pretrained(sys.argv[1], **kw)
t2 = time.time()
ids = torch.randint(10, 3000, (1, 16), device=dev)
with torch.no_grad():
    m.generate(input_ids=ids, max_new_tokens=1, do_sample=False)
if dev == "cuda":
    torch.cuda.synchronize()
print(json.dumps({"import_s": round(t1 - t0, 2), "from_pretrained_s": round(t2 - t1, 2),
                  "in_process_first_token_s": round(time.time() - t0, 2)}))
"""


def log(key, value):
    RES[key] = value
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "cold.json").write_text(json.dumps(RES, indent=1))
    print(f"{key}: {json.dumps(value)[:1200]}", file=sys.stderr, flush=True)


def has_gpu() -> bool:
    return os.path.exists("/dev/nvidiactl") or shutil.which("nvidia-smi") is not None



# ------------------------------------------------------------------------------------------------ page cache
def drop_caches() -> bool:
    try:
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def evict(paths) -> None:
    for p in paths:
        try:
            fd = os.open(p, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)
        except OSError:
            pass


def warm(paths) -> None:
    for p in paths:
        with open(p, "rb") as f:
            while f.read(64 << 20):
                pass


def read_speed(paths) -> float:
    t, n = time.perf_counter(), 0
    for p in paths:
        with open(p, "rb") as f:
            while True:
                b = f.read(64 << 20)
                if not b:
                    break
                n += len(b)
    return round(n / (time.perf_counter() - t) / 1e9, 2)


def weight_files(d: Path) -> list[Path]:
    return sorted(d.glob("*.safetensors")) + sorted(d.glob("*.json"))


# ------------------------------------------------------------------------------------------------ runs
def naive(model: Path, quant: str, timeout: float) -> dict:
    t = time.time()
    p = subprocess.run([sys.executable, "-c", NAIVE, str(model), quant], capture_output=True, text=True,
                       timeout=timeout)
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith("{")]
    if not lines:
        return {"error": p.stderr[-1500:]}
    return {"exec_to_first_token_s": round(time.time() - t, 2), **json.loads(lines[-1])}


def copies(cache_dir: Path, quant: str) -> list[Path]:
    """The complete pre-quantized copies of `quant` in the cache dir (loader.prequantized_dir names them
    <model>-<quant>-<fingerprint>)."""
    return sorted((cache_dir / "prequantized").glob(f"*-{quant}-*/prequantized.json"))


def function(model: Path | None, quant: str, cache_dir: Path, timeout: float, env_extra: dict,
             wait_for_copy: bool = False) -> dict:
    """One fresh start: exec -> ready -> first streamed token, phases from /metrics. `wait_for_copy`: a first
    start that quantizes writes its pre-quantized copy after ready; the server is stopped once it is there."""
    port = free_port()
    env = dict(os.environ, **IMAGE_ENV)
    env.update(MODEL_CACHE_DIR=str(cache_dir), QUANTIZATION=quant, LISTEN_ADDRESS=f"127.0.0.1:{port}",
               LOG_LEVEL="INFO", PYTHONPATH=os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p),
               **env_extra)
    if model is not None:
        env["MODEL_PATH"] = str(model)
    t = time.time()
    proc = subprocess.Popen([sys.executable, "-c", "from func_python.http import serve; from function import new; "
                             "serve(new)"], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    res: dict = {}
    try:
        base = f"http://127.0.0.1:{port}"
        while True:
            if time.time() - t > timeout:
                res["error"] = "not ready in time"
                return res
            if proc.poll() is not None:
                res["error"] = "server exited"
                return res
            try:
                with urllib.request.urlopen(base + "/health/readiness", timeout=2) as r:
                    res.setdefault("exec_to_listening_s", round(time.time() - t, 2))
                    if r.status == 200:
                        break
            except urllib.error.HTTPError:
                res.setdefault("exec_to_listening_s", round(time.time() - t, 2))
            except OSError:
                pass
            time.sleep(0.02)
        res["exec_to_ready_s"] = round(time.time() - t, 2)
        body = json.dumps({"model": "autoglm-phone-9b", "max_tokens": 8, "stream": True,
                           "messages": [{"role": "user", "content": "打开微信"}]}).encode()
        req = urllib.request.Request(base + "/v1/chat/completions", data=body,
                                     headers={"Content-Type": "application/json"})
        t1 = time.time()
        with urllib.request.urlopen(req, timeout=120) as r:
            for raw in r:
                line = raw.decode().strip()
                if not line.startswith("data:") or line == "data: [DONE]" or "first_token_after_ready_s" in res:
                    continue
                delta = (json.loads(line[5:]).get("choices") or [{}])[0].get("delta", {})
                if delta.get("content") or delta.get("reasoning_content"):
                    res["first_token_after_ready_s"] = round(time.time() - t1, 3)
                    res["exec_to_first_token_s"] = round(time.time() - t, 2)
            res["status"] = r.status
        with urllib.request.urlopen(base + "/metrics", timeout=10) as r:
            phases = {}
            for ln in r.read().decode().splitlines():
                m = re.match(r'autoglm_cold_start_phase_seconds\{phase="([^"]+)"\} (\S+)', ln)
                if m:
                    phases[m.group(1)] = round(float(m.group(2)), 3)
            res["phases"] = phases
        if wait_for_copy:
            t2 = time.time()
            while not copies(cache_dir, quant) and time.time() - t2 < timeout and proc.poll() is None:
                time.sleep(0.2)
            res["copy_written_after_first_token_s"] = round(time.time() - t2, 2) if copies(cache_dir, quant) else None
        return res
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            out, _ = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, _ = proc.communicate()
        res["log"] = [ln[-700:] for ln in out.splitlines()
                      if any(k in ln for k in ("model loaded", "engine ready", "read ", "weights are read",
                                               "Traceback", "Error", "failed"))][-6:]


def make_cold(files) -> str:
    """Take the files out of the page cache; says how."""
    if drop_caches():
        return "drop_caches"
    evict(files)
    return "fadvise(DONTNEED)"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None, help="checkpoint dir (default /tmp/glm9b on a GPU, tiny model on CPU)")
    ap.add_argument("--quant", default=None, help="comma list of none,nf4,fp8 (default: none,nf4 on GPU; none)")
    ap.add_argument("--cold", action="store_true", help="also run with the page cache dropped")
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--skip-naive", action="store_true")
    ap.add_argument("--timeout", type=float, default=240)
    ap.add_argument("--cache-dir", default=None, help="MODEL_CACHE_DIR (default: a fresh temp dir)")
    a = ap.parse_args()
    gpu = has_gpu()
    model = Path(a.model) if a.model else (Path(os.environ.get("BENCH_MODEL_DIR", "/tmp/glm9b")) if gpu else None)
    if model is not None and gpu and not (model / "config.json").exists():
        import bench.engine_bench as eb    # the random-weight full-size model
        eb.MODEL_DIR, eb.OUT = str(model), str(OUT)
        eb.build()
    cache_dir = Path(a.cache_dir or tempfile.mkdtemp(prefix="cold-cache-"))
    if model is None:       # CPU smoke check: the tiny model, built into the cache dir once (untimed)
        from function.config import Config
        from function.tiny_model import build_tiny_model
        model = Path(build_tiny_model(Config.from_env({"MODEL_CACHE_DIR": str(cache_dir)}).tiny_model_dir))
    quants = (a.quant or ("none,nf4" if gpu else "none")).split(",")
    if "fp8" in quants:
        from function.config import Config, ConfigError
        try:
            Config.from_env({"QUANTIZATION": "fp8"})
        except ConfigError as e:
            log("fp8_skipped", str(e))
            quants.remove("fp8")
    files = weight_files(model)
    size = sum(p.stat().st_size for p in files if p.suffix == ".safetensors")
    log("setup", {"model": str(model), "checkpoint_GB": round(size / 1e9, 2), "gpu": gpu, "quant": quants,
                  "python": sys.version.split()[0], "cache_dir": str(cache_dir)})

    def all_files():
        return files + sorted(p for p in (cache_dir / "prequantized").glob("*/*") if p.is_file())

    if drop_caches():
        log("disk_cold_read_GBps", read_speed(files))
    warm(files)
    log("page_cache_read_GBps", read_speed(files))
    modes = ["warm"] + (["cold"] if a.cold else [])
    for mode in modes:
        for rep in range(a.repeat):
            for q in quants:
                naive_q = {"none": "bf16", "nf4": "nf4"}.get(q)
                if not a.skip_naive and naive_q is not None:
                    how = make_cold(all_files()) if mode == "cold" else (warm(files) or "warm")
                    log(f"{mode}_{rep}_naive_{naive_q}", {**naive(model, naive_q, a.timeout), "cache": how})
                starts = ["only"] if q == "none" else (
                    ["first_start_quantize", "prequantized"] if not copies(cache_dir, q) else ["prequantized"])
                for s in starts:
                    how = make_cold(all_files()) if mode == "cold" else (warm(all_files()) or "warm")
                    r = function(model, q, cache_dir, a.timeout, {}, wait_for_copy=s == "first_start_quantize")
                    log(f"{mode}_{rep}_function_{q}_{s}", {**r, "cache": how})
    print(json.dumps(RES))


if __name__ == "__main__":
    main()
