"""Where the function's start-up import time goes, in fresh processes: what the loader imports before it can
build the model (loader.import_transformers: the GLM-4.1V config and model modules, the tokenizer and processor
modules, the image processor class it serves), with torchvision importable and with it blocked (the two images
issue 17 asks to compare), and with nothing hidden from transformers (`hide=()`: scipy and scikit-learn imported
as transformers would on its own; loader.OPTIONAL_TO_TRANSFORMERS). Writes $OUT/imports.json: wall time per
mode, the biggest cumulative entries of `-X importtime`, and which heavy packages ended up in sys.modules.

    python3 bench/import_probe.py [MODEL_DIR] [REPEATS]   # default /tmp/glm9b (bench/engine_bench.py build), 1
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = Path(os.environ.get("OUT", "/tmp/out"))
MODEL = sys.argv[1] if len(sys.argv) > 1 else "/tmp/glm9b"
REPEATS = int(sys.argv[2]) if len(sys.argv) > 2 else 1    # best of REPEATS fresh processes per mode
HEAVY = ("torchvision", "torch._dynamo", "torch.distributed.tensor", "sympy", "sklearn", "scipy", "accelerate",
         "torch._inductor", "triton", "cv2", "torchaudio", "librosa", "pandas")

CODE = """
import sys, time, json
{block}
t = time.perf_counter()
import torch
t_torch = time.perf_counter() - t
from pathlib import Path
from function.engine import loader
cfg, model = loader.import_transformers(Path({model!r}){hide})
proc = loader.image_processor_class()
print("RESULT", json.dumps({{"import_torch_s": round(t_torch, 3), "total_s": round(time.perf_counter() - t, 3),
      "processor": proc.__name__, "heavy": [m for m in {heavy!r} if sys.modules.get(m) is not None]}}))
"""
BLOCK = "sys.modules['torchvision'] = None   # import torchvision -> ImportError\n"


def run(block: str, hide: str = "") -> dict:
    """The best (lowest total_s) of REPEATS fresh processes."""
    runs = [_run(block, hide) for _ in range(REPEATS)]
    return min(runs, key=lambda r: r.get("total_s", float("inf")))


def _run(block: str, hide: str) -> dict:
    code = CODE.format(block=block, model=MODEL, heavy=HEAVY, hide=hide)
    t = time.perf_counter()
    p = subprocess.run([sys.executable, "-X", "importtime", "-c", code], cwd=ROOT, capture_output=True, text=True,
                       timeout=120)
    wall = time.perf_counter() - t
    res = {"wall_s": round(wall, 2)}
    for ln in p.stdout.splitlines():
        if ln.startswith("RESULT "):
            res.update(json.loads(ln[7:]))
    rows = []
    for ln in p.stderr.splitlines():
        parts = ln.split("|")
        if len(parts) == 3 and parts[1].strip().isdigit():
            rows.append((int(parts[1]), parts[2].rstrip()))
    res["top_cumulative_ms"] = [(round(us / 1000), name) for us, name in sorted(rows, reverse=True)[:30]]
    if p.returncode:
        res["error"] = p.stderr[-2000:]
    return res


def main():
    out = {"torchvision": run(""), "torchvision_blocked": run(BLOCK), "nothing_hidden": run("", ", hide=()")}
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "imports.json").write_text(json.dumps(out, indent=1))
    for k, v in out.items():
        print(k, {x: v.get(x) for x in ("wall_s", "import_torch_s", "total_s", "processor", "heavy")}, flush=True)
        print("  ", v["top_cumulative_ms"][:12], flush=True)


if __name__ == "__main__":
    main()
