"""The native GLM-4.1V implementation (engine/glm4v.py, glm4v_processing.py) against transformers' on the GPU, in one
process, on the random-weight full-size model (bench/engine_bench.py build) and one agent turn (a ~1.5k-token
system prompt, a 1080x2400 screenshot, a question):

- inputs: token ids, grid and pixel values of the two processors;
- numerics through the engine's own runner (eager, bf16): prefill logits, then 64 decode steps teacher-forced on
  transformers' greedy tokens (top-1 agreement, logits relative error);
- speed: the vision tower on the screenshot and the whole fresh prefill step, median of 5, each implementation.

    python3 bench/native_check.py [MODEL_DIR]       # writes $OUT/native_check.json
"""
from __future__ import annotations

import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

MODEL = Path(sys.argv[1] if len(sys.argv) > 1 else "/tmp/glm9b")
OUT = Path(os.environ.get("OUT", "/tmp/out"))
RES: dict = {}


def log(k, v):
    RES[k] = v
    print(k, json.dumps(v), flush=True)


def screenshot() -> Image.Image:
    rng = np.random.default_rng(0)
    base = np.linspace(0, 255, 1080 * 2400 * 3).reshape(2400, 1080, 3)
    noise = rng.integers(0, 40, size=(2400, 1080, 3))
    return Image.fromarray(((base + noise) % 256).astype(np.uint8))


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(fn, n=5) -> float:
    fn()
    sync()
    ts = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        sync()
        ts.append(time.perf_counter() - t)
    return round(statistics.median(ts) * 1e3, 2)


@torch.inference_mode()
def main() -> None:
    from transformers import Glm4vForConditionalGeneration

    from function.engine import glm4v, loader
    from function.engine.inputs import InputPreparer
    from function.engine.protocol import ChatInput, SamplingParams
    from function.engine.runner import ModelRunner, PrefillItem

    dev = "cuda" if torch.cuda.is_available() else "cpu"     # cpu: a smoke run on the tiny model
    bf16 = torch.bfloat16 if dev == "cuda" else torch.float32
    t = time.perf_counter()
    ref = Glm4vForConditionalGeneration.from_pretrained(MODEL, dtype=bf16, device_map=dev).eval()
    log("load_transformers_s", round(time.perf_counter() - t, 2))
    t = time.perf_counter()
    nat = glm4v.load_native(MODEL, bf16, dev)
    log("load_native_s", round(time.perf_counter() - t, 2))
    procs = {"transformers": loader.load_processor(MODEL, "transformers"), "native": loader.load_processor(MODEL, "native")}
    system = "You are a phone agent. " + " ".join(f"Rule {i}: tap, swipe or type as the task needs." for i in range(150))
    chat = ChatInput(messages=[{"role": "system", "content": system},
                               {"role": "user", "content": [{"type": "image", "image": screenshot()},
                                                            {"type": "text", "text": "Open the settings app."}]}])
    params = SamplingParams(max_tokens=64, temperature=0.0)
    preps = {k: InputPreparer(p, nat, max_model_len=8192) for k, p in procs.items()}
    prompts = {k: p.prepare(chat, params) for k, p in preps.items()}
    a, b = prompts["transformers"], prompts["native"]
    pa, pb = a.images[0].pixels.float(), b.images[0].pixels.float()
    log("inputs", {"tokens": a.length, "ids_equal": a.token_ids == b.token_ids,
                   "grid_equal": bool(torch.equal(a.images[0].grid, b.images[0].grid)),
                   "positions_equal": bool(torch.equal(a.position_ids, b.position_ids)),
                   "pixels_max_abs": float((pa - pb).abs().max()), "pixels_mean_abs": float((pa - pb).abs().mean())})
    p = b   # both models get the same inputs from here on
    runners = {"transformers": ModelRunner(ref, num_slots=2, max_len=8192, use_graphs=False),
               "native": ModelRunner(nat, num_slots=2, max_len=8192, use_graphs=False)}

    def item():
        return PrefillItem(slot=0, token_ids=p.token_ids, start=0, position_ids=p.position_ids, images=p.images)
    logits = {k: r.prefill([item()]).float() for k, r in runners.items()}
    rel = lambda x, y: float((x - y).norm() / y.norm())  # noqa: E731
    log("prefill", {"logits_rel_err": rel(logits["native"], logits["transformers"]),
                    "top1_equal": int(logits["native"].argmax()) == int(logits["transformers"].argmax())})
    tok = int(logits["transformers"].argmax())
    agree, errs = 0, []
    for step in range(64):
        outs = {}
        for k, r in runners.items():
            r.feed(torch.tensor([0], device=dev), torch.tensor([tok], device=dev))
            outs[k] = r.decode([0], [p.length + step], [p.rope_delta])[:1].float()
        agree += int(outs["native"].argmax()) == int(outs["transformers"].argmax())
        errs.append(rel(outs["native"], outs["transformers"]))
        tok = int(outs["transformers"].argmax())
    log("decode_64_teacher_forced", {"top1_agreement": agree / 64, "logits_rel_err_max": max(errs),
                                     "logits_rel_err_mean": sum(errs) / len(errs)})
    pix = p.images[0].pixels.to(dev)
    grid = p.images[0].grid.view(1, 3).to(dev)
    fa = torch.cat(ref.model.get_image_features(pix, grid, return_dict=True).pooler_output).float()
    fb = torch.cat(nat.model.get_image_features(pix, grid).pooler_output).float()
    log("vision_features_rel_err", rel(fb, fa))
    speed = {}
    for k, m in (("transformers", ref), ("native", nat)):
        speed[f"vision_ms_{k}"] = timed(lambda: m.model.get_image_features(pix, grid))
        speed[f"prefill_step_ms_{k}"] = timed(lambda: runners[k].prefill([item()]))
    log("speed", speed)
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "native_check.json").write_text(json.dumps(RES, indent=1))


if __name__ == "__main__":
    main()
