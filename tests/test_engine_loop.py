"""The engine loop's idle-time graph captures, with a fake runner and clock (no model): a capture starts only once
the engine has had nothing to do for IDLE_CAPTURE_DELAY_S, so a turn sent just after the last one ends is not
delayed behind a 0.1-0.4 s capture."""
from __future__ import annotations

import threading
import time

from function.engine.core import IDLE_CAPTURE_DELAY_S, EngineCore


class FakeRunner:
    def __init__(self, keys):
        self.pending = list(keys)
        self.captured: list = []
        self.engine_thread = None
        self.lock = threading.Lock()

    def has_idle_work(self) -> bool:
        return bool(self.pending)

    def capture_pending(self) -> bool:
        with self.lock:
            self.captured.append(self.pending.pop(0))
        return True


class FakeScheduler:
    waiting: list = []


def _wait_until(cond, timeout=5.0):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return True
        time.sleep(0.01)
    return cond()


def test_idle_captures_wait_for_the_idle_delay_then_run_one_at_a_time():
    runner = FakeRunner([("prefill", 1, 256), ("prefill", 2, 256)])
    core = EngineCore(runner, FakeScheduler(), sampler=None, max_len=64)
    now = [1000.0]
    core._clock = lambda: now[0]
    core._last_work = now[0]          # the last step just ended
    assert core.idle_capture_delay_s == IDLE_CAPTURE_DELAY_S > 0
    core.start()
    try:
        time.sleep(0.4)               # real time passes, the engine's clock does not: still inside the delay
        assert runner.captured == []
        now[0] += IDLE_CAPTURE_DELAY_S / 2
        time.sleep(0.2)
        assert runner.captured == []
        now[0] += IDLE_CAPTURE_DELAY_S    # idle long enough: the pending graphs are captured, in order
        assert _wait_until(lambda: len(runner.captured) == 2)
        assert runner.captured == [("prefill", 1, 256), ("prefill", 2, 256)]
    finally:
        core.stop()


def test_work_on_the_engine_thread_still_runs_while_a_capture_waits_for_idle():
    runner = FakeRunner([("prefill", 1, 256)])
    core = EngineCore(runner, FakeScheduler(), sampler=None, max_len=64)
    core._clock = lambda: 0.0
    core._last_work = 0.0
    core.start()
    try:
        assert core.call(lambda: 42).result(timeout=2) == 42   # the inbox is served during the delay
        assert runner.captured == []
    finally:
        core.stop()


def test_mailbox_hands_a_steps_outputs_to_the_loop_with_one_wake_up_in_order():
    """The engine thread's outputs reach their requests' queues in order; outputs posted while the loop has not
    run yet share one call_soon_threadsafe (one self-pipe write); a closed loop drops them without raising."""
    import asyncio

    from function.engine.client import _LoopMailbox

    async def main():
        loop = asyncio.get_running_loop()
        box = _LoopMailbox(loop)
        wakeups = []
        real = loop.call_soon_threadsafe
        loop.call_soon_threadsafe = lambda *a: (wakeups.append(a), real(*a))[1]
        queues = [asyncio.Queue() for _ in range(3)]

        def engine_step(step):
            for i in range(30):
                box.post(queues[i % 3], (step, i))
        t = threading.Thread(target=engine_step, args=(0,))
        t.start()
        t.join()                      # the loop has not run since: one wake-up carries the whole step
        assert len(wakeups) == 1
        await asyncio.sleep(0)
        got = [[q.get_nowait() for _ in range(q.qsize())] for q in queues]
        assert got == [[(0, i) for i in range(k, 30, 3)] for k in range(3)]
        t = threading.Thread(target=engine_step, args=(1,))
        t.start()
        t.join()
        assert len(wakeups) == 2
        await asyncio.sleep(0)
        assert all(q.qsize() == 10 for q in queues)
        return box

    box = asyncio.run(main())         # its loop is closed now
    box.post(asyncio.Queue(), "late")  # no RuntimeError reaches the engine thread


def test_mailbox_does_not_keep_its_event_loop_alive():
    """LocalEngine maps each event loop to its mailbox weakly: the warm-up's short-lived loops must be collectable
    while their mailbox exists, and a post to a collected loop is dropped without raising."""
    import asyncio
    import gc
    import weakref

    from function.engine.client import _LoopMailbox

    async def make():
        return _LoopMailbox(asyncio.get_running_loop()), weakref.ref(asyncio.get_running_loop())
    box, loop_ref = asyncio.run(make())
    gc.collect()
    assert loop_ref() is None
    box.post(asyncio.Queue(), "late")
