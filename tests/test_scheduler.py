"""The scheduler as plain data (no torch, no model): chunked prefill under a token budget, the order in which
prompts get their first token, prefix reuse across chunks, and slot release in the middle of a prefill."""
from __future__ import annotations

import subprocess
import sys

import numpy as np

from function.engine.scheduler import MIN_CHUNK, Scheduler


class Seq:
    def __init__(self, name, keys, images=()):
        self.name = name
        self.prompt = type("P", (), {"keys": np.asarray(keys, dtype=np.int64), "images": list(images)})()


def prompt(tag: int, n: int) -> list[int]:
    return [tag * 100_000 + i for i in range(n)]


def drain(s: Scheduler, decoding=False, steps=100):
    """Run steps until nothing is left to prefill; returns [(step, seq name)] in the order prompts completed."""
    done = []
    for step in range(steps):
        chunks = s.schedule(decoding=decoding)
        if not chunks:
            return done
        for c in chunks:
            s.chunk_done(c)
            if c.final:
                done.append((step, c.seq.name))
    raise AssertionError("prefill never finished")


def test_a_long_prompt_is_chunked_while_others_decode_and_whole_when_idle():
    s = Scheduler(num_slots=4, max_prefill_tokens=16384, chunk_tokens=2048)
    s.waiting.append(Seq("agent", prompt(1, 5500)))
    (c,) = s.schedule(decoding=False)
    assert (c.start, c.end, c.final) == (0, 5500, True)       # nothing decodes: one step, fastest first token
    s2 = Scheduler(num_slots=4, max_prefill_tokens=16384, chunk_tokens=2048)
    s2.waiting.append(Seq("agent", prompt(1, 5500)))
    pieces = []
    while True:
        chunks = s2.schedule(decoding=True)
        if not chunks:
            break
        assert sum(x.tokens for x in chunks) <= 2048
        for x in chunks:
            pieces.append((x.start, x.end))
            s2.chunk_done(x)
    assert pieces == [(0, 2048), (2048, 4096), (4096, 5500)]
    assert s2.slots[c.slot].valid == 5500 and not s2.partial


def test_a_burst_of_screenshots_finishes_in_arrival_order_one_at_a_time():
    """8 agents at once under a 2048-token budget: the first arrival gets its first token after ~3 steps, not
    after all 8 prompts (SRPF over started prefills, then arrival order)."""
    s = Scheduler(num_slots=8, max_prefill_tokens=16384, chunk_tokens=2048)
    for i in range(8):
        s.waiting.append(Seq(f"a{i}", prompt(i + 1, 5500)))
    done = drain(s, decoding=True)
    assert [name for _, name in done] == [f"a{i}" for i in range(8)]
    assert done[0][0] <= 2 and done[-1][0] >= 20           # the first is not held back by the last


def test_when_idle_a_burst_of_long_prompts_starts_one_at_a_time_and_short_ones_are_packed():
    """Nothing decodes and several agent turns arrive at once: the first runs alone (its first token after one
    step, not after all of them in one big step); the next go on in chunks once it decodes. Short prompts that
    arrive together still share the idle step, up to max_prefill_tokens, and a long one may close it."""
    s = Scheduler(num_slots=8, max_prefill_tokens=16384, chunk_tokens=2048)
    for i in range(4):
        s.waiting.append(Seq(f"a{i}", prompt(i + 1, 3500)))
    (c,) = s.schedule(decoding=False)
    assert (c.seq.name, c.start, c.end, c.final) == ("a0", 0, 3500, True)
    s.chunk_done(c)
    nxt = s.schedule(decoding=True)
    assert [x.seq.name for x in nxt] == ["a1"] and sum(x.tokens for x in nxt) <= 2048

    short = Scheduler(num_slots=8, max_prefill_tokens=16384, chunk_tokens=2048)
    for i in range(6):
        short.waiting.append(Seq(f"s{i}", prompt(i + 1, 340)))
    short.waiting.append(Seq("long", prompt(9, 3000)))
    short.waiting.append(Seq("after", prompt(10, 340)))
    names = [x.seq.name for x in short.schedule(decoding=False)]
    assert names == [f"s{i}" for i in range(6)] + ["long"]


def test_the_first_chunk_of_a_step_always_progresses_and_tiny_leftovers_wait():
    s = Scheduler(num_slots=4, max_prefill_tokens=16384, chunk_tokens=256)
    s.waiting.append(Seq("a", prompt(1, 1000)))
    s.waiting.append(Seq("b", prompt(2, 1000)))
    (c,) = s.schedule(decoding=True)
    assert c.tokens == MIN_CHUNK and c.seq.name == "a"


