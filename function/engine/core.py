"""The engine loop: one dedicated thread owns the model and the GPU. Each iteration takes new requests and aborts
from a thread-safe inbox, admits waiting requests into free cache slots (one batched prefill), then runs one
decode step for every running sequence, and hands each sequence's new token to its owner through a callback.

Continuous batching: requests join at step boundaries and leave when they finish; each row samples with its
own parameters. A failing step fails only the requests in it; a crash of the loop fails everyone and marks the
engine dead so the process gets restarted instead of hanging.
"""
from __future__ import annotations

import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from .. import metrics
from .inputs import PreparedPrompt
from .protocol import EngineDead, GenerationFailed, SamplingParams
from .runner import ModelRunner, PrefillItem
from .sampling import RowState, Sampler
from .scheduler import Scheduler

log = logging.getLogger(__name__)

# emit(token_ids, finish_reason, error[, packed logprobs]) is called on the engine thread; it must not block
Emit = Callable[..., None]


@dataclass
class Sequence:
    request_id: str
    prompt: PreparedPrompt
    params: SamplingParams
    emit: Emit
    max_new: int
    stop_ids: frozenset[int]
    slot: int = -1
    generated: list[int] = field(default_factory=list)
    row: RowState | None = None
    cached_tokens: int = 0
    arrival: float = field(default_factory=time.monotonic)


