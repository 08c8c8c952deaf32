"""engine/rope.py: the torch forms of the two rotary embeddings against the textbook rotation, the dispatch on CPU,
and the Triton kernel itself in Triton's interpreter (TRITON_INTERPRET=1 runs it on CPU tensors in a fresh
process). The interpreter casts to bf16 by truncation, unlike the GPU's round-to-nearest-even, so here the kernel's
indexing, strides, in-place writes and head masking are checked bit for bit in fp32; the bf16 rounding is checked
on the card itself by rope.self_check before the kernel is used, and by bench/rope_check.py."""
import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from function.engine import rope

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _rotate(x0, x1, ang):
    return x0 * math.cos(ang) - x1 * math.sin(ang), x1 * math.cos(ang) + x0 * math.sin(ang)


def test_mrope_torch_is_the_pairwise_rotation_of_the_first_dims():
    g = torch.Generator().manual_seed(1)
    B, H, L, D, rd = 1, 2, 3, 8, 4
    q = torch.randn(B, H, L, D, generator=g, dtype=torch.float64)
    k = torch.randn(B, 1, L, D, generator=g, dtype=torch.float64)
    ang = torch.randn(B, L, rd // 2, generator=g, dtype=torch.float64)
    cos, sin = ang.repeat_interleave(2, -1).cos(), ang.repeat_interleave(2, -1).sin()   # one angle per pair
    rq, rk = rope.mrope_torch(q, k, cos, sin)
    for t, r in ((q, rq), (k, rk)):
        for h in range(t.shape[1]):
            for pos in range(L):
                for p in range(rd // 2):
                    a, b = _rotate(t[0, h, pos, 2 * p].item(), t[0, h, pos, 2 * p + 1].item(), ang[0, pos, p].item())
                    assert r[0, h, pos, 2 * p].item() == pytest.approx(a, abs=1e-12)
                    assert r[0, h, pos, 2 * p + 1].item() == pytest.approx(b, abs=1e-12)
        assert torch.equal(r[..., rd:], t[..., rd:])      # the dims past the rotary ones pass through


def test_vision_torch_rotates_halves_in_fp32_and_returns_the_input_dtype():
    g = torch.Generator().manual_seed(2)
    N, H, D = 3, 2, 8
    q = torch.randn(N, H, D, generator=g).to(torch.bfloat16)
    k = torch.randn(N, H, D, generator=g).to(torch.bfloat16)
    ang = torch.randn(N, D // 2, generator=g, dtype=torch.float64)
    full = torch.cat([ang, ang], -1)
    rq, rk = rope.vision_torch(q, k, full.cos().float(), full.sin().float())
    assert rq.dtype == torch.bfloat16 and rk.dtype == torch.bfloat16
    half = D // 2
    for n in range(N):
        for h in range(H):
            for i in range(half):
                a, b = _rotate(q[n, h, i].double().item(), q[n, h, i + half].double().item(), ang[n, i].item())
                assert rq[n, h, i].float().item() == pytest.approx(a, rel=1e-2, abs=1e-2)
                assert rq[n, h, i + half].float().item() == pytest.approx(b, rel=1e-2, abs=1e-2)


def test_cpu_tensors_take_the_torch_ops_and_leave_the_inputs_alone():
    g = torch.Generator().manual_seed(3)
    q = torch.randn(1, 4, 5, 16, generator=g).to(torch.bfloat16)
    k = torch.randn(1, 2, 5, 16, generator=g).to(torch.bfloat16)
    ang = torch.randn(1, 5, 8, generator=g)
    cos, sin = ang.cos().to(torch.bfloat16), ang.sin().to(torch.bfloat16)
    q0, k0 = q.clone(), k.clone()
    got = rope.mrope(q, k, cos, sin)
    want = rope.mrope_torch(q0, k0, cos, sin)
    assert all(torch.equal(a, b) for a, b in zip(got, want))
    assert torch.equal(q, q0) and torch.equal(k, k0)     # the torch form makes new tensors
    assert rope._kernel_for("pairs", q, cos, sin) is None
    assert rope.self_check("cpu", torch.bfloat16, (4, 2, 16), (2, 16), 8) == {
        "pairs": "no Triton/CUDA", "halves": "no Triton/CUDA"}


_INTERPRETED = textwrap.dedent(r"""
    import os, sys, json
    os.environ["TRITON_INTERPRET"] = "1"
    sys.path.insert(0, sys.argv[1])
    import torch
    from function.engine import rope
    kernel = rope.load()
    assert kernel is not None, "no Triton"
    g = torch.Generator().manual_seed(0)
    out = {}
    # text: 5 q heads (not a multiple of the head block: the mask), 2 k heads, 16-wide heads, 8 rotated dims,
    # q/k as strided views of one projection output (the fused layer's layout), prefill- and decode-like lengths
    for L in (1, 7):
        hq, hk, d, rd = 5, 2, 16, 8
        qkv = 4 * torch.randn(2, L, hq + 2 * hk, d, generator=g)
        ang = 50 * torch.randn(2, L, rd, generator=g)
        cos, sin = ang.cos(), ang.sin()
        views = lambda t: (t[:, :, :hq].transpose(1, 2), t[:, :, hq:hq + hk].transpose(1, 2))
        want = rope.mrope_torch(*views(qkv), cos, sin)
        got_buf = qkv.clone()
        a, b = views(got_buf)
        rope._launch(kernel, a, cos, sin, pairs=True)
        rope._launch(kernel, b, cos, sin, pairs=True)
        out[f"pairs_L{L}"] = torch.equal(a, want[0]) and torch.equal(b, want[1])
        out[f"pairs_L{L}_v_untouched"] = torch.equal(got_buf[:, :, hq + hk:], qkv[:, :, hq + hk:])
    # vision: q, k as views of the [N, 3, H, D] projection, 3 heads (mask), the whole head rotated by halves
    N, H, D = 6, 3, 16
    qkv = 4 * torch.randn(N, 3, H, D, generator=g)
    ang = 50 * torch.randn(N, D, generator=g)
    cos, sin = ang.cos(), ang.sin()
    want = rope.vision_torch(qkv[:, 0], qkv[:, 1], cos, sin)
    got_buf = qkv.clone()
    c, s = cos.unsqueeze(0), sin.unsqueeze(0)
    rope._launch(kernel, got_buf[:, 0].unsqueeze(0).transpose(1, 2), c, s, pairs=False)
    rope._launch(kernel, got_buf[:, 1].unsqueeze(0).transpose(1, 2), c, s, pairs=False)
    out["halves"] = torch.equal(got_buf[:, 0], want[0]) and torch.equal(got_buf[:, 1], want[1])
    out["halves_v_untouched"] = torch.equal(got_buf[:, 2], qkv[:, 2])
    print(json.dumps(out))
""")


def test_the_triton_kernel_in_the_interpreter_matches_the_torch_forms_in_fp32():
    import triton  # noqa: F401 - a test requirement (pyproject [test]): this test fails, never skips, without it
    r = subprocess.run([sys.executable, "-c", _INTERPRETED, ROOT], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    import json
    res = json.loads(r.stdout.strip().splitlines()[-1])
    assert res == {"pairs_L1": True, "pairs_L1_v_untouched": True, "pairs_L7": True, "pairs_L7_v_untouched": True,
                   "halves": True, "halves_v_untouched": True}