def test_prefix_reuse_starts_after_the_cached_part_and_copies_from_a_running_slot():
    s = Scheduler(num_slots=3, max_prefill_tokens=16384, chunk_tokens=2048)
    system = prompt(9, 1500)
    s.waiting.append(Seq("t1", system + prompt(1, 3000)))
    (a,) = s.schedule()
    s.chunk_done(a)                                         # a is decoding now
    s.waiting.append(Seq("t2", system + prompt(2, 3000)))
    (b,) = s.schedule(decoding=True)
    assert (b.reuse, b.start, b.copy_from) == (1500, 1500, a.slot) and b.slot != a.slot
    assert b.end == 1500 + 2048 and not b.final
    s.chunk_done(b)
    (b2,) = s.schedule(decoding=True)
    assert (b2.start, b2.end, b2.final, b2.first, b2.copy_from) == (3548, 4500, True, False, None)


def test_releasing_a_slot_mid_prefill_keeps_only_what_was_written():
    s = Scheduler(num_slots=2, max_prefill_tokens=16384, chunk_tokens=1024)
    keys = prompt(3, 3000)
    s.waiting.append(Seq("gone", keys))
    c = s.schedule(decoding=True)[0]
    s.chunk_done(c)
    s.release(c.slot, [])                                   # the client disconnected after one chunk
    assert not s.partial and s.slots[c.slot].valid == 1024 and s.slots[c.slot].owner is None
    s.waiting.append(Seq("again", keys))                   # the retry reuses the written part
    (r,) = s.schedule(decoding=True)
    assert (r.slot, r.reuse, r.copy_from) == (c.slot, 1024, None)


def test_waiting_requests_wait_for_a_free_slot():
    s = Scheduler(num_slots=1, max_prefill_tokens=16384)
    s.waiting.extend([Seq("a", prompt(1, 100)), Seq("b", prompt(2, 100))])
    assert [c.seq.name for c in s.schedule()] == ["a"]
    assert len(s.waiting) == 1


def test_the_scheduler_imports_no_torch():
    code = "import sys; import function.engine.scheduler; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False", out.stderr


def test_fresh_prompts_share_a_forward_only_when_padding_is_cheap():
    from function.engine.core import _prefill_groups
    from function.engine.scheduler import Chunk

    def ch(n, start=0):
        return Chunk(seq=None, slot=0, start=start, end=start + n)

    groups = _prefill_groups([ch(300), ch(5500), ch(250), ch(2000), ch(5400), ch(100, start=900)])
    sizes = [[c.tokens for c in g] for g in groups]
    assert sizes == [[5500, 5400], [2000], [300, 250], [100]]


def test_an_unrelated_request_does_not_evict_a_lone_agents_cached_turn():
    """The order of real traffic: one agent's turn finishes (its 5k-token prompt cached in slot 0, nothing
    running), an unrelated chat arrives, then the agent's next turn. The chat takes an empty slot, and the
    next turn still reuses the agent's prefix."""
    s = Scheduler(num_slots=4, max_prefill_tokens=16384)
    history = prompt(1, 5000)
    s.waiting.append(Seq("turn1", history))
    (t1,) = s.schedule()
    s.chunk_done(t1)
    s.release(t1.slot, [7, 8, 9])
    s.waiting.append(Seq("chat", prompt(2, 300)))
    (chat,) = s.schedule()
    assert chat.slot != t1.slot and chat.reuse == 0
    s.chunk_done(chat)
    s.release(chat.slot, [])
    s.waiting.append(Seq("turn2", history + [7, 8, 9] + prompt(3, 400)))
    (t2,) = s.schedule()
    assert (t2.slot, t2.reuse, t2.copy_from) == (t1.slot, 5003, None)


def test_with_no_empty_slot_the_least_recently_used_prefix_is_overwritten():
    s = Scheduler(num_slots=3, max_prefill_tokens=16384)
    for tag in (1, 2, 3):
        s.waiting.append(Seq(f"p{tag}", prompt(tag, 100)))
    chunks = s.schedule()
    for c in chunks:
        s.chunk_done(c)
    for c in (chunks[1], chunks[0], chunks[2]):           # released in the order p2, p1, p3
        s.release(c.slot, [])
    s.waiting.append(Seq("new", prompt(4, 100)))
    (n,) = s.schedule()
    assert n.slot == chunks[1].slot and n.reuse == 0        # p2's was used least recently


def shot_prompt(tag: int, text_before: int, image: int, text_after: int):
    """A prompt with one screenshot: [text_before tokens][image tokens][text_after tokens], and its image span."""
    keys = prompt(tag, text_before + image + text_after)
    return keys, [(text_before, text_before + image, None, None)]


