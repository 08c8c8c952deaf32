"""Slot bookkeeping and admission policy, as plain data (no torch): which waiting request gets which cache slot,
how much of its prompt is already in some slot's cache (prefix reuse), and how many prompt tokens one prefill
step may take. Unit-tested without a model.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .inputs import longest_common_prefix

MIN_PREFIX_REUSE = 16   # shorter shared prefixes are not worth a copy or a constrained slot choice


@dataclass
class SlotState:
    """What a slot's cache holds: `keys[:valid]` are the tokens whose KV is written there."""
    keys: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    valid: int = 0
    owner: Any = None        # the running sequence, or None when free (its KV kept for reuse)
    last_used: int = 0


@dataclass
class Admission:
    seq: Any
    slot: int
    reuse: int               # prompt tokens already in the slot's cache
    copy_from: int | None    # copy `reuse` tokens of KV from this running slot first


class Scheduler:
    def __init__(self, num_slots: int, max_prefill_tokens: int, prefix_caching: bool = True):
        self.slots = [SlotState() for _ in range(num_slots)]
        self.waiting: deque = deque()
        self.max_prefill_tokens = max_prefill_tokens
        self.prefix_caching = prefix_caching
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

    # --- admission
    def admit(self) -> list[Admission]:
        """Pop waiting sequences into free slots within the prefill token budget (FIFO; the first one always fits
        so a long prompt is never starved)."""
        out: list[Admission] = []
        budget = self.max_prefill_tokens
        while self.waiting:
            free = self.free_slots()
            if not free:
                break
            seq = self.waiting[0]
            keys = seq.prompt.keys
            spans = [(s, e) for s, e, *_ in seq.prompt.images]
            reuse, src = self.best_prefix(keys, spans)
            cost = len(keys) - reuse
            if out and (cost > budget or reuse > 0 or out[0].reuse > 0):
                break   # prefix-reuse prefills run alone (masked attention); fresh ones batch (causal attention)
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
            out.append(Admission(seq=seq, slot=slot, reuse=reuse, copy_from=copy_from))
            budget -= cost
        return out

    def _pick_free(self, free: list[int]) -> int:
        """Decode runs rows 0..B-1 of a batch bucket, so a slot above the highest running one makes every step
        bigger (and for bitsandbytes nf4, batch 1 -> 2 leaves its fast single-row kernel). Among free slots that do
        not grow the batch, take an empty one, else the least recently used; otherwise the lowest free slot."""
        running = [i for i, s in enumerate(self.slots) if s.owner is not None]
        top = max(running) if running else -1
        inside = [i for i in free if i < top]
        if not inside:
            return min(free)
        return min(inside, key=lambda i: (self.slots[i].valid >= MIN_PREFIX_REUSE, self.slots[i].last_used, i))

    def prefilled(self, slot: int) -> None:
        st = self.slots[slot]
        st.valid = len(st.keys)

    def release(self, slot: int, generated: list[int] | None = None) -> None:
        """Free a slot, keeping its KV for reuse: the prompt plus the generated tokens whose KV was written
        (`generated`, without the last sampled token). `generated=None` drops the content (failed step)."""
        st = self.slots[slot]
        st.owner = None
        self._clock += 1
        st.last_used = self._clock
        if generated is None:
            st.valid, st.keys = 0, np.zeros(0, dtype=np.int64)
        else:
            st.keys = np.concatenate([st.keys[: st.valid], np.asarray(generated, dtype=np.int64)])
            st.valid = len(st.keys)
