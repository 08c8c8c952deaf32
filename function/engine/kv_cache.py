"""A preallocated KV cache with one contiguous slot per running sequence, each with its own length, plugged into
transformers' attention through its Cache `update()` hook and an attention function registered with
`AttentionInterface`.

Why our own: transformers' StaticCache writes every row at one shared position, so it cannot hold sequences of
different lengths, and its sdpa path copies the cache from kv-heads to all heads (`repeat_kv`) every step. Here
every write position and the mask are tensors, so a decode step has no host-side state and can be captured as a
CUDA graph; attention is SDPA with `enable_gqa`.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

ATTN_NAME = "autoglm_slots"
_GQA = "enable_gqa" in (F.scaled_dot_product_attention.__doc__ or "")


def causal_lower_right(q_len: int, kv_len: int):
    """torch's lower-right causal bias, imported on first use: torch.nn.attention.bias imports torch._dynamo and
    sympy (~0.8 s of a cold start), and the CUDA prefill path never needs it (flash takes the causal flag)."""
    from torch.nn.attention.bias import causal_lower_right as bias

    return bias(q_len, kv_len)


def slot_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """query [B,H,q,D]; key/value [B,Hkv,L,D] straight from the slot cache; attention_mask bool [B,1,q,L], or None
    for a prefill where causal attention is exact: from position 0 (q == L), or one sequence's chunk after the
    part of its prompt already in the cache (q < L: the causal diagonal aligned to the lower right). Both run a
    flash kernel instead of materializing a [q, L] mask."""
    q_len, kv_len = query.shape[2], key.shape[2]
    if attention_mask is None and q_len > 1:
        if query.is_cuda:
            return _causal_flash_cuda(query, key, value, scaling)
        if q_len < kv_len:
            attention_mask = causal_lower_right(q_len, kv_len)
    causal = attention_mask is None and q_len > 1
    if _GQA:
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask, scale=scaling,
                                             is_causal=causal, enable_gqa=key.shape[1] != query.shape[1])
    else:  # torch < 2.5
        rep = query.shape[1] // key.shape[1]
        out = F.scaled_dot_product_attention(query, key.repeat_interleave(rep, 1), value.repeat_interleave(rep, 1),
                                             attn_mask=attention_mask, scale=scaling, is_causal=causal)
    return out.transpose(1, 2).contiguous(), None


_FLASH_GQA: list[bool] = []   # whether the flash kernel took GQA shapes directly (decided on first use)


def _causal_flash_cuda(query, key, value, scaling):
    """A prefill's causal attention on FlashAttention, called directly. From position 0 SDPA's dispatch would pick
    cuDNN on Hopper, which builds an execution plan for every new sequence length (~40 ms per new prompt length
    on an H200, measured in bench/prefill_probe.py; flash: none), and agent prompts rarely repeat a length. For a
    chunk after cached tokens (q < L) FlashAttention's causal mask is aligned to the lower right, and it reads
    grouped K/V heads as they are, where SDPA's dispatch of `causal_lower_right` refuses GQA shapes for flash and
    falls back to a materialized [q, L] mask in the math kernel. If this torch build refuses the direct call, K/V
    heads are expanded for SDPA's own causal paths instead."""
    if not _FLASH_GQA or _FLASH_GQA[0]:
        try:
            out = torch.ops.aten._scaled_dot_product_flash_attention(query, key, value, 0.0, True, False,
                                                                     scale=scaling)[0]
            if not _FLASH_GQA:
                _FLASH_GQA.append(True)
            return out.transpose(1, 2).contiguous(), None
        except RuntimeError:
            if _FLASH_GQA:
                raise
            _FLASH_GQA.append(False)
    rep = query.shape[1] // key.shape[1]
    if rep > 1:
        key, value = key.repeat_interleave(rep, 1), value.repeat_interleave(rep, 1)
    q_len, kv_len = query.shape[2], key.shape[2]
    if q_len == kv_len:
        out = F.scaled_dot_product_attention(query, key, value, scale=scaling, is_causal=True)
    else:
        out = F.scaled_dot_product_attention(query, key, value, scale=scaling,
                                             attn_mask=causal_lower_right(q_len, kv_len))
    return out.transpose(1, 2).contiguous(), None


def register_attention() -> None:
    from transformers import AttentionInterface

    AttentionInterface.register(ATTN_NAME, slot_attention)