def _pieces(s):
    pieces = []
    while True:
        chunks = s.schedule(decoding=True)
        if not chunks:
            return pieces
        pieces.append([(c.seq.name, c.start, c.end) for c in chunks])
        for c in chunks:
            s.chunk_done(c)


def test_while_streams_decode_one_screenshot_encode_per_step_beside_a_text_chunk():
    """encoder_tokens (the default): a 3,354-token screenshot is larger than the 2048-token encoder budget, and
    the first encode of a step always fits, so it is encoded beside a full text chunk."""
    s = Scheduler(num_slots=4, max_prefill_tokens=16384, chunk_tokens=2048)
    assert s.encoder_tokens == 2048
    keys, images = shot_prompt(1, 300, 3354, 200)
    s.waiting.append(Seq("agent", keys, images))
    assert _pieces(s) == [[("agent", 0, 2048)], [("agent", 2048, len(keys))]]


def test_a_screenshot_that_exceeds_the_steps_encoder_budget_waits_its_turn_in_order():
    """Two turns with 1,000-token screenshots and a 1,500-token encoder budget: the second image does not fit
    beside the first, so the second request stays first in the queue for the next step; with room for both,
    one step takes both."""
    def two(encoder_tokens):
        s = Scheduler(num_slots=4, max_prefill_tokens=16384, chunk_tokens=4096, encoder_tokens=encoder_tokens)
        for tag in (1, 2):
            keys, images = shot_prompt(tag, 0, 1000, 200)
            s.waiting.append(Seq(f"a{tag}", keys, images))
        return _pieces(s)
    assert two(1500) == [[("a1", 0, 1200)], [("a2", 0, 1200)]]
    assert two(2000) == [[("a1", 0, 1200), ("a2", 0, 1200)]]


def test_while_streams_decode_a_screenshots_encode_is_charged_to_the_step():
    """encoder_tokens=0: a 3,354-token screenshot's encode does not come on top of a full 2048-token text chunk.
    The first step encodes it with MIN_CHUNK decoder tokens; later steps are plain text chunks."""
    s = Scheduler(num_slots=4, max_prefill_tokens=16384, chunk_tokens=2048, encoder_tokens=0)
    keys, images = shot_prompt(1, 300, 3354, 200)
    s.waiting.append(Seq("agent", keys, images))
    pieces = []
    while True:
        chunks = s.schedule(decoding=True)
        if not chunks:
            break
        for c in chunks:
            pieces.append((c.start, c.end))
            s.chunk_done(c)
    # text before the image, then the image's encode with MIN_CHUNK tokens alone, then text chunks
    assert pieces[0] == (0, 300)
    assert pieces[1] == (300, 300 + MIN_CHUNK)
    assert all(e - st <= 2048 for st, e in pieces[2:]) and pieces[-1][1] == len(keys)


def test_idle_prefill_is_one_step_with_its_image():
    s = Scheduler(num_slots=4, max_prefill_tokens=16384, chunk_tokens=2048)
    keys, images = shot_prompt(1, 300, 3354, 200)
    s.waiting.append(Seq("agent", keys, images))
    (c,) = s.schedule(decoding=False)
    assert (c.start, c.end) == (0, len(keys))


def test_a_second_screenshot_waits_for_a_step_with_room_for_its_encode():
    """Two agent turns arrive while others decode: one step never starts two screenshot encodes, and the second
    keeps its place in the queue (arrival order) instead of being skipped."""
    s = Scheduler(num_slots=4, max_prefill_tokens=16384, chunk_tokens=2048, encoder_tokens=0)
    for tag in (1, 2):
        keys, images = shot_prompt(tag, 0, 3354, 200)
        s.waiting.append(Seq(f"a{tag}", keys, images))
    steps = []
    while True:
        chunks = s.schedule(decoding=True)
        if not chunks:
            break
        encodes = [c.seq.name for c in chunks if any(c.start <= s0 < c.end for s0, *_ in c.seq.prompt.images)]
        assert len(encodes) <= 1
        steps.append([(c.seq.name, c.start, c.end) for c in chunks])
        for c in chunks:
            s.chunk_done(c)
    assert steps[0] == [("a1", 0, MIN_CHUNK)]
    firsts = [i for i, st in enumerate(steps) if any(n == "a2" for n, *_ in st)]
    assert firsts and firsts[0] >= 1


# --- split encodes (the native tower runs in pieces of blocks)

def _steps(s, decoding=True):
    """[(name, start, end, encodes)] per step until nothing is left."""
    steps = []
    for _ in range(100):
        chunks = s.schedule(decoding=decoding)
        if not chunks:
            return steps
        steps.append([(c.seq.name, c.start, c.end, list(c.encodes)) for c in chunks])
        for c in chunks:
            s.chunk_done(c)
    raise AssertionError("prefill never finished")


