"""LocalEngine: the in-process engine behind the EngineClient interface.

Importing this module is cheap (no torch): `start_loading()` imports and loads everything on a background
thread, so func-python's `start()` returns at once and the probes answer while the model loads. Requests are
prepared (chat template, image processor) in a small thread pool, queued to the engine thread, and their
tokens flow back to each request's coroutine through an asyncio queue.
"""
from __future__ import annotations

import asyncio
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import AsyncIterator

from .. import metrics
from ..config import Config
from .protocol import (ChatInput, CompletionChunk, EngineClient, EngineDead, EngineError, InvalidInput, NotReady,
                       Overloaded, SamplingParams, TokenLogprob)

log = logging.getLogger(__name__)

FAILED_GRACE_S = 30.0   # after a fatal load error, liveness stays up this long so readiness can say why


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
        except Exception as e:  # noqa: BLE001 - reported through readiness, then liveness
            log.exception("model load failed")
            self.error = f"{type(e).__name__}: {e}"
            self._failed_at = time.monotonic()
            self._set_phase(f"failed: {self.error}")

    def _build(self) -> None:
        from . import loader
        self._set_phase("loading: resolving model")
        loaded = loader.load(self.config, on_phase=lambda p: self._set_phase(f"loading: {p}"))
        self.timings.update(loaded.choices.timings)
        self.choices = loaded.choices
        c = loaded.choices
        metrics.set_model_info(model=self.config.served_model_name, quantization=c.quantization,
                               attn_implementation=c.attn_implementation, device=c.device, dtype=c.dtype)

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
        budget = self._kv_budget(torch, loaded.choices.device, slots)
        if loaded.placement is not None:
            # split model: each card holds the KV of its own layers; the card with the least room sets the size
            from .placement import default_reserve_bytes, fit_kv

            budgets = []
            for d in loaded.placement.devices:
                free, total = torch.cuda.mem_get_info(d)
                budgets.append(int(total * self.config.gpu_memory_utilization) - (total - free)
                               - default_reserve_bytes(slots))
            fit = fit_kv(loaded.placement.layers_per_device, budgets, per_tok // tcfg.num_hidden_layers, slots,
                         max_len, device_names=[str(d) for d in loaded.placement.devices])
            for note in fit.notes:
                log.warning("%s", note)
            slots, max_len = fit.slots, fit.max_len
            budget = slots * (max_len + 1) * per_tok
        if slots * (max_len + 1) * per_tok > budget:
            fit_slots = max(1, budget // ((max_len + 1) * per_tok))
            if fit_slots < slots:
                log.warning("KV cache budget %.1f GiB holds %d slots of %d tokens, not MAX_NUM_SEQS=%d",
                            budget / 2**30, fit_slots, max_len, slots)
                slots = int(fit_slots)
            if budget < (max_len + 1) * per_tok:
                max_len = int(budget // per_tok) - 1
                log.warning("KV cache budget limits MAX_MODEL_LEN to %d", max_len)
        self.max_model_len = max_len
        self._set_phase("loading: kv cache")
        t = time.perf_counter()
        tok = loaded.tokenizer
        pad = tok.pad_token_id if tok.pad_token_id is not None else 0
        runner = ModelRunner(model, num_slots=slots, max_len=max_len,
                             use_graphs=self.config.cuda_graphs, graph_batch_sizes=self.config.cuda_graph_batch_sizes,
                             pad_token_id=pad)
        sampler = Sampler(slots, runner.vocab, runner.device)
        sched = Scheduler(slots, self.config.max_prefill_tokens, self.config.prefix_caching)
        self._core = EngineCore(runner, sched, sampler, max_len)
        self.timings["kv_cache"] = round(time.perf_counter() - t, 3)
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

    def _kv_budget(self, torch, device: str, slots: int) -> int:
        if device.startswith("cuda"):
            free, total = torch.cuda.mem_get_info()
            used = total - free
            reserve = 2 * 2**30 + 512 * 2**20 * max(1, slots // 8)   # activations, graphs, vision tower, sampler
            return max(0, int(total * self.config.gpu_memory_utilization) - used - reserve)
        return 640 * 2**20    # CPU: the tiny model's default 32 slots x 16384 tokens (537 MB) fit

    def _warmup(self) -> None:
        """Capture the decode graphs, then push a text and an image request through the whole path."""
        from PIL import Image

        runner = self._core.runner
        t = time.perf_counter()
        n = 0
        if runner.use_graphs:
            # before ready: the graphs a first request after scale-from-zero uses (small batches, short and
            # screenshot-length context, a short prompt); the engine captures the rest when idle (or on first use)
            import torch
            plan = runner.graph_plan(min(4096, runner.len_buckets[-1]))
            first = [k for k in plan if (k[0] != "prefill" and k[0] <= 8 and k[1] == runner.len_buckets[0])
                     or (k[0] != "prefill" and k[0] == 1) or k in (("prefill", 1, 256), ("prefill", 1, 512))]
            for k in first:
                runner.capture(k)
            torch.cuda.synchronize()
            runner.pending = [k for k in plan if k not in runner.graphs]
            n = len(first)
        self.timings["graph_capture"] = round(time.perf_counter() - t, 3)
        self.timings["graphs"] = n
        side = 1080 if runner.device.type == "cuda" else 224
        img = Image.new("RGB", (side, side * 20 // 9), (40, 120, 200))
        # several text prompts (a batched prefill) and a screenshot (the vision tower)
        chats = [ChatInput(messages=[{"role": "user", "content": f"warm up {i} " + "tap the button " * 60}])
                 for i in range(4)]
        chats.append(ChatInput(messages=[{"role": "user", "content": [{"type": "image", "image": img},
                                                                      {"type": "text", "text": "warm up"}]}]))
        params = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)

        async def run_all():
            async def one(i, chat):
                async for _ in self._generate(f"warmup-{i}", chat, params, warmup=True):
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

    def shutdown(self, timeout: float = 30.0) -> None:
        self._stopping = True
        if self._core is not None:
            self._core.stop(timeout)
        self._pool.shutdown(wait=False, cancel_futures=True)

    # ------------------------------------------------------------------ requests
    def generate(self, request_id: str, chat: ChatInput, params: SamplingParams) -> AsyncIterator[CompletionChunk]:
        alive, ready, msg = self.status()
        if not ready:
            raise NotReady(f"the model is not ready ({msg})", retry_after=5.0) if alive else \
                EngineDead(f"the engine is not running ({msg})")
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

        def emit(tokens, finish, error, logprobs=None):
            try:
                loop.call_soon_threadsafe(out.put_nowait, (tokens, finish, error, logprobs))
            except RuntimeError:  # the requester's event loop is gone; nobody is listening
                pass

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
                lps = self._logprobs(tokens, packed) if packed is not None else None
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
    def _logprobs(tokens: list[int], packed: list[float]) -> list[TokenLogprob]:
        from .sampling import Sampler
        lp, top = Sampler.unpack_logprobs(tokens[-1], packed)
        return [TokenLogprob(token_id=tokens[-1], logprob=lp, top=top)]

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
        alive, ready, msg = self.status()
        if not ready:
            raise NotReady(f"the model is not ready ({msg})", retry_after=5.0) if alive else \
                EngineDead(f"the engine is not running ({msg})")

    async def abort(self, request_id: str) -> None:
        if self._core is not None:
            self._core.abort(request_id)

    # test hook: make the next steps fail (see tests/test_engine_faults)
    def set_fault_hook(self, hook) -> None:
        self._core.fault_hook = hook

