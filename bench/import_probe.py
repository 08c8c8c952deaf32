"""Where the function's start-up import time goes, in fresh processes: the imports the loader runs before it can
build the model (loader.model_classes + the image processor class it serves), with torchvision importable and
with it blocked (the two images issue 17 asks to compare). Writes $OUT/imports.json: wall time per mode and the
biggest cumulative entries of `-X importtime`, and which heavy packages ended up in sys.modules.

    python3 bench/import_probe.py [MODEL_DIR]      # default /tmp/glm9b (bench/engine_bench.py build)
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
HEAVY = ("torchvision", "torch._dynamo", "sympy", "sklearn", "scipy", "torch._inductor", "triton", "cv2")

CODE = """
import sys, time, json
{block}
t = time.perf_counter()
import torch
t_torch = time.perf_counter() - t
from pathlib import Path
from function.engine import loader
cfg, model = loader.model_classes(Path({model!r}))
proc = loader.image_processor_class()
from transformers import AutoTokenizer, GenerationConfig
from transformers.models.glm4v import processing_glm4v
print("RESULT", json.dumps({{"import_torch_s": round(t_torch, 3), "total_s": round(time.perf_counter() - t, 3),
      "processor": proc.__name__, "heavy": [m for m in {heavy!r} if sys.modules.get(m) is not None]}}))
"""
BLOCK = "sys.modules['torchvision'] = None   # import torchvision -> ImportError\n"


def run(block: str) -> dict:
    code = CODE.format(block=block, model=MODEL, heavy=HEAVY)
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
    out = {"torchvision": run(""), "torchvision_blocked": run(BLOCK)}
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "imports.json").write_text(json.dumps(out, indent=1))
    for k, v in out.items():
        print(k, {x: v.get(x) for x in ("wall_s", "import_torch_s", "total_s", "processor", "heavy")}, flush=True)
        print("  ", v["top_cumulative_ms"][:12], flush=True)


if __name__ == "__main__":
    main()