def test_split_encode_spreads_a_screenshot_over_steps_and_its_text_waits_for_it():
    """A prefix hit leaves [image][text] to prefill while streams decode: the 3,354-token screenshot's encode is
    spread over ceil(3354 / 1024) = 4 steps, no step runs more than 1024 image tokens' worth of tower work, the
    text stops before the image until its encode is done, and the step that finishes it continues into it."""
    s = Scheduler(num_slots=4, max_prefill_tokens=16384, chunk_tokens=2048, encoder_tokens=1024, split_encodes=True)
    keys, images = shot_prompt(1, 0, 3354, 200)
    s.waiting.append(Seq("agent", keys, images))
    steps = _steps(s)
    assert [e for (step,) in steps for e in step[3]] == [(0, 0, 1024), (0, 1024, 2048), (0, 2048, 3072),
                                                         (0, 3072, 3354)]
    assert [(st, en) for (step,) in steps for _, st, en, _ in [step]] == \
        [(0, 0), (0, 0), (0, 0), (0, 2048), (2048, 3554)]
    assert all(sum(b - a for _, a, b in step[0][3]) <= 1024 for step in steps)


def test_split_encode_looks_ahead_while_the_text_before_the_image_runs():
    """A fresh agent turn, [1,500 text][screenshot][200 text]: the text chunks run while the budget left encodes
    the screenshot ahead, so the text reaches the image with its encode (nearly) done."""
    s = Scheduler(num_slots=4, max_prefill_tokens=16384, chunk_tokens=1024, encoder_tokens=1024, split_encodes=True)
    keys, images = shot_prompt(1, 1500, 3354, 200)
    s.waiting.append(Seq("agent", keys, images))
    steps = _steps(s)
    first, second = steps[0][0], steps[1][0]
    assert (first[1], first[2], first[3]) == (0, 1024, [(1500, 0, 1024)])
    assert (second[1], second[2], second[3]) == (1024, 1500, [(1500, 1024, 2048)])   # stops before the image
    assert all(e - st <= 1024 for (_, st, e, _), in steps)
    assert steps[-1][0][2] == len(keys)
    assert sum(b - a for (step,) in steps for _, a, b in step[3]) == 3354


def test_split_encode_uses_the_encoder_budget_beside_a_full_text_chunk():
    """One sequence fills the text budget; a second one's screenshot is encoded beside it (an encode-only chunk),
    admitted into its slot, instead of waiting for a step with text room."""
    s = Scheduler(num_slots=4, max_prefill_tokens=16384, chunk_tokens=1024, encoder_tokens=1024, split_encodes=True)
    s.waiting.append(Seq("text", prompt(1, 4000)))
    keys, images = shot_prompt(2, 0, 3354, 100)
    s.waiting.append(Seq("shot", keys, images))
    chunks = s.schedule(decoding=True)
    assert [(c.seq.name, c.tokens, c.encodes) for c in chunks] == [("text", 1024, []), ("shot", 0, [(0, 0, 1024)])]
    assert all(c.first for c in chunks) and chunks[0].slot != chunks[1].slot


def test_split_encode_finishes_whole_when_the_engine_goes_idle_and_release_forgets_it():
    s = Scheduler(num_slots=2, max_prefill_tokens=16384, chunk_tokens=1024, encoder_tokens=1024, split_encodes=True)
    keys, images = shot_prompt(1, 0, 3354, 100)
    s.waiting.append(Seq("agent", keys, images))
    (c,) = s.schedule(decoding=True)
    s.chunk_done(c)
    assert s.encoded[c.slot] == {0: 1024}
    (c2,) = s.schedule(decoding=False)        # nothing decodes any more: one step, the rest of the encode
    assert (c2.start, c2.end, c2.encodes) == (0, len(keys), [(0, 1024, 3354)])
    s.chunk_done(c2)
    assert c2.slot not in s.encoded
    # a sequence aborted mid-encode: its slot's progress goes with it
    s.waiting.append(Seq("again", *shot_prompt(3, 0, 3354, 100)))
    (c3,) = s.schedule(decoding=True)
    s.chunk_done(c3)
    assert s.encoded[c3.slot] == {0: 1024}
    s.release(c3.slot, None)
    assert c3.slot not in s.encoded


def test_without_split_encodes_a_chunk_names_the_whole_images_it_encodes():
    s = Scheduler(num_slots=4, max_prefill_tokens=16384, chunk_tokens=2048, encoder_tokens=2048)
    keys, images = shot_prompt(1, 300, 3354, 200)
    s.waiting.append(Seq("agent", keys, images))
    assert [step[0][3] for step in _steps(s)] == [[(300, 0, 3354)], []]
