"""The sampler's vLLM fields on plain tensors (no model): logit bias, allowed ids, min_tokens, min_p, and logprobs
packed with the tokens into one host copy."""
from __future__ import annotations

import torch

from function.engine.protocol import SamplingParams
from function.engine.sampling import Sampler

V = 12


def setup(*params: SamplingParams, stop_ids=(3,)):
    s = Sampler(len(params), V, "cpu")
    rows = [s.reset_slot(i, [0, 1], p, stop_ids) for i, p in enumerate(params)]
    return s, rows, torch.arange(len(params))


def step(s, rows, slots, logits):
    toks = s.sample(logits, slots, rows)
    host, lps = s.fetch(toks).result()
    s.record(slots, toks.clamp(min=0))
    return host, lps


def test_logit_bias_and_allowed_ids_per_row():
    s, rows, slots = setup(SamplingParams(temperature=1.0, seed=1, logit_bias=((7, 100.0),)),
                           SamplingParams(temperature=1.0, seed=2, allowed_token_ids=(4, 5)),
                           SamplingParams(temperature=0.0))
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        logits = torch.randn(3, V, generator=g)
        host, _ = step(s, rows, slots, logits)
        assert host[0] == 7 and host[1] in (4, 5) and host[2] == int(logits[2].argmax())


def test_a_slot_reused_without_bias_loses_the_old_bias():
    s, rows, slots = setup(SamplingParams(temperature=0.0, logit_bias=((7, 100.0),)))
    logits = torch.zeros(1, V)
    logits[0, 2] = 5.0
    assert step(s, rows, slots, logits)[0] == [7]
    rows = [s.reset_slot(0, [0], SamplingParams(temperature=0.0))]
    assert step(s, rows, slots, logits)[0] == [2]


def test_min_tokens_masks_the_end_tokens_until_reached():
    s, rows, slots = setup(SamplingParams(temperature=0.0, min_tokens=3))
    logits = torch.zeros(1, V)
    logits[0, 3] = 10.0          # the end token is the best every step
    got = [step(s, rows, slots, logits)[0][0] for _ in range(5)]
    assert 3 not in got[:3] and got[3:] == [3, 3]


def test_min_p_keeps_only_tokens_near_the_top():
    s, rows, slots = setup(*[SamplingParams(temperature=1.0, seed=i, min_p=0.5) for i in range(4)])
    logits = torch.tensor([[5.0, 5.0 - 0.5, 1.0] + [0.0] * (V - 3)]).repeat(4, 1)
    seen = set()
    for _ in range(25):
        seen |= set(step(s, rows, slots, logits)[0])
    assert seen == {0, 1}       # p1/p0 = e^-0.5 = 0.61 >= 0.5; the rest are far below


def test_logprobs_are_the_raw_log_softmax_and_ride_with_the_tokens():
    s, rows, slots = setup(SamplingParams(temperature=0.0, logprobs=3, logit_bias=((9, 50.0),)),
                           SamplingParams(temperature=0.0))
    logits = torch.randn(2, V, generator=torch.Generator().manual_seed(4))
    host, lps = step(s, rows, slots, logits)
    assert host == [9, int(logits[1].argmax())]
    lp, top = Sampler.unpack_logprobs(host[0], lps[0])
    want = torch.log_softmax(logits[0].double(), -1)      # the raw logits: before the bias
    assert abs(lp - want[9].item()) < 1e-9
    assert [i for i, _ in top] == want.topk(3).indices.tolist()
    assert [v for _, v in top] == want.topk(3).values.tolist()
    # a step where no row asks returns no logprobs
    s2, rows2, slots2 = setup(SamplingParams(temperature=0.0))
    assert step(s2, rows2, slots2, logits[:1])[1] == [None]
