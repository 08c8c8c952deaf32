"""Slot bookkeeping and prefill scheduling, as plain data (no torch): which waiting request gets which cache slot,
how much of its prompt is already in some slot's cache (prefix reuse), and which pieces of which prompts one
engine step prefills (chunked prefill under a token budget). Unit-tested without a model.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Any

import numpy as np


MIN_PREFIX_REUSE = 16   # shorter shared prefixes are not worth a copy or a constrained slot choice


def longest_common_prefix(a: np.ndarray, b: np.ndarray) -> int:
    m = min(len(a), len(b))
    if m == 0:
        return 0
    neq = np.flatnonzero(a[:m] != b[:m])
    return int(neq[0]) if len(neq) else m


@dataclass
class SlotState:
    """What a slot's cache holds: `keys[:valid]` are the tokens whose KV is written there."""
    keys: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    valid: int = 0
    owner: Any = None        # the running sequence, or None when free (its KV kept for reuse)
    last_used: int = 0


@dataclass
class Chunk:
    """One piece of prefill work for one engine step: write the KV of prompt tokens [start, end) into `slot`.
    The first chunk of a sequence may first copy `start` tokens of KV from the running slot `copy_from` (prefix
    reuse); the chunk that reaches the end of the prompt gives the sequence its first token."""
    seq: Any
    slot: int
    start: int
    end: int
    copy_from: int | None = None
    first: bool = False      # the sequence was admitted to its slot in this step
    reuse: int = 0           # prompt tokens taken from a cached prefix (first chunk only)
    # vision-tower work of this step for this sequence: (image start, from, to) in units of the image's tokens;
    # (s, 0, n) encodes an n-token image whole, a smaller range is a piece of its encode (split encodes)
    encodes: list[tuple[int, int, int]] = field(default_factory=list)

    @property
    def final(self) -> bool:
        return self.end >= len(self.seq.prompt.keys)

    @property
    def tokens(self) -> int:
        return self.end - self.start


MIN_CHUNK = 256   # smaller pieces cost a forward's fixed overhead for little work


