"""The engine on CPU with the tiny model: continuous batching gives the same greedy output as one request at a
time, images included; prefix reuse changes cost, not output; per-row sampling, stops, aborts, overload and
step failures behave. The model math is checked against transformers' own forward pass."""
from __future__ import annotations

import asyncio
import copy
import time

import numpy as np
import pytest
import torch
from PIL import Image
from support.faults import set_fault_hook
from support.stages import running

from function.config import Config
from function.engine.client import LocalEngine
from function.engine.protocol import ChatInput, SamplingParams
from function.engine.runner import ModelRunner, PrefillItem
from function.engine.scheduler import MIN_PREFIX_REUSE, Scheduler
from function.errors import GenerationFailed, InvalidInput, Overloaded

GREEDY = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def engine(model_cache_dir):
    with running(LocalEngine(Config.from_env({"MODEL_CACHE_DIR": str(model_cache_dir), "MAX_NUM_SEQS": "4",
                                              "MAX_MODEL_LEN": "4096", "MAX_QUEUE_SIZE": "6"}))) as e:
        yield e


def img(color, size=(84, 140)):
    return Image.new("RGB", size, color)


def chat(text, image=None, system="You are a phone agent."):
    content = [{"type": "text", "text": text}]
    if image is not None:
        content.insert(0, {"type": "image", "image": image})
    return ChatInput(messages=[{"role": "system", "content": system}, {"role": "user", "content": content}])


async def idle(e):
    """Wait until aborts from earlier tests have reached the engine thread."""
    for _ in range(250):
        if e.idle():
            return
        await asyncio.sleep(0.02)
    raise AssertionError("engine still busy")


async def run(e, c, p=GREEDY, rid=None):
    text, last = "", None
    async for chunk in e.generate(rid or f"r{id(c)}-{time.time()}", c, p):
        text += chunk.text
        last = chunk
    return text, last


def test_ready_phases_and_status(engine):
    alive, ready, msg = engine.status()
    assert alive and ready and msg == "ready"
    assert {"load_weights", "warmup", "total"} <= set(engine.timings)


async def test_batched_equals_one_at_a_time_with_images(engine):
    chats = [chat(f"open app number {i}", img((i * 40, 90, 200)) if i % 2 else None) for i in range(6)]
    alone = [await run(engine, c) for c in chats]
    together = await asyncio.gather(*(run(engine, c) for c in chats))   # 6 requests over 4 slots
    assert [a[0] for a in alone] == [b[0] for b in together]
    assert all(b[1].finish_reason == "length" and b[1].completion_tokens == 12 for b in together)
    # the image changes the answer's prompt: its tokens are counted
    assert alone[1][1].prompt_tokens > alone[0][1].prompt_tokens + 10


async def test_prefix_reuse_same_output_fewer_prefilled_tokens(engine):
    system = "You are a phone agent. " + "Tap, scroll and type to finish the task. " * 20
    first = chat("step one", img((10, 20, 30)), system=system)
    await run(engine, first)
    follow = chat("step two", img((200, 20, 30)), system=system)
    b = await run(engine, follow)
    assert b[1].cached_prompt_tokens >= MIN_PREFIX_REUSE   # the shared system prompt was reused
    # the same request on an engine state without that prefix gives the same text
    engine.set_prefix_caching(False)
    try:
        c = await run(engine, follow)
    finally:
        engine.set_prefix_caching(True)
    assert c[1].cached_prompt_tokens == 0 and c[0] == b[0]


async def test_different_images_never_share_a_prefix(engine):
    await run(engine, chat("same words", img((1, 2, 3))))
    _, last = await run(engine, chat("same words", img((250, 2, 3))))
    # the system prompt may be reused, the image may not: the reuse stops before the image tokens
    image_start = next(s for s, *_ in engine.preparer.prepare(chat("same words", img((250, 2, 3))),
                                                              GREEDY).images)
    assert last.cached_prompt_tokens <= image_start


