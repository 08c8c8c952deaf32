"""Batched token sampling where every row has its own parameters: temperature (0 = greedy), top-k, top-p,
OpenAI frequency/presence penalties, a multiplicative repetition penalty, and a per-request seed.

Per-slot parameters live in device tables written once when a request is admitted, so a decode step samples
without copying anything from the host (a copy from pageable memory would wait for the GPU). Sampling uses the
exponential race (argmax of p / E with E ~ Exp(1)), which equals multinomial sampling and lets a seeded row
draw its noise from its own generator while the other rows share one draw.
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
        # per-slot parameters: temperature, top_p, frequency, presence, repetition, greedy (1/0); top_k
        self.fparams = torch.zeros(num_slots, 6, dtype=torch.float32, device=device)
        self.top_k = torch.zeros(num_slots, dtype=torch.long, device=device)

    def reset_slot(self, slot: int, prompt_ids: list[int], params: SamplingParams) -> RowState:
        self.counts[slot].zero_()
        self.fparams[slot] = torch.tensor([params.temperature if not params.greedy else 1.0, params.top_p,
                                           params.frequency_penalty, params.presence_penalty,
                                           params.repetition_penalty, float(params.greedy)])
        self.top_k[slot] = params.top_k if params.top_k > 0 else self.vocab
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

    def sample(self, logits: torch.Tensor, slots: torch.Tensor, rows: list[RowState]) -> torch.Tensor:
        """logits [n, V] for the slots in `slots` (a device tensor, in row order) -> token ids [n] (long), -1 where
        the logits are not finite."""
        ps = [r.params for r in rows]
        logits = logits[:, : self.vocab].float()
        bad = ~torch.isfinite(logits).all(dim=-1)
        fp = self.fparams.index_select(0, slots)

        if any(p.frequency_penalty or p.presence_penalty for p in ps):
            cnt = self.counts.index_select(0, slots).float()
            logits = logits - fp[:, 2:3] * cnt - fp[:, 3:4] * (cnt > 0).float()
        if any(p.repetition_penalty != 1.0 for p in ps):
            seen = self.prompt_seen.index_select(0, slots) | (self.counts.index_select(0, slots) > 0)
            rp = fp[:, 4:5]
            logits = torch.where(seen, torch.where(logits > 0, logits / rp, logits * rp), logits)

        greedy_tok = logits.argmax(dim=-1)
        if all(p.greedy for p in ps):
            return greedy_tok.masked_fill(bad, -1)

        scaled = logits / fp[:, 0:1]
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
        return sampled.masked_fill(bad, -1)

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