class Scheduler:
    """Prefill is chunked: each engine step gives prompts at most `chunk_tokens` tokens while sequences are
    decoding (so running streams keep a bounded inter-token gap while screenshots arrive), or
    `max_prefill_tokens` when nothing decodes (one big step is the fastest first token). Started prefills go
    first, shortest remaining first, then new admissions in arrival order: the earliest request reaches its
    first token first instead of every arrival waiting for all of them. For the same reason a step that
    nothing decodes beside ends after its first long chunk (`chunk_tokens` or more, encodes included): short
    prompts that arrive together are packed up to `max_prefill_tokens`, but a burst of screenshot turns is not
    prefilled in one 1-2 s step that gives every agent its first token at its end (the ≤ 2.5 s prefill step of
    8 agents on an H200); the next arrivals go on in chunks beside the first one's decode.

    While sequences decode, an image's vision-tower encode costs about what the same number of decoder tokens
    cost (on an H200 a 1080x2400 screenshot's encode, 3,354 image tokens, costs about a 3.4k-token text chunk:
    bench/prefill_probe.py), so a step must not start a full text chunk plus several encodes (the 32-agent ITL
    p99 of bench/RESULTS.md). As in vLLM, encodes have their own per-step budget, `encoder_tokens` image tokens,
    beside the text budget; the first encode of a step always fits, so one screenshot larger than the budget is
    encoded in a step of its own, and a chunk stops before an image that does not fit. `encoder_tokens=0`
    charges encodes to the text budget instead (a step then holds either a text chunk or an encode with
    MIN_CHUNK tokens: the smallest stall, the most steps per prompt).

    `split_encodes` (the native GLM-4.1V tower, which runs in pieces of blocks): while sequences decode, an encode
    is spread over steps instead, `encoder_tokens` image tokens' worth of tower work per step, so no step carries a
    whole screenshot's encode (~120 ms on an H200) on top of its text chunk. A chunk stops before an image whose
    encode is not finished, and budget left after the chunk starts the encode of the next image ahead of it
    (lookahead), so a prompt's text reaches its screenshot with the encode done."""

    def __init__(self, num_slots: int, max_prefill_tokens: int, prefix_caching: bool = True,
                 chunk_tokens: int = 2048, encoder_tokens: int = 2048, split_encodes: bool = False):
        self.slots = [SlotState() for _ in range(num_slots)]
        self.split_encodes = split_encodes and encoder_tokens > 0
        self.encoded: dict[int, dict[int, int]] = {}   # slot -> image start -> its encode's units done
        self.waiting: deque = deque()
        self.max_prefill_tokens = max_prefill_tokens
        self.chunk_tokens = max(MIN_CHUNK, min(chunk_tokens, max_prefill_tokens))
        self.prefix_caching = prefix_caching
        self.encoder_tokens = max(0, encoder_tokens)
        self.partial: dict[int, int] = {}    # slot -> prompt tokens whose KV is written (prefill under way)
        self._clock = 0
        self.prefix_query_tokens = 0
        self.prefix_hit_tokens = 0

    # --- queries
    def free_slots(self) -> list[int]:
        return [i for i, s in enumerate(self.slots) if s.owner is None]

    def running(self) -> list[int]:
        return [i for i, s in enumerate(self.slots) if s.owner is not None]

    # --- prefix matching
    def best_prefix(self, keys: np.ndarray, image_spans: list[tuple[int, int]]) -> tuple[int, int | None]:
        """(reusable tokens, slot holding them). At least one prompt token is always left to prefill, and a
        match never ends inside an image (its features are computed whole)."""
        if not self.prefix_caching:
            return 0, None
        best, best_slot = 0, None
        for i, s in enumerate(self.slots):
            if s.valid < MIN_PREFIX_REUSE:
                continue
            n = longest_common_prefix(keys, s.keys[: s.valid])
            # prefer a free slot on ties: taking it costs no copy
            if n > best or (n == best and n > 0 and s.owner is None and best_slot is not None
                            and self.slots[best_slot].owner is not None):
                best, best_slot = n, i
        best = min(best, len(keys) - 1)
        for s, e in image_spans:
            if s < best < e:
                best = s
        if best < MIN_PREFIX_REUSE:
            return 0, None
        return best, best_slot

    # --- scheduling
    def schedule(self, decoding: bool = False) -> list[Chunk]:
        """The prefill work of one step within its token budget; the first chunk of a step always gets at least
        MIN_CHUNK tokens, so no prompt is starved."""
        budget = self.chunk_tokens if decoding else self.max_prefill_tokens
        # image tokens this step may still encode; None: no separate limit (idle) or charged to `budget`
        enc_left = self.encoder_tokens if decoding and self.encoder_tokens else None
        out: list[Chunk] = []
        order = sorted(self.partial.items(), key=lambda kv: (len(self.slots[kv[0]].keys) - kv[1],
                                                              self.slots[kv[0]].last_used))
        for slot, done in order:
            take = self._take(budget, out)
            if take <= 0 and not self._encode_room(enc_left):
                return out
            st = self.slots[slot]
            end, cost, enc, pieces = self._chunk_end(st.owner, slot, done, take, decoding, not out, enc_left)
            if end <= done and not pieces:
                continue
            out.append(Chunk(seq=st.owner, slot=slot, start=done, end=end, encodes=pieces))
            budget -= cost
            enc_left = None if enc_left is None else enc_left - enc
            if not decoding and cost >= self.chunk_tokens:
                return out          # a long prompt runs alone when nothing decodes (see the class docstring)
        while self.waiting:
            free = self.free_slots()
            if not free:
                break
            take = self._take(budget, out)
            if take <= 0 and not self._encode_room(enc_left):
                break
            seq = self.waiting[0]
            keys = seq.prompt.keys
            spans = [(s, e) for s, e, *_ in seq.prompt.images]
            reuse, src = self.best_prefix(keys, spans)
            end, cost, enc, pieces = self._chunk_end(seq, None, reuse, take, decoding, not out, enc_left)
            if end <= reuse and not pieces:
                break               # its next image does not fit in this step: it keeps its place in the queue
            self.waiting.popleft()
            self.prefix_query_tokens += len(keys)
            self.prefix_hit_tokens += reuse
            if src is not None and self.slots[src].owner is None:
                slot, copy_from = src, None
            else:
                slot, copy_from = self._pick_free(free), src
            st = self.slots[slot]
            st.owner = seq
            st.keys = keys.copy()
            st.valid = reuse
            self._clock += 1
            st.last_used = self._clock
            self.encoded.pop(slot, None)
            out.append(Chunk(seq=seq, slot=slot, start=reuse, end=end, copy_from=copy_from, first=True,
                             reuse=reuse, encodes=pieces))
            budget -= cost
            enc_left = None if enc_left is None else enc_left - enc
            if not decoding and cost >= self.chunk_tokens:
                break
        return out

    def _encode_room(self, enc_left: int | None) -> bool:
        """With split encodes, tower work fits beside a full text budget: an encode-only chunk."""
        return self.split_encodes and enc_left is not None and enc_left > 0

    def _chunk_end(self, seq, slot: int | None, start: int, take: int, decoding: bool, first: bool,
                   enc_left: int | None) -> tuple[int, int, int, list[tuple[int, int, int]]]:
        """(end, text-budget cost, image tokens' worth of encode, encode pieces) of the chunk of `seq` from `start`
        within `take`. An image is encoded by the chunk that contains its first token (one begun before `start`
        was encoded by an earlier chunk). While decoding, encodes count against `enc_left` (the first of a step
        always fits, unless encodes are split), or against `take` when `enc_left` is None (encoder_tokens=0).
        end == start and no pieces: nothing fits."""
        length = len(seq.prompt.keys)
        end = min(length, start + take)
        spans = sorted((s0, e0) for s0, e0, *_ in seq.prompt.images if s0 >= start)
        done = self.encoded.get(slot, {}) if slot is not None else {}

        def whole(upto: int) -> list[tuple[int, int, int]]:   # the rest of each image that starts before `upto`
            return [(s0, done.get(s0, 0), e0 - s0) for s0, e0 in spans if s0 < upto and done.get(s0, 0) < e0 - s0]

        def encode(upto: int) -> int:
            return sum(b - a for _, a, b in whole(upto))
        if not decoding:
            return end, end - start, 0, whole(end)
        if enc_left is not None and self.split_encodes:
            pieces, used = [], 0
            for s0, e0 in spans:
                n = e0 - s0
                left = n - done.get(s0, 0)
                if left <= 0:
                    continue          # encoded ahead by an earlier step
                piece = min(left, enc_left - used)
                if piece > 0:
                    pieces.append((s0, n - left, n - left + piece))
                    used += piece
                if s0 >= end:
                    break             # the lookahead image: one per chunk
                if piece < left:
                    end = s0          # the text stops before an image whose encode is not finished
                    break
            return end, end - start, used, pieces
        if enc_left is not None:
            step_fresh = enc_left == self.encoder_tokens   # nothing encoded yet in this step
            enc = 0
            for s0, e0 in spans:
                if s0 >= end:
                    break
                if enc + (e0 - s0) > enc_left and not (step_fresh and enc == 0):
                    end = s0            # stop before the image that does not fit
                    break
                enc += e0 - s0
            return end, end - start, enc, whole(end)
        while end > start and (end - start) + encode(end) > take:
            last = max(s0 for s0, _ in spans if s0 < end)
            fit = start + take - encode(end)      # keep that image, shorten the text after it
            end = fit if fit > last else last     # or stop just before it
        if end <= start and first:
            end = min(length, start + MIN_CHUNK)
        return end, (end - start) + encode(end), encode(end), whole(end)

    def _take(self, budget: int, out: list) -> int:
        if not out:
            return max(budget, MIN_CHUNK)
        return budget if budget >= MIN_CHUNK else 0

    def chunk_done(self, chunk: Chunk) -> None:
        """The chunk's KV is written: later requests may reuse it, and the next chunk starts after it."""
        st = self.slots[chunk.slot]
        st.valid = chunk.end
        if chunk.final:
            self.partial.pop(chunk.slot, None)
            self.encoded.pop(chunk.slot, None)
        else:
            self.partial[chunk.slot] = chunk.end
            for s0, _, b in chunk.encodes:
                self.encoded.setdefault(chunk.slot, {})[s0] = b

    def _pick_free(self, free: list[int]) -> int:
        """A slot for a prompt that matches no free slot's cache. Decode runs rows 0..B-1 of a batch bucket, so a
        slot above the highest running one makes every step bigger (and for bitsandbytes nf4, batch 1 -> 2 leaves
        its fast single-row kernel): free slots below it come first. Within a group an empty slot goes before one
        that holds a reusable prefix, and among those the least recently used is overwritten: a lone agent's
        cached turn is not evicted by the first unrelated request while empty slots exist (the next turn of that
        agent would recompute its whole 5k-token prompt)."""
        running = [i for i, s in enumerate(self.slots) if s.owner is not None]
        top = max(running) if running else -1
        inside = [i for i in free if i < top]

        def victim(i: int) -> tuple:
            cached = self.slots[i].valid >= MIN_PREFIX_REUSE
            return (cached, self.slots[i].last_used if cached else i, i)
        return min(inside or free, key=victim)

    def release(self, slot: int, generated: list[int] | None = None) -> None:
        """Free a slot, keeping its KV for reuse: the prompt tokens whose KV was written plus the generated tokens
        whose KV was written (`generated`, without the last sampled token). `generated=None` drops the content
        (failed step)."""
        st = self.slots[slot]
        st.owner = None
        self.partial.pop(slot, None)
        self.encoded.pop(slot, None)
        self._clock += 1
        st.last_used = self._clock
        if generated is None:
            st.valid, st.keys = 0, np.zeros(0, dtype=np.int64)
        else:
            st.keys = np.concatenate([st.keys[: st.valid], np.asarray(generated, dtype=np.int64)])
            st.valid = len(st.keys)
