"""The overlapped engine loop on CPU with the tiny model: a decode step is launched before the host reads the
previous step's tokens, and what that lag could get wrong does not happen (a token sampled after a stop is
dropped, a slot freed with a step in flight serves its next request exactly)."""
from __future__ import annotations

import asyncio
import time

import pytest
from support.stages import running

from function.config import Config
from function.engine import sampling
from function.engine.client import LocalEngine
from function.engine.protocol import SamplingParams
from tests.test_engine import chat, idle, run

GREEDY = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def engine(model_cache_dir):
    with running(LocalEngine(Config.from_env({"MODEL_CACHE_DIR": str(model_cache_dir), "MAX_NUM_SEQS": "2",
                                              "MAX_MODEL_LEN": "2048"}))) as e:
        for _ in range(500):     # the warm-up after ready runs requests too: let it finish first
            if "warmup_after_ready" in e.timings:
                break
            time.sleep(0.02)
        yield e


async def test_each_step_is_launched_before_the_previous_steps_tokens_are_read(engine, monkeypatch):
    events: list[str] = []
    real_decode, real_result = engine.runner.decode, sampling.HostFetch.result

    def decode(*a):
        events.append("launch")
        return real_decode(*a)

    def result(self):
        events.append("read")
        return real_result(self)

    await idle(engine)
    monkeypatch.setattr(engine.runner, "decode", decode)
    monkeypatch.setattr(sampling.HostFetch, "result", result)
    _, last = await run(engine, chat("open the clock app"), GREEDY)
    assert last.completion_tokens == 12
    # prefill's token, then 11 decode steps: each read but the last comes after the next step's launch
    assert events.count("launch") == 11 and events.count("read") == 12
    reads = [i for i, e in enumerate(events) if e == "read"]
    for n, i in enumerate(reads[:-1]):
        assert events[:i].count("launch") == n + 1, events


async def test_a_token_sampled_after_a_stop_is_dropped_and_the_slot_serves_the_next_request_exactly(engine):
    await idle(engine)
    c = chat("open the settings app and tap wifi")
    full, _ = await run(engine, c, GREEDY)
    ids = []
    async for chunk in engine.generate("ids", c, GREEDY):
        ids += chunk.token_ids
    stop_at = ids[3]
    first = ids.index(stop_at)              # the earliest position that token is produced
    stopped = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True, stop_token_ids=(stop_at,))
    got = []
    async for chunk in engine.generate("stopped", c, stopped):
        got += chunk.token_ids
        last = chunk
    assert last.finish_reason == "stop" and last.completion_tokens == first + 1
    assert got == ids[:first + 1]           # nothing of the step that was in flight when the stop was read
    # the slots (one holding the stopped request's kept prefix, written while a step was still in flight) serve
    # two fresh requests and a repeat exactly as the first time
    again = await asyncio.gather(run(engine, c, GREEDY), run(engine, chat("another task"), GREEDY))
    assert again[0][0] == full
    assert (await run(engine, chat("another task"), GREEDY))[0] == again[1][0]
