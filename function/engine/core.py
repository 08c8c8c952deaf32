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
from .sampling import HostFetch, RowState, Sampler
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
    inflight: int = 0        # tokens sampled on the device whose values the host has not read yet
    finished: bool = False


@dataclass
class _Launched:
    """A step's forwards whose sampled tokens are on their way to the host."""
    seqs: list[Sequence]
    fetches: list[HostFetch]   # one per forward, their rows in the order of `seqs`
    phase: str                 # "prefill" or "decode", for the step-time metric
    host_s: float              # the host time its launch took


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
        self._pending: list[_Launched] = []   # launched forwards whose tokens the host reads in the next step
        # cumulative step timings (each forward's launch plus the wait for its tokens), for benchmarks and debugging
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
                idle = not self.by_id and not self._pending
                pending_graphs = idle and self.runner.has_idle_work()
                if pending_graphs:   # wait out the rest of the idle delay, waking for any new request
                    wait = self.idle_capture_delay_s - (self._clock() - self._last_work)
                    self._drain(block=wait > 0, timeout=min(max(wait, 0.0), 0.5))
                else:
                    self._drain(block=idle)
                if idle and not self.by_id:
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
            self._pending.clear()
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
        """Launch this step's decode, read the previous step's tokens while the GPU runs it, then launch this step's
        prefill chunks (SGLang's overlap scheduler, vLLM's async scheduling): the host work of a step (emitting
        tokens, finish checks, staging inputs) hides behind the GPU work of the next. A decode step takes its
        input ids from the device (`ModelRunner.feed`), so it never waits for the host to see them; a sequence
        that turns out to have stopped one step earlier wastes one row of one step, whose token is dropped."""
        done, self._pending = self._pending, []
        running = [s for s in self.by_id.values()
                   if s.slot >= 0 and (s.generated or s.inflight) and len(s.generated) + s.inflight < s.max_new]
        chunks = self.scheduler.schedule(decoding=bool(running))
        if running:
            self._launch_decode(running)
        for launched in done:
            self._accept(launched)
        if chunks:
            self._launch_prefill(chunks)

    def _launch_prefill(self, chunks) -> None:
        """Launch this step's prefill chunks: those from position 0 batched in one forward, each continuing chunk
        (after a reused prefix or an earlier chunk) in its own forward with flash-capable causal attention."""
        t = time.perf_counter()
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
        ready = self._encode(ready)
        for c in ready:
            if c.tokens == 0:   # tower work only (a piece of a split encode): no forward this step
                self.scheduler.chunk_done(c)
        seqs, fetches = [], []
        for group in _prefill_groups([c for c in ready if c.tokens > 0]):
            sampled = self._prefill_group(group)
            if sampled:
                seqs += sampled[0]
                fetches.append(sampled[1])
        st = self.stats
        st["prefills"] += 1
        st["prefill_seqs"] += sum(c.final for c in chunks)
        st["prefill_tokens"] += sum(c.tokens for c in chunks)
        self._launched(_Launched(seqs, fetches, "prefill", time.perf_counter() - t))

    def _encode(self, chunks) -> list:
        """This step's vision-tower work (whole encodes batched, pieces of split ones); the chunks still to run."""
        pieces = [(c.seq.image_features, img, a, b) for c in chunks for s0, a, b in c.encodes
                  for img in c.seq.prompt.images if img.start == s0]
        if not pieces:
            return chunks
        try:
            self.runner.encode(pieces)
        except Exception as e:  # noqa: BLE001
            self._step_failed([c.seq for c in chunks if c.encodes], e)
            return [c for c in chunks if not c.encodes]
        return chunks

    def _prefill_group(self, chunks) -> tuple[list[Sequence], HostFetch] | None:
        """Launch one prefill forward; (the sequences whose prompt it completes, their first tokens' fetch)."""
        seqs = [c.seq for c in chunks]
        items = [PrefillItem(slot=c.slot, token_ids=c.seq.prompt.token_ids, start=c.start, end=c.end,
                             position_ids=c.seq.prompt.position_ids, images=c.seq.prompt.images,
                             features=c.seq.image_features) for c in chunks]
        try:
            logits = self.runner.prefill(items)
            done = [i for i, c in enumerate(chunks) if c.final]
            if done:
                rows = self.runner.stage_rows([chunks[i].slot for i in done])
                sel = logits if len(done) == len(chunks) else \
                    logits.index_select(0, self.runner.stage_rows(done))
                fetch = self._sample([seqs[i] for i in done], sel, rows)
        except Exception as e:  # noqa: BLE001
            self._step_failed(seqs, e)
            return None
        for c in chunks:
            self.scheduler.chunk_done(c)
            if c.final:
                c.seq.image_features = {}
        return ([seqs[i] for i in done], fetch) if done else None

    def _launch_decode(self, seqs: list[Sequence]) -> None:
        t = time.perf_counter()
        # the token fed is the last one sampled (read or still in flight); it sits at index generated + inflight - 1
        positions = [len(s.prompt.token_ids) + len(s.generated) + s.inflight - 1 for s in seqs]
        try:
            rows = self.runner.stage_rows([s.slot for s in seqs])
            logits = self.runner.decode([s.slot for s in seqs], positions, [s.prompt.rope_delta for s in seqs])
            fetch = self._sample(seqs, logits.index_select(0, rows), rows)
        except Exception as e:  # noqa: BLE001
            self._step_failed(seqs, e)
            return
        st = self.stats
        st["decode_steps"] += 1
        st["decode_rows"] += len(seqs)
        self._launched(_Launched(seqs, [fetch], "decode", time.perf_counter() - t))

    def _sample(self, seqs: list[Sequence], logits: torch.Tensor, rows: torch.Tensor):
        """Sample the rows' next tokens on the device, count them, feed them to the next decode step and start
        their copy to the host; the host reads them a step later (`_accept`)."""
        toks = self.sampler.sample(logits, rows, [s.row for s in seqs])
        self.sampler.record(rows, toks.clamp(min=0))
        self.runner.feed(rows, toks)
        for s in seqs:
            s.inflight += 1
        return self.sampler.fetch(toks)

    def _launched(self, launched: "_Launched") -> None:
        if launched.fetches:
            self._pending.append(launched)
        else:   # nothing sampled (chunks that end mid-prompt, or every row failed): its launch time is its cost
            self.stats[f"{launched.phase}_s"] += launched.host_s
            metrics.observe_engine_step(launched.phase, launched.host_s)

    def _accept(self, launched: "_Launched") -> None:
        """Read a launched forward's tokens (waiting for that forward alone) and hand them to their requests. A step
        counts as its launch time plus the wait here: the engine's period per step when the GPU is the limit."""
        t = time.perf_counter()
        host, lps = [], []
        for fetch in launched.fetches:
            h, lp = fetch.result()
            host += h
            lps += lp
        dt = launched.host_s + time.perf_counter() - t
        self.stats[f"{launched.phase}_s"] += dt
        metrics.observe_engine_step(launched.phase, dt)
        for seq, tok, lp in zip(launched.seqs, host, lps):
            seq.inflight -= 1
            if seq.finished:   # stopped, aborted or failed since this step was launched: its token is dropped
                continue
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
        seq.finished = True
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
        seq.finished = True
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
