"""The engine's static-buffer (CUDA-graph) paths walked in the order real traffic produces them, on CPU: a long
prefill in a big bucket, then idle-time captures of smaller buckets, then decode. Captures run the forward for real
(a warm run, then the capture), so they must read only idle inputs and write nowhere a live sequence or a kept
prefix lives. Also: faults that poison the device stop the engine with a retriable error."""
from __future__ import annotations

import asyncio

import pytest
import torch
from support.faults import set_fault_hook
from support.stages import wait_ready

from function.config import Config
from function.engine.client import LocalEngine
from function.engine.core import is_fatal_device_error
from function.engine.loader import load
from function.engine.protocol import ChatInput, SamplingParams
from function.engine.runner import ModelRunner, PrefillItem
from function.errors import EngineDead, GenerationFailed

GREEDY = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)


def chat(text: str) -> ChatInput:
    return ChatInput(messages=[{"role": "system", "content": "You are a phone agent."},
                               {"role": "user", "content": text}])


@pytest.fixture(scope="module")
def loaded(model_cache_dir):
    return load(Config.from_env({"MODEL_CACHE_DIR": str(model_cache_dir)}))


@pytest.fixture(scope="module")
def preparer(loaded):
    from function.engine.inputs import InputPreparer
    return InputPreparer(loaded.processor, loaded.model, 2048)


def kv_of(runner: ModelRunner, slot: int, length: int) -> list[torch.Tensor]:
    c = runner.cache
    return [t[slot, :, :length].clone() for t in (*c.k, *c.v)]


def test_idle_captures_after_a_big_prefill_leave_live_slots_untouched(loaded, preparer):
    runner = ModelRunner(loaded.model, num_slots=4, max_len=2048, use_graphs=False)
    eager = ModelRunner(loaded.model, num_slots=4, max_len=2048, use_graphs=False)
    runner.static_prefill = True      # the graphed path's static buffers and the captures' warm runs, eagerly
    prompts = [preparer.prepare(chat(f"agent {i}: " + "open the settings app and tap wifi " * 70), GREEDY)
               for i in range(2)]
    assert all(600 < p.length <= 1024 for p in prompts)        # rows of the (2 rows, 1024) prefill bucket
    items = [PrefillItem(slot=i, token_ids=p.token_ids, start=0, position_ids=p.position_ids, images=p.images)
             for i, p in enumerate(prompts)]
    first = runner.prefill(items)
    ref = eager.prefill(items)
    torch.testing.assert_close(first, ref, atol=1e-4, rtol=1e-4)
    before = [kv_of(runner, i, p.length) for i, p in enumerate(prompts)]
    # what the engine does when idle: capture smaller prefill buckets (stale `last` would be out of their range,
    # stale write slots/positions would overwrite the live rows) and decode buckets
    for key in (("prefill", 4, 128), ("prefill", 1, 256), ("prefill", 2, 512), (1, 1024), (4, 2048)):
        runner.capture(key)
    for i, p in enumerate(prompts):
        for a, b in zip(before[i], kv_of(runner, i, p.length)):
            assert torch.equal(a, b), f"an idle capture changed slot {i}'s KV"
    # decode continues exactly as on the eager runner
    slots = torch.arange(2)
    toks = first.argmax(dim=-1)
    pos = [p.length for p in prompts]
    delta = [p.rope_delta for p in prompts]
    for _ in range(3):
        runner.feed(slots, toks)
        eager.feed(slots, toks)
        out, want = runner.decode([0, 1], pos, delta), eager.decode([0, 1], pos, delta)
        torch.testing.assert_close(out[:2], want[:2], atol=1e-4, rtol=1e-4)
        toks = want[:2].argmax(dim=-1)
        pos = [x + 1 for x in pos]
        runner.capture(("prefill", 8, 256))   # idle work between steps must not disturb the running rows
        runner.capture((2, 4096 if 4096 in runner.len_buckets else runner.len_buckets[-1]))


def test_a_smaller_graphed_prefill_after_a_bigger_one_reads_its_own_rows(loaded, preparer):
    """Padding rows of a bucket read `last` = 0 and write scratch: a 1-row prefill after a 2-row one."""
    runner = ModelRunner(loaded.model, num_slots=3, max_len=2048, use_graphs=False)
    runner.static_prefill = True
    big = [preparer.prepare(chat("long " * 300 + str(i)), GREEDY) for i in range(2)]
    runner.prefill([PrefillItem(slot=i, token_ids=p.token_ids, start=0, position_ids=p.position_ids, images=[])
                    for i, p in enumerate(big)])
    kept = [kv_of(runner, i, p.length) for i, p in enumerate(big)]
    small = preparer.prepare(chat("short"), GREEDY)
    got = runner.prefill([PrefillItem(slot=2, token_ids=small.token_ids, start=0,
                                      position_ids=small.position_ids, images=[])])
    eager = ModelRunner(loaded.model, num_slots=3, max_len=2048, use_graphs=False)
    want = eager.prefill([PrefillItem(slot=2, token_ids=small.token_ids, start=0,
                                      position_ids=small.position_ids, images=[])])
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    for i, p in enumerate(big):
        assert all(torch.equal(a, b) for a, b in zip(kept[i], kv_of(runner, i, p.length)))


