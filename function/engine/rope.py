"""Rotary position embeddings of q and k in one kernel launch per attention layer, where Triton runs (CUDA builds of
torch ship it); elsewhere, and where the kernel fails its check, the torch forms below (`mrope_torch`,
`vision_torch`: what glm4v.py ran before) serve.

Why: the torch form is ~6 elementwise kernels per tensor (multiply, negate, interleave, multiply, add, concatenate),
12 per layer. A decode step replays 40 layers of them, ~480 launches of a few microseconds each inside its CUDA
graph, and the vision tower runs its rotation in fp32 over 13.4k patches x 12 heads per block (14 full passes over
~80 MB tensors per block). bench/RESULTS.md (session 9) has the profile.

The kernels reproduce the torch ops' rounding exactly, so outputs are bit-identical (bench/rope_check.py checks it on
the GPU; CPU tests check the torch fallback against the formulas):
- text decoder (GLM's interleaved-pair M-RoPE over the first `rd` dims, cos/sin in the activations' dtype): torch
  computes q*cos and rot(q)*sin as two rounded products and rounds their sum, so the kernel rounds the same three
  times;
- vision tower (halves rotation over the whole head, cos/sin in fp32): torch upcasts q, forms q*cos + rot(q)*sin in
  fp32 and rounds once; the kernel does the same, compiled without fused multiply-adds (`enable_fp_fusion=False`),
  whose single rounding would differ from torch's two.
Both write q and k in place (they are fresh projections nobody else reads). The token and head counts are not specialized,
so one binary per kind serves prefill, decode, q and k; `load()` imports Triton and defines the kernels (call it early, on a thread,
to keep the import off the first forward).
"""
from __future__ import annotations

import logging
import threading

import torch

log = logging.getLogger(__name__)

_lock = threading.Lock()
_state: dict = {}   # "kernel": the @triton.jit function (None: no Triton); "ok": {(kind, dtype): passed self_check}


