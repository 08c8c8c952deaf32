"""LocalEngine: the in-process engine behind the EngineClient interface.

Importing this module is cheap (no torch): `start_loading()` imports and loads everything on a background
thread, so func-python's `start()` returns at once and the probes answer while the model loads. Requests are
prepared (chat template, image processor) in a small thread pool, queued to the engine thread, and their
tokens flow back to each request's coroutine through an asyncio queue.
"""
from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
import weakref
from concurrent.futures import ThreadPoolExecutor
from typing import AsyncIterator

from .. import metrics
from ..config import Config
from ..errors import unready
from .protocol import (FAILED_GRACE_S, ChatInput, CompletionChunk, EngineClient, EngineDead, EngineError,
                       InvalidInput, Overloaded, SamplingParams, TokenLogprob)

log = logging.getLogger(__name__)

AFTER_READY_QUIET_S = 1.0             # no request for this long before the after-ready work starts
AFTER_READY_SAVE_MAX_WAIT_S = 120.0   # a never-quiet replica still writes its pre-quantized copy
IDLE_STEP_QUIET_S = 0.1               # between two steps of the loader's idle work
_DONE = object()


def _host_memory_bytes() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 8 * 2**30


class LocalEngine(EngineClient):
    def __init__(self, config: Config):
        self.config = config
        self.max_model_len = 0
        self.phase = "starting"
        self.error: str | None = None
        self._failed_at: float | None = None
        self._ready = False
        self._stopping = False
        self._core = None
        self._preparer = None
        self._tokenizer = None
        self._eos: frozenset[int] = frozenset()
        self._pool = ThreadPoolExecutor(max_workers=4, thread_name_prefix="prepare")
        self._pending = 0            # accepted, not yet admitted to a slot (being prepared or waiting)
        self._save_prequantized = None   # the pre-quantized copy's write, run after ready (loader.load defer_save)
        self._idle_work: list = []       # loader.Loaded.idle_work: (phase, steps) run on the engine thread when idle
        # event loop -> its _LoopMailbox (the server's loop; the warm-up's short-lived ones go with their loops)
        self._mailboxes: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
        self._lock = threading.Lock()
        self.choices = None
        self.timings: dict[str, float] = {}
        self.default_sampling: dict = {}
        self.vocab_size = 0

    # ------------------------------------------------------------------ lifecycle
    def start_loading(self) -> None:
        threading.Thread(target=self._load, name="engine-load", daemon=True).start()

    def _set_phase(self, phase: str) -> None:
        self.phase = phase
        log.info("engine: %s", phase)

    def _load(self) -> None:
        t0 = time.perf_counter()
        try:
            self._build()
            if self.config.warmup:
                self._set_phase("warmup")
                t = time.perf_counter()
                self._warmup()
                self.timings["warmup"] = round(time.perf_counter() - t, 3)
            self.timings["total"] = round(time.perf_counter() - t0, 3)
            for k, v in self.timings.items():
                if k != "graphs":   # a count, not a duration
                    metrics.set_cold_start_phase(k, v)
            self._ready = True
            self._set_phase("ready")
            log.info("engine ready in %.1fs: %s", self.timings["total"], self.timings)
            if self.config.warmup or self._save_prequantized is not None or self._idle_work:
                threading.Thread(target=self._after_ready, name="engine-after-ready", daemon=True).start()
        except Exception as e:  # noqa: BLE001 - reported through readiness, then liveness
            log.exception("model load failed")
            self.error = f"{type(e).__name__}: {e}"
            self._failed_at = time.monotonic()
            self._set_phase(f"failed: {self.error}")

    def _build(self) -> None:
        from . import loader
        self._set_phase("loading: resolving model")
        loaded = loader.load(self.config, on_phase=lambda p: self._set_phase(f"loading: {p}"), defer_save=True)
        self._save_prequantized = loaded.save_prequantized
        self._idle_work = loaded.idle_work
        self.timings.update(loaded.choices.timings)
        self.choices = loaded.choices
        c = loaded.choices
        metrics.set_model_info(model=self.config.served_model_name, quantization=c.quantization,
                               attn_implementation=c.attn_implementation, device=c.device, dtype=c.dtype,
                               model_impl=c.model_impl)

        import torch
        from .core import EngineCore
        from .inputs import InputPreparer
        from .runner import ModelRunner
        from .sampling import Sampler
        from .scheduler import Scheduler
        from .kv_cache import SlotKVCache

        torch.set_grad_enabled(False)
        model = loaded.model
        tcfg = model.config.text_config
        max_len = self.config.max_model_len or min(int(tcfg.max_position_embeddings), 16384)
        head_dim = getattr(tcfg, "head_dim", None) or tcfg.hidden_size // tcfg.num_attention_heads
        dtype = model.lm_head.weight.dtype
        per_tok = SlotKVCache.bytes_per_token(tcfg.num_hidden_layers, tcfg.num_key_value_heads, head_dim, dtype)
        slots = self.config.max_num_seqs
        fit = self._fit_kv(torch, loaded, tcfg.num_hidden_layers, per_tok // tcfg.num_hidden_layers, slots, max_len)
        for note in fit.notes:
            log.warning("%s", note)
        slots, max_len = fit.slots, fit.max_len
        self.max_model_len = max_len
        self._set_phase("loading: kv cache")
        t = time.perf_counter()
        tok = loaded.tokenizer
        pad = tok.pad_token_id if tok.pad_token_id is not None else 0
        runner = ModelRunner(model, num_slots=slots, max_len=max_len,
                             use_graphs=self.config.cuda_graphs, graph_batch_sizes=self.config.cuda_graph_batch_sizes,
                             pad_token_id=pad, rotary_kernels=self.config.rotary_kernels)
        sampler = Sampler(slots, runner.vocab, runner.device)
        sched = Scheduler(slots, self.config.max_prefill_tokens, self.config.prefix_caching,
                          chunk_tokens=self.config.prefill_chunk_tokens,
                          encoder_tokens=self.config.prefill_encoder_tokens,
                          split_encodes=self.config.prefill_split_encodes and runner.splits_encodes)
        self._core = EngineCore(runner, sched, sampler, max_len)
        self.timings["kv_cache"] = round(time.perf_counter() - t, 3)
        if runner.rope_check:
            self.timings["rope_check"] = runner.rope_check["seconds"]
        self._preparer = InputPreparer(loaded.processor, model, max_len)
        self._tokenizer = tok
        eos = loaded.generation_config.eos_token_id
        eos = [eos] if isinstance(eos, int) else list(eos or [])
        if tok.eos_token_id is not None:
            eos.append(tok.eos_token_id)
        self._eos = frozenset(int(e) for e in eos)
        self.num_slots = slots
        self.vocab_size = int(runner.vocab)
        if self.config.generation_config == "auto":
            from .protocol import generation_defaults
            self.default_sampling = generation_defaults(loaded.generation_config)
            if self.default_sampling:
                log.info("default sampling parameters from the checkpoint's generation_config.json: %s "
                         "(set GENERATION_CONFIG=vllm to use vLLM's defaults instead)", self.default_sampling)
        else:
            self.default_sampling = {}
            log.info("GENERATION_CONFIG=vllm: the checkpoint's generation_config.json sampling values are not used")
        self._core.start()

    def _fit_kv(self, torch, loaded, num_layers: int, per_tok_layer: int, slots: int, max_len: int):
        """One KV sizing path for one card and for several: each card gives its layers' KV what is left of
        GPU_MEMORY_UTILIZATION x its total memory after this process's own use (weights) and a reserve for
        activations, cuBLAS/cuDNN workspaces and graph pools; fit_kv turns that into slots x length, or a clear
        error when not even one sequence fits."""
        from .placement import fit_kv

        if loaded.placement is not None:
            devices, layers = list(loaded.placement.devices), list(loaded.placement.layers_per_device)
        else:
            devices, layers = [loaded.choices.device], [num_layers]
        if not devices[0].startswith("cuda"):
            # CPU: room for every slot at full length, within a quarter of the machine's memory
            need = num_layers * slots * (max_len + 1) * per_tok_layer
            budgets = [min(max(512 * 2**20, need), _host_memory_bytes() // 4)]
        else:
            budgets = [self._card_kv_budget(torch, d, slots) for d in devices]
        return fit_kv(layers, budgets, per_tok_layer, slots, max_len, device_names=[str(d) for d in devices])

    def _card_kv_budget(self, torch, device: str, slots: int) -> int:
        from .placement import PlacementError, default_reserve_bytes

        free, total = torch.cuda.mem_get_info(device)
        ours = torch.cuda.memory_reserved(device)
        reserve = default_reserve_bytes(slots)
        share = int(total * self.config.gpu_memory_utilization)
        budget = share - ours - reserve
        if budget > free - reserve:
            # something outside this engine (another process, a pod still exiting) holds the room the budget
            # counts on: say so now instead of failing later inside a graph capture or a cuBLAS workspace
            others = max(0, total - free - ours)
            g = 2**30
            raise PlacementError(
                f"not enough free GPU memory on {device}: GPU_MEMORY_UTILIZATION={self.config.gpu_memory_utilization:g}"
                f" of {total / g:.1f} GiB gives this engine {share / g:.1f} GiB; it holds {ours / g:.1f} GiB "
                f"(weights) and needs {reserve / g:.1f} GiB of reserve plus its KV cache, but only {free / g:.1f} GiB "
                f"are free: {others / g:.1f} GiB are held outside this engine (other processes, CUDA contexts). "
                f"Free the card or lower GPU_MEMORY_UTILIZATION to "
                f"{max(0.05, (free + ours) / total - 0.02):.2f}")
        return max(0, budget)

    def _warmup(self) -> None:
        """Capture the graphs a first request uses, then push one small image request through the whole path."""
        from PIL import Image

        runner = self._core.runner
        t = time.perf_counter()
        n = 0
        if runner.use_graphs:
            # before ready: the graphs the first request after scale-from-zero uses (one stream at every context
            # length: an agent turn of 5-6k tokens decodes in the top bucket; its short prefill shapes). Each costs
            # ~0.3 s of a cold start on an H200 (8 graphs: 2.7 s of a 10 s start, bench/RESULTS.md); the engine
            # captures the rest of the plan when idle, most needed first (small batches at short context next)
            import torch
            plan = runner.graph_plan(runner.len_buckets[-1])
            first = [k for k in plan if (k[0] != "prefill" and k[0] == 1)
                     or k in (("prefill", 1, 256), ("prefill", 1, 512))]

            def capture_first():
                # on the engine thread: the one that runs the model, with its cuBLAS handles and capture stream
                each = []
                for k in first:
                    t0 = time.perf_counter()
                    runner.capture(k)
                    each.append(f"{k}: {time.perf_counter() - t0:.3f}s")
                torch.cuda.synchronize()
                runner.pending = [k for k in plan if k not in runner.graphs]
                log.info("graphs captured before ready: %s", ", ".join(each))

            self._core.call(capture_first).result()
            n = len(first)
        self.timings["graph_capture"] = round(time.perf_counter() - t, 3)
        self.timings["graphs"] = n
        # before ready, one request shaped like a phone agent's first (a small screenshot and text): the vision
        # tower, a prefill and decode steps run once; full-size screenshots and batched prompts in _warmup_rest
        img = Image.new("RGB", (224, 224 * 20 // 9), (40, 120, 200))
        t = time.perf_counter()
        self._run_warmup([ChatInput(messages=[{"role": "user", "content": [{"type": "image", "image": img},
                                                                           {"type": "text", "text": "warm up"}]}])])
        self.timings["warmup_request"] = round(time.perf_counter() - t, 3)

    def _after_ready(self) -> None:
        """Work that readiness does not wait for (the loader's idle work, e.g. fp8's kernel compiles, then the
        full-size warm-up, then the pre-quantized copy), started only once no request has been in the engine for
        AFTER_READY_QUIET_S: after a scale from zero the activator forwards the requests it held the moment
        readiness passes, and they must not queue behind this work (measured on an H200: the first request's TTFT
        0.45-0.97 s behind the warm-up, 3.5 s behind the fp8 copy's write). The copy is written after
        AFTER_READY_SAVE_MAX_WAIT_S even on a replica that is never quiet."""
        for phase, steps in self._idle_work:
            if not self._run_idle_steps(phase, steps):
                return
        self._idle_work = []
        if self.config.warmup and self._wait_quiet(AFTER_READY_QUIET_S, None):
            self._warmup_rest()
        if self._save_prequantized is not None and self._wait_quiet(AFTER_READY_QUIET_S,
                                                                    AFTER_READY_SAVE_MAX_WAIT_S):
            self._write_prequantized()

    def _run_idle_steps(self, phase: str, steps) -> bool:
        """Each step on the engine thread (where the model runs: no launch beside a graph capture), the first after
        AFTER_READY_QUIET_S of quiet and each next after IDLE_STEP_QUIET_S, so a request that arrives meanwhile
        waits for one step at most; the steps' own seconds become `phase`. False when the engine shuts down."""
        busy, quiet = 0.0, AFTER_READY_QUIET_S
        def step() -> tuple[bool, float]:               # timed on the engine thread: not the wait for a turn
            t = time.perf_counter()
            more = next(steps, _DONE) is not _DONE
            return more, time.perf_counter() - t

        while self._wait_quiet(quiet, None):
            try:
                more, secs = self._core.call(step).result()
            except Exception as e:  # noqa: BLE001 - serving goes on; a request meets that path on its own
                log.warning("%s after ready failed: %s: %s", phase, type(e).__name__, e)
                return True
            busy += secs
            if not more:
                self.timings[phase] = round(busy, 3)
                metrics.set_cold_start_phase(phase, self.timings[phase])
                log.info("%s done after ready: %.2fs", phase, busy)
                return True
            quiet = IDLE_STEP_QUIET_S
        return False

    def _wait_quiet(self, quiet_s: float, max_wait_s: float | None) -> bool:
        """Block until no request has been queued, prepared or running for `quiet_s` (or `max_wait_s` passed);
        False when the engine is shutting down instead."""
        start = quiet_since = time.monotonic()
        while not self._stopping:
            now = time.monotonic()
            if not self.idle() or self._pending:
                quiet_since = now
            elif now - quiet_since >= quiet_s:
                return True
            if max_wait_s is not None and now - start >= max_wait_s:
                return True
            time.sleep(0.02)
        return False

    def _write_prequantized(self) -> None:
        """After ready, beside serving: the pre-quantized copy that later starts load (a first start that quantized
        does not wait for the write; the copy appears atomically when it is whole)."""
        seconds = self._save_prequantized()
        self._save_prequantized = None
        if seconds is not None:
            self.timings["save_prequantized"] = seconds
            metrics.set_cold_start_phase("save_prequantized", seconds)

    def _warmup_rest(self) -> None:
        """After ready, beside real requests: several text prompts (a batched prefill) and a full-size screenshot,
        whose first run would otherwise fall on a client's request."""
        from PIL import Image

        side = 1080 if self._core.runner.device.type == "cuda" else 224
        img = Image.new("RGB", (side, side * 20 // 9), (40, 120, 200))
        chats = [ChatInput(messages=[{"role": "user", "content": f"warm up {i} " + "tap the button " * 60}])
                 for i in range(4)]
        chats.append(ChatInput(messages=[{"role": "user", "content": [{"type": "image", "image": img},
                                                                      {"type": "text", "text": "warm up"}]}]))
        t = time.perf_counter()
        try:
            self._run_warmup(chats)
        except Exception as e:  # noqa: BLE001 - serving goes on; a real request would meet the same error
            log.warning("warm-up after ready failed: %s: %s", type(e).__name__, e)
            return
        self.timings["warmup_after_ready"] = round(time.perf_counter() - t, 3)
        metrics.set_cold_start_phase("warmup_after_ready", self.timings["warmup_after_ready"])
        log.info("warm-up after ready done in %.1fs", self.timings["warmup_after_ready"])

    def _run_warmup(self, chats: list[ChatInput]) -> None:
        params = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)

        async def run_all():
            async def one(i, chat):
                async for _ in self._generate(f"warmup-{id(chat)}-{i}", chat, params, warmup=True):
                    pass
            await asyncio.gather(*(one(i, c) for i, c in enumerate(chats)))

        asyncio.run(run_all())

    def status(self) -> tuple[bool, bool, str]:
        if self._failed_at is not None:
            alive = time.monotonic() - self._failed_at < FAILED_GRACE_S
            return alive, False, self.phase
        if self._core is not None and self._core.dead is not None:
            return False, False, f"engine stopped: {self._core.dead}"
        if self._stopping:
            return True, False, "shutting down"
        return True, self._ready, "ready" if self._ready else self.phase

    # ------------------------------------------------------------------ observation (tests, the bench, /metrics)
    def idle(self) -> bool:
        """No request is queued or running on the engine thread (aborts included once it has seen them)."""
        return self._core is None or not self._core.by_id

    def stats(self) -> dict:
        """Cumulative engine-step counters (prefills, prefill tokens and seconds, decode steps and rows, ...)."""
        return dict(self._core.stats) if self._core is not None else {}

    @property
    def core(self):
        """The EngineCore (the engine thread, its scheduler and sampler), for the bench: `core.call(fn)` runs fn
        on the engine thread; None before load."""
        return self._core

    @property
    def runner(self):
        """The loaded ModelRunner (the model, its graphs and cache), for the bench and tests; None before load."""
        return self._core.runner if self._core is not None else None

    def shutdown(self, timeout: float = 30.0) -> None:
        self._stopping = True
        if self._core is not None:
            self._core.stop(timeout)
        self._pool.shutdown(wait=False, cancel_futures=True)

    # ------------------------------------------------------------------ requests
    def _mailbox(self, loop: asyncio.AbstractEventLoop) -> "_LoopMailbox":
        with self._lock:
            box = self._mailboxes.get(loop)
            if box is None:
                box = self._mailboxes[loop] = _LoopMailbox(loop)
            return box

    def generate(self, request_id: str, chat: ChatInput, params: SamplingParams) -> AsyncIterator[CompletionChunk]:
        self._require_ready()
        return self._generate(request_id, chat, params)

    async def _generate(self, request_id: str, chat: ChatInput, params: SamplingParams,
                        warmup: bool = False) -> AsyncIterator[CompletionChunk]:
        from .core import Sequence
        from .detokenizer import OutputText

        with self._lock:
            # MAX_QUEUE_SIZE counts requests waiting beyond the free batch slots (read without a lock: a heuristic)
            free = max(0, self.num_slots - (len(self._core.by_id) - len(self._core.scheduler.waiting)))
            if not warmup and self._pending >= self.config.queue_limit + free:
                raise Overloaded(f"the server is at capacity ({self._pending} requests waiting); retry later",
                                 retry_after=1.0)
            self._pending += 1
            metrics.set_queue_depth(self._pending)
        loop = asyncio.get_running_loop()
        admitted = False
        try:
            prompt = await loop.run_in_executor(self._pool, self._preparer.prepare, chat, params)
        except BaseException:
            with self._lock:
                self._pending -= 1
                metrics.set_queue_depth(self._pending)
            raise
        max_new = params.max_tokens or (self.max_model_len - prompt.length)
        max_new = min(max_new, self.max_model_len - prompt.length)
        out: asyncio.Queue = asyncio.Queue()

        mailbox = self._mailbox(loop)

        def emit(tokens, finish, error, logprobs=None):
            mailbox.post(out, (tokens, finish, error, logprobs))

        stop_ids = frozenset(params.stop_token_ids) | (frozenset() if params.ignore_eos else self._eos)
        seq = Sequence(request_id=request_id, prompt=prompt, params=params, emit=emit, max_new=max_new,
                       stop_ids=stop_ids)
        text = OutputText(self._tokenizer, params.stop, params.skip_special_tokens, stop_token_ids=stop_ids,
                          include_stop=params.include_stop_str_in_output, min_tokens=params.min_tokens)
        core = self._core
        core.submit(seq)
        finished = False
        n_out = 0
        try:
            while True:
                tokens, finish, error, packed = await out.get()
                packs = [packed] if packed is not None else []
                # a consumer that fell behind takes everything the engine has produced since, in one chunk (as
                # vLLM's RequestOutputCollector merges outputs): under load the event loop then detokenizes, encodes
                # and sends one SSE event per request per wake-up instead of one per token, and the loop's work (and
                # its hold on the GIL, which the engine thread needs between steps) stops growing with the batch
                while finish is None and error is None and not out.empty():
                    more, finish, error, packed = out.get_nowait()
                    tokens = tokens + more
                    if packed is not None:
                        packs.append(packed)
                if not admitted:
                    admitted = True
                    with self._lock:
                        self._pending -= 1
                        metrics.set_queue_depth(self._pending)
                if error is not None:
                    finished = True
                    raise error if isinstance(error, EngineError) else EngineDead(str(error))
                n_out += len(tokens)
                delta = text.add(tokens, final=finish is not None)
                lps = self._logprobs(tokens, packs) if packs else None
                if text.stop_hit is not None and finish is None:
                    core.abort(request_id)
                    finish = "stop"
                if finish == "stop" and tokens and tokens[-1] in stop_ids:
                    stop_reason = tokens[-1]
                else:
                    stop_reason = text.stop_hit
                if finish is not None:
                    finished = True
                    if text.stop_hit is None:
                        delta += text.flush()
                    yield CompletionChunk(text=delta, token_ids=tokens, finish_reason=finish,
                                          prompt_tokens=prompt.length, completion_tokens=n_out,
                                          cached_prompt_tokens=seq.cached_tokens, stop_reason=stop_reason,
                                          logprobs=lps)
                    return
                yield CompletionChunk(text=delta, token_ids=tokens, prompt_tokens=prompt.length,
                                      completion_tokens=n_out, cached_prompt_tokens=seq.cached_tokens, logprobs=lps)
        finally:
            if not admitted:
                with self._lock:
                    self._pending -= 1
                    metrics.set_queue_depth(self._pending)
            if not finished:
                core.abort(request_id)

    @staticmethod
    def _logprobs(tokens: list[int], packs: list[list[float]]) -> list[TokenLogprob]:
        """One entry per token that carried logprobs (each emit of a token carries its own; a final emit with no
        token carries none), in order: they are the last len(packs) of `tokens`."""
        from .sampling import Sampler
        out = []
        for tok, packed in zip(tokens[len(tokens) - len(packs):], packs):
            lp, top = Sampler.unpack_logprobs(tok, packed)
            out.append(TokenLogprob(token_id=tok, logprob=lp, top=top))
        return out

    # --- tokenizer endpoints (vLLM's /tokenize, /detokenize) and logprobs' token texts
    async def tokenize(self, chat: ChatInput | None = None, prompt: str | None = None,
                       add_special_tokens: bool = True) -> list[int]:
        self._require_ready()
        loop = asyncio.get_running_loop()
        if chat is not None:
            params = SamplingParams(max_tokens=1)
            prepared = await loop.run_in_executor(self._pool, self._preparer.prepare, chat, params, False)
            return prepared.token_ids
        return await loop.run_in_executor(
            self._pool, lambda: self._tokenizer(prompt, add_special_tokens=add_special_tokens)["input_ids"])

    async def detokenize(self, token_ids: list[int]) -> str:
        self._require_ready()
        bad = [t for t in token_ids if not 0 <= t < len(self._tokenizer)]
        if bad:
            raise InvalidInput(f"token ids {bad[:5]} are not in the vocabulary (0..{len(self._tokenizer) - 1})",
                               param="tokens")
        return self._tokenizer.decode(token_ids)

    def token_texts(self, token_ids: list[int]) -> list[str]:
        return [self._tokenizer.decode([t]) for t in token_ids]

    def _require_ready(self) -> None:
        refusal = unready("the model", self.status())
        if refusal is not None:
            raise refusal

    async def abort(self, request_id: str) -> None:
        if self._core is not None:
            self._core.abort(request_id)

    # ------------------------------------------------------------------ for tests and the bench (no private reach-in)
    @property
    def preparer(self):
        """The loaded InputPreparer (chat template, image processor, positions); None before load."""
        return self._preparer

    @property
    def tokenizer(self):
        """The loaded tokenizer; None before load."""
        return self._tokenizer

    def set_prefix_caching(self, on: bool) -> None:
        """Reuse cached prompt prefixes (PREFIX_CACHING) or not, for requests admitted from now on."""
        self._core.scheduler.prefix_caching = on


class _LoopMailbox:
    """The engine thread's outputs for the requests of one event loop, handed over with one wake-up per batch.

    `call_soon_threadsafe` writes to the loop's self-pipe, a syscall on the engine thread, at every call: the first
    output posted since the last flush schedules one flush, the others of the step ride along, and the flush puts
    each into its request's queue. The loop is held weakly, so LocalEngine's loop -> mailbox map lets it go."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self._loop = weakref.ref(loop)
        self._items: list = []
        self._lock = threading.Lock()

    def post(self, queue: asyncio.Queue, item) -> None:
        with self._lock:
            first = not self._items
            self._items.append((queue, item))
        if first:
            loop = self._loop()
            try:
                if loop is None:
                    raise RuntimeError("event loop collected")
                loop.call_soon_threadsafe(self._flush)
            except RuntimeError:  # the loop is closed or gone: nobody is listening
                with self._lock:
                    self._items.clear()

    def _flush(self) -> None:
        with self._lock:
            items, self._items = self._items, []
        for queue, item in items:
            queue.put_nowait(item)
