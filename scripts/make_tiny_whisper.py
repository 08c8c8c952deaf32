#!/usr/bin/env python3
"""Build the tiny random-weight Whisper checkpoint (for ASR_MODEL_PATH) and print its path.

    python scripts/make_tiny_whisper.py [OUT_DIR] [--seed N] [--force]

OUT_DIR defaults to $MODEL_CACHE_DIR/tiny-whisper (beside the tiny GLM-4.1V). An existing checkpoint of the same
builder version and seed is reused unless --force. Serve it with ASR_MODEL_PATH=<the printed path>.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from function.tiny_whisper import build_tiny_whisper  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", nargs="?", help="target directory (default: $MODEL_CACHE_DIR/tiny-whisper)")
    parser.add_argument("--seed", type=int, default=0, help="weight seed (default 0)")
    parser.add_argument("--force", action="store_true", help="rebuild even if a matching checkpoint exists")
    args = parser.parse_args(argv)

    out_dir = args.out_dir
    if out_dir is None:
        from function.config import Config

        out_dir = Path(Config.from_env().model_cache_dir) / "tiny-whisper"
    t0 = time.perf_counter()
    path = build_tiny_whisper(out_dir, seed=args.seed, force=args.force)
    print(path)
    print(f"({time.perf_counter() - t0:.1f}s)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