def load():
    """The Triton kernel, or None where Triton does not import. Safe to call from any thread, once or many times."""
    with _lock:
        if "kernel" in _state:
            return _state["kernel"]
        try:
            import triton
            import triton.language as tl
        except Exception as e:  # noqa: BLE001 - no Triton (CPU builds): the torch ops
            log.info("rope: Triton unavailable (%s); rotary embeddings run as torch ops", type(e).__name__)
            _state["kernel"] = None
            return None

        @triton.jit(do_not_specialize=["L", "H"])
        def _rope(X, COS, SIN, L, H, sxb, sxl, sxh, scb, scl,
                  ROT: tl.constexpr, PAIRS: tl.constexpr, ROUND_PRODUCTS: tl.constexpr, BLOCK_H: tl.constexpr):
            """x [B, H, L, D] rotated in place over dims [0, ROT); one program per (token, block of heads)."""
            t = tl.program_id(0)
            b = t // L
            pos = t - b * L
            j = tl.arange(0, ROT)
            if PAIRS:      # (x0, x1) -> (-x1, x0) per interleaved pair
                other = j ^ 1
                neg = (j % 2) == 0
            else:          # halves: (a, b) -> (-b, a)
                other = (j + ROT // 2) % ROT
                neg = j < ROT // 2
            c = tl.load(COS + b * scb + pos * scl + j).to(tl.float32)
            s = tl.load(SIN + b * scb + pos * scl + j).to(tl.float32)
            h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
            ptr = X + b * sxb + pos * sxl + h[:, None] * sxh
            m = h[:, None] < H
            x = tl.load(ptr + j[None, :], mask=m)
            xo = tl.load(ptr + other[None, :], mask=m).to(tl.float32)
            xf = x.to(tl.float32)
            rot = tl.where(neg[None, :], -xo, xo)
            if ROUND_PRODUCTS:   # each product rounded to the activations' dtype, then their sum
                a = (xf * c[None, :]).to(x.dtype, fp_downcast_rounding="rtne").to(tl.float32)
                r = (rot * s[None, :]).to(x.dtype, fp_downcast_rounding="rtne").to(tl.float32)
                y = a + r
            else:
                y = xf * c[None, :] + rot * s[None, :]
            tl.store(ptr + j[None, :], y.to(x.dtype, fp_downcast_rounding="rtne"), mask=m)

        _state["kernel"] = _rope
        return _rope


def preload(device=None, dtype: torch.dtype | None = None, shapes: tuple | None = None) -> threading.Thread:
    """Import Triton, define the kernel and (given the card, dtype and `self_check`'s shapes) run the self-check, on a
    daemon thread beside the weight read; `checked` then waits for it instead of doing the work on the start's path
    (0.7 s with a warm Triton cache, 1.45 s with an empty one, session 9 call 3)."""
    def run():
        load()
        if device is not None and shapes is not None:
            _state.setdefault("preloaded", {})[(str(torch.device(device)), dtype)] = (shapes, self_check(
                device, dtype, *shapes))
    th = threading.Thread(target=run, name="rope-load", daemon=True)
    _state["preload_thread"] = th
    th.start()
    return th


def checked(device, dtype: torch.dtype, shapes: tuple) -> dict:
    """`self_check`'s result for this card, dtype and shapes: the preload's (waited for) or computed here."""
    th = _state.get("preload_thread")
    if th is not None:
        th.join()
    got = _state.get("preloaded", {}).get((str(torch.device(device)), dtype))
    if got is not None and got[0] == shapes:
        return dict(got[1], preloaded=True)
    return self_check(device, dtype, *shapes)


# --------------------------------------------------------------------------------------- the torch forms (reference)

def rotate_pairs(x: torch.Tensor) -> torch.Tensor:
    """transformers' rotate_half_llm: (x0, x1) -> (-x1, x0) for each interleaved pair."""
    return torch.stack((-x[..., 1::2], x[..., 0::2]), dim=-1).flatten(-2)


def rotate_halves(x: torch.Tensor) -> torch.Tensor:
    return torch.cat((-x[..., x.shape[-1] // 2:], x[..., : x.shape[-1] // 2]), dim=-1)


def mrope_torch(q, k, cos, sin):
    """GLM-4.1V's text rotation (transformers' apply_multimodal_rotary_pos_emb with rotate_half_llm): q [B, H, L, D],
    k [B, Hk, L, D], cos/sin [B, L, rd] in q's dtype, rd <= D; new tensors."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    rd = cos.shape[-1]
    q_rot, q_pass = q[..., :rd], q[..., rd:]
    k_rot, k_pass = k[..., :rd], k[..., rd:]
    q = torch.cat([q_rot * cos + rotate_pairs(q_rot) * sin, q_pass], dim=-1)
    k = torch.cat([k_rot * cos + rotate_pairs(k_rot) * sin, k_pass], dim=-1)
    return q, k


def vision_torch(q, k, cos, sin):
    """The vision tower's rotation (apply_rotary_pos_emb_vision): q, k [N, H, D], cos/sin [N, D] in fp32; the
    arithmetic in fp32, the result in q's dtype; new tensors."""
    c, s = cos.unsqueeze(-2), sin.unsqueeze(-2)
    qf, kf = q.float(), k.float()
    return (qf * c + rotate_halves(qf) * s).to(q.dtype), (kf * c + rotate_halves(kf) * s).to(k.dtype)


# ------------------------------------------------------------------------------------------------------ dispatch

def _launch(kernel, x, cos, sin, pairs: bool) -> None:
    """x [B, H, L, D] (any strides, last dim contiguous), cos/sin [B, L, ROT] (last dim contiguous), in place."""
    B, H, L, _ = x.shape
    rot = cos.shape[-1]
    block_h = max(1, min(8 if rot <= 64 else 4, 1 << (H - 1).bit_length()))
    grid = (B * L, -(-H // block_h))
    kernel[grid](x, cos, sin, L, H, x.stride(0), x.stride(2), x.stride(1), cos.stride(0), cos.stride(1),
                 ROT=rot, PAIRS=pairs, ROUND_PRODUCTS=pairs, BLOCK_H=block_h, enable_fp_fusion=False)


def _kernel_for(kind: str, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """The kernel where it may run on these tensors (CUDA, Triton, a power-of-two rotated width, unit inner strides,
    passed its self-check for this dtype), else None."""
    if not x.is_cuda:
        return None
    kernel = _state["kernel"] if "kernel" in _state else load()
    if kernel is None or not _state.get("ok", {}).get((kind, x.dtype)):
        return None
    rot = cos.shape[-1]
    if rot < 2 or rot & (rot - 1) or x.stride(-1) != 1 or cos.stride(-1) != 1 or cos.stride() != sin.stride():
        return None
    return kernel


def mrope(q, k, cos, sin):
    """The text decoder's rotation: in place by the kernel on CUDA (after `self_check`), else `mrope_torch`."""
    kernel = _kernel_for("pairs", q, cos, sin)
    if kernel is None or k.stride(-1) != 1:
        return mrope_torch(q, k, cos, sin)
    _launch(kernel, q, cos, sin, pairs=True)
    _launch(kernel, k, cos, sin, pairs=True)
    return q, k


def vision(q, k, cos, sin):
    """The vision tower's rotation: in place by the kernel on CUDA (after `self_check`), else `vision_torch`."""
    kernel = _kernel_for("halves", q, cos, sin)
    if kernel is None or k.stride(-1) != 1:
        return vision_torch(q, k, cos, sin)
    c, s = cos.unsqueeze(0), sin.unsqueeze(0)
    _launch(kernel, q.unsqueeze(0).transpose(1, 2), c, s, pairs=False)
    _launch(kernel, k.unsqueeze(0).transpose(1, 2), c, s, pairs=False)
    return q, k


def self_check(device, dtype: torch.dtype, text_shape: tuple[int, int, int], vision_shape: tuple[int, int],
               text_rot: int) -> dict:
    """Before any graph capture: each kernel against its torch form on random inputs of the model's head shapes
    (prefill-sized and decode-sized); only a bit-identical kernel is used. Returns {kind: True/False/reason}."""
    res: dict = {}
    ok = _state.setdefault("ok", {})
    device = torch.device(device)
    if device.type != "cuda" or load() is None:
        return {"pairs": "no Triton/CUDA", "halves": "no Triton/CUDA"}
    g = torch.Generator(device="cpu").manual_seed(0)
    hq, hk, d = text_shape
    hv, dv = vision_shape
    kernel = _state["kernel"]
    for kind in ("pairs", "halves"):
        try:
            same = True
            for n in (1, 37):
                if kind == "pairs":
                    # strided views of one projection output, as the fused q/k/v layer hands them over
                    qkv = (4 * torch.randn(2, n, hq + 2 * hk, d, generator=g)).to(device, dtype)
                    ang = (50 * torch.randn(2, n, text_rot, generator=g)).to(device)
                    cos, sin = ang.cos().to(dtype), ang.sin().to(dtype)
                    views = lambda t: (t[:, :, :hq].transpose(1, 2), t[:, :, hq:hq + hk].transpose(1, 2))  # noqa: E731
                    want = mrope_torch(*views(qkv), cos, sin)
                    got = views(qkv.clone())
                    for x in got:
                        _launch(kernel, x, cos, sin, pairs=True)
                else:
                    qkv = (4 * torch.randn(n, 3, hv, dv, generator=g)).to(device, dtype)
                    ang = (50 * torch.randn(n, dv, generator=g)).to(device)
                    cos, sin = ang.cos(), ang.sin()
                    want = vision_torch(qkv[:, 0], qkv[:, 1], cos, sin)
                    q2 = qkv.clone()
                    got = (q2[:, 0], q2[:, 1])
                    for x in got:
                        _launch(kernel, x.unsqueeze(0).transpose(1, 2), cos.unsqueeze(0), sin.unsqueeze(0),
                                pairs=False)
                same = same and all(torch.equal(a, b) for a, b in zip(got, want))
            ok[(kind, dtype)] = same
            res[kind] = same
            if not same:
                log.warning("rope: the %s kernel differs from the torch ops here; torch ops serve", kind)
        except Exception as e:  # noqa: BLE001
            ok[(kind, dtype)] = False
            res[kind] = f"{type(e).__name__}: {str(e)[:200]}"
            log.warning("rope: the %s kernel failed its check (%s); torch ops serve", kind, res[kind])
    return res
