"""The engine loop: one dedicated thread owns the model and the GPU. Each iteration takes new requests and aborts
from a thread-safe inbox, prefills the prompt chunks the scheduler picks within its token budget (new requests
admitted into free cache slots), then runs one decode step for every running sequence, and hands each
sequence's new token to its owner through a callback.

Continuous batching: requests join at step boundaries and leave when they finish; each row samples with its
own parameters. A failing step fails only the requests in it; a crash of the loop fails everyone and marks the
engine dead so the process gets restarted instead of hanging.
"""
from __future__ import annotations

import logging
import queue
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Callable

import torch

from .. import metrics
from .inputs import PreparedPrompt
from .protocol import EngineDead, GenerationFailed, SamplingParams
from .runner import PREFILL_GRAPH_TOKENS, ModelRunner, PrefillItem
from .sampling import RowState, Sampler
from .scheduler import Scheduler

log = logging.getLogger(__name__)

# emit(token_ids, finish_reason, error[, packed logprobs]) is called on the engine thread; it must not block
Emit = Callable[..., None]

# An idle-time graph capture (0.1-0.4 s on a 9B model) starts only after the engine has had nothing to do for this
# long: an agent sends its next turn milliseconds after the last one ends, and a capture started in that gap
# would delay the turn's first token by the whole capture.
IDLE_CAPTURE_DELAY_S = 0.3

# CUDA errors after which the context is unusable (sticky errors): nothing in this process can run on the GPU
# again, so the engine stops, readiness and liveness turn false, and the kubelet restarts the container.
_FATAL_CUDA = ("device-side assert", "illegal memory access", "illegal instruction", "unspecified launch failure",
               "launch failure", "misaligned address", "uncorrectable ecc", "ecc error", "hardware stack error",
               "cudaerrorlaunchfailure", "cudaerrorillegaladdress", "cudaerrorassert", "gpu has fallen off the bus",
               "an illegal", "invalid program counter", "unrecoverable")


def is_fatal_device_error(e: BaseException) -> bool:
    """A CUDA fault that poisons the context, as opposed to one a step can survive (out of memory)."""
    if isinstance(e, getattr(torch, "OutOfMemoryError", ())):
        return False
    msg = str(e).lower()
    return ("cuda" in msg or "cublas" in msg or "cudnn" in msg or "accelerator" in msg or
            isinstance(e, getattr(torch, "AcceleratorError", ()))) and any(p in msg for p in _FATAL_CUDA)


def _prefill_groups(chunks) -> list[list]:
    """Forwards for one step's chunks. Chunks from position 0 share a forward (rows right-padded to the longest)
    when that is cheap: small enough for a graphed prefill, or of nearly equal length; long prompts of different
    lengths run one per forward, where a forward is GPU-bound anyway and padding would be wasted work. Chunks
    that continue a slot's cache run one per forward (their attention reads that slot)."""
    fresh = sorted((c for c in chunks if c.start == 0), key=lambda c: -c.tokens)
    groups: list[list] = []
    for c in fresh:
        g = groups[-1] if groups else None
        if g is not None and ((len(g) + 1) * g[0].tokens <= PREFILL_GRAPH_TOKENS or c.tokens >= 0.9 * g[0].tokens):
            g.append(c)
        else:
            groups.append([c])
    return groups + [[c] for c in chunks if c.start > 0]


class FatalDeviceError(RuntimeError):
    """Raised out of a step to stop the engine loop: the device cannot run anything any more."""


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
    image_features: dict = field(default_factory=dict)   # vision features kept across prefill chunks


