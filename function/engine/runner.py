"""Runs the model: batched prefill (vision tower + text decoder) into cache slots, and batched decode steps,
captured as CUDA graphs per (batch bucket, length bucket) on CUDA and run eagerly on CPU.

Only the engine thread calls this. It uses transformers' modules for all the math (embeddings, vision tower,
decoder layers, lm_head) and owns the cache, the positions and the masks.
"""
from __future__ import annotations

import inspect
import logging
import threading
import time
from dataclasses import dataclass
from typing import Any

import torch

from .kv_cache import ATTN_NAME, SlotKVCache, register_attention
from .staging import to_device

log = logging.getLogger(__name__)


def _buckets(limit: int, base: tuple[int, ...]) -> list[int]:
    """The base sizes below `limit`, and `limit` itself. A base size within 1/8 of the limit is dropped: with
    MAX_MODEL_LEN=8192 the cache holds 8193 positions, and an 8192 bucket next to an 8193 one would double the
    top row of graphs (capture time and memory) to save one position per step."""
    return sorted({b for b in base if b <= limit - limit // 8} | {limit})


def _fused_rms_norm(self, hidden_states: torch.Tensor) -> torch.Tensor:
    # one kernel instead of seven (fp32 statistics as in the original; the weight is applied before the final
    # rounding to the input dtype, a difference within bf16 rounding)
    return torch.nn.functional.rms_norm(hidden_states, self.weight.shape, self.weight, self.variance_epsilon)


def fuse_rms_norms(module: torch.nn.Module) -> int:
    """Swap transformers' eager RMSNorm forward (7 kernels) for torch's fused rms_norm in `module`: decode steps
    are made of hundreds of tiny kernels, and each costs launch time even inside a CUDA graph."""
    if not hasattr(torch.nn.functional, "rms_norm"):
        return 0
    n = 0
    for m in module.modules():
        if type(m).__name__.endswith("RMSNorm") and hasattr(m, "variance_epsilon") and \
                isinstance(getattr(m, "weight", None), torch.nn.Parameter):
            m.forward = _fused_rms_norm.__get__(m)
            n += 1
    return n


PREFILL_GRAPH_ROWS = (1, 2, 4, 8)
PREFILL_GRAPH_LENGTHS = (64, 128, 256, 512, 1024, 2048)
PREFILL_GRAPH_TOKENS = 2048   # larger prefills are compute-bound: eager costs little more than a graph there


@dataclass
class PrefillItem:
    slot: int
    token_ids: list[int]          # the whole prompt
    start: int                    # tokens already in the slot's cache (reused prefix, earlier chunks)
    position_ids: torch.Tensor    # [3, L] for the whole prompt
    images: list                  # the prompt's PromptImages; those overlapping [start, end) are used
    end: int | None = None        # prefill up to here (None: the whole prompt)
    features: dict | None = None  # image start -> vision features, kept across the chunks of one prompt

    @property
    def stop(self) -> int:
        return len(self.token_ids) if self.end is None else self.end


class ModelRunner:
    def __init__(self, model, *, num_slots: int, max_len: int, use_graphs: bool,
                 graph_batch_sizes: tuple[int, ...] = (), pad_token_id: int = 0, rotary_kernels: bool = True):
        self.model = model
        self.lm = model.model.language_model
        self.visual = model.model.visual
        self.lm_head = model.lm_head
        tcfg = model.config.text_config
        self.device = self.lm.embed_tokens.weight.device
        layer_devices = [layer.self_attn.k_proj.weight.device for layer in self.lm.layers]
        self.split = len({str(d) for d in layer_devices} | {str(self.device),
                                                              str(model.lm_head.weight.device)}) > 1
        self.dtype = self.lm.embed_tokens.weight.dtype
        self.image_token_id = int(model.config.image_token_id)
        self.vocab = int(tcfg.vocab_size)
        self.pad_token_id = pad_token_id
        if type(model).__module__.startswith("transformers."):   # the native model calls slot_attention itself
            register_attention()
        tcfg._attn_implementation = ATTN_NAME   # the text decoder only; the vision tower keeps its own
        fuse_rms_norms(self.lm)
        self.rope_check: dict = {}
        if hasattr(model, "fuse_projections"):   # the native model: one q/k/v GEMM per layer
            model.fuse_projections()
            if self.device.type == "cuda" and rotary_kernels:
                self.rope_check = self._check_rope(model)
        self._cache_kw = "cache" if "cache" in inspect.signature(self.lm.forward).parameters else "past_key_values"
        head_dim = getattr(tcfg, "head_dim", None) or tcfg.hidden_size // tcfg.num_attention_heads
        self.max_len = max_len
        self.num_slots = num_slots
        self.cache = SlotKVCache(tcfg.num_hidden_layers, num_slots, tcfg.num_key_value_heads, max_len + 1,
                                 head_dim, self.dtype, self.device, layer_devices)
        self.scratch_pos = max_len     # the extra last position of every slot
        S = num_slots
        dev = self.device
        self.in_ids = torch.zeros(S, 1, dtype=torch.long, device=dev)
        self.in_pos = torch.full((S,), self.scratch_pos, dtype=torch.long, device=dev)
        self.in_delta = torch.zeros(S, dtype=torch.long, device=dev)
        # each slot's last sampled token, written on the device by `feed`: a decode step takes its input ids from
        # here, so it can be launched before the host has read the previous step's tokens
        self.next_ids = torch.zeros(S, dtype=torch.long, device=dev)
        # a split model runs eagerly: one CUDA graph cannot span the cards' streams
        self.use_graphs = use_graphs and self.device.type == "cuda" and not self.split
        self.batch_buckets = _buckets(S, graph_batch_sizes or (1, 2, 4, 8, 16, 32, 48, 64, 96, 128))
        # attention reads the cache up to the bucket length: short chats use 1024, a screenshot alone 4096, an
        # agent turn (system prompt + history + screenshot) 8192
        self.len_buckets = _buckets(max_len + 1, (1024, 4096) + tuple(2 ** i for i in range(13, 20)))
        self.graphs: dict[tuple[int, int], tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self._pool = None
        # every warm run and capture happens on this one stream of the engine thread, so cuBLAS/cuBLASLt/cuDNN
        # handles and workspaces for (thread, stream) exist before a capture needs them (creating one inside a
        # capture fails: CUBLAS_STATUS_NOT_INITIALIZED)
        self._capture_stream = torch.cuda.Stream(self.device) if self.use_graphs else None
        self.engine_thread: int | None = None   # set by the engine loop; captures anywhere else are refused
        self._pf = None
        # tests: run the graphed paths (static buffers, idle-time captures' warm runs) eagerly on CPU
        self.static_prefill = False
        self.pending: list[tuple] = []   # graphs to capture when the engine is idle
        self.capture_seconds = 0.0

    def _check_rope(self, model) -> dict:
        """The native model's rotary kernels (engine/rope.py) are used only after matching the torch ops bit for bit
        on this card, here, before any graph is captured."""
        from . import glm4v, rope
        t = time.perf_counter()
        res = rope.checked(self.device, self.dtype, glm4v.rotary_shapes(model.config))
        res["seconds"] = round(time.perf_counter() - t, 3)
        log.info("rotary kernels: %s", res)
        return res

    # ------------------------------------------------------------------ prefill
    @torch.inference_mode()
    def prefill(self, items: list[PrefillItem]) -> torch.Tensor:
        """Write the KV of prompt tokens [start, end) of each item into its slot and return each item's logits at
        `end - 1` [n, V]. Items either all start at 0 (batched with right padding, plain causal attention), or
        one item continues its slot's cache (a chunk after a reused prefix or an earlier chunk: lower-right
        causal attention over a view of the slot); several continuing items fall back to a dense mask.

        Prefills from position 0 of up to PREFILL_GRAPH_TOKENS tokens replay a CUDA graph captured per (rows, length)
        bucket: there, the eager forward is bound by the CPU launching ~1600 kernels, not by the GPU."""
        dev = self.device
        n = len(items)
        ends = [it.stop for it in items]
        qlens = [e - it.start for it, e in zip(items, ends)]
        q = max(qlens)
        ids = torch.full((n, q), self.pad_token_id, dtype=torch.long)
        pos = torch.zeros(3, n, q, dtype=torch.long)
        for i, (it, e) in enumerate(zip(items, ends)):
            ql = qlens[i]
            ids[i, :ql] = torch.tensor(it.token_ids[it.start:e])
            p = it.position_ids[:, it.start:e]
            pos[:, i, :ql] = p
            if ql < q:  # padding continues the positions; its outputs are discarded
                pos[:, i, ql:] = p[:, -1:] + torch.arange(1, q - ql + 1)
        embeds = self.lm.embed_tokens(to_device(ids, torch.long, dev))
        self._place_images(items, ends, embeds)
        fresh = all(it.start == 0 for it in items)
        bucket = self._prefill_bucket(n, q) if (fresh and (self.use_graphs or self.static_prefill)) else None
        if bucket is not None:
            return self._prefill_graphed(bucket, items, qlens, embeds, pos)
        pos = to_device(pos, torch.long, dev)
        starts = to_device([it.start for it in items], torch.long, dev)
        steps = torch.arange(q, device=dev).unsqueeze(0)
        real = steps < to_device(qlens, torch.long, dev).unsqueeze(1)
        write_pos = torch.where(real, starts.unsqueeze(1) + steps, self.scratch_pos)   # padding writes scratch
        read_len = int(max(it.start for it in items)) + q
        attn, row_slot = None, None
        if not fresh and n == 1:
            row_slot = items[0].slot   # lower-right causal over the slot's first start + q positions
        elif not fresh:
            keys = torch.arange(read_len, device=dev)
            attn = (keys.view(1, 1, read_len) <= write_pos.unsqueeze(-1)).unsqueeze(1)  # [n,1,q,read_len]
        slots = to_device([it.slot for it in items], torch.long, dev)
        self.cache.set_prefill(slots, write_pos, read_len, fresh, row_slot=row_slot)
        out = self.lm(inputs_embeds=embeds, position_ids=pos, attention_mask=attn, use_cache=True,
                      **{self._cache_kw: self.cache})
        hs = out.last_hidden_state
        last = to_device([ql - 1 for ql in qlens], torch.long, hs.device)
        h = hs[torch.arange(n, device=hs.device), last]
        return self.lm_head(h).to(dev)

    @property
    def splits_encodes(self) -> bool:
        """Whether the vision tower runs in pieces of blocks (the native model), so the scheduler may spread a
        screenshot's encode over several steps."""
        return all(hasattr(self.visual, a) for a in ("begin", "advance", "finish"))

    @torch.inference_mode()
    def encode(self, pieces: list[tuple[dict, Any, int, int]]) -> None:
        """Vision-tower work of one step: (the prompt's feature store, its PromptImage, from, to) in units of the
        image's tokens. Whole encodes (0 -> all) share one tower call; a piece runs the blocks its share of the
        tower's depth covers and keeps the hidden states (glm4v.VisionWork) in the store until the last piece,
        which stores the image's features as a whole encode does."""
        whole = [(store, img) for store, img, a, b in pieces if a == 0 and b >= img.end - img.start
                 and img.start not in store]
        if whole:
            self._encode_whole(whole)
        vis = self.visual
        for store, img, a, b in pieces:
            n = img.end - img.start
            if a == 0 and b >= n:
                continue
            work = store.get(img.start)
            if torch.is_tensor(work):
                continue
            if work is None:
                pixels = to_device(img.pixels, img.pixels.dtype, self.device)
                work = vis.begin(pixels.type(vis.dtype), [img.grid.tolist()])
                store[img.start] = work
            vis.advance(work, len(vis.blocks) * min(b, n) // n)
            if b >= n:
                store[img.start] = vis.finish(work).pooler_output.to(self.dtype)

    def _encode_whole(self, todo: list[tuple[dict, Any]]) -> None:
        dev = self.device
        grids = to_device(torch.stack([img.grid for _, img in todo]), torch.long, dev)
        # one image (the usual screenshot) is staged as it is: a cat would copy its ~30 MB once more
        pixels = todo[0][1].pixels if len(todo) == 1 else torch.cat([img.pixels for _, img in todo])
        pixels = to_device(pixels, pixels.dtype, dev)
        feats = self.model.model.get_image_features(pixels, grids, return_dict=True).pooler_output
        for (store, img), f in zip(todo, feats):
            store[img.start] = f.to(self.dtype)

    def _place_images(self, items: list[PrefillItem], ends: list[int], embeds: torch.Tensor) -> None:
        """Put vision features where the image tokens of [start, end) are. An image is encoded once per prompt
        (`encode`, or here all images of this step not encoded yet in one vision-tower call) and its features
        kept for the prompt's later chunks, so a chunk boundary may fall inside an image."""
        todo = []
        stores = []
        for it, e in zip(items, ends):
            store = it.features if it.features is not None else {}
            stores.append(store)
            for img in it.images:
                if img.start < e and img.end > it.start:
                    got = store.get(img.start)
                    if got is not None and not torch.is_tensor(got):   # an encode under way: finish it
                        store[img.start] = self.visual.finish(got).pooler_output.to(self.dtype)
                    elif got is None:
                        todo.append((store, img))
        if todo:
            self._encode_whole(todo)
        for i, (it, e, store) in enumerate(zip(items, ends, stores)):
            for img in it.images:
                a, b = max(img.start, it.start), min(img.end, e)
                if a < b:
                    embeds[i, a - it.start:b - it.start] = store[img.start][a - img.start:b - img.start]

    # --- graphed prefill (from position 0, small batches): static inputs, one graph per (rows, length) bucket
    def _prefill_bucket(self, n: int, q: int) -> tuple[int, int] | None:
        nb = next((b for b in PREFILL_GRAPH_ROWS if b >= n), None)
        qb = next((b for b in PREFILL_GRAPH_LENGTHS if b >= q), None)
        if nb is None or qb is None or nb * qb > PREFILL_GRAPH_TOKENS:
            return None
        return nb, qb

    def _prefill_static(self):
        if self._pf is None:
            T, dev = PREFILL_GRAPH_TOKENS, self.device
            self._pf = {"embeds": torch.zeros(T, self.lm.config.hidden_size, dtype=self.dtype, device=dev),
                        "pos": torch.zeros(3, T, dtype=torch.long, device=dev),
                        "wslot": torch.zeros(T, dtype=torch.long, device=dev),
                        "wpos": torch.full((T,), self.scratch_pos, dtype=torch.long, device=dev),
                        "last": torch.zeros(max(PREFILL_GRAPH_ROWS), dtype=torch.long, device=dev)}
        return self._pf

    def _prefill_forward(self, nb: int, qb: int) -> torch.Tensor:
        pf = self._prefill_static()
        T = nb * qb
        self.cache.set_prefill(None, pf["wpos"][:T].view(nb, qb), qb, True, write_slots=pf["wslot"][:T].view(nb, qb))
        out = self.lm(inputs_embeds=pf["embeds"][:T].view(nb, qb, -1), position_ids=pf["pos"][:, :T].view(3, nb, qb),
                      attention_mask=None, use_cache=True, **{self._cache_kw: self.cache})
        h = out.last_hidden_state[torch.arange(nb, device=self.device), pf["last"][:nb]]
        return self.lm_head(h)

    def _prefill_graphed(self, bucket, items, qlens, embeds, pos) -> torch.Tensor:
        nb, qb = bucket
        n, q = embeds.shape[0], embeds.shape[1]
        key = ("prefill", nb, qb)
        if self.use_graphs and key not in self.graphs:
            self.capture(key)   # on idle inputs, before this step's inputs are staged
        pf = self._prefill_static()
        T = nb * qb
        e = pf["embeds"][:T].view(nb, qb, -1)
        e[:n, :q].copy_(embeds)
        hp = torch.zeros(3, nb, qb, dtype=torch.long)
        hp[:, :n, :q] = pos
        ws = torch.zeros(nb, qb, dtype=torch.long)
        wp = torch.full((nb, qb), self.scratch_pos, dtype=torch.long)   # padding writes to scratch
        last = torch.zeros(nb, dtype=torch.long)
        for i, it in enumerate(items):
            ws[i] = it.slot
            wp[i, : qlens[i]] = torch.arange(qlens[i])
            last[i] = qlens[i] - 1
        pf["pos"][:, :T].copy_(to_device(hp.view(3, T), torch.long, self.device))
        pf["wslot"][:T].copy_(to_device(ws.view(T), torch.long, self.device))
        pf["wpos"][:T].copy_(to_device(wp.view(T), torch.long, self.device))
        pf["last"][:nb].copy_(to_device(last, torch.long, self.device))
        if not self.use_graphs:   # the same static-buffer path, run eagerly (CPU tests)
            return self._prefill_forward(nb, qb)[:n]
        g = self.graphs[key]
        g[0].replay()
        return g[1][:n]

    # ------------------------------------------------------------------ decode
    def _decode_forward(self, batch: int, read_len: int) -> torch.Tensor:
        pos = self.in_pos[:batch]
        self.cache.set_decode(batch, read_len, pos)
        keys = torch.arange(read_len, device=self.device)
        attn = (keys.view(1, read_len) <= pos.view(batch, 1)).view(batch, 1, 1, read_len)
        mpos = (pos + self.in_delta[:batch]).view(1, batch, 1).expand(3, batch, 1)
        out = self.lm(input_ids=self.in_ids[:batch], position_ids=mpos, attention_mask=attn, use_cache=True,
                      **{self._cache_kw: self.cache})
        return self.lm_head(out.last_hidden_state[:, -1]).to(self.device)

    def bucket(self, active_max_slot: int, max_pos: int) -> tuple[int, int]:
        b = next(x for x in self.batch_buckets if x > active_max_slot)
        need = max_pos + 1
        ln = next((x for x in self.len_buckets if x >= need), self.max_len + 1)
        return b, ln

    @torch.inference_mode()
    def decode(self, slots: list[int], positions: list[int], deltas: list[int]) -> torch.Tensor:
        """One step for `slots`, each feeding its last sampled token (`next_ids`, on the device) at its position.
        Returns logits [B, V] for rows 0..B-1 (= slots); rows of idle slots are garbage.

        Nothing here waits for the GPU: the positions go through a pinned buffer, the ids never leave the device,
        so the host can launch this step while the previous one still runs."""
        B, Ln = self.bucket(max(slots), max(positions))
        if self.use_graphs and (B, Ln) not in self.graphs:
            self.capture((B, Ln))   # on idle inputs, before this step's inputs are staged
        h = torch.zeros(2, B, dtype=torch.long)
        h[0].fill_(self.scratch_pos)   # idle rows write the scratch position
        idx = torch.tensor(slots)
        h[0, idx] = torch.tensor(positions)
        h[1, idx] = torch.tensor(deltas)
        h = to_device(h, torch.long, self.device)
        self.in_ids[:B, 0].copy_(self.next_ids[:B])
        self.in_pos[:B].copy_(h[0])
        self.in_delta[:B].copy_(h[1])
        if not self.use_graphs:
            return self._decode_forward(B, Ln)
        g = self.graphs[(B, Ln)]
        g[0].replay()
        return g[1]

    def feed(self, slots: torch.Tensor, tokens: torch.Tensor) -> None:
        """Make `tokens` (sampled on the device for `slots`) the input of those slots' next decode step."""
        self.next_ids.index_copy_(0, slots, tokens.clamp(min=0))

    # ------------------------------------------------------------------ graph capture
    def _idle_inputs(self, key: tuple) -> None:
        """Set every static input that graph `key` reads to values that touch no live state: the warm run and the
        capture execute the forward for real, so whatever an earlier step left in these buffers would be read
        (an out-of-range `last` from a bigger bucket) and written (K/V through a stale slot/position into a
        running sequence or a kept prefix). Idle inputs write only the scratch position of slot 0."""
        if key[0] == "prefill":
            pf = self._prefill_static()
            pf["embeds"].zero_()
            pf["pos"].zero_()
            pf["wslot"].zero_()
            pf["wpos"].fill_(self.scratch_pos)
            pf["last"].zero_()
        else:
            self.in_ids.zero_()
            self.in_pos.fill_(self.scratch_pos)
            self.in_delta.zero_()

    def _graph_fn(self, key: tuple):
        if key[0] == "prefill":
            _, nb, qb = key
            return lambda: self._prefill_forward(nb, qb)
        B, Ln = key
        return lambda: self._decode_forward(B, Ln)

    def _capture_fn(self, key, fn):
        """Capture `fn` (which reads only static buffers, set to idle values) as a CUDA graph in the shared pool,
        after an eager run of the same shapes on the same thread and stream (lazy kernel init, cuBLAS/cuDNN
        handles and workspaces all happen outside the graph)."""
        t = time.perf_counter()
        s = self._capture_stream
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            fn()
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        g = torch.cuda.CUDAGraph()
        # thread_local: another thread's CUDA call (a pinned allocation while preparing a request) neither
        # invalidates this capture nor fails
        with torch.cuda.graph(g, pool=self._pool, stream=s, capture_error_mode="thread_local"):
            out = fn()
        torch.cuda.current_stream().wait_stream(s)
        self.graphs[key] = (g, out)
        dt = time.perf_counter() - t
        self.capture_seconds += dt
        log.debug("captured graph %s in %.3fs", key, dt)
        return self.graphs[key]

    def graph_plan(self, max_len_bucket: int) -> list[tuple]:
        """Every graph worth having, most needed first: decode for the small batch buckets at every length bucket
        up to `max_len_bucket`, then the large ones, then the short prefill shapes."""
        keys = [(b, ln) for ln in self.len_buckets if ln <= max_len_bucket for b in self.batch_buckets]
        keys.sort(key=lambda k: (k[0] > 8, k[1], k[0]))
        keys += [("prefill", nb, qb) for nb in PREFILL_GRAPH_ROWS for qb in (256, 512)
                 if nb * qb <= PREFILL_GRAPH_TOKENS]
        return keys

    @torch.inference_mode()
    def capture(self, key: tuple) -> None:
        """Capture graph `key` on idle inputs. On CPU with `static_prefill` (tests) the warm run that a capture
        makes is run eagerly, so the order of events real traffic produces can be walked without a GPU."""
        if key in self.graphs:
            return
        if self.engine_thread is not None and threading.get_ident() != self.engine_thread:
            raise RuntimeError("CUDA graphs are captured on the engine thread only")
        if not self.use_graphs:
            if self.static_prefill:
                self._idle_inputs(key)
                self._graph_fn(key)()
            return
        self._idle_inputs(key)
        self._capture_fn(key, self._graph_fn(key))

    @torch.inference_mode()
    def capture_pending(self) -> bool:
        """Capture one graph from `pending` (called by the engine loop when it has nothing else to do), so that
        readiness waits only for the graphs a first request needs and the rest never stall a busy step."""
        while self.pending:
            key = self.pending.pop(0)
            if key not in self.graphs:
                self.capture(key)
                return True
        return False

    def has_idle_work(self) -> bool:
        return bool(self.pending) and (self.use_graphs or self.static_prefill)

    def stage_rows(self, slots: list[int]) -> torch.Tensor:
        """The slots of a step as a device index tensor, copied without a sync (see decode)."""
        return to_device(slots, torch.long, self.device)

    def copy_prefix(self, src: int, dst: int, length: int) -> None:
        self.cache.copy_prefix(src, dst, length)
