#!/usr/bin/env python3
"""Write the pre-quantized checkpoint onto the model cache volume, so pods load quantized weights straight to the
GPU instead of quantizing at every cold start. Run once per checkpoint and setting (the cache-filling Job does).

    MODEL_CACHE_DIR=/models/cache python scripts/prequantize.py --model-path /models/hf/AutoGLM-Phone-9B \
        --quantization fp8

Idempotent: when the pre-quantized copy for this checkpoint, setting and library versions exists, it only says
where. Settings not given as options (QUANTIZE_VISION, DTYPE, DEVICE) come from the environment, as in the server.

`--quantization none` (or bf16), the setting service.yaml ships, is a valid no-op: bf16 loads the checkpoint as it
is, so there is nothing to write; the script checks that the checkpoint is there, says so and exits 0 (the Job then
only downloads).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-path", required=True, help="local checkpoint directory")
    ap.add_argument("--quantization", default="fp8", choices=["fp8", "nf4", "int8", "none", "bf16"],
                    help="fp8 (function/engine/fp8.py) or a bitsandbytes scheme; none/bf16: nothing to write")
    ap.add_argument("--cache-dir", default=None, help="model cache volume (default: MODEL_CACHE_DIR)")
    args = ap.parse_args(argv)

    from function.config import Config

    env = dict(os.environ, MODEL_PATH=args.model_path, QUANTIZATION=args.quantization, PREQUANTIZED_CACHE="true")
    if args.cache_dir:
        env["MODEL_CACHE_DIR"] = args.cache_dir
    config = Config.from_env(env)
    model_path = Path(config.model_path)
    if not (model_path / "config.json").is_file():
        print(f"error: {model_path} has no config.json", file=sys.stderr)
        return 2
    if args.quantization in ("none", "bf16"):
        msg = ("QUANTIZATION=none (bf16) needs no pre-quantized copy: the server loads the bf16 checkpoint as it is; "
               "nothing written")
        print(json.dumps({"status": "not-needed", "quantization": "none", "path": str(model_path),
                          "message": msg}))
        return 0
    from function.engine import loader

    choices = loader.choose(config, model_path)
    target = loader.prequantized_dir(config, model_path, choices)
    if (target / "prequantized.json").is_file():
        print(json.dumps({"status": "exists", "path": str(target)}))
        return 0
    t = time.perf_counter()
    loaded = loader.load(config, on_phase=lambda p: print(f"... {p}", file=sys.stderr))
    ok = (target / "prequantized.json").is_file()
    # the start-up work a server runs while idle after ready (fp8: every Triton kernel variant, compiled into
    # TRITON_CACHE_DIR): run here, on the Job's GPU, so a volume's first pod meets a warm kernel cache
    for phase, steps in loaded.idle_work:
        t0 = time.perf_counter()
        for _ in steps:
            pass
        loaded.choices.timings[phase] = round(time.perf_counter() - t0, 3)
    print(json.dumps({"status": "written" if ok else "failed", "path": str(target),
                      "seconds": round(time.perf_counter() - t, 1), "timings": loaded.choices.timings}))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
