"""Writing generated checkpoint directories: build one beside its final path, then rename it into place
(atomic publishing), and save models without progress-bar noise.

Used for the self-built tiny checkpoints, which several processes (test workers, server replicas sharing a model
cache volume) may build at the same moment: readers never see half a directory and racing builders all end with
a complete one.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable


def publish_dir(out: Path, build_into: Callable[[Path], None], is_complete: Callable[[Path], bool], *,
                force: bool = False, what: str = "directory") -> Path:
    """Return `out`, building it with `build_into(tmp)` unless `is_complete(out)` already (or `force`)."""
    if not force and is_complete(out):
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.build-", dir=out.parent))
    try:
        build_into(tmp)
        for _ in range(5):
            try:
                os.rename(tmp, out)  # atomic; fails if `out` exists and is not an empty directory
                return out
            except OSError:
                if not out.exists():
                    continue
                if not force and is_complete(out):
                    return out  # another process finished first
                # stale or forced: move the old directory aside (atomic), then retry the rename
                trash = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
                try:
                    os.rename(out, trash / "old")
                except OSError:
                    pass  # someone else moved or replaced it meanwhile
                shutil.rmtree(trash, ignore_errors=True)
                force = False  # our copy is about to be the fresh one; accept a racer's equally fresh copy
        raise OSError(f"could not move the {what} into place at {out}")
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def marker_matches(d: Path, marker_file: str, **expected) -> bool:
    """True when `d/marker_file` (JSON) exists and holds every `expected` key with that value: a builder writes its
    marker last, so a matching marker means a finished directory of that version."""
    try:
        marker = json.loads((d / marker_file).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return all(marker.get(k) == v for k, v in expected.items())


def save_model_quietly(model, d: Path) -> None:
    """`save_pretrained` without transformers' progress bar (noise in test and server logs)."""
    from transformers.utils import logging as hf_logging

    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        model.save_pretrained(d, safe_serialization=True)
    finally:
        if bars:
            hf_logging.enable_progress_bar()