class EngineCore:
    def __init__(self, runner: ModelRunner, scheduler: Scheduler, sampler: Sampler, max_len: int):
        self.runner, self.scheduler, self.sampler = runner, scheduler, sampler
        self.max_len = max_len
        self.inbox: queue.SimpleQueue = queue.SimpleQueue()
        self.by_id: dict[str, Sequence] = {}
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self.dead: Exception | None = None
        self._busy_s = 0.0
        self._since = time.monotonic()
        self.idle_capture_delay_s = IDLE_CAPTURE_DELAY_S
        self._clock = time.monotonic   # tests replace it to decide when the engine counts as idle
        self._last_work = self._clock()
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

    def call(self, fn: Callable[[], object]) -> Future:
        """Run `fn` on the engine thread between steps (graph capture must happen on the thread and stream
        that run the model). The future holds its result or exception."""
        fut: Future = Future()
        if self.dead is not None:
            fut.set_exception(EngineDead(f"the engine stopped: {self.dead}", retry_after=5.0))
        else:
            self.inbox.put(("call", (fn, fut)))
        return fut

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
        self.runner.engine_thread = threading.get_ident()
        try:
            while not self._stop.is_set():
                idle = not self.by_id
                pending_graphs = idle and self.runner.has_idle_work()
                if pending_graphs:   # wait out the rest of the idle delay, waking for any new request
                    wait = self.idle_capture_delay_s - (self._clock() - self._last_work)
                    self._drain(block=wait > 0, timeout=min(max(wait, 0.0), 0.5))
                else:
                    self._drain(block=idle)
                if not self.by_id:
                    self._report()   # gauges fall back to idle values (after aborts too)
                    if (pending_graphs and self.inbox.empty()
                            and self._clock() - self._last_work >= self.idle_capture_delay_s):
                        self._capture_idle()
                    continue
                t = time.perf_counter()
                self.step()
                self._busy_s += time.perf_counter() - t
                self._last_work = self._clock()
                self._report()
        except BaseException as e:  # noqa: BLE001 - the loop must never die silently
            cause = e.__cause__ if isinstance(e, FatalDeviceError) and e.__cause__ else e
            running = sorted(self.by_id)
            log.critical("engine stopped: %s: %s (requests in flight: %s); the process must be restarted",
                         type(cause).__name__, cause, ", ".join(running[:16]) or "none", exc_info=cause)
            self.dead = cause
            err = EngineDead(f"the engine stopped ({type(cause).__name__}: {str(cause)[:200]}); "
                             "this replica is restarting, retry", retry_after=5.0)
            for seq in list(self.by_id.values()):
                seq.emit([], "error", err)
            self.by_id.clear()
            self._fail_inbox(err)

    def _capture_idle(self) -> None:
        """Capture one pending graph. A capture that fails for a reason the device survives leaves that bucket
        to run eagerly; a fault that poisons the context stops the engine."""
        try:
            self.runner.capture_pending()
        except Exception as e:  # noqa: BLE001
            if is_fatal_device_error(e):
                raise FatalDeviceError(str(e)) from e
            log.warning("idle graph capture failed (that bucket runs eagerly): %s: %s", type(e).__name__, e)

    def _fail_inbox(self, err: Exception) -> None:
        while True:
            try:
                kind, item = self.inbox.get_nowait()
            except queue.Empty:
                return
            if kind == "add":
                item.emit([], "error", err)
            elif kind == "call":
                item[1].set_exception(err)

    def _drain(self, block: bool, timeout: float = 0.5) -> None:
        try:
            item = self.inbox.get(timeout=timeout) if block else self.inbox.get_nowait()
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
            elif kind == "call":
                fn, fut = obj
                try:
                    fut.set_result(fn())
                except Exception as e:  # noqa: BLE001
                    fut.set_exception(e)
                    if is_fatal_device_error(e):
                        raise FatalDeviceError(str(e)) from e
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
        decoding = any(s.slot >= 0 and s.generated for s in self.by_id.values())
        chunks = self.scheduler.schedule(decoding=decoding)
        if chunks:
            t = time.perf_counter()
            self._prefill(chunks)
            dt = time.perf_counter() - t
            st["prefills"] += 1
            st["prefill_seqs"] += sum(c.final for c in chunks)
            st["prefill_tokens"] += sum(c.tokens for c in chunks)
            st["prefill_s"] += dt
            metrics.observe_engine_step("prefill", dt)
        running = [s for s in self.by_id.values() if s.slot >= 0 and s.generated]
        if running:
            t = time.perf_counter()
            self._decode(running)
            dt = time.perf_counter() - t
            st["decode_steps"] += 1
            st["decode_rows"] += len(running)
            st["decode_s"] += dt
            metrics.observe_engine_step("decode", dt)

    def _prefill(self, chunks) -> None:
        """Run this step's prefill chunks: those from position 0 batched in one forward, each continuing chunk
        (after a reused prefix or an earlier chunk) in its own forward with flash-capable causal attention."""
        ready = []
        for c in chunks:
            seq = c.seq
            if c.first:
                seq.slot = c.slot
                seq.cached_tokens = c.reuse
                try:   # per-request setup: a failure here fails this request only
                    if c.copy_from is not None:
                        self.runner.copy_prefix(c.copy_from, c.slot, c.reuse)
                    seq.row = self.sampler.reset_slot(c.slot, seq.prompt.token_ids, seq.params, seq.stop_ids)
                except Exception as e:  # noqa: BLE001
                    self._step_failed([seq], e)
                    continue
                metrics.observe_prefix_cache(c.reuse, seq.prompt.length)
            ready.append(c)
        for group in _prefill_groups(ready):
            self._prefill_group(group)

    def _prefill_group(self, chunks) -> None:
        seqs = [c.seq for c in chunks]
        items = [PrefillItem(slot=c.slot, token_ids=c.seq.prompt.token_ids, start=c.start, end=c.end,
                             position_ids=c.seq.prompt.position_ids, images=c.seq.prompt.images,
                             features=c.seq.image_features) for c in chunks]
        try:
            logits = self.runner.prefill(items)
            done = [i for i, c in enumerate(chunks) if c.final]
            if done:
                rows = self.runner.stage_rows([chunks[i].slot for i in done])
                sel = logits if len(done) == len(chunks) else logits[torch.tensor(done, device=logits.device)]
                toks = self.sampler.sample(sel, rows, [seqs[i].row for i in done])
        except Exception as e:  # noqa: BLE001
            self._step_failed(seqs, e)
            return
        for c in chunks:
            self.scheduler.chunk_done(c)
            if c.final:
                c.seq.image_features = {}
        if done:
            self._accept([seqs[i] for i in done], toks, rows)

    def _decode(self, seqs: list[Sequence]) -> None:
        tokens = {s.slot: s.generated[-1] for s in seqs}
        positions = {s.slot: len(s.prompt.token_ids) + len(s.generated) - 1 for s in seqs}
        deltas = {s.slot: s.prompt.rope_delta for s in seqs}
        try:
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
        if is_fatal_device_error(e):   # every later step would fail too: stop serving, get restarted
            raise FatalDeviceError(str(e)) from e
        oom = isinstance(e, torch.OutOfMemoryError) if hasattr(torch, "OutOfMemoryError") else False
        log.error("step failed for %d request(s): %s: %s", len(seqs), type(e).__name__, e)
        err = GenerationFailed("out of GPU memory while serving this request; retry later" if oom else
                               f"generation failed: {type(e).__name__}: {e}", retry_after=1.0)
        for seq in seqs:
            self._fail(seq, err)
        if oom and torch.cuda.is_available():
            torch.cuda.empty_cache()
