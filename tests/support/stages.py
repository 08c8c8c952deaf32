"""Waiting for a stage that loads in the background (LocalEngine, SpeechRecognizer: function.http_common.Lifecycle)."""
from __future__ import annotations

import contextlib
import time
from typing import Iterator, TypeVar

__all__ = ["running", "wait_ready"]

S = TypeVar("S")


def wait_ready(stage, timeout: float = 300.0) -> None:
    """Poll `stage.status()` until it says ready. Fails at once when the stage stops being alive or reports a
    failure (with its status), and after `timeout` seconds (a bound never reached when the code is right)."""
    deadline = time.monotonic() + timeout
    while not (status := stage.status())[1]:
        alive, _, message = status
        assert alive and "failed" not in message, status
        assert getattr(stage, "error", None) is None, stage.error
        assert time.monotonic() < deadline, status
        time.sleep(0.02)


@contextlib.contextmanager
def running(stage: S, timeout: float = 300.0) -> Iterator[S]:
    """`stage` loaded (start_loading, then `wait_ready`) for the block, shut down after."""
    stage.start_loading()
    try:
        wait_ready(stage, timeout)
        yield stage
    finally:
        stage.shutdown()
