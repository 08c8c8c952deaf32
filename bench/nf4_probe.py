"""Where the native nf4 load's time goes (engine/nf4.py; session 7 call 1: `load_prequantized` 12.2 s on the H200
against 2.5 s through transformers). In one fresh process, as the loader runs it: import torch, read the
pre-quantized copy into the card (weights.WeightReader), then `import bitsandbytes` and nf4.load_native under
cProfile. Writes $OUT/nf4_probe.json: the phases and the top entries by cumulative and by own time.

    python3 bench/nf4_probe.py [COPY_DIR]   # default: the nf4 copy under /tmp/modelcache/prequantized
    python3 bench/nf4_probe.py --quantize [MODEL_DIR]   # a first start's nf4.quantize of the bf16 model (/tmp/glm9b)
"""
from __future__ import annotations

import cProfile
import glob
import io
import json
import os
import pstats
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
OUT = Path(os.environ.get("OUT", "/tmp/out"))


def top(prof: cProfile.Profile, key: str, n: int = 30) -> list[str]:
    s = io.StringIO()
    pstats.Stats(prof, stream=s).sort_stats(key).print_stats(n)
    return [ln for ln in s.getvalue().splitlines() if ln.strip()][-n - 1:]


def quantize_probe(model_dir: Path) -> None:
    """The first nf4 start's quantization (session 8 call 1: nf4_quantize 5.6-5.7 s): the bf16 model read ahead
    onto the card, then nf4.quantize under cProfile, synchronized; also one Params4bit quantization timed alone
    before and after, to split the per-module cost from the first-call cost."""
    res: dict = {"model": str(model_dir)}
    import torch
    from function.engine import glm4v, nf4
    from function.engine.weights import WeightReader
    t = time.perf_counter()
    state = WeightReader(model_dir, "cuda").start().result()
    model = glm4v.load_native(model_dir, torch.bfloat16, "cuda", state_dict=state)
    torch.cuda.synchronize()
    res["read_and_load_s"] = round(time.perf_counter() - t, 3)
    t = time.perf_counter()
    bnb_nn = nf4.import_bitsandbytes()
    res["import_bitsandbytes_s"] = round(time.perf_counter() - t, 3)
    w = torch.randn(13696, 4096, dtype=torch.bfloat16, device="cuda")
    for label in ("one_params4bit_first_s", "one_params4bit_again_s"):
        torch.cuda.synchronize()
        t = time.perf_counter()
        bnb_nn.Params4bit(w, requires_grad=False, compress_statistics=False, quant_type="nf4").to("cuda")
        torch.cuda.synchronize()
        res[label] = round(time.perf_counter() - t, 4)
    prof = cProfile.Profile()
    torch.cuda.synchronize()
    t = time.perf_counter()
    prof.enable()
    names = nf4.quantize(model, torch.bfloat16, "cuda")
    torch.cuda.synchronize()
    prof.disable()
    res["quantize_s"] = round(time.perf_counter() - t, 3)
    res["modules"] = len(names)
    res["memory_allocated_GB"] = round(torch.cuda.memory_allocated() / 1e9, 2)
    res["top_cumulative"] = top(prof, "cumulative")
    res["top_own"] = top(prof, "tottime")
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "nf4_quantize_probe.json").write_text(json.dumps(res, indent=1))
    print(json.dumps({k: v for k, v in res.items() if not k.startswith("top")}))
    print("\n".join(res["top_cumulative"]))
    print("\n".join(res["top_own"][:20]))


def main() -> None:
    if sys.argv[1:2] == ["--quantize"]:
        quantize_probe(Path(sys.argv[2] if len(sys.argv) > 2 else "/tmp/glm9b"))
        return
    copy = Path(sys.argv[1] if len(sys.argv) > 1 else
                sorted(glob.glob("/tmp/modelcache/prequantized/*-nf4-*/prequantized.json"))[0]).resolve()
    copy = copy.parent if copy.is_file() else copy
    res: dict = {"copy": str(copy)}
    t = time.perf_counter()
    import torch
    res["import_torch_s"] = round(time.perf_counter() - t, 3)
    from function.engine import glm4v, nf4
    from function.engine.weights import WeightReader
    t = time.perf_counter()
    state = WeightReader(copy, "cuda").start().result()
    torch.cuda.synchronize()
    res["read_s"] = round(time.perf_counter() - t, 3)
    prof = cProfile.Profile()
    t = time.perf_counter()
    prof.enable()
    import bitsandbytes  # noqa: F401
    res["import_bitsandbytes_s"] = round(time.perf_counter() - t, 3)
    t = time.perf_counter()
    model = nf4.load_native(copy, torch.bfloat16, "cuda", state_dict=state)
    torch.cuda.synchronize()
    prof.disable()
    res["load_native_s"] = round(time.perf_counter() - t, 3)
    res["heavy_modules"] = [m for m in ("torch._dynamo", "torch._inductor", "triton", "sympy", "transformers")
                            if m in sys.modules]
    res["top_cumulative"] = top(prof, "cumulative")
    res["top_own"] = top(prof, "tottime")
    t = time.perf_counter()
    with torch.no_grad():
        model(input_ids=torch.tensor([[1, 2, 3, 4]], device="cuda"))
    torch.cuda.synchronize()
    res["first_forward_s"] = round(time.perf_counter() - t, 3)
    del glm4v
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "nf4_probe.json").write_text(json.dumps(res, indent=1))
    print(json.dumps({k: v for k, v in res.items() if not k.startswith("top")}))
    print("\n".join(res["top_cumulative"]))
    print("\n".join(res["top_own"][:20]))


if __name__ == "__main__":
    main()