def test_captures_are_refused_off_the_engine_thread(loaded):
    runner = ModelRunner(loaded.model, num_slots=2, max_len=512, use_graphs=False)
    runner.engine_thread = -1
    with pytest.raises(RuntimeError, match="engine thread"):
        runner.capture((1, 513))


@pytest.mark.parametrize("message, fatal", [
    ("CUDA error: device-side assert triggered\nCompile with `TORCH_USE_CUDA_DSA`", True),
    ("CUDA error: an illegal memory access was encountered", True),
    ("CUDA error: unspecified launch failure", True),
    ("CUDA error: uncorrectable ECC error encountered", True),
    ("CUBLAS_STATUS_NOT_INITIALIZED when calling `cublasCreate(handle)`", False),
    ("index 7 is out of bounds for dimension 0 with size 4", False),
])
def test_fatal_device_errors_are_told_apart(message, fatal):
    assert is_fatal_device_error(RuntimeError(message)) is fatal
    assert is_fatal_device_error(torch.OutOfMemoryError("CUDA out of memory. device-side assert")) is False


def _engine(model_cache_dir) -> LocalEngine:
    e = LocalEngine(Config.from_env({"MODEL_CACHE_DIR": str(model_cache_dir), "MAX_NUM_SEQS": "2",
                                     "MAX_MODEL_LEN": "1024", "WARMUP": "false"}))
    e.start_loading()
    wait_ready(e)
    return e


async def _collect(e, rid, c, p=GREEDY):
    out = []
    async for chunk in e.generate(rid, c, p):
        out.append(chunk)
    return out


async def test_a_fault_that_poisons_the_device_stops_the_engine_with_a_retriable_error(model_cache_dir):
    e = _engine(model_cache_dir)
    try:
        def fault(stage):
            if stage == "decode":
                raise RuntimeError("CUDA error: device-side assert triggered")

        set_fault_hook(e, fault)
        running = [asyncio.create_task(_collect(e, f"r{i}", chat(f"request {i}"))) for i in range(3)]
        results = await asyncio.gather(*running, return_exceptions=True)
        assert all(isinstance(r, EngineDead) for r in results), results
        assert all(r.retry_after and r.kind == "engine_stopped" for r in results)
        alive, ready, msg = e.status()
        assert (alive, ready) == (False, False) and "device-side assert" in msg
        with pytest.raises(EngineDead):           # and every later request, at once
            await asyncio.wait_for(_collect(e, "late", chat("late")), 5)
    finally:
        e.shutdown()


async def test_out_of_memory_and_failed_idle_captures_keep_the_engine_serving(model_cache_dir):
    e = _engine(model_cache_dir)
    try:
        calls = {"n": 0}

        def oom(stage):
            if stage == "prefill" and calls["n"] == 0:
                calls["n"] += 1
                raise torch.OutOfMemoryError("CUDA out of memory (injected)")

        set_fault_hook(e, oom)
        with pytest.raises(GenerationFailed):
            await _collect(e, "victim", chat("victim"))
        set_fault_hook(e, None)
        # an idle capture that fails for a survivable reason leaves its bucket eager and the engine up
        runner = e.runner

        def bad_capture(key):
            raise RuntimeError("CUBLAS_STATUS_NOT_INITIALIZED when calling `cublasCreate(handle)`")

        runner.static_prefill = True
        runner.capture = bad_capture
        runner.pending = [("prefill", 1, 256)]
        for _ in range(100):
            if not runner.pending:
                break
            await asyncio.sleep(0.02)
        assert not runner.pending and e.status()[:2] == (True, True)
        out = await _collect(e, "after", chat("after"))
        assert out[-1].finish_reason == "length"
    finally:
        e.shutdown()


