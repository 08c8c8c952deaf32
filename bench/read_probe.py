"""How fast engine/weights.WeightReader fills device memory from the checkpoint, by reader threads and chunk size,
page cache warm (one untimed read first), against a plain single-threaded read of the same files into host memory
(what the page cache gives one thread). Issue 17: once transformers is not imported, the read is on the start's
critical path.

    python3 bench/read_probe.py [MODEL_DIR] [THREADS,...] [CHUNK_MIB,...]   # default /tmp/glm9b 2,4,8,12 32,64

Writes $OUT/read_probe.json.
"""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from function.engine import weights  # noqa: E402

MODEL = Path(sys.argv[1] if len(sys.argv) > 1 else "/tmp/glm9b")
THREADS = [int(x) for x in (sys.argv[2] if len(sys.argv) > 2 else "2,4,8,12").split(",")]
CHUNKS = [int(x) for x in (sys.argv[3] if len(sys.argv) > 3 else "32,64").split(",")]
OUT = Path(os.environ.get("OUT", "/tmp/out"))


def host_read() -> dict:
    buf = bytearray(64 << 20)
    view = memoryview(buf)
    total, t = 0, time.perf_counter()
    for p in weights.shard_files(MODEL):
        with open(p, "rb", buffering=0) as f:
            while n := f.readinto(view):
                total += n
    s = time.perf_counter() - t
    return {"bytes": total, "s": round(s, 3), "gbps": round(total / s / 1e9, 2)}


def main() -> None:
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    res = {"device": torch.cuda.get_device_name(0) if dev == "cuda" else "cpu", "cpus": os.cpu_count(),
           "host_read_1_thread": host_read(), "reader": []}
    res["host_read_1_thread"] = host_read()     # the first one warmed the page cache
    for chunk in CHUNKS:
        for th in THREADS:
            r = weights.WeightReader(MODEL, dev, threads=th, chunk_bytes=chunk << 20, headroom_bytes=0).start()
            state = r.result()
            row = {"threads": th, "chunk_mib": chunk, **r.stats, "declined": r.declined}
            del state
            if dev == "cuda":
                torch.cuda.empty_cache()
            res["reader"].append(row)
            print(json.dumps(row), flush=True)
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "read_probe.json").write_text(json.dumps(res, indent=1))
    print(json.dumps({k: v for k, v in res.items() if k != "reader"}))


if __name__ == "__main__":
    main()