async def test_stop_string_and_max_tokens(engine):
    text, _ = await run(engine, chat("hello"), SamplingParams(max_tokens=20, temperature=0, ignore_eos=True))
    stop = text[6:9]
    assert stop
    cut, last = await run(engine, chat("hello"), SamplingParams(max_tokens=20, temperature=0, ignore_eos=True,
                                                                stop=(stop,)))
    assert last.finish_reason == "stop" and last.stop_reason == stop
    assert cut == text[: text.index(stop)] and stop not in cut


async def test_a_consumer_that_fell_behind_gets_one_chunk_with_everything_produced_since(engine):
    """Under load the event loop falls behind the engine; the client then merges what is queued into one chunk
    (fewer, larger SSE events), with the same text, token ids and one logprob entry per token."""
    p = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True, logprobs=2)
    await idle(engine)
    fast = [c async for c in engine.generate("fast-consumer", chat("merge me"), p)]
    gen = engine.generate("slow-consumer", chat("merge me"), p)
    first = await anext(gen)
    await idle(engine)                      # the engine has produced every token; they wait in the request's queue
    rest = [c async for c in gen]
    slow = [first] + rest
    # (the "fast" consumer may lag a step too: only its total is fixed)
    assert sum(len(c.token_ids) for c in fast) == 16 and len(rest) == 1 and rest[0].finish_reason == "length"
    assert [t for c in slow for t in c.token_ids] == [t for c in fast for t in c.token_ids]
    assert "".join(c.text for c in slow) == "".join(c.text for c in fast)
    for c in slow:
        assert [lp.token_id for lp in c.logprobs] == c.token_ids
    # (the second request reuses the first's prefix: same tokens, logprobs equal up to float rounding)
    assert [lp.logprob for c in slow for lp in c.logprobs] == pytest.approx(
        [lp.logprob for c in fast for lp in c.logprobs], abs=1e-4)
    assert slow[-1].completion_tokens == 16


async def test_seeded_sampling_is_reproducible_and_penalties_apply(engine):
    p = SamplingParams(max_tokens=8, temperature=1.0, top_p=0.9, seed=11, ignore_eos=True)
    a = await run(engine, chat("pick"), p)
    b = await run(engine, chat("pick"), p)
    assert a[0] == b[0]
    outs = {(await run(engine, chat("pick"), SamplingParams(max_tokens=8, temperature=1.0, seed=s,
                                                             ignore_eos=True)))[0] for s in range(3)}
    assert len(outs) > 1
    # the random tiny model repeats one token greedily; a presence penalty must break the repetition
    greedy, _ = await run(engine, chat("repeat"), SamplingParams(max_tokens=12, temperature=0, ignore_eos=True))
    pen, _ = await run(engine, chat("repeat"), SamplingParams(max_tokens=12, temperature=0, ignore_eos=True,
                                                              presence_penalty=2.0))
    assert pen != greedy


async def test_context_limit_is_a_clear_error(engine):
    with pytest.raises(InvalidInput) as ei:
        await run(engine, chat("x"), SamplingParams(max_tokens=5000))
    assert "maximum context length" in ei.value.message and ei.value.param == "max_tokens"


async def test_abort_frees_the_slot(engine):
    p = SamplingParams(max_tokens=3000, temperature=0, ignore_eos=True)
    gens = [engine.generate(f"long-{i}", chat(f"long {i}"), p) for i in range(4)]
    for g in gens:
        await g.__anext__()          # all 4 slots busy
    for g in gens:
        await g.aclose()             # closing aborts
    t = time.time()
    text, last = await run(engine, chat("after abort"))
    assert last.finish_reason == "length" and time.time() - t < 30
    await idle(engine)


async def test_overload_is_refused_not_queued_forever(engine):
    """4 free slots + a queue limit of 6: of 12 concurrent requests 2 are refused at once with a retry hint."""
    await idle(engine)
    p = SamplingParams(max_tokens=2000, temperature=0, ignore_eos=True)
    gens = [engine.generate(f"o-{i}", chat(f"busy {i}"), p) for i in range(12)]
    tasks = [asyncio.ensure_future(g.__anext__()) for g in gens]
    deadline = time.time() + 20
    while sum(t.done() for t in tasks) < 6 and time.time() < deadline:
        await asyncio.sleep(0.02)
    refused = [t.exception() for t in tasks if t.done() and isinstance(t.exception(), Overloaded)]
    started = [t for t in tasks if t.done() and t.exception() is None]
    assert len(refused) == 2 and len(started) >= 4      # 10 accepted (4 free slots + 6 queued), 2 refused
    assert all(r.retry_after for r in refused)
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    for g in gens:
        await g.aclose()


