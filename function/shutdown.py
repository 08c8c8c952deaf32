"""Graceful shutdown on SIGTERM under both servers: stop taking work, finish what was accepted, then exit.

Kubernetes (Knative) sends SIGTERM and waits terminationGracePeriodSeconds (Knative: the revision timeout) before
SIGKILL. Left alone, both servers would close the listening socket at once, and hypercorn (func-python sets no
config) cuts the requests still running after its graceful_timeout of 3 s. So the first SIGTERM is taken over here:

1. `Drain.begin()`: readiness turns False at once; every new request but the probes and /metrics gets 503
   `shutting_down` with Retry-After (api/gate.py), so the activator, queue-proxy or client retries elsewhere;
2. the requests and streams already accepted run to their end; each has its own deadline (REQUEST_TIMEOUT_S), so
   the wait is bounded by it (plus DRAIN_MARGIN_S);
3. then the server's own SIGTERM handler runs: it closes the listener and runs the shutdown (func-python:
   `Function.stop()`; uvicorn: the lifespan), which stops the engine, and the process exits - status 0 under
   func-python; uvicorn re-raises the signal after its shutdown, so it ends by SIGTERM (143 in a shell).

A second SIGTERM skips the wait, and SIGINT (Ctrl+C) is left to the server.

The server's handler is found where each server puts it: hypercorn (func-python) registers it on the event loop
with `loop.add_signal_handler` (asyncio keeps it in the loop's `_signal_handlers`, the one private name used here);
uvicorn installs it with `signal.signal`. `drain_on_sigterm` must run on the server's event loop after the server
has installed its handlers: func-python's `start()` and uvicorn's lifespan startup both do. Anywhere else (tests,
another thread) it changes nothing.
"""
from __future__ import annotations

import asyncio
import logging
import signal
import threading
from typing import Callable

from function.api.gate import Drain

log = logging.getLogger(__name__)

DRAIN_MARGIN_S = 5.0
"""Waited beyond REQUEST_TIMEOUT_S for requests to finish (their error events and logs) before the server stops."""


def drain_on_sigterm(drain: Drain, timeout_s: float) -> bool:
    """Take SIGTERM over from the server running the current event loop; True if it was taken over."""
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:
        return False
    if threading.current_thread() is not threading.main_thread():
        return False
    sig = signal.SIGTERM
    handed_over = False

    def hand_over() -> None:
        nonlocal handed_over
        if not handed_over:
            handed_over = True
            server_handler()

    async def drain_then_hand_over() -> None:
        if await drain.wait_idle(timeout_s + DRAIN_MARGIN_S):
            log.info("SIGTERM: no request in flight; shutting down")
        else:
            log.warning("SIGTERM: %d request(s) still in flight after %.0f s; shutting down anyway",
                        drain.in_flight, timeout_s + DRAIN_MARGIN_S)
        hand_over()

    def on_sigterm() -> None:
        if drain.draining:
            log.info("SIGTERM again: shutting down without waiting for %d request(s)", drain.in_flight)
            hand_over()
            return
        log.info("SIGTERM: not ready; finishing %d request(s) in flight (at most %.0f s), refusing new ones with 503",
                 drain.in_flight, timeout_s + DRAIN_MARGIN_S)
        drain.begin()
        waiter = loop.create_task(drain_then_hand_over())
        _waiters.add(waiter)
        waiter.add_done_callback(_waiters.discard)

    handle = getattr(loop, "_signal_handlers", {}).get(sig)       # hypercorn: loop.add_signal_handler
    if handle is not None:
        server_handler: Callable[[], None] = handle._run
        loop.add_signal_handler(sig, on_sigterm)
        return True
    previous = signal.getsignal(sig)                               # uvicorn: signal.signal
    if callable(previous):
        server_handler = lambda: previous(sig, None)               # noqa: E731
        signal.signal(sig, lambda *_: loop.call_soon_threadsafe(on_sigterm))
        return True
    return False                                                   # no server handles SIGTERM here: leave it


_waiters: set[asyncio.Task] = set()     # the running drain tasks (a task nobody references may be collected)