class SlotKVCache:
    """K/V buffers per layer, shaped [slots, kv_heads, max_len, head_dim]. Before each forward the runner sets
    either decode mode (row b of the batch is slot b, writing at `positions[b]`) or prefill mode (rows are the
    slots in `slot_ids`, writing a block of positions each). The last position of every slot is scratch space
    where idle rows of a decode bucket write, so they never touch a kept prefix."""

    is_compileable = False

    def __init__(self, num_layers: int, num_slots: int, kv_heads: int, max_len: int, head_dim: int, dtype,
                 device, layer_devices: list | None = None):
        """`layer_devices`: where each layer's K/V live when the model is split over several GPUs (each layer's
        cache sits on its layer's card); default all on `device`."""
        shape = (num_slots, kv_heads, max_len, head_dim)
        devs = layer_devices or [device] * num_layers
        self.k = [torch.zeros(shape, dtype=dtype, device=d) for d in devs]
        self.v = [torch.zeros(shape, dtype=dtype, device=d) for d in devs]
        self._moved: dict = {}
        self.num_slots, self.max_len = num_slots, max_len
        self._mode = "decode"
        self._fresh = False
        self._rows = torch.arange(num_slots, device=devs[0])
        self._batch = 0
        self._read_len = 0
        self._positions: torch.Tensor | None = None   # decode: [B]
        self._slot_ids: torch.Tensor | None = None    # prefill: [n]
        self._row_slot: int | None = None             # prefill of one sequence's chunk: its slot (a view, no gather)
        self._w_slots: torch.Tensor | None = None     # prefill: [n, q]
        self._w_pos: torch.Tensor | None = None       # prefill: [n, q]

    @staticmethod
    def bytes_per_token(num_layers, kv_heads, head_dim, dtype) -> int:
        return 2 * num_layers * kv_heads * head_dim * torch.finfo(dtype).bits // 8

    def _on(self, t: torch.Tensor | None, device) -> torch.Tensor | None:
        """An index tensor on a layer's device (split models only; one copy per device and step)."""
        if t is None or t.device == device:
            return t
        key = (id(t), device)
        if key not in self._moved:
            self._moved[key] = t.to(device)
        return self._moved[key]

    def set_decode(self, batch: int, read_len: int, positions: torch.Tensor) -> None:
        self._mode, self._batch, self._read_len, self._positions = "decode", batch, read_len, positions
        self._moved.clear()

    def set_prefill(self, slot_ids: torch.Tensor | None, write_pos: torch.Tensor, read_len: int, fresh: bool,
                    write_slots: torch.Tensor | None = None, row_slot: int | None = None) -> None:
        """Rows write `write_pos[r]` positions of slot `slot_ids[r]` (or per token, `write_slots`); a fresh
        prefill (from position 0) attends to its own keys, else rows read their slots up to `read_len` (one row:
        `row_slot`, read as a view of its slot)."""
        n, q = write_pos.shape
        self._fresh = fresh
        self._row_slot = row_slot
        self._mode, self._read_len = "prefill", read_len
        self._slot_ids = slot_ids
        self._w_slots = write_slots if write_slots is not None else slot_ids.view(n, 1).expand(n, q)
        self._w_pos = write_pos
        self._moved.clear()

    # the transformers Cache hook; the second signature form covers transformers versions that pass cache_kwargs
    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        K, V = self.k[layer_idx], self.v[layer_idx]
        d = K.device
        if self._mode == "decode":
            b, pos = self._batch, self._on(self._positions, d)
            rows = self._on(self._rows, d)[:b]
            K[rows, :, pos] = key_states[:, :, 0]
            V[rows, :, pos] = value_states[:, :, 0]
            return K[:b, :, : self._read_len], V[:b, :, : self._read_len]
        ws, wp = self._on(self._w_slots, d), self._on(self._w_pos, d)
        K[ws, :, wp] = key_states.transpose(1, 2)
        V[ws, :, wp] = value_states.transpose(1, 2)
        if self._fresh:   # prefill from position 0: the keys are exactly what was just computed
            return key_states, value_states
        if self._row_slot is not None:
            r = self._row_slot
            return K[r:r + 1, :, : self._read_len], V[r:r + 1, :, : self._read_len]
        sl = self._on(self._slot_ids, d)
        return K[sl, :, : self._read_len], V[sl, :, : self._read_len]

    def copy_prefix(self, src: int, dst: int, length: int) -> None:
        """Share a prefix between slots by copying its KV (prefix reuse from a slot that is still running)."""
        for K, V in zip(self.k, self.v):
            K[dst, :, :length].copy_(K[src, :, :length])
            V[dst, :, :length].copy_(V[src, :, :length])

    def move(self, src: int, dst: int, length: int) -> None:
        self.copy_prefix(src, dst, length)

    # transformers may ask these of any cache
    def get_seq_length(self, layer_idx: int = 0) -> int:
        return 0

    def get_mask_sizes(self, *args, **kwargs):
        return self._read_len, 0
