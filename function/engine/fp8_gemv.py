"""QUANTIZATION=fp8, calls of few rows (decode): the weight-only product in Triton, imported by fp8.py only where
Triton imports (CUDA builds of torch ship it).

    y[M, N] = (x[M, K] @ codes[N, K].T) * scale[N] + bias[N]

bf16 activations as they are (not quantized), the fp8 (e4m3) weight codes widened in registers (every e4m3 value is
exact in bf16 and fp32), fp32 accumulation, the per-channel scale and the bias in the epilogue. At M <= 64 the
product reads ~1 byte per weight and does little arithmetic per byte, so it is bound by the weight stream, which fp8
halves against bf16 (the `_scaled_mm` path pays its fixed ~12.5 us per call and an activation-quantization kernel).

Two kernels, one program per BLOCK_N output channels (and per K slice with split-K), each streaming whole weight
rows along K (contiguous, coalesced, evict-first since every byte is read once):
- `fma`: for a few rows (M <= fp8.FMA_MAX_M): multiply-adds on the CUDA cores into a [BLOCK_M, BLOCK_N, BLOCK_K]
  register accumulator, reduced along K once at the end (gemlite's GEMV / split-K idea, without its atomics);
- `dot`: tl.dot of the bf16 activation tile with the widened weight tile (tensor cores, fp32 accumulation), for
  more rows; `dot_t` the same product transposed (the weight tile is the MMA's M side, the rows its N side).
The codes are widened by `_dequant`: with FAST (the default) four codes per 32-bit register by byte permutes, shifts
and masks into bf16 bit patterns 2^-120 too small, then one bf16x2 multiply-add by 2^120 per pair, exact for every
finite e4m3 value, subnormals included (checked against torch's cast of all 256 codes at conversion); otherwise
Triton's cast (fp8 -> f16 -> f32 -> bf16 conversions).
Split-K (small N, e.g. k_proj/v_proj with N = 256) writes fp32 partials [SPLIT_K, M, N] that `_splitk_reduce_kernel`
adds in a fixed order, so results are deterministic and a CUDA graph replays bit-identically. Launch shapes come from
fp8.gemv_config (a fixed table measured on the H200, else a heuristic) and fp8.gemv_launch (BLOCK_M, split); nothing
is autotuned and nothing reads a device value on the host, so the calls are capturable in CUDA graphs.

Compiled variants: Triton specializes an integer argument on == 1 and on divisibility by 16 unless told not to, so
without `do_not_specialize` the row count M alone made 1, 16, 20, 32, 37, 64 ... separate binaries, each compiled
(0.3-0.55 s on the H200) the first time serving met it (bench/RESULTS.md: 32 agents). M is a runtime value of both
kernels here, so one binary serves every M of a launch class (fp8.gemv_launch: the same config and BLOCK_M for all
rows of one fp8._bucket), and fp8.warm_steps compiles each class while the engine is idle after ready. N, K, K_SPLIT and
the strides stay specialized: they are fixed per layer (and K_SPLIT is a multiple of BLOCK_K).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .fp8 import GemvConfig, gemv_config, gemv_launch


@triton.jit
def _dequant(w, FAST: tl.constexpr):
    """uint8 e4m3 codes -> bf16 values (exact)."""
    if FAST:
        # byte b of each pair to the top byte of a 16-bit lane: sign at bit 15, exponent and mantissa at bits 8..14;
        # shifted right by 4 they sit where bf16 keeps them (exponent bias 127, e4m3's 7: 2^-120 too small);
        # then * 2^120 (0x7B80) + -0.0 (0x8000, which keeps signed zeros) per bf16 pair
        return tl.inline_asm_elementwise(
            asm="""{
            .reg .b32 t0, t1, s0, s1, m, z;
            mov.b32 m, 0x7B807B80;
            mov.b32 z, 0x80008000;
            prmt.b32 t0, $2, 0, 0x1404;
            prmt.b32 t1, $2, 0, 0x3424;
            shr.b32 s0, t0, 4;
            shr.b32 s1, t1, 4;
            and.b32 t0, t0, 0x80008000;
            and.b32 t1, t1, 0x80008000;
            and.b32 s0, s0, 0x07F007F0;
            and.b32 s1, s1, 0x07F007F0;
            or.b32 t0, t0, s0;
            or.b32 t1, t1, s1;
            fma.rn.bf16x2 $0, t0, m, z;
            fma.rn.bf16x2 $1, t1, m, z;
            }""",
            constraints="=r,=r,r", args=[w], dtype=tl.bfloat16, is_pure=True, pack=4)
    else:
        return w.to(tl.float8e4nv, bitcast=True).to(tl.bfloat16)


@triton.jit
def _dequant_kernel(w_ptr, y_ptr, n, FAST: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    w = tl.load(w_ptr + offs, mask=offs < n, other=0)
    tl.store(y_ptr + offs, _dequant(w, FAST), mask=offs < n)


@triton.jit
def _epilogue(acc, offs_m, offs_n, m_mask, n_mask, pid_k, s_ptr, b_ptr, y_ptr, ws_ptr, M, N, stride_ym,
              HAS_BIAS: tl.constexpr, SPLIT_K: tl.constexpr):
    mask = m_mask[:, None] & n_mask[None, :]
    if SPLIT_K == 1:
        s = tl.load(s_ptr + offs_n, mask=n_mask, other=0.0)
        out = acc * s[None, :]
        if HAS_BIAS:
            out += tl.load(b_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
        tl.store(y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :], out.to(y_ptr.dtype.element_ty),
                 mask=mask)
    else:
        tl.store(ws_ptr + (pid_k * M + offs_m[:, None]) * N + offs_n[None, :], acc, mask=mask)


@triton.jit
def _tiles(w_rows, x_rows, kk, K, m_mask, n_mask, EVEN_K: tl.constexpr, EVEN_N: tl.constexpr):
    """One K step: the weight codes [BLOCK_N, BLOCK_K] (uint8, read once: evict-first) and the rows [BLOCK_M,
    BLOCK_K]."""
    if EVEN_K:
        if EVEN_N:
            w = tl.load(w_rows + kk[None, :], eviction_policy="evict_first")
        else:
            w = tl.load(w_rows + kk[None, :], mask=n_mask[:, None], other=0, eviction_policy="evict_first")
        x = tl.load(x_rows + kk[None, :], mask=m_mask[:, None], other=0.0)
    else:
        k_mask = kk < K
        w = tl.load(w_rows + kk[None, :], mask=n_mask[:, None] & k_mask[None, :], other=0,
                    eviction_policy="evict_first")
        x = tl.load(x_rows + kk[None, :], mask=m_mask[:, None] & k_mask[None, :], other=0.0)
    return w, x


@triton.jit(do_not_specialize=["M"])
def _w8a16_kernel(x_ptr, w_ptr, s_ptr, b_ptr, y_ptr, ws_ptr, M, N, K, K_SPLIT, stride_xm, stride_wn, stride_ym,
                  KIND: tl.constexpr, FAST: tl.constexpr, HAS_BIAS: tl.constexpr, SPLIT_K: tl.constexpr,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr,
                  EVEN_N: tl.constexpr):
    """KIND 0: fma, 1: dot, 2: dot_t. Grid (N / BLOCK_N, SPLIT_K, M / BLOCK_M)."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_m = tl.program_id(2) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    m_mask = offs_m < M
    n_mask = offs_n < N
    k_lo = pid_k * K_SPLIT
    k_hi = tl.minimum(k_lo + K_SPLIT, K)
    w_rows = w_ptr + offs_n[:, None].to(tl.int64) * stride_wn
    x_rows = x_ptr + offs_m[:, None] * stride_xm
    if KIND == 0:
        acc3 = tl.zeros((BLOCK_M, BLOCK_N, BLOCK_K), dtype=tl.float32)
        for k in range(k_lo, k_hi, BLOCK_K):
            w, x = _tiles(w_rows, x_rows, k + offs_k, K, m_mask, n_mask, EVEN_K, EVEN_N)
            wf = _dequant(w, FAST).to(tl.float32)
            acc3 += x.to(tl.float32)[:, None, :] * wf[None, :, :]
        acc = tl.sum(acc3, axis=2)
    elif KIND == 1:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k in range(k_lo, k_hi, BLOCK_K):
            w, x = _tiles(w_rows, x_rows, k + offs_k, K, m_mask, n_mask, EVEN_K, EVEN_N)
            acc = tl.dot(x.to(tl.bfloat16), tl.trans(_dequant(w, FAST)), acc)
    else:
        acc_t = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
        for k in range(k_lo, k_hi, BLOCK_K):
            w, x = _tiles(w_rows, x_rows, k + offs_k, K, m_mask, n_mask, EVEN_K, EVEN_N)
            acc_t = tl.dot(_dequant(w, FAST), tl.trans(x.to(tl.bfloat16)), acc_t)
        acc = tl.trans(acc_t)
    _epilogue(acc, offs_m, offs_n, m_mask, n_mask, pid_k, s_ptr, b_ptr, y_ptr, ws_ptr, M, N, stride_ym,
              HAS_BIAS, SPLIT_K)