class EngineCore:
    def __init__(self, runner: ModelRunner, scheduler: Scheduler, sampler: Sampler, max_len: int):
        self.runner, self.scheduler, self.sampler = runner, scheduler, sampler
        self.max_len = max_len
        self.inbox: queue.SimpleQueue = queue.SimpleQueue()
        self.by_id: dict[str, Sequence] = {}
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self.dead: Exception | None = None
        self.fault_hook: Callable[[str], None] | None = None   # tests inject step failures here
        self._busy_s = 0.0
        self._since = time.monotonic()
        # cumulative step timings (wall, including the per-step device sync), for benchmarks and debugging
        self.stats = dict(prefills=0, prefill_seqs=0, prefill_tokens=0, prefill_s=0.0, decode_steps=0,
                          decode_rows=0, decode_s=0.0)

    # --- called from other threads
    def submit(self, seq: Sequence) -> None:
        if self.dead is not None:   # nobody would ever answer it
            seq.emit([], "error", EngineDead(f"the engine stopped: {self.dead}"))
            return
        self.inbox.put(("add", seq))

    def abort(self, request_id: str) -> None:
        self.inbox.put(("abort", request_id))

    def waiting_count(self) -> int:
        return len(self.scheduler.waiting)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="engine", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        self.inbox.put(("wake", None))
        if self._thread:
            self._thread.join(timeout)

    def is_alive(self) -> bool:
        return self.dead is None and (self._thread is None or self._thread.is_alive())

    # --- the loop
    def _loop(self) -> None:
        try:
            while not self._stop.is_set():
                idle = not self.by_id
                pending_graphs = idle and bool(self.runner.pending)
                self._drain(block=idle and not pending_graphs)
                if not self.by_id:
                    self._report()   # gauges fall back to idle values (after aborts too)
                    if pending_graphs:
                        self.runner.capture_pending()
                    continue
                t = time.perf_counter()
                self.step()
                self._busy_s += time.perf_counter() - t
                self._report()
        except BaseException as e:  # noqa: BLE001 - the loop must never die silently
            log.exception("engine loop crashed")
            self.dead = e
            err = EngineDead(f"the engine stopped: {type(e).__name__}: {e}")
            for seq in list(self.by_id.values()):
                seq.emit([], "error", err)
            self.by_id.clear()
            self._fail_inbox(err)

    def _fail_inbox(self, err: Exception) -> None:
        while True:
            try:
                kind, item = self.inbox.get_nowait()
            except queue.Empty:
                return
            if kind == "add":
                item.emit([], "error", err)

    def _drain(self, block: bool) -> None:
        try:
            item = self.inbox.get(timeout=0.5) if block else self.inbox.get_nowait()
        except queue.Empty:
            return
        while True:
            kind, obj = item
            if kind == "add":
                self.by_id[obj.request_id] = obj
                self.scheduler.waiting.append(obj)
            elif kind == "abort":
                seq = self.by_id.get(obj)
                if seq is not None:
                    self._finish(seq, "abort")
            try:
                item = self.inbox.get_nowait()
            except queue.Empty:
                return

    def _report(self) -> None:
        now = time.monotonic()
        if now - self._since >= 1.0:
            metrics.set_busy_ratio(min(1.0, self._busy_s / max(1e-9, now - self._since)))
            self._busy_s, self._since = 0.0, now
            if torch.cuda.is_available():
                metrics.set_gpu_memory(torch.cuda.memory_allocated(), torch.cuda.memory_reserved())
        metrics.set_running(len(self.by_id) - len(self.scheduler.waiting))

    # --- one iteration
    def step(self) -> None:
        st = self.stats
        admitted = self.scheduler.admit()
        if admitted:
            t = time.perf_counter()
            self._prefill(admitted)
            st["prefills"] += 1
            st["prefill_seqs"] += len(admitted)
            st["prefill_tokens"] += sum(a.seq.prompt.length - a.reuse for a in admitted)
            st["prefill_s"] += time.perf_counter() - t
        running = [s for s in self.by_id.values() if s.slot >= 0 and s.generated]
        if running:
            t = time.perf_counter()
            self._decode(running)
            st["decode_steps"] += 1
            st["decode_rows"] += len(running)
            st["decode_s"] += time.perf_counter() - t

    def _prefill(self, admitted) -> None:
        items, seqs = [], []
        for a in admitted:
            seq = a.seq
            seq.slot = a.slot
            seq.cached_tokens = a.reuse
            try:   # per-request setup: a failure here fails this request only
                if a.copy_from is not None:
                    self.runner.copy_prefix(a.copy_from, a.slot, a.reuse)
                seq.row = self.sampler.reset_slot(a.slot, seq.prompt.token_ids, seq.params, seq.stop_ids)
            except Exception as e:  # noqa: BLE001
                self._step_failed([seq], e)
                continue
            imgs = [im for im in seq.prompt.images if im[0] >= a.reuse]
            items.append(PrefillItem(slot=a.slot, token_ids=seq.prompt.token_ids, start=a.reuse,
                                     position_ids=seq.prompt.position_ids, images=imgs))
            seqs.append(seq)
        if not seqs:
            return
        metrics.observe_prefix_cache(sum(s.cached_tokens for s in seqs), sum(s.prompt.length for s in seqs))
        try:
            if self.fault_hook:
                self.fault_hook("prefill")
            rows = self.runner.stage_rows([s.slot for s in seqs])
            logits = self.runner.prefill(items)
            toks = self.sampler.sample(logits, rows, [s.row for s in seqs])
        except Exception as e:  # noqa: BLE001
            self._step_failed(seqs, e)
            return
        for seq in seqs:
            self.scheduler.prefilled(seq.slot)
        self._accept(seqs, toks, rows)

    def _decode(self, seqs: list[Sequence]) -> None:
        tokens = {s.slot: s.generated[-1] for s in seqs}
        positions = {s.slot: len(s.prompt.token_ids) + len(s.generated) - 1 for s in seqs}
        deltas = {s.slot: s.prompt.rope_delta for s in seqs}
        try:
            if self.fault_hook:
                self.fault_hook("decode")
            rows = self.runner.stage_rows([s.slot for s in seqs])
            logits = self.runner.decode(tokens, positions, deltas)
            toks = self.sampler.sample(logits.index_select(0, rows), rows, [s.row for s in seqs])
        except Exception as e:  # noqa: BLE001
            self._step_failed(seqs, e)
            return
        self._accept(seqs, toks, rows)

    def _accept(self, seqs: list[Sequence], toks: torch.Tensor, slots_t: torch.Tensor) -> None:
        self.sampler.record(slots_t, toks.clamp(min=0))
        host, lps = self.sampler.to_host(toks)   # the one device->host sync of the step (logprobs ride along)
        for seq, tok, lp in zip(seqs, host, lps):
            if tok < 0:
                self._fail(seq, GenerationFailed("the model produced non-finite logits for this request"))
                continue
            seq.generated.append(tok)
            finish = None
            if tok in seq.stop_ids:
                finish = "stop"
            elif len(seq.generated) >= seq.max_new:
                finish = "length"
            if lp is not None and seq.params.logprobs is not None:
                seq.emit([tok], finish, None, lp)
            else:
                seq.emit([tok], finish, None)
            if finish:
                self._finish(seq, finish, emitted=True)

    def _finish(self, seq: Sequence, reason: str, emitted: bool = False) -> None:
        self.by_id.pop(seq.request_id, None)
        if seq.slot >= 0:
            # the last sampled token's KV was never written
            self.scheduler.release(seq.slot, seq.generated[:-1])
        else:
            try:
                self.scheduler.waiting.remove(seq)
            except ValueError:
                pass
        if not emitted:
            seq.emit([], reason, None)

    def _fail(self, seq: Sequence, err: Exception) -> None:
        self.by_id.pop(seq.request_id, None)
        if seq.slot >= 0:
            self.scheduler.release(seq.slot, None)
        seq.emit([], "error", err)

    def _step_failed(self, seqs: list[Sequence], e: Exception) -> None:
        oom = isinstance(e, torch.OutOfMemoryError) if hasattr(torch, "OutOfMemoryError") else False
        log.error("step failed for %d request(s): %s: %s", len(seqs), type(e).__name__, e)
        err = GenerationFailed("out of GPU memory while serving this request; retry later" if oom else
                               f"generation failed: {type(e).__name__}: {e}", retry_after=1.0)
        for seq in seqs:
            self._fail(seq, err)
        if oom and torch.cuda.is_available():
            torch.cuda.empty_cache()
