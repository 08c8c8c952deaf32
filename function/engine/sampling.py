"""Batched token sampling where every row has its own parameters: temperature (0 = greedy), top-k, top-p,
OpenAI frequency/presence penalties, a multiplicative repetition penalty, and a per-request seed.

Sampling uses the exponential race (argmax of p / E with E ~ Exp(1)), which equals multinomial sampling and lets a
seeded row draw its noise from its own generator while the other rows share one draw.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .protocol import SamplingParams


@dataclass
class RowState:
    """Sampling state of one running sequence."""
    params: SamplingParams
    generator: torch.Generator | None = None


class Sampler:
    def __init__(self, num_slots: int, vocab_size: int, device):
        self.device = device
        self.vocab = vocab_size
        # output-token counts per slot, for frequency/presence penalties; prompt presence for repetition penalty
        self.counts = torch.zeros(num_slots, vocab_size, dtype=torch.int32, device=device)
        self.prompt_seen = torch.zeros(num_slots, vocab_size, dtype=torch.bool, device=device)

    def reset_slot(self, slot: int, prompt_ids: list[int], params: SamplingParams) -> RowState:
        self.counts[slot].zero_()
        if params.repetition_penalty != 1.0:
            self.prompt_seen[slot].zero_()
            ids = torch.tensor([i for i in prompt_ids if 0 <= i < self.vocab], device=self.device, dtype=torch.long)
            self.prompt_seen[slot].index_fill_(0, ids, True)
        gen = None
        if params.seed is not None and not params.greedy:
            gen = torch.Generator(device=self.device)
            gen.manual_seed(params.seed)
        return RowState(params=params, generator=gen)

    def record(self, slots: torch.Tensor, tokens: torch.Tensor) -> None:
        """Count the tokens just sampled (before they are fed back)."""
        self.counts.index_put_((slots, tokens), torch.ones_like(tokens, dtype=torch.int32), accumulate=True)

    def sample(self, logits: torch.Tensor, slots: list[int], rows: list[RowState]) -> torch.Tensor:
        """logits [n, V] (any float dtype) for the given slots -> token ids [n] (long), -1 where non-finite."""
        n = logits.shape[0]
        ps = [r.params for r in rows]
        logits = logits[:, : self.vocab].float()
        bad = ~torch.isfinite(logits).all(dim=-1)
        slot_t = torch.tensor(slots, device=self.device)

        if any(p.frequency_penalty or p.presence_penalty for p in ps):
            cnt = self.counts[slot_t].float()
            fp = torch.tensor([p.frequency_penalty for p in ps], device=self.device).unsqueeze(1)
            pp = torch.tensor([p.presence_penalty for p in ps], device=self.device).unsqueeze(1)
            logits = logits - fp * cnt - pp * (cnt > 0).float()
        if any(p.repetition_penalty != 1.0 for p in ps):
            seen = self.prompt_seen[slot_t] | (self.counts[slot_t] > 0)
            rp = torch.tensor([p.repetition_penalty for p in ps], device=self.device).unsqueeze(1)
            pen = torch.where(logits > 0, logits / rp, logits * rp)
            logits = torch.where(seen, pen, logits)

        greedy_tok = logits.argmax(dim=-1)
        if all(p.greedy for p in ps):
            return torch.where(bad, torch.full_like(greedy_tok, -1), greedy_tok)

        temp = torch.tensor([p.temperature if not p.greedy else 1.0 for p in ps], device=self.device)
        scaled = logits / temp.unsqueeze(1)
        if any(p.top_k > 0 for p in ps) or any(p.top_p < 1.0 for p in ps):
            scaled = self._top_k_top_p(scaled, ps)
        probs = torch.softmax(scaled, dim=-1)
        noise = torch.empty_like(probs).exponential_(1.0)
        for i, r in enumerate(rows):
            if r.generator is not None:
                noise[i].exponential_(1.0, generator=r.generator)
        sampled = (probs / noise).argmax(dim=-1)
        greedy_mask = torch.tensor([p.greedy for p in ps], device=self.device)
        tok = torch.where(greedy_mask, greedy_tok, sampled)
        return torch.where(bad, torch.full_like(tok, -1), tok)

    def _top_k_top_p(self, logits: torch.Tensor, ps: list[SamplingParams]) -> torch.Tensor:
        sorted_logits, idx = logits.sort(dim=-1, descending=True)
        V = logits.shape[-1]
        ks = torch.tensor([p.top_k if p.top_k > 0 else V for p in ps], device=self.device)
        ranks = torch.arange(V, device=self.device).unsqueeze(0)
        remove = ranks >= ks.unsqueeze(1)
        top_p = torch.tensor([p.top_p for p in ps], device=self.device).unsqueeze(1)
        probs = torch.softmax(sorted_logits.masked_fill(remove, float("-inf")), dim=-1)
        cum = probs.cumsum(dim=-1)
        remove |= (cum - probs) > top_p  # keep the smallest set whose mass reaches top_p (at least one token)
        sorted_logits = sorted_logits.masked_fill(remove, float("-inf"))
        return torch.full_like(logits, float("-inf")).scatter(1, idx, sorted_logits)