async def test_a_failing_step_fails_its_requests_and_the_engine_keeps_serving(engine):
    calls = {"n": 0}

    def fault(stage):
        if stage == "decode" and calls["n"] == 0:
            calls["n"] += 1
            raise torch.OutOfMemoryError("CUDA out of memory (injected)")

    await idle(engine)
    set_fault_hook(engine, fault)
    try:
        with pytest.raises(GenerationFailed) as ei:
            await run(engine, chat("victim"))
        assert "out of GPU memory" in ei.value.message
    finally:
        set_fault_hook(engine, None)
    text, last = await run(engine, chat("survivor"))
    assert last.finish_reason == "length" and engine.status()[:2] == (True, True)


async def test_non_finite_logits_fail_only_that_request(engine):
    real = engine.runner.decode

    def nan_decode(slots, positions, deltas):
        out = real(slots, positions, deltas).clone()
        out[min(slots)] = float("nan")
        return out

    await idle(engine)
    engine.runner.decode = nan_decode
    try:
        with pytest.raises(GenerationFailed):
            await run(engine, chat("nan"))
    finally:
        engine.runner.decode = real
    assert (await run(engine, chat("fine")))[1].finish_reason == "length"


# ---------------------------------------------------------------- the model math against transformers


def test_runner_matches_transformers_forward(model_cache_dir, engine):
    """Prefill (text and image, batched with padding), decode steps and prefix reuse give transformers' logits."""
    from function.engine.loader import load

    cfg = Config.from_env({"MODEL_CACHE_DIR": str(model_cache_dir)})
    loaded = load(cfg)
    ref = copy.deepcopy(loaded.model)
    runner = ModelRunner(loaded.model, num_slots=3, max_len=1024, use_graphs=False)
    prep = engine.preparer
    prompts = [prep.prepare(chat("text only"), GREEDY), prep.prepare(chat("with image", img((9, 80, 160))), GREEDY)]
    items = [PrefillItem(slot=i, token_ids=p.token_ids, start=0, position_ids=p.position_ids, images=p.images)
             for i, p in enumerate(prompts)]
    logits = runner.prefill(items)

    def reference(p, extra=()):
        ids = torch.tensor([p.token_ids + list(extra)])
        kw = {}
        if p.images:
            kw = dict(pixel_values=torch.cat([im.pixels for im in p.images]),
                      image_grid_thw=torch.stack([im.grid for im in p.images]),
                      mm_token_type_ids=(ids == ref.config.image_token_id).int())
        with torch.no_grad():
            return ref(input_ids=ids, **kw).logits[0, -1]

    for i, p in enumerate(prompts):
        torch.testing.assert_close(logits[i], reference(p), atol=1e-4, rtol=1e-4)
    gen = [[int(logits[i].argmax())] for i in range(2)]
    for _ in range(3):
        runner.feed(torch.arange(2), torch.tensor([gen[i][-1] for i in range(2)]))
        out = runner.decode([0, 1], [prompts[i].length + len(gen[i]) - 1 for i in range(2)],
                            [prompts[i].rope_delta for i in range(2)])
        for i, p in enumerate(prompts):
            torch.testing.assert_close(out[i], reference(p, gen[i]), atol=1e-4, rtol=1e-4)
            gen[i].append(int(out[i].argmax()))
    # the graphed prefill's path (static buffers, padded rows and lengths, padding written to scratch) on CPU
    runner.static_prefill = True
    try:
        again = runner.prefill(items[::-1])
    finally:
        runner.static_prefill = False
    torch.testing.assert_close(again[0], reference(prompts[1]), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(again[1], reference(prompts[0]), atol=1e-4, rtol=1e-4)
    # prefix reuse: slot 2 takes slot 0's first tokens and prefills only the rest
    p0 = prompts[0]
    runner.copy_prefix(0, 2, p0.length - 3)
    lg = runner.prefill([PrefillItem(slot=2, token_ids=p0.token_ids, start=p0.length - 3,
                                     position_ids=p0.position_ids, images=[])])
    torch.testing.assert_close(lg[0], reference(p0), atol=1e-4, rtol=1e-4)


# ---------------------------------------------------------------- the scheduler as plain data


class _Seq:
    def __init__(self, keys, images=()):
        self.prompt = type("P", (), {"keys": np.asarray(keys, dtype=np.int64), "images": list(images)})()


def test_scheduler_prefix_match_stops_at_images_and_leaves_one_token():
    s = Scheduler(num_slots=2, max_prefill_tokens=1000)
    base = list(range(100))
    s.waiting.append(_Seq(base))
    (a,) = s.schedule()
    s.chunk_done(a)
    s.release(a.slot, [500, 501])
    # identical prompt: everything but the last token is reusable, from the free slot, without a copy
    s.waiting.append(_Seq(base))
    (b,) = s.schedule()
    assert (b.slot, b.reuse, b.start, b.copy_from) == (a.slot, 99, 99, None)
    s.chunk_done(b)
    # an image spanning 40..60 that differs: reuse stops at its start
    s.waiting.append(_Seq(base[:40] + [-7] * 20 + base[60:], images=[(40, 60)]))
    (c,) = s.schedule()
    assert c.reuse == 40 and c.copy_from == b.slot     # b's slot is running: its KV is copied


def test_output_text_holds_back_partial_stop_strings(engine):
    from function.engine.detokenizer import OutputText

    tok = engine.tokenizer
    ids = tok("open the settings app now", add_special_tokens=False)["input_ids"]
    full = tok.decode(ids)
    ot = OutputText(tok, stop=("app",))
    sent = ""
    for t in ids:
        sent += ot.add([t])
        assert "app" not in sent and full.startswith(sent)
        if ot.stop_hit:
            break
    assert ot.stop_hit == "app" and sent == full[: full.index("app")]


def test_enable_thinking_false_ends_the_prompt_with_an_empty_think_block(engine):
    """The tiny template knows the flag; GLM-4.1V's own template ignores it, so the preparer appends the block."""
    prep = engine.preparer
    p = prep.prepare(ChatInput(messages=[{"role": "user", "content": "hi"}],
                               chat_template_kwargs={"enable_thinking": False}), GREEDY)
    empty = engine.tokenizer("<think></think>", add_special_tokens=False)["input_ids"]
    assert p.token_ids[-len(empty):] == empty and p.token_ids[-2 * len(empty):-len(empty)] != empty
    enc = {"input_ids": torch.tensor([[5, 6, 7]]), "attention_mask": torch.ones(1, 3, dtype=torch.long),
           "mm_token_type_ids": torch.zeros(1, 3, dtype=torch.int32)}
    out = prep._skip_thinking(enc)        # a template that ignored the flag
    assert out["input_ids"][0].tolist() == [5, 6, 7] + empty
    assert out["attention_mask"].shape == out["mm_token_type_ids"].shape == out["input_ids"].shape


def test_prepared_pixels_are_in_the_vision_towers_dtype(engine):
    """A queued screenshot holds its pixels in the dtype the vision tower casts them to (bf16 on a GPU: half the
    host memory of fp32); the values are exactly the processor's, cast."""
    prep = engine.preparer
    model = engine.runner.model
    assert prep.pixel_dtype == model.model.visual.dtype
    original = prep.pixel_dtype
    try:
        prep.pixel_dtype = torch.bfloat16
        p = prep.prepare(chat("with image", img((9, 80, 160))), GREEDY)
    finally:
        prep.pixel_dtype = original
    ref = prep.processor.image_processor(images=[img((9, 80, 160))], return_tensors="pt")["pixel_values"]
    (_, _, pixels, _), = p.images
    assert pixels.dtype == torch.bfloat16
    assert torch.equal(pixels, ref.to(torch.bfloat16))