def test_chunked_prefill_with_a_boundary_inside_the_image_equals_one_piece(loaded, preparer):
    """Chunks [0, a), [a, b), [b, L) where a and b fall inside the screenshot's tokens: the image is encoded once
    and its features are sliced; lower-right causal attention over the slot gives the one-piece logits."""
    from PIL import Image

    shot = Image.new("RGB", (112, 252), (30, 140, 90))
    c = ChatInput(messages=[{"role": "system", "content": "You are a phone agent. " * 20},
                            {"role": "user", "content": [{"type": "image", "image": shot},
                                                         {"type": "text", "text": "tap the green button"}]}])
    p = preparer.prepare(c, GREEDY)
    (s0, e0, *_), = p.images
    a, b = s0 + (e0 - s0) // 3, s0 + 2 * (e0 - s0) // 3
    assert s0 < a < b < e0 < p.length
    whole = ModelRunner(loaded.model, num_slots=2, max_len=2048, use_graphs=False)
    want = whole.prefill([PrefillItem(slot=0, token_ids=p.token_ids, start=0, position_ids=p.position_ids,
                                      images=p.images)])
    runner = ModelRunner(loaded.model, num_slots=2, max_len=2048, use_graphs=False)
    feats: dict = {}
    for start, end in ((0, a), (a, b), (b, p.length)):
        got = runner.prefill([PrefillItem(slot=1, token_ids=p.token_ids, start=start, end=end,
                                          position_ids=p.position_ids, images=p.images, features=feats)])
    assert list(feats) == [s0]                              # encoded once, in the first chunk that touched it
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    for x, y in zip(kv_of(whole, 0, p.length), kv_of(runner, 1, p.length)):
        torch.testing.assert_close(x, y, atol=1e-4, rtol=1e-4)


async def test_chunked_prefill_in_the_engine_gives_the_same_tokens(model_cache_dir):
    """A small chunk budget while others decode: the same greedy outputs as one request at a time."""
    e = LocalEngine(Config.from_env({"MODEL_CACHE_DIR": str(model_cache_dir), "MAX_NUM_SEQS": "4",
                                     "MAX_MODEL_LEN": "2048", "WARMUP": "false", "PREFILL_CHUNK_TOKENS": "256"}))
    e.start_loading()
    wait_ready(e)
    try:
        chats = [chat(f"agent {i}: " + "scroll down and open the message " * (20 + 15 * i)) for i in range(4)]
        p = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)
        alone = [[t for ch in await _collect(e, f"alone{i}", c, p) for t in ch.token_ids] for i, c in enumerate(chats)]
        gen = e.generate("decoding", chat("keep decoding"), SamplingParams(max_tokens=200, temperature=0.0,
                                                                            ignore_eos=True))
        await gen.__anext__()                                   # a stream is decoding: prefill is chunked now
        before = e.stats()
        e.set_prefix_caching(False)                            # every prompt prefilled in full, in chunks
        together = await asyncio.gather(*(_collect(e, f"tog{i}", c, p) for i, c in enumerate(chats)))
        await gen.aclose()
        assert [[t for ch in r for t in ch.token_ids] for r in together] == alone
        steps = e.stats()["prefills"] - before["prefills"]
        tokens = e.stats()["prefill_tokens"] - before["prefill_tokens"]
        assert tokens > 3 * 256 and steps >= -(-tokens // 256)   # no step took more than the chunk budget
    finally:
        e.shutdown()


async def test_split_encodes_while_others_decode_give_the_same_tokens(model_cache_dir):
    """A tiny encoder budget while a stream decodes: each screenshot's encode is spread over several steps in
    pieces of the tower's blocks (the native model), and the greedy outputs equal those of one request at a time."""
    from PIL import Image

    e = LocalEngine(Config.from_env({"MODEL_CACHE_DIR": str(model_cache_dir), "MAX_NUM_SEQS": "4",
                                     "MAX_MODEL_LEN": "2048", "WARMUP": "false", "PREFILL_ENCODER_TOKENS": "8",
                                     "PREFILL_SPLIT_ENCODES": "true"}))
    e.start_loading()
    wait_ready(e)
    try:
        assert e._core.scheduler.split_encodes
        shots = [Image.new("RGB", (112, 252), (30 * i, 140, 90)) for i in range(3)]
        chats = [ChatInput(messages=[{"role": "user", "content": [{"type": "image", "image": im},
                                                                  {"type": "text", "text": f"tap button {i}"}]}])
                 for i, im in enumerate(shots)]
        p = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
        alone = [[t for ch in await _collect(e, f"alone{i}", c, p) for t in ch.token_ids] for i, c in enumerate(chats)]
        pieces = []
        real = e.runner.encode
        e.runner.encode = lambda ps: (pieces.extend((a, b, img.end - img.start) for _, img, a, b in ps), real(ps))
        gen = e.generate("decoding", chat("keep decoding"), SamplingParams(max_tokens=300, temperature=0.0,
                                                                            ignore_eos=True))
        await gen.__anext__()
        e.set_prefix_caching(False)
        together = await asyncio.gather(*(_collect(e, f"tog{i}", c, p) for i, c in enumerate(chats)))
        await gen.aclose()
        assert [[t for ch in r for t in ch.token_ids] for r in together] == alone
        n = pieces[0][2]
        assert n > 8 and all(b - a <= 8 for a, b, _ in pieces)       # no piece above the step's budget
        assert sum(b - a for a, b, _ in pieces) == 3 * n               # every image encoded exactly once
    finally:
        e.shutdown()
