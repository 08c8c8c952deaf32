"""Batched token sampling where every row has its own parameters: temperature (0 = greedy), top-k, top-p, min-p,
OpenAI frequency/presence penalties, a multiplicative repetition penalty, logit bias, allowed token ids, min_tokens
(end tokens masked until then), a per-request seed, and logprobs of the raw logits.

Order, as vLLM's sampler: allowed ids and logit bias, the min_tokens mask, penalties, temperature, min-p, top-k/top-p.
Logprobs are the log-softmax of the model's raw logits (vLLM's default `raw_logprobs`), computed on the device for
the step's rows only when some row asked, and copied to the host together with the tokens (`fetch`: the step's
one device->host copy, which the engine reads only after it has launched the next step).

Per-slot parameters live in device tables written once when a request is admitted, so a decode step samples
without copying anything from the host (a copy from pageable memory would wait for the GPU). Sampling uses the
exponential race (argmax of p / E with E ~ Exp(1)), which equals multinomial sampling and lets a seeded row
draw its noise from its own generator while the other rows share one draw.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .protocol import SamplingParams
from .staging import to_device


@dataclass
class RowState:
    """Sampling state of one running sequence."""
    params: SamplingParams
    generator: torch.Generator | None = None
    biased: bool = False        # logit_bias / allowed_token_ids: the slot's row of `Sampler.bias` is in use


class HostFetch:
    """A device->host copy under way (a CUDA event marks its end); `result()` waits for it alone, not for work
    queued after it. The pinned buffer comes from torch's caching host allocator, which does not hand it out
    again before the copy has completed."""

    def __init__(self, packed: torch.Tensor, has_logprobs: bool):
        self.has_logprobs = has_logprobs
        if packed.is_cuda:
            self._host = torch.empty(packed.shape, dtype=packed.dtype, pin_memory=True)
            self._host.copy_(packed, non_blocking=True)
            self._done = torch.cuda.Event()
            self._done.record(torch.cuda.current_stream(packed.device))   # the copy's stream, not the thread's device
        else:
            self._host, self._done = packed, None   # nothing writes the step's tokens after sampling

    def result(self) -> tuple[list[int], list[list[float] | None]]:
        """(token ids, packed logprobs per row or None)."""
        if self._done is not None:
            self._done.synchronize()
        rows = self._host.tolist()
        if not self.has_logprobs:
            return [int(r[0]) for r in rows], [None] * len(rows)
        return [int(r[0]) for r in rows], [r[1:] for r in rows]


class Sampler:
    def __init__(self, num_slots: int, vocab_size: int, device):
        self.device = device
        self.vocab = vocab_size
        # output-token counts per slot, for frequency/presence penalties; prompt presence for repetition penalty
        self.counts = torch.zeros(num_slots, vocab_size, dtype=torch.int32, device=device)
        self.prompt_seen = torch.zeros(num_slots, vocab_size, dtype=torch.bool, device=device)
        # per-slot parameters: temperature, top_p, frequency, presence, repetition, greedy (1/0); top_k
        self.fparams = torch.zeros(num_slots, 6, dtype=torch.float32, device=device)
        self.top_k = torch.zeros(num_slots, dtype=torch.long, device=device)
        self.min_p = torch.zeros(num_slots, dtype=torch.float32, device=device)
        # tokens generated so far per slot and min_tokens, for the end-token mask
        self.n_gen = torch.zeros(num_slots, dtype=torch.int32, device=device)
        self.min_tokens = torch.zeros(num_slots, dtype=torch.int32, device=device)
        # allocated on first use: additive bias per slot (logit_bias; -inf outside allowed_token_ids) and the
        # end tokens each slot masks until min_tokens
        self.bias: torch.Tensor | None = None
        self.stop_mask: torch.Tensor | None = None
        self._logprobs: torch.Tensor | None = None    # [n, 2 + 2k] of the last step, see fetch

    def reset_slot(self, slot: int, prompt_ids: list[int], params: SamplingParams,
                   stop_ids: frozenset[int] | tuple[int, ...] = ()) -> RowState:
        """Set up `slot` for a new sequence; `stop_ids` are the ids that end it (masked before min_tokens)."""
        self.counts[slot].zero_()
        self.fparams[slot] = self._dev([params.temperature if not params.greedy else 1.0, params.top_p,
                                        params.frequency_penalty, params.presence_penalty,
                                        params.repetition_penalty, float(params.greedy)], torch.float32)
        self.top_k[slot] = params.top_k if params.top_k > 0 else self.vocab
        self.min_p[slot] = params.min_p
        self.n_gen[slot] = 0
        self.min_tokens[slot] = params.min_tokens
        if params.min_tokens > 0 and stop_ids:
            if self.stop_mask is None:
                self.stop_mask = torch.zeros(self.counts.shape, dtype=torch.bool, device=self.device)
            self.stop_mask[slot].zero_()
            self.stop_mask[slot].index_fill_(0, self._ids(stop_ids), True)
        biased = bool(params.logit_bias) or params.allowed_token_ids is not None
        if not biased and self.bias is not None:
            self.bias[slot].zero_()      # a zero row: the batch adds the bias table without a per-row mask
        if biased:
            if self.bias is None:
                self.bias = torch.zeros(self.counts.shape, dtype=torch.float32, device=self.device)
            row = self.bias[slot]
            if params.allowed_token_ids is not None:
                allowed = self._ids(params.allowed_token_ids)
                if not len(allowed):
                    raise ValueError("allowed_token_ids holds no token id of this model's vocabulary")
                row.fill_(float("-inf"))
                row.index_fill_(0, allowed, 0.0)
            else:
                row.zero_()
            if params.logit_bias:
                pairs = [(i, b) for i, b in params.logit_bias if 0 <= i < self.vocab]
                if pairs:
                    row.index_add_(0, self._dev([i for i, _ in pairs], torch.long),
                                   self._dev([b for _, b in pairs], torch.float32))
        if params.repetition_penalty != 1.0:
            self.prompt_seen[slot].zero_()
            self.prompt_seen[slot].index_fill_(0, self._ids(prompt_ids), True)
        gen = None
        if params.seed is not None and not params.greedy:
            gen = torch.Generator(device=self.device)
            gen.manual_seed(params.seed)
        return RowState(params=params, generator=gen, biased=biased)

    def _ids(self, ids) -> torch.Tensor:
        return self._dev([i for i in ids if 0 <= i < self.vocab], torch.long)

    def _dev(self, values: list, dtype: torch.dtype) -> torch.Tensor:
        return to_device(values, dtype, self.device)

    def record(self, slots: torch.Tensor, tokens: torch.Tensor) -> None:
        """Count the tokens just sampled (before they are fed back)."""
        self.counts.index_put_((slots, tokens), torch.ones_like(tokens, dtype=torch.int32), accumulate=True)
        self.n_gen.index_add_(0, slots, torch.ones_like(slots, dtype=torch.int32))

    def fetch(self, tokens: torch.Tensor) -> "HostFetch":
        """Start copying the step's tokens and, when the step computed logprobs, each row's packed logprobs
        ([logprob of the token, k, k top logprobs, k top ids]) to the host - one device->host copy either way,
        into pinned memory without waiting: the engine launches the next step before it reads them."""
        lp, self._logprobs = self._logprobs, None
        packed = tokens.unsqueeze(1).to(lp.dtype if lp is not None else tokens.dtype)
        if lp is not None:
            packed = torch.cat([packed, lp], dim=1)
        return HostFetch(packed, has_logprobs=lp is not None)

    @staticmethod
    def unpack_logprobs(token: int, packed: list[float]):
        """(logprob of `token`, ((id, logprob), ...) top first) from a row of `fetch`."""
        k = int(packed[1])
        return packed[0], tuple(zip((int(i) for i in packed[2 + k:2 + 2 * k]), packed[2:2 + k]))

    def sample(self, logits: torch.Tensor, slots: torch.Tensor, rows: list[RowState]) -> torch.Tensor:
        """logits [n, V] for the slots in `slots` (a device tensor, in row order) -> token ids [n] (long), -1 where
        the logits are not finite."""
        ps = [r.params for r in rows]
        logits = logits[:, : self.vocab].float()
        bad = ~torch.isfinite(logits).all(dim=-1)
        fp = self.fparams.index_select(0, slots)
        k = max((p.logprobs for p in ps if p.logprobs is not None), default=None)
        raw = logits if k is not None else None

        if self.bias is not None and any(r.biased for r in rows):
            logits = logits + self.bias.index_select(0, slots)     # unbiased rows' rows are zero
        if self.stop_mask is not None and any(p.min_tokens > 0 for p in ps):
            early = self.n_gen.index_select(0, slots) < self.min_tokens.index_select(0, slots)
            logits = logits.masked_fill(early.unsqueeze(1) & self.stop_mask.index_select(0, slots), float("-inf"))

        if any(p.frequency_penalty or p.presence_penalty for p in ps):
            cnt = self.counts.index_select(0, slots).float()
            logits = logits - fp[:, 2:3] * cnt - fp[:, 3:4] * (cnt > 0).float()
        if any(p.repetition_penalty != 1.0 for p in ps):
            seen = self.prompt_seen.index_select(0, slots) | (self.counts.index_select(0, slots) > 0)
            rp = fp[:, 4:5]
            logits = torch.where(seen, torch.where(logits > 0, logits / rp, logits * rp), logits)

        greedy_tok = logits.argmax(dim=-1)
        if all(p.greedy for p in ps):
            return self._with_logprobs(greedy_tok.masked_fill(bad, -1), raw, k)

        scaled = logits / fp[:, 0:1]
        if any(p.min_p > 0 for p in ps):
            probs = torch.softmax(scaled, dim=-1)
            floor = probs.amax(dim=-1, keepdim=True) * self.min_p.index_select(0, slots).unsqueeze(1)
            scaled = scaled.masked_fill(probs < floor, float("-inf"))
        if any(p.top_k > 0 for p in ps) or any(p.top_p < 1.0 for p in ps):
            scaled = self._top_k_top_p(scaled, self.top_k.index_select(0, slots), fp[:, 1:2])
        probs = torch.softmax(scaled, dim=-1)
        noise = torch.empty_like(probs).exponential_(1.0)
        for i, r in enumerate(rows):
            if r.generator is not None:
                noise[i].exponential_(1.0, generator=r.generator)
        sampled = (probs / noise).argmax(dim=-1)
        if any(p.greedy for p in ps):
            sampled = torch.where(fp[:, 5] > 0.5, greedy_tok, sampled)
        return self._with_logprobs(sampled.masked_fill(bad, -1), raw, k)

    def _with_logprobs(self, tokens: torch.Tensor, raw: torch.Tensor | None, k: int | None) -> torch.Tensor:
        """Keep the rows' logprobs for `fetch` (when some row asked; k = the most top logprobs asked)."""
        if raw is None or k is None:
            self._logprobs = None
            return tokens
        lsm = torch.log_softmax(raw.double(), dim=-1)
        tok_lp = lsm.gather(1, tokens.clamp(min=0).unsqueeze(1))
        kcol = torch.full_like(tok_lp, float(k))
        if k > 0:
            top = lsm.topk(min(k, lsm.shape[-1]), dim=-1)
            self._logprobs = torch.cat([tok_lp, kcol, top.values, top.indices.double()], dim=1)
        else:
            self._logprobs = torch.cat([tok_lp, kcol], dim=1)
        return tokens

    @staticmethod
    def _top_k_top_p(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
        sorted_logits, idx = logits.sort(dim=-1, descending=True)
        ranks = torch.arange(logits.shape[-1], device=logits.device).unsqueeze(0)
        remove = ranks >= top_k.unsqueeze(1)
        probs = torch.softmax(sorted_logits.masked_fill(remove, float("-inf")), dim=-1)
        cum = probs.cumsum(dim=-1)
        remove |= (cum - probs) > top_p  # keep the smallest set whose mass reaches top_p (at least one token)
        sorted_logits = sorted_logits.masked_fill(remove, float("-inf"))
        return torch.full_like(logits, float("-inf")).scatter(1, idx, sorted_logits)
