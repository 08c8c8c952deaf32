"""Why bitsandbytes' first CUDA kernel costs 5.8-8.8 s in every fresh process on the H200 (session 8 calls 1-2: the
first Params4bit quantization, or the first decode graph capture of a pre-quantized nf4 start). Hypothesis: its
library carries no SASS for this card, so the driver JIT-compiles the PTX module on first use, and the driver's JIT
cache (CUDA_CACHE_PATH, default ~/.nv/ComputeCache, CUDA_CACHE_MAXSIZE default 256 MiB) does not keep it.
Fresh processes time the first quantize_4bit and the first matmul_4bit (decode gemv) under: the default cache,
then twice with a fresh cache dir and a 4 GiB limit. Writes $OUT/bnb_jit_probe.json.

    python3 bench/bnb_jit_probe.py
"""
from __future__ import annotations

import glob
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = Path(os.environ.get("OUT", "/tmp/out"))

CHILD = r"""
import json, time, torch
t = time.perf_counter(); torch.zeros(1, device="cuda"); torch.cuda.synchronize(); cuda = time.perf_counter() - t
from function.engine import nf4
t = time.perf_counter(); bnn = nf4.import_bitsandbytes(); imp = time.perf_counter() - t
import bitsandbytes as bnb
w = torch.randn(4096, 4096, dtype=torch.bfloat16, device="cuda")
t = time.perf_counter()
p = bnn.Params4bit(w, requires_grad=False, compress_statistics=False, quant_type="nf4").to("cuda")
torch.cuda.synchronize(); first_quant = time.perf_counter() - t
x = torch.randn(1, 4096, dtype=torch.bfloat16, device="cuda")
t = time.perf_counter(); bnb.matmul_4bit(x, p.t(), quant_state=p.quant_state); torch.cuda.synchronize()
first_gemv = time.perf_counter() - t
t = time.perf_counter(); bnb.matmul_4bit(x, p.t(), quant_state=p.quant_state); torch.cuda.synchronize()
again = time.perf_counter() - t
print(json.dumps({"cuda_init_s": round(cuda, 3), "import_s": round(imp, 3), "first_quantize_s": round(first_quant, 3),
                  "first_gemv_s": round(first_gemv, 3), "gemv_again_s": round(again, 4)}))
"""


def child(env: dict) -> dict:
    r = subprocess.run([sys.executable, "-c", CHILD], cwd=ROOT, env={**os.environ, **env, "PYTHONPATH": os.pathsep.join(
        [str(ROOT), os.environ.get("PYTHONPATH", "")])}, capture_output=True, text=True, timeout=120)
    try:
        return json.loads(r.stdout.strip().splitlines()[-1])
    except (IndexError, ValueError):
        return {"rc": r.returncode, "stderr": r.stderr[-1500:]}


def du(path: str) -> int:
    return sum(os.path.getsize(p) for p in glob.glob(os.path.join(path, "**"), recursive=True) if os.path.isfile(p))


def main() -> None:
    res: dict = {}
    tool = shutil.which("cuobjdump") or next(iter(glob.glob("/usr/local/cuda*/bin/cuobjdump")), None)
    import bitsandbytes  # noqa: F401  (the library files; CPU-only import work)
    libs = sorted(glob.glob(os.path.join(os.path.dirname(bitsandbytes.__file__), "libbitsandbytes_cuda13*.so")))
    if tool:
        for lib in libs:
            out = subprocess.run([tool, "--list-elf", "--list-ptx", lib], capture_output=True, text=True)
            res[f"cuobjdump {os.path.basename(lib)}"] = (out.stdout + out.stderr)[-1500:]
    else:
        res["cuobjdump"] = "not found"
    default_cache = os.path.expanduser("~/.nv/ComputeCache")
    res["default_cache_before_bytes"] = du(default_cache)
    res["default_1"] = child({})
    res["default_2"] = child({})
    res["default_cache_after_bytes"] = du(default_cache)
    d = tempfile.mkdtemp(prefix="nvjit-")
    big = {"CUDA_CACHE_PATH": d, "CUDA_CACHE_MAXSIZE": str(4 << 30)}
    res["big_cache_1"] = child(big)
    res["big_cache_bytes"] = du(d)
    res["big_cache_2"] = child(big)
    res["eager_module_loading"] = child({**big, "CUDA_MODULE_LOADING": "EAGER"})
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "bnb_jit_probe.json").write_text(json.dumps(res, indent=1))
    print(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