@triton.jit(do_not_specialize=["M"])
def _splitk_reduce_kernel(ws_ptr, s_ptr, b_ptr, y_ptr, M, N, stride_ym, HAS_BIAS: tl.constexpr,
                          SPLIT_K: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < M * N
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for s in tl.static_range(SPLIT_K):
        acc += tl.load(ws_ptr + s * M * N + offs, mask=mask, other=0.0)
    n = offs % N
    m = offs // N
    out = acc * tl.load(s_ptr + n, mask=mask, other=0.0)
    if HAS_BIAS:
        out += tl.load(b_ptr + n, mask=mask, other=0.0).to(tl.float32)
    tl.store(y_ptr + m * stride_ym + n, out.to(y_ptr.dtype.element_ty), mask=mask)


KINDS = {"fma": 0, "dot": 1, "dot_t": 2}


def dequant(codes: torch.Tensor, fast: bool = True) -> torch.Tensor:
    """The kernels' widening of fp8 codes to bf16, alone (the probe checks it against torch's cast)."""
    flat = codes.reshape(-1).view(torch.uint8)
    y = torch.empty(flat.shape, dtype=torch.bfloat16, device=codes.device)
    _dequant_kernel[(triton.cdiv(flat.numel(), 1024),)](flat, y, flat.numel(), FAST=fast, BLOCK=1024)
    return y.view(codes.shape)


def w8a16(x: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None,
          cfg: GemvConfig | None = None) -> torch.Tensor:
    """y = (x @ codes.T) * scale + bias for a 2-D bf16 x whose last dimension is contiguous; cfg: fp8.gemv_config."""
    M, K = x.shape
    N = codes.shape[0]
    cfg = cfg or gemv_config(M, N, K)
    if cfg is None:
        raise ValueError(f"no weight-only launch for M={M} N={N} K={K} (torch._scaled_mm is the faster path there)")
    y = torch.empty((M, N), dtype=x.dtype, device=x.device)
    launch = gemv_launch(M, N, K, cfg)
    bm, split, k_split = launch.block_m, launch.split, launch.k_split
    ws = torch.empty((split, M, N), dtype=torch.float32, device=x.device) if split > 1 else y
    grid = (triton.cdiv(N, cfg.block_n), split, triton.cdiv(M, bm))
    b = bias if bias is not None else scale
    _w8a16_kernel[grid](
        x, codes.view(torch.uint8), scale, b, y, ws, M, N, K, k_split, x.stride(0), codes.stride(0), y.stride(0),
        KIND=KINDS[cfg.kind], FAST=cfg.fast, HAS_BIAS=bias is not None, SPLIT_K=split, BLOCK_M=bm,
        BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, EVEN_K=K % cfg.block_k == 0, EVEN_N=N % cfg.block_n == 0,
        num_warps=cfg.warps, num_stages=cfg.stages)
    if split > 1:
        block = 1024
        _splitk_reduce_kernel[(triton.cdiv(M * N, block),)](ws, scale, b, y, M, N, y.stride(0),
                                                             HAS_BIAS=bias is not None, SPLIT_K=split, BLOCK=block,
                                                             num_warps=4)
    return y
