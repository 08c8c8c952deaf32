"""Fault injection into a loaded LocalEngine's model steps, from the test side (the engine carries no hook of its
own): `set_fault_hook(engine, hook)` makes `hook("prefill")` run before every prefill forward and `hook("decode")`
before every decode forward, on the engine thread and inside the step's error handling, as a failing kernel would;
`set_fault_hook(engine, None)` restores the runner's own methods."""
from __future__ import annotations

from typing import Callable


def set_fault_hook(engine, hook: Callable[[str], None] | None) -> None:
    runner = engine.runner
    for stage in ("prefill", "decode"):
        runner.__dict__.pop(stage, None)           # back to the class's method
        if hook is None:
            continue
        real = getattr(runner, stage)

        def wrapped(*args, _stage=stage, _real=real, **kwargs):
            hook(_stage)
            return _real(*args, **kwargs)
        setattr(runner, stage, wrapped)
