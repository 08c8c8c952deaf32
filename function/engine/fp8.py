"""QUANTIZATION=fp8: FP8 (e4m3) weights for the text decoder's linear layers, and the QUANTIZATION=auto rule.

Scheme (the one vLLM's `Fp8LinearMethod` / `Fp8LinearOp` uses for checkpoints without static activation scales, and
torchao's `Float8DynamicActivationFloat8WeightConfig(granularity=PerRow())`):

- weights: one fp32 scale per output channel, `scale = amax(|W[n, :]|) / 448`, codes `W / scale` in
  float8_e4m3fn, stored row-major [N, K] as `weight` (so `weight.t()` is the column-major [K, N] operand that
  `torch._scaled_mm` requires);
- activations: one fp32 scale per token, computed on the GPU at every call (`amax(|x[m, :]|) / 448`, floored at
  1 / (448 * 512) as vLLM does), never synchronised with the host;
- the product: `torch._scaled_mm(x_fp8, W_fp8.t(), scale_a=[M, 1], scale_b=[1, N], bias, out_dtype=bf16)`, the
  rowwise-scaled FP8 tensor-core GEMM (cuBLASLt / CUTLASS, compute capability >= 8.9), accumulating in fp32;
- calls of at most SMALL_M_MAX rows (decode steps) instead take a weight-only Triton kernel (fp8_gemv.py): bf16
  activations as they are times the fp8 codes widened in registers, fp32 accumulation, the per-channel scale and
  the bias in the epilogue. These calls are bound by reading the weights, which fp8 halves, whereas `_scaled_mm`
  costs a fixed ~12.5 us plus the activation-quantization kernel (bench/RESULTS.md). The kernel is probed at
  conversion/load (`_probe_w8a16`, on a thread of its own beside the weight read: loader.py); where Triton or the
  kernel fails, every call takes `_scaled_mm`, as logged. What a first request runs is compiled (or loaded from
  TRITON_CACHE_DIR) before ready by the graph captures and the warm-up request; every other variant the calls can
  launch (`row_classes`) right after ready while the engine is idle, a launch per step (`warm_steps`).

Everything else stays in the model dtype: the vision tower (unless QUANTIZE_VISION), embeddings, norms, lm_head.
Shapes are static and nothing reads a device value on the host, so the module runs inside the engine's CUDA graphs
unchanged. On CPU (tests, the tiny model) and for shapes or dtypes `_scaled_mm` cannot take, the same module runs
the same arithmetic emulated in fp32: quantize the activation per token, multiply the fp8 codes, apply both scales.

torchao is not installed on the serving image, hence this module instead of `quantize_(model, ...)`. The per-token
activation quantization is one Triton kernel where Triton imports (it ships with CUDA builds of torch) and checks
out against the torch version at conversion time; otherwise it is a handful of torch ops.

The pre-quantized checkpoint (`save_model` / `load_model`) is plain safetensors: the fp8 `*.weight` codes, their
`*.weight_scale`, and the model's other tensors in the model dtype, plus `fp8.json` naming the converted modules. It
is loaded onto an empty (meta) model, straight to the card, without transformers' weight conversion.
"""
from __future__ import annotations

import json
import logging
import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import torch
from torch import nn

from .weights import SHARD_BYTES, compact_views, is_view

log = logging.getLogger(__name__)

FP8_DTYPE = getattr(torch, "float8_e4m3fn", None)
FP8_MAX = 448.0                          # largest finite float8_e4m3fn
MIN_SCALE = 1.0 / (FP8_MAX * 512.0)      # vLLM's floor for dynamic (activation) scales: zero rows stay finite
WEIGHT_MIN_SCALE = 1e-12                 # weights: only guards all-zero rows; small rows keep their own scale
MIN_CAPABILITY = (8, 9)                  # FP8 tensor cores: Ada (8.9), Hopper (9.0) and later
FORMAT = 1                               # bump when the saved layout changes
INFO_FILE = "fp8.json"

#: Modules kept in the model dtype: lm_head (its logits decide every token; 1.2 GB of bf16, read once per step),
#: the vision tower unless QUANTIZE_VISION. Embeddings and norms are not nn.Linear and are never touched.
SKIP = ("lm_head",)
DECODER = "model.language_model"
VISUAL = "model.visual"


# --------------------------------------------------------------------------------------------- quantization math

def quantize_weight(w: torch.Tensor, out: torch.Tensor | None = None,
                    scale_out: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-output-channel FP8: (codes [N, K] float8_e4m3fn, scales [N] fp32) with w ~= codes * scales[:, None].
    `out` / `scale_out`: tensors to write the codes and scales into (then returned).

    No fp32 copy of w: the row maximum of |w| in w's own dtype is exact (abs and max only pick one of the values,
    and bf16/fp16 -> fp32 is exact), and the division promotes to fp32 element by element, so the codes and scales
    are those of `w.float()`, bit for bit, with one fp32 temporary instead of three (tests/test_fp8.py)."""
    w = w.detach()
    if w.dtype not in (torch.bfloat16, torch.float16, torch.float32):
        w = w.to(torch.float32)
    scale = (w.abs().amax(dim=1).to(torch.float32) / FP8_MAX).clamp_(min=WEIGHT_MIN_SCALE)
    q = torch.div(w, scale[:, None]).clamp_(-FP8_MAX, FP8_MAX)
    if out is None:
        q = q.to(FP8_DTYPE)
    else:
        q = out.copy_(q)
    if scale_out is not None:
        scale = scale_out.copy_(scale)
    return q, scale


def quantize_rows_torch(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic per-token FP8 of a 2-D activation: (codes [M, K], scales [M, 1] fp32), computed on x's device."""
    xf = x.to(torch.float32)
    scale = (xf.abs().amax(dim=-1, keepdim=True) / FP8_MAX).clamp_(min=MIN_SCALE)
    q = (xf / scale).clamp_(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return q, scale


_triton_quant = None      # set by _load_triton(): a callable like quantize_rows_torch, or None


def _load_triton():
    """The per-token quantization as one Triton kernel (two passes over each row: amax, then scale and cast)."""
    import triton
    import triton.language as tl

    @triton.jit
    def _quant_rows_kernel(x_ptr, q_ptr, s_ptr, K, stride_x, stride_q, MIN_S: tl.constexpr, QMAX: tl.constexpr,
                           BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        offs = tl.arange(0, BLOCK)
        x_row = x_ptr + row * stride_x
        acc = tl.zeros([BLOCK], dtype=tl.float32)
        for k in range(0, K, BLOCK):
            m = k + offs < K
            v = tl.load(x_row + k + offs, mask=m, other=0.0).to(tl.float32)
            acc = tl.maximum(acc, tl.abs(v))
        scale = tl.maximum(tl.max(acc, axis=0) / QMAX, MIN_S)
        tl.store(s_ptr + row, scale)
        q_row = q_ptr + row * stride_q
        for k in range(0, K, BLOCK):
            m = k + offs < K
            v = tl.load(x_row + k + offs, mask=m, other=0.0).to(tl.float32)
            v = tl.minimum(tl.maximum(v / scale, -QMAX), QMAX)
            tl.store(q_row + k + offs, v.to(q_ptr.dtype.element_ty), mask=m)

    def quant(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        M, K = x.shape
        q = torch.empty((M, K), dtype=FP8_DTYPE, device=x.device)
        s = torch.empty((M, 1), dtype=torch.float32, device=x.device)
        if M:
            block = min(4096, triton.next_power_of_2(K))
            _quant_rows_kernel[(M,)](x, q, s, K, x.stride(0), q.stride(0), MIN_S=MIN_SCALE, QMAX=FP8_MAX,
                                     BLOCK=block, num_warps=4 if block <= 1024 else 8)
        return q, s

    return quant


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if _triton_quant is not None and x.is_cuda:
        return _triton_quant(x)
    return quantize_rows_torch(x)


# --------------------------------------------------------------------------------------------- small-M: weight-only

#: Rows (tokens) up to which a CUDA bf16 call takes the weight-only kernel below instead of activation quantization
#: + torch._scaled_mm: decode steps (one row per sequence). At these sizes the product is bound by reading the
#: weights, which the fp8 codes halve, while `_scaled_mm` costs ~12.5 us per call whatever the size (bench/RESULTS.md,
#: FP8 issue 16). Measured by `bench/fp8_bench.py gemv` / `gemv_tune` on an H200: the kernel is ahead of both bf16
#: and `_scaled_mm` at 1..32 rows for every decoder shape and at 64 for all but gate_up (GEMV_TABLE sends that one
#: to `_scaled_mm`); above 64 rows `_scaled_mm` (the engine's next decode bucket is 96).
SMALL_M_MAX = 64


@dataclass(frozen=True)
class GemvConfig:
    """One launch configuration of the weight-only kernels: `fma` (CUDA-core multiply-adds, rows in registers, for
    a few rows), `dot` (tensor-core bf16 products of the widened tile, fp32 accumulation) or `dot_t` (the same
    product transposed: the weight tile on the MMA's M side); `split_k` > 1 writes fp32 partial sums that a second
    kernel adds in a fixed order (deterministic: no atomics)."""
    kind: str
    block_n: int
    block_k: int
    split_k: int = 1
    warps: int = 4
    stages: int = 3
    fast: bool = True       # the codes widened by byte permutes + one bf16x2 fma (else Triton's fp8 -> bf16 cast)


def _pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


FMA_MAX_M = 4           # rows up to which the fma kernel may be used (its registers grow with the rows)

_C = GemvConfig
#: Measured winners on an H200 (bench/fp8_bench.py gemv_tune, 2026-12-03, torch 2.11 / Triton 3.6; CUDA-graph replay
#: of one call), (M bucket, N, K) -> config, or None where torch._scaled_mm is faster (gate_up at 64 rows: 48.8 us
#: against 72.9). The GLM-4.1V-9B decoder's shapes: q/o (4096, 4096), k/v (256, 4096), gate_up (27392, 4096), down
#: (4096, 13696). dot at 1..16 rows runs one BLOCK_M=16 kernel, so most buckets share a compiled kernel.
GEMV_TABLE: dict[tuple[int, int, int], GemvConfig | None] = {
    **{(m, 4096, 4096): _C("dot", 64, 128, 4, 4, 4) for m in (1, 2, 4, 8, 16, 32)},      # 8.4-8.6 us, 10.2 at 32
    (64, 4096, 4096): _C("dot_t", 64, 128, 4, 4, 4),                                       # 14.3 us
    (1, 256, 4096): _C("fma", 2, 1024, 1, 4, 3),                                           # 3.6 us
    (2, 256, 4096): _C("fma", 4, 1024, 1, 4, 3),                                           # 3.9 us
    (4, 256, 4096): _C("fma", 2, 1024, 1, 4, 3),                                           # 4.6 us
    **{(m, 256, 4096): _C("dot", 32, 128, 8, 4, 4) for m in (8, 16, 32, 64)},            # 4.5-5.7 us
    **{(m, 27392, 4096): _C("dot", 64, 128, 1, 4, 4) for m in (1, 2, 4, 8, 16, 32)},     # 36.1-36.4 us, 45.8 at 32
    (64, 27392, 4096): None,
    **{(m, 4096, 13696): _C("dot", 64, 128, 4, 4, 4) for m in (1, 2, 4, 8, 16, 32)},     # 20.8-21.5 us, 25.0 at 32
    (64, 4096, 13696): _C("dot_t", 128, 128, 4, 4, 4),                                     # 33.4 us
}


def _heuristic(M: int, N: int, K: int, sms: int = 132) -> GemvConfig:
    """Shapes outside the table, after its pattern: fma over pairs of channels for a few rows of a narrow weight,
    else the tensor-core kernel with 64 channels a program, split along K until the card has a program per SM."""
    if M <= FMA_MAX_M and N <= 1024:
        return GemvConfig("fma", 2, 1024 if K >= 1024 else 256, 1, 4, 3)
    kind = "dot" if M <= 32 else "dot_t"
    bn = (128 if kind == "dot_t" and N >= 8192 else 64) if N >= 512 else 32
    bk = 128
    split = 1
    while split < 8 and -(-N // bn) * split < sms and K // (split * 2) >= 2 * bk:
        split *= 2
    return GemvConfig(kind, bn, bk, split, 4, 4)


def _bucket(M: int) -> int:
    return _pow2(M) if M <= 16 else 32 if M <= 32 else 64


_FAST_DEQUANT = True     # cleared by the probe where the kernels' bit-level widening differs from torch's cast


def gemv_config(M: int, N: int, K: int) -> GemvConfig | None:
    """The weight-only kernel's launch for M rows of an [N, K] weight; None: torch._scaled_mm is faster there."""
    key = (_bucket(M), N, K)
    cfg = GEMV_TABLE[key] if key in GEMV_TABLE else _heuristic(M, N, K)
    if cfg is None:
        return None
    return cfg if _FAST_DEQUANT or not cfg.fast else replace(cfg, fast=False)


@dataclass(frozen=True)
class GemvLaunch:
    """How fp8_gemv.w8a16 launches one config: rows per program (BLOCK_M), K slices (split) and their length."""
    block_m: int
    split: int
    k_split: int


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def gemv_launch(M: int, N: int, K: int, cfg: GemvConfig) -> GemvLaunch:
    """BLOCK_M and split-K of the weight-only launch of `cfg` for M rows of an [N, K] weight (pure: no Triton, so
    warm_kernels can tell its compile variants apart on the host). BLOCK_M depends on M only through `_bucket(M)`
    (a power of two for fma; 16, 32 or 64 for the tensor-core kernels), and M itself is not specialized by the
    kernels (`do_not_specialize`), so every row count of one bucket runs one compiled binary."""
    bm = _pow2(M) if cfg.kind == "fma" else min(64, max(16, _pow2(M)))
    split = max(1, min(cfg.split_k, _cdiv(K, cfg.block_k)))
    k_split = _cdiv(_cdiv(K, split), cfg.block_k) * cfg.block_k
    return GemvLaunch(bm, _cdiv(K, k_split), k_split)


_w8a16 = None      # set by _probe_w8a16(): callable (x2 bf16 [M, K], codes fp8 [N, K], scale [N], bias | None) -> y


def _load_w8a16():
    """The weight-only kernels (function/engine/fp8_gemv.py, which imports Triton): (the product, a callable
    (x2, codes, scale, bias, cfg=None) -> y; the widening of codes alone, (codes, fast) -> bf16)."""
    from . import fp8_gemv
    return fp8_gemv.w8a16, fp8_gemv.dequant


def weight_only_reference(x2: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor,
                          bias: torch.Tensor | None) -> torch.Tensor:
    """What the weight-only kernel computes, in fp32 (the activation is not quantized): x @ (codes * scale).T + b."""
    out = (x2.to(torch.float32) @ codes.to(torch.float32).t()) * scale.view(1, -1)
    if bias is not None:
        out = out + bias.to(torch.float32)
    return out


# --------------------------------------------------------------------------------------------- the module

class Fp8Linear(nn.Module):
    """Drop-in for nn.Linear with FP8 weights: same in/out features and call signature; `weight` is the fp8 code
    tensor (its `.device` is the layer's device, as the runner reads it), `weight_scale` its per-channel scales,
    `bias` stays in the model dtype."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, dtype=torch.bfloat16,
                 device=None, scaled_mm: bool = False):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features, dtype=FP8_DTYPE, device=device),
                                   requires_grad=False)
        self.weight_scale = nn.Parameter(torch.empty(out_features, dtype=torch.float32, device=device),
                                         requires_grad=False)
        self.bias = nn.Parameter(torch.empty(out_features, dtype=dtype, device=device), requires_grad=False) \
            if bias else None
        self.scaled_mm = scaled_mm        # decided once (conversion/load time), never per call
        self.fuse_bias = True
        self.small_m = 0                  # rows up to which the weight-only kernel runs (0: never); set with scaled_mm

    @classmethod
    def from_linear(cls, lin: nn.Linear, *, scaled_mm: bool = False, codes: torch.Tensor | None = None,
                    scale: torch.Tensor | None = None) -> "Fp8Linear":
        """The FP8 copy of `lin` (its bias shared, not copied). `codes` / `scale`: preallocated [N, K] fp8 and [N]
        fp32 tensors to quantize into (convert allocates them before any temporary). Built on the meta device, so
        no placeholder weight is allocated on the card and then thrown away."""
        w = lin.weight
        m = cls(lin.in_features, lin.out_features, lin.bias is not None, dtype=w.dtype, device="meta",
                scaled_mm=scaled_mm)
        q, s = quantize_weight(w, codes, scale)
        m.weight = nn.Parameter(q, requires_grad=False)
        m.weight_scale = nn.Parameter(s, requires_grad=False)
        if lin.bias is not None:
            m.bias = nn.Parameter(lin.bias.detach(), requires_grad=False)
        return m

    def extra_repr(self) -> str:
        how = "emulated" if not self.scaled_mm else \
            f"weight-only <= {self.small_m} rows, scaled_mm above" if self.small_m else "scaled_mm"
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"{how}")

    def dequantized(self, dtype=torch.float32) -> torch.Tensor:
        return (self.weight.to(torch.float32) * self.weight_scale[:, None]).to(dtype)

    def path(self, rows: int, is_cuda: bool, dtype: torch.dtype) -> str:
        """Which arithmetic a call with `rows` tokens takes: "weight_only" (the small-M Triton kernel: bf16
        activations x fp8 codes; rows <= small_m, where the launch table does not name _scaled_mm faster for this
        shape), "scaled_mm" (per-token FP8 activations, torch._scaled_mm) or "emulated" (fp32). Decided from static
        facts only, so a CUDA graph captured at a batch size always takes the same path."""
        if not (self.scaled_mm and is_cuda and dtype == torch.bfloat16):
            return "emulated"
        if rows <= self.small_m and _w8a16 is not None and \
                gemv_config(rows, self.out_features, self.in_features) is not None:
            return "weight_only"
        return "scaled_mm"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        if x2.shape[0] == 0:
            return x.new_zeros(*lead, self.out_features)
        path = self.path(x2.shape[0], x.is_cuda, x.dtype)
        if path == "weight_only":
            if x2.stride(-1) != 1:
                x2 = x2.contiguous()
            out = _w8a16(x2, self.weight, self.weight_scale, self.bias)
        elif path == "scaled_mm":
            if not x2.is_contiguous():
                x2 = x2.contiguous()
            qx, sx = quantize_rows(x2)
            bias = self.bias if self.fuse_bias else None
            out = torch._scaled_mm(qx, self.weight.t(), scale_a=sx, scale_b=self.weight_scale.view(1, -1),
                                   bias=bias, out_dtype=torch.bfloat16)
            if self.bias is not None and not self.fuse_bias:
                out = out + self.bias
        else:
            out = self._emulated(x2)
        return out.view(*lead, self.out_features)

    def _emulated(self, x2: torch.Tensor) -> torch.Tensor:
        """The arithmetic of the FP8 GEMM, in fp32: per-token codes times per-channel codes, then both scales."""
        qx, sx = quantize_rows_torch(x2)
        acc = qx.to(torch.float32) @ self.weight.to(torch.float32).t()
        out = acc * sx * self.weight_scale.view(1, -1)
        if self.bias is not None:
            out = out + self.bias.to(torch.float32)
        return out.to(x2.dtype)


# --------------------------------------------------------------------------------------------- what the card can do

@dataclass
class Support:
    scaled_mm: bool          # torch._scaled_mm with rowwise scales runs on this device
    fuse_bias: bool          # ... and takes a bias
    triton: bool             # the Triton activation-quantization kernel matches the torch ops here
    reason: str
    small_m: int = 0         # rows up to which the weight-only Triton kernel runs (0: it does not run here)


def _probe_scaled_mm(device: torch.device) -> tuple[bool, bool, str]:
    """Run a small rowwise-scaled FP8 GEMM against its emulation; (works, takes bias, why not)."""
    g = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(5, 64, generator=g).to(device=device, dtype=torch.bfloat16)
    lin = nn.Linear(64, 32, bias=True)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(32, 64, generator=g) * 0.05)
        lin.bias.copy_(torch.randn(32, generator=g))
    lin = lin.to(device=device, dtype=torch.bfloat16)
    m = Fp8Linear.from_linear(lin, scaled_mm=True)
    ref = m._emulated(x).float()
    for fuse in (True, False):
        m.fuse_bias = fuse
        try:
            out = m(x).float()
        except (RuntimeError, TypeError, NotImplementedError) as e:
            err = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            continue
        rel = float((out - ref).norm() / ref.norm())
        if rel < 2e-2:
            return True, fuse, ""
        err = f"rowwise _scaled_mm differs from its emulation (relative error {rel:.3g})"
    return False, False, err


def _probe_triton(device: torch.device) -> bool:
    global _triton_quant
    try:
        quant = _load_triton()
        g = torch.Generator(device="cpu").manual_seed(1)
        # 1000: a row shorter than one block (masked); 4096 and 13696 (ragged last block): the decoder's widths,
        # one binary for both (K is specialized only on divisibility by 16), the one prefill then launches
        for K in (1000, 4096, 13696):
            x = (torch.randn(7, K, generator=g) * torch.logspace(-3, 2, 7).view(7, 1)).to(device, torch.bfloat16)
            x[3] = 0
            qa, sa = quant(x)
            qb, sb = quantize_rows_torch(x)
            if not torch.allclose(sa, sb, rtol=1e-6, atol=0):
                raise AssertionError(f"scales differ at K={K}")
            diff = (qa.float() * sa - qb.float() * sb).abs()
            # the same codes but for a rare rounding tie (division order); never more than one code step
            if float((qa.view(torch.uint8) != qb.view(torch.uint8)).float().mean()) > 1e-3 or \
                    bool((diff > 0.0625 * (qb.float() * sb).abs() + sb * 2**-9).any()):
                raise AssertionError(f"codes differ at K={K}")
    except Exception as e:  # noqa: BLE001 - an absent or broken Triton only costs a few kernels per layer
        log.info("fp8: Triton activation quantization not used (%s: %s); torch ops instead", type(e).__name__, e)
        _triton_quant = None
        return False
    _triton_quant = quant
    return True


#: The weight-only kernels' checks at start-up: (M, N, K, config or None for gemv_config), each with a bias or
#: without. Chosen to cover what can go wrong while compiling little that serving does not run (each entry is one
#: Triton compile on an empty cache, ~0.3-0.5 s on the H200; the earlier list of 20 took 11 s): every kernel kind
#: (fma, dot, dot_t), split-K and its reduce kernel (with and without bias), the bias epilogue of the main kernel,
#: rows that fill no tile (3 of BLOCK_M 4, 5 of 16, 20 of 32, 40 of 64) and N and K that are no multiple of the
#: blocks (masked loads: EVEN_K/EVEN_N false). The second entry is what gemv_config picks for it, the same binary
#: the decoder's o_proj/down run at 1..16 rows (N, K and the strides are specialized only on divisibility by 16,
#: M not at all), so its compile is not wasted. The real shapes' binaries are compiled by the graph captures and
#: `warm_steps`; a failure in those sends that layer to _scaled_mm instead of failing a request.
PROBE_CASES: tuple[tuple[int, int, int, GemvConfig | None, bool], ...] = (
    (3, 70, 1000, GemvConfig("fma", 4, 256, 2), True),         # fma, split 2 (ragged last slice), ragged N
    (5, 512, 1024, None, False),                                 # heuristic: dot 64x128, split 4, no bias
    (20, 100, 512, GemvConfig("dot", 32, 128, 1), True),        # dot, bias in the main epilogue, ragged N
    (40, 128, 1000, GemvConfig("dot_t", 64, 128, 2), True),     # dot_t, split 2, ragged K
)


def _probe_w8a16(device: torch.device) -> tuple[bool, str]:
    """Load the weight-only kernels, check the widening of every finite e4m3 code against torch's cast, and each
    kernel kind against `weight_only_reference` on PROBE_CASES (see there for why these)."""
    global _w8a16, _FAST_DEQUANT
    _w8a16 = None
    try:
        fn, dequant = _load_w8a16()
        codes = torch.arange(256, dtype=torch.int32).to(torch.uint8)
        codes = codes[(codes & 0x7F) != 0x7F].view(FP8_DTYPE).to(device)      # every finite e4m3 value
        want = codes.to(torch.bfloat16).view(torch.int16)
        if not torch.equal(dequant(codes, fast=False).view(torch.int16), want):
            raise AssertionError("Triton's fp8 -> bf16 cast differs from torch's")
        try:
            _FAST_DEQUANT = bool(torch.equal(dequant(codes, fast=True).view(torch.int16), want))
        except Exception as e:  # noqa: BLE001 - e.g. the inline PTX does not assemble for this card
            log.info("fp8: bit-level fp8 widening unavailable (%s: %s)", type(e).__name__, str(e)[:200])
            _FAST_DEQUANT = False
        if not _FAST_DEQUANT:
            log.warning("fp8: the weight-only kernel's bit-level fp8 widening differs from torch's cast here; "
                        "using Triton's cast")
        g = torch.Generator(device="cpu").manual_seed(2)
        for M, N, K, cfg, bias in PROBE_CASES:
            w = (torch.randn(N, K, generator=g) * 0.05).to(device=device, dtype=torch.bfloat16)
            q, sc = quantize_weight(w)
            b = torch.randn(N, generator=g).to(device=device, dtype=torch.bfloat16) if bias else None
            x = torch.randn(M, K, generator=g).to(device=device, dtype=torch.bfloat16)
            if cfg is not None and not _FAST_DEQUANT:
                cfg = replace(cfg, fast=False)
            out = fn(x, q, sc, b, cfg).float()
            ref = weight_only_reference(x, q, sc, b)
            rel = float((out - ref).norm() / ref.norm())
            if not rel < 1e-2:
                raise AssertionError(f"M={M} N={N} K={K} {cfg}: relative error {rel:.3g}")
    except Exception as e:  # noqa: BLE001 - no kernel: every call takes torch._scaled_mm, as before
        return False, f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300]
    _w8a16 = fn
    return True, ""


_SUPPORT: dict[str, Support] = {}     # device -> the probes' answer (they set this module's kernels once)
_SUPPORT_LOCK = threading.Lock()


def device_support(device: str | torch.device) -> Support:
    """Whether FP8 tensor-core matmuls are usable on `device`; CPU and older cards get the emulated module. The
    probes run once per device and process (QUANTIZATION=auto's rule, the loader's background probe and the bench
    ask again), under a lock, so a second caller waits for the first one's answer rather than probing beside it."""
    dev = torch.device(device)
    if FP8_DTYPE is None or not hasattr(torch, "_scaled_mm"):
        return Support(False, False, False, f"torch {torch.__version__} has no float8_e4m3fn/_scaled_mm")
    if dev.type != "cuda":
        return Support(False, False, False, "no CUDA device: the FP8 arithmetic is emulated in fp32")
    if dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    with _SUPPORT_LOCK:
        if str(dev) not in _SUPPORT:
            with torch.cuda.device(dev):     # Triton launches on the thread's current device
                _SUPPORT[str(dev)] = _probe_device(dev)
        return _SUPPORT[str(dev)]


def _probe_device(dev: torch.device) -> Support:
    cap = torch.cuda.get_device_capability(dev)
    if cap < MIN_CAPABILITY:
        return Support(False, False, False, f"compute capability {cap[0]}.{cap[1]} < 8.9: no FP8 tensor cores")
    ok, fuse, err = _probe_scaled_mm(dev)
    if not ok:
        return Support(False, False, False, f"torch._scaled_mm (rowwise) does not run here: {err}")
    tri = _probe_triton(dev)
    wo, why = _probe_w8a16(dev)
    if wo:
        log.info("fp8: weight-only Triton kernel for calls of <= %d rows (decode); torch._scaled_mm above",
                 SMALL_M_MAX)
    else:
        log.warning("fp8: weight-only Triton kernel not used (%s); every call takes torch._scaled_mm", why)
    return Support(True, fuse, tri, f"compute capability {cap[0]}.{cap[1]}: FP8 tensor cores"
                   + ("" if wo else f"; no weight-only kernel ({why})"), small_m=SMALL_M_MAX if wo else 0)


SupportSource = Support | Callable[[], Support | None] | None


def _resolve_support(support: SupportSource, device: torch.device) -> tuple[Support, float]:
    """(the Support to use, seconds spent getting it): `support` itself, or what the callable returns (e.g. the
    loader's probe running on another thread), or the probes run here where that is None."""
    t0 = time.perf_counter()
    if callable(support):
        support = support()
    if support is None:
        support = device_support(device)
        log.info("fp8: device probes %.2fs (%s)", time.perf_counter() - t0, support.reason)
    return support, time.perf_counter() - t0


# --------------------------------------------------------------------------------------------- conversion

def _targets(model: nn.Module, quantize_vision: bool) -> list[str]:
    prefixes = (DECODER,) + ((VISUAL,) if quantize_vision else ())
    names = []
    for name, mod in model.named_modules():
        if type(mod) is nn.Linear and name.startswith(prefixes) and name.rsplit(".", 1)[-1] not in SKIP:
            names.append(name)
    return names


def _set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


def _gemm_ok(in_features: int, out_features: int) -> bool:
    # _scaled_mm: K and N multiples of 16 (the row-major A's leading dimension and the column-major B's)
    return in_features % 16 == 0 and out_features % 16 == 0


def convert(model: nn.Module, *, quantize_vision: bool = False, support: SupportSource = None) -> dict[str, Any]:
    """Replace the decoder's nn.Linear modules (and the vision tower's with `quantize_vision`) by Fp8Linear, in
    place. Returns what was done. `support`: the device's Support, or a callable giving it (the loader's probe on
    another thread; resolved after the weights are quantized, so the two overlap), or None to probe here.

    Where the codes go depends on what the bf16 weights are:
    - views of larger buffers (weights.WeightReader's shards: the first start's read-ahead, the usual case):
      swapping a module frees nothing, so every module's codes and scales are allocated first, before any
      quantization temporary (which would otherwise leave them inside temporary blocks the allocator then cannot
      release), and quantized straight into them with no host round trip or per-module sync (staging through
      host memory, below, was done here too before: per module a synchronous copy to pageable host memory and one
      back, 2 x 8.5 GB for the 9B model, the likely bulk of the 6.9 s conversion on the H200); once all modules
      are converted the model's tensors that are still views of a shard (embeddings, norms, biases, lm_head,
      the vision tower) are copied out (`weights.compact_views`), so the shards themselves, bf16 decoder weights included, are
      freed (before, they stayed allocated beside the fp8 codes: less room for the KV cache on a first start);
    - tensors of their own (from_pretrained, the plain native read): each bf16 weight is freed as its fp8 copy is
      made; the codes are parked in host memory until every bf16 weight is freed (allocated now, they would be
      carved out of the freed bf16 blocks, and the rest of those blocks would stay reserved: the KV cache is sized
      from the memory the driver reports free), then moved back."""
    names = _targets(model, quantize_vision)
    if not names:
        raise RuntimeError("fp8: no nn.Linear under model.language_model: the transformers layout changed; update "
                           "function/engine/fp8.py")
    t0 = time.perf_counter()
    device = model.get_submodule(names[0]).weight.device
    in_place = any(is_view(model.get_submodule(n).weight) for n in names)
    before = after = 0
    done: list[tuple[str, Fp8Linear, torch.dtype]] = []
    staged: list[tuple[Fp8Linear, torch.device]] = []
    outs: list[tuple[torch.Tensor | None, torch.Tensor | None]] = [(None, None)] * len(names)
    if in_place:
        outs = []
        for n in names:
            w = model.get_submodule(n).weight
            outs.append((torch.empty(w.shape, dtype=FP8_DTYPE, device=w.device),
                         torch.empty(w.shape[0], dtype=torch.float32, device=w.device)))
    for i, name in enumerate(names):
        lin = model.get_submodule(name)     # one at a time: the bf16 module goes once it is swapped
        codes, scale = outs[i]
        outs[i] = (None, None)
        new = Fp8Linear.from_linear(lin, codes=codes, scale=scale)
        before += lin.weight.numel() * lin.weight.element_size()
        after += new.weight.numel() + new.weight_scale.numel() * 4
        done.append((name, new, lin.weight.dtype))
        if new.weight.is_cuda and not in_place:
            staged.append((new, new.weight.device))
            new.to("cpu")
        _set_module(model, name, new)
        del lin, codes, scale
    compacted = 0
    if staged:
        torch.cuda.empty_cache()
        for mod, dev in staged:
            mod.to(dev)
    if in_place:
        compacted = compact_views(model)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    t_convert = time.perf_counter() - t0
    support_now, t_support = _resolve_support(support, device)
    emulated = []
    for name, new, wdtype in done:
        use = support_now.scaled_mm and wdtype == torch.bfloat16 and _gemm_ok(new.in_features, new.out_features)
        new.scaled_mm = use
        new.fuse_bias = support_now.fuse_bias
        new.small_m = support_now.small_m if use else 0
        if support_now.scaled_mm and not use:
            emulated.append(name)
    if emulated:
        log.warning("fp8: %d modules run emulated (shape not a multiple of 16 or dtype not bf16): %s", len(emulated),
                    ", ".join(emulated[:5]))
    _mark(model, names, quantize_vision)
    return {"modules": len(names), "bytes_before": before, "bytes_after": after, "support": support_now.reason,
            "probe_s": round(t_support, 3), "convert_s": round(t_convert, 3),
            "codes": "allocated first" if in_place else "staged on the host" if staged else "as made",
            "compacted_bytes": compacted, "triton_quant": support_now.triton,
            "weight_only_max_rows": support_now.small_m,
            "emulated": len(emulated) if support_now.scaled_mm else len(names)}


def _mark(model: nn.Module, names: list[str], quantize_vision: bool) -> None:
    model._fp8_modules = list(names)
    model._fp8_quantize_vision = quantize_vision


def converted_modules(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, Fp8Linear)]


# --------------------------------------------------------------------------------------------- kernel warm-up

#: The engine's decode batch buckets when CUDA_GRAPH_BATCH_SIZES is unset (function/engine/runner.py ModelRunner;
#: tests/test_fp8.py holds the two equal).
DECODE_BATCH_SIZES = (1, 2, 4, 8, 16, 32, 48, 64, 96, 128)


def row_classes(max_num_seqs: int, small_m: int = SMALL_M_MAX, graph_batch_sizes: tuple[int, ...] = ()) -> list[int]:
    """The row counts up to `small_m` whose Fp8Linear calls the engine can launch, one per compiled class: the
    decode buckets of `max_num_seqs` slots (runner._buckets of CUDA_GRAPH_BATCH_SIZES, default
    DECODE_BATCH_SIZES: the base sizes below the slot count, less any within 1/8 of it, and the slot count) and
    every `_bucket` class, because prefill calls are not bucketed to the slots: a chunk after a reused prefix has
    as many rows as new tokens (20, 37, ...) and a short prompt's graphed prefill 64. Each row count stands for
    all of its `_bucket`: they share one launch config and one compiled binary (gemv_launch)."""
    limit = max(1, int(max_num_seqs))
    base = tuple(graph_batch_sizes) or DECODE_BATCH_SIZES
    decode = {b for b in base if b <= limit - limit // 8} | {limit}
    prefill = {_bucket(m) for m in range(1, int(small_m) + 1)}
    return sorted({r for r in decode if 1 <= r <= small_m} | prefill)


def _fusions(model: nn.Module) -> list[tuple[list[Fp8Linear], Fp8Linear | None]]:
    """The q/k/v projections the engine runs as one module, as ([q, k, v], the fused module or None where the
    fusion is still to come): engine/glm4v.py's attention `fuse_qkv`, which ModelRunner applies after the load
    through `fuse_projections` where the model has it (the fused module is kept in the attention's __dict__)."""
    will_fuse = callable(getattr(model, "fuse_projections", None))
    out = []
    for mod in model.modules():
        if not callable(getattr(mod, "fuse_qkv", None)):
            continue
        parts = [getattr(mod, n, None) for n in ("q_proj", "k_proj", "v_proj")]
        fused = mod.__dict__.get("_qkv")
        if all(isinstance(p, Fp8Linear) for p in parts) and (fused is not None or will_fuse):
            out.append((parts, fused))
    return out


def _warm_targets(model: nn.Module) -> list[tuple[str, Fp8Linear, list[Fp8Linear]]]:
    """(name, module to launch like, modules whose kernel it stands for): every Fp8Linear the engine will call:
    the registered modules but fused q/k/v, the fused q/k/v modules (not registered), and for a fusion still to
    come a stand-in of the fused shape on the meta device (fuse_linear gives the fused module the first's path)."""
    targets, skip = [], set()
    for parts, fused in _fusions(model):
        q = parts[0]
        if fused is None:
            fused = Fp8Linear(q.in_features, sum(p.out_features for p in parts), q.bias is not None,
                              dtype=q.bias.dtype if q.bias is not None else torch.bfloat16, device="meta",
                              scaled_mm=q.scaled_mm)
            fused.fuse_bias, fused.small_m = q.fuse_bias, q.small_m
            fused._warm_device = q.weight.device
            targets.append(("fused q/k/v", fused, [q]))
        else:
            targets.append(("fused q/k/v", fused, [fused]))
        skip.update(id(p) for p in parts)
        skip.add(id(fused))
    for name, mod in model.named_modules():
        if isinstance(mod, Fp8Linear) and id(mod) not in skip:
            skip.add(id(mod))
            targets.append((name, mod, [mod]))
    return targets


def _disable_triton_quant(why: str) -> None:
    global _triton_quant
    _triton_quant = None
    log.warning("fp8: the Triton activation-quantization kernel failed (%s); torch ops quantize instead", why)


def _on(dev: torch.device):
    import contextlib
    return torch.cuda.device(dev) if dev.type == "cuda" else contextlib.nullcontext()


def _aligned(t: torch.Tensor | None) -> bool:
    return t is None or t.data_ptr() % 16 == 0


def warm_kernels(model: nn.Module, rows: Iterable[int], *,
                 device_types: tuple[str, ...] = ("cuda",)) -> dict[str, Any]:
    """Every step of `warm_steps` at once; returns its counts and seconds."""
    res: dict[str, Any] = {}
    for _ in warm_steps(model, rows, res, device_types=device_types):
        pass
    return res


def warm_steps(model: nn.Module, rows: Iterable[int], res: dict[str, Any] | None = None, *,
               device_types: tuple[str, ...] = ("cuda",)) -> Iterator[None]:
    """Compile (or load from TRITON_CACHE_DIR) every Triton kernel variant the model's Fp8Linear calls can launch,
    one launch per step (a compile is 0.3-0.55 s on the H200 on an empty cache), so the engine can run them
    while idle after ready: a variant first met by a request stalls the engine for its compile (bench/RESULTS.md,
    32 agents). Plans on the first step, so a q/k/v fusion made since the call is seen as made. `rows`: the row
    counts calls can have (`row_classes`); `res` gets the counts and seconds.

    For each module (and each q/k/v fusion the engine will make, see `_warm_targets`) and each row count whose
    `path` is "weight_only", the weight-only kernel (and its split-K reduce) runs once on zero activations, deduped
    by its launch (shape, bias, launch config, BLOCK_M, split, alignment of the tensors): the 40 decoder layers
    share their launches, so this is one run per variant, not per layer. The activation-quantization kernel of
    the _scaled_mm path runs once per input width. No-op (zeros in the result) on CPU and where the kernels did
    not pass their probe. A launch that fails sends the modules it stands for to _scaled_mm (logged) rather than
    failing a request later. `device_types`: where the modules must be for their kernels to run (the tests run
    this logic on CPU with stand-in kernels)."""
    busy = 0.0      # seconds inside the steps (not the pauses between them)
    t0 = time.perf_counter()
    rows = sorted({int(r) for r in rows if int(r) >= 1})
    res = {} if res is None else res
    res.update({"launches": 0, "variants": 0, "quant_widths": 0, "failed": 0, "seconds": 0.0})
    kernel, quant = _w8a16, _triton_quant
    if kernel is None and quant is None:
        res["skipped"] = "no Triton kernels on this device"
        return
    # launch key -> (name, module, rows, config, every module whose calls it stands for)
    launches: dict[tuple, tuple[str, Fp8Linear, int, GemvConfig, list[Fp8Linear]]] = {}
    widths: dict[tuple, torch.device] = {}
    variants = set()
    for name, mod, members in _warm_targets(model):
        dev = getattr(mod, "_warm_device", None) or mod.weight.device
        if dev.type not in device_types:
            continue
        N, K, bias = mod.out_features, mod.in_features, mod.bias is not None
        if mod.scaled_mm and quant is not None:
            widths.setdefault((dev, K), dev)
        if kernel is None:
            continue
        align = (True, True, True) if mod.weight.device.type == "meta" else \
            (_aligned(mod.weight), _aligned(mod.weight_scale), _aligned(mod.bias))
        for r in rows:
            if mod.path(r, True, torch.bfloat16) != "weight_only":
                continue
            cfg = gemv_config(r, N, K)
            launch = gemv_launch(r, N, K, cfg)
            key = (dev, N, K, bias, cfg, launch.block_m, launch.split, launch.k_split, align)
            launches.setdefault(key, (name, mod, r, cfg, []))[4].extend(members)
            variants.add((dev, cfg, launch.block_m, launch.split, bias, N % 16 == 0, K % 16 == 0,
                          K % cfg.block_k == 0, N % cfg.block_n == 0, align))
    res["variants"] = len(variants)
    stand_ins: dict[tuple, tuple] = {}
    xs: dict[tuple, torch.Tensor] = {}
    failed: set[int] = set()
    for key, (name, mod, r, cfg, members) in launches.items():
        if mod.path(r, True, torch.bfloat16) != "weight_only":    # an earlier launch of it failed
            continue
        dev, N, K = key[0], key[1], key[2]
        if mod.weight.device.type == "meta":    # a fusion still to come: tensors of its shape, made once
            sk = (dev, N, K, mod.bias is not None)
            if sk not in stand_ins:
                stand_ins[sk] = (torch.zeros(N, K, dtype=FP8_DTYPE, device=dev),
                                 torch.ones(N, dtype=torch.float32, device=dev),
                                 torch.zeros(N, dtype=torch.bfloat16, device=dev) if mod.bias is not None else None)
            codes, scale, b = stand_ins[sk]
        else:
            codes, scale, b = mod.weight, mod.weight_scale, mod.bias
        if (dev, K) not in xs:
            xs[(dev, K)] = torch.zeros(max(rows), K, dtype=torch.bfloat16, device=dev)
        try:
            with _on(dev):
                kernel(xs[(dev, K)][:r], codes, scale, b, cfg)
                if dev.type == "cuda":
                    torch.cuda.synchronize(dev)     # errors surface here, and the seconds are the kernel's too
            res["launches"] += 1
        except Exception as e:  # noqa: BLE001 - those layers take _scaled_mm rather than failing a request
            for m in [mod, *members]:
                failed.add(id(m))
                m.small_m = 0
            log.warning("fp8: the weight-only kernel failed for %s and %d more (M=%d N=%d K=%d %s: %s: %s); they "
                        "take torch._scaled_mm", name, len(members) - 1, r, N, K, cfg, type(e).__name__,
                        str(e)[:200])
        res["failed"] = len(failed)     # modules sent to _scaled_mm
        busy += time.perf_counter() - t0
        res["seconds"] = round(busy, 3)
        yield
        t0 = time.perf_counter()
    if quant is not None:
        for (dev, K) in widths:
            try:
                with _on(dev):
                    quant(torch.zeros(1, K, dtype=torch.bfloat16, device=dev))
                    if dev.type == "cuda":
                        torch.cuda.synchronize(dev)
                res["quant_widths"] += 1
            except Exception as e:  # noqa: BLE001 - the torch ops then quantize the activations
                _disable_triton_quant(f"{type(e).__name__}: {str(e)[:200]} at K={K}")
                break
    res["seconds"] = round(busy + time.perf_counter() - t0, 3)


# --------------------------------------------------------------------------------------------- pre-quantized checkpoint

def save_model(model: nn.Module, out: Path, *, max_shard_bytes: int = SHARD_BYTES) -> None:
    """Write the converted model as safetensors shards + config.json + fp8.json into `out` (an existing, empty
    directory; the caller makes it atomic)."""
    from .weights import save_shards

    out = Path(out)
    names = converted_modules(model)
    if not names:
        raise RuntimeError("save_model: the model has no Fp8Linear modules")
    files = save_shards(model.state_dict(), out, max_shard_bytes)
    model.config.save_pretrained(out)
    (out / INFO_FILE).write_text(json.dumps({
        "format": FORMAT, "scheme": "float8_e4m3fn weights, per-output-channel fp32 scales; dynamic per-token "
        "activation scales", "modules": names, "quantize_vision": bool(getattr(model, "_fp8_quantize_vision", False)),
        "dtype": str(model.lm_head.weight.dtype).replace("torch.", ""),
        "files": files, "torch": torch.__version__}, indent=1))


def is_fp8_checkpoint(d: Path) -> bool:
    return (Path(d) / INFO_FILE).is_file()


def _device_for(key: str, device_map) -> torch.device:
    if isinstance(device_map, (str, torch.device)):
        return torch.device(device_map)
    best, dev = -1, None
    for prefix, d in device_map.items():
        if prefix == "" or key == prefix or key.startswith(prefix + "."):
            if len(prefix) > best:
                best, dev = len(prefix), d
    if dev is None:
        raise RuntimeError(f"fp8: the device map places no module holding {key}")
    return torch.device(f"cuda:{dev}" if isinstance(dev, int) else dev)


def _assign(model: nn.Module, key: str, value: torch.Tensor) -> None:
    mod_name, _, attr = key.rpartition(".")
    mod = model.get_submodule(mod_name) if mod_name else model
    if attr in mod._parameters:
        mod._parameters[attr] = nn.Parameter(value, requires_grad=False)
    elif attr in mod._buffers:
        mod._buffers[attr] = value
    else:
        raise KeyError(key)


def load_model(load_dir: Path, *, dtype: torch.dtype, device_map, attn_implementation: str, native: bool = False,
               state_dict: dict[str, torch.Tensor] | None = None, support: SupportSource = None):
    """The pre-quantized checkpoint written by `save_model`, built on the meta device and filled straight from the
    safetensors files onto the target device(s). Every parameter must come from the files. `native`: the model is
    engine/glm4v.py's (no transformers import), else transformers' class for the checkpoint. `state_dict`: the
    files' tensors already read (weights.WeightReader: parallel reads into device memory, ~8x one safe_open
    reader's speed on an H200 host); its entries are consumed. `support`: the device's Support, or a callable
    giving it (the loader's probe on another thread), asked for only once the tensors are in place so the probe
    overlaps the build; None (or a callable answering None): the probes run here."""
    from safetensors import safe_open

    load_dir = Path(load_dir)
    info = json.loads((load_dir / INFO_FILE).read_text())
    if info.get("format") != FORMAT:
        raise RuntimeError(f"{load_dir}: fp8 checkpoint format {info.get('format')} != {FORMAT}")
    if native:
        from . import glm4v
        cfg = glm4v.Glm4vNativeConfig.from_dir(load_dir)
        model = glm4v.build_empty(cfg).to(dtype)
    else:
        from accelerate import init_empty_weights
        from transformers import AutoConfig, AutoModelForImageTextToText
        cfg = AutoConfig.from_pretrained(load_dir)
        with init_empty_weights(include_buffers=False):
            model = AutoModelForImageTextToText.from_config(cfg, dtype=dtype,
                                                            attn_implementation=attn_implementation)
    converted = []
    for name in info["modules"]:
        lin = model.get_submodule(name)
        new = Fp8Linear(lin.in_features, lin.out_features, lin.bias is not None, dtype=dtype, device="meta")
        _set_module(model, name, new)
        converted.append(new)
    files = info.get("files") or sorted(p.name for p in load_dir.glob("*.safetensors"))
    expected = {k for k, _ in model.named_parameters(remove_duplicate=False)} | \
        {k for k, _ in model.named_buffers(remove_duplicate=False)}
    single = isinstance(device_map, (str, torch.device))
    read_dev = "cpu"
    if single:   # straight onto the card (safetensors reads into device memory); a split model goes via the host
        d = torch.device(device_map)
        read_dev = f"cuda:{d.index if d.index is not None else torch.cuda.current_device()}" \
            if d.type == "cuda" else str(d)
    if state_dict is not None:
        for key in list(state_dict):
            if key not in expected:
                raise RuntimeError(f"{load_dir}: unexpected tensor {key}")
            _assign(model, key, state_dict.pop(key).to(_device_for(key, device_map)))
    else:
        for fname in files:
            with safe_open(str(load_dir / fname), framework="pt", device=read_dev) as f:
                for key in f.keys():
                    if key not in expected:
                        raise RuntimeError(f"{load_dir / fname}: unexpected tensor {key}")
                    _assign(model, key, f.get_tensor(key).to(_device_for(key, device_map)))
    if native:
        glm4v.finish_load(model, _device_for("lm_head.weight", device_map))   # tied weights, rotary buffers
    elif getattr(cfg.get_text_config(), "tie_word_embeddings", False) or getattr(cfg, "tie_word_embeddings", False):
        model.tie_weights()
    # non-persistent buffers (rotary inv_freq) were built on the CPU by the model's __init__
    for key, b in list(model.named_buffers()):
        dev = _device_for(key, device_map)
        if b.device != dev:
            _assign(model, key, b.to(dev))
    missing = [k for k, p in model.named_parameters() if p.device.type == "meta"]
    if missing:
        raise RuntimeError(f"{load_dir}: the checkpoint lacks {len(missing)} tensors, e.g. {missing[:3]}")
    if converted:
        support, _ = _resolve_support(support, _device_for(info["modules"][0] + ".weight", device_map))
        for new in converted:
            use = support.scaled_mm and dtype == torch.bfloat16 and _gemm_ok(new.in_features, new.out_features)
            new.scaled_mm, new.fuse_bias, new.small_m = use, support.fuse_bias, support.small_m if use else 0
    _mark(model, list(info["modules"]), bool(info.get("quantize_vision")))
    if not single:
        from accelerate import dispatch_model
        model = dispatch_model(model, device_map=device_map)
    return model.eval()


# --------------------------------------------------------------------------------------------- QUANTIZATION=auto

#: The useful KV room: MAX_NUM_SEQS sequences of this many tokens (a phone step: one screenshot + the task and history
#: is ~1.5-2k tokens; the answer needs room too). bf16 is chosen wherever its weights leave this much, because it is
#: the setting measured best under load (on an H200 fp8 ran 0.91-0.94x bf16's agent turns per minute before its
#: small-M decode kernel; with it, 1.22x at 1 agent, not yet measured under load; nf4 0.6-0.7x bf16's throughput:
#: bench/RESULTS.md). Below it, fp8 needs only one such sequence beside its weights (the engine
#: sizes its slots to what is left); nf4 where fp8 does not run or does not fit.
USEFUL_KV_TOKENS_PER_SEQ = 4096

#: Where the speed ranking of the rule comes from (cited in its reasons).
MEASURED = ("fp8 measured 0.91-0.94x bf16's agent turns per minute on an H200 before its small-M decode kernel and "
            "1.22x bf16's turn time at 1 agent with it (not yet measured under 8-32 agents; accuracy on real "
            "weights unvalidated), nf4 0.6-0.7x (bench/RESULTS.md)")


@dataclass(frozen=True)
class Card:
    capability: tuple[int, int]
    total_bytes: int
    name: str = ""


def decide(cards: list[Card], weight_bytes: dict[str, int], kv_bytes: int, *, usable_fraction: float,
           overhead_bytes: int, min_kv_bytes: int = 0, fp8_runs: bool = True,
           fp8_why_not: str = "") -> tuple[str, str]:
    """The QUANTIZATION=auto rule, as plain data. `cards`: the pod's GPUs (empty: CPU). `weight_bytes`: bytes on the
    cards for "none", "fp8" and "nf4". `kv_bytes`: the useful KV room (MAX_NUM_SEQS phone steps); `min_kv_bytes`:
    one phone step. `overhead_bytes`: per card (CUDA context, activations, graph pools). `fp8_runs` / `fp8_why_not`:
    whether torch._scaled_mm runs on these cards (and why not); only consulted when bf16 does not fit. Returns
    (quantization, reason). The order follows what was measured (bench/RESULTS.md: on an H200 this project's fp8
    path gave 0.91-0.94x bf16's agent turns per minute, its decode GEMMs 0.79x bf16's, before the small-M decode
    kernel; with it one agent's turn is 1.22x faster, but nothing under load and no real-weight accuracy is
    measured yet; nf4 gives 0.6-0.7x bf16's throughput under load), so the setting measured best that fits wins:

    - bf16 (none) where bf16 weights leave the useful KV room (`kv_bytes`);
    - else fp8 on cards with FP8 tensor cores (compute capability >= 8.9, `fp8_runs`) where fp8 weights leave at
      least one sequence's KV (`min_kv_bytes`);
    - else nf4 (bitsandbytes);
    - none on CPU."""
    if not cards:
        return "none", "no CUDA device: unquantized on CPU"
    room = sum(int(c.total_bytes * usable_fraction) - overhead_bytes for c in cards)
    gib = 2**30
    desc = f"{len(cards)} x {cards[0].name or 'GPU'} (compute capability {cards[0].capability[0]}." \
           f"{cards[0].capability[1]}, {cards[0].total_bytes / gib:.0f} GiB)"

    def left(q):
        return (room - weight_bytes[q]) / gib

    want = f"{kv_bytes / gib:.1f} GiB of KV wanted"
    bf16 = f"bf16 weights ({weight_bytes['none'] / gib:.1f} GiB)"
    if room - weight_bytes["none"] >= kv_bytes:
        return "none", (f"{desc}: bf16 fits with {left('none'):.1f} GiB KV: {bf16} of {room / gib:.1f} GiB usable, "
                        f"{want}; {MEASURED}")
    too_little = f"bf16 leaves too little KV room: {bf16} leave {left('none'):.1f} GiB ({want})"
    fp8_card = all(c.capability >= MIN_CAPABILITY for c in cards)
    if fp8_card and fp8_runs and room - weight_bytes["fp8"] >= min_kv_bytes:
        return "fp8", (f"{desc}: {too_little}; FP8 tensor cores (compute capability >= 8.9): fp8 weights "
                       f"({weight_bytes['fp8'] / gib:.1f} GiB) leave {left('fp8'):.1f} GiB of {room / gib:.1f} GiB "
                       "usable for the KV cache; fp8 is ahead of nf4 (0.91-1.22x bf16 against 0.6-0.7x on an H200: "
                       "bench/RESULTS.md)")
    if not fp8_card:
        why_fp8 = "no FP8 tensor cores (compute capability < 8.9)"
    elif not fp8_runs:
        why_fp8 = fp8_why_not or "FP8 does not run here"
    else:
        why_fp8 = f"fp8 weights ({weight_bytes['fp8'] / gib:.1f} GiB) do not fit with one sequence's KV"
    return "nf4", (f"{desc}: {too_little}; {why_fp8}: nf4 ({weight_bytes['nf4'] / gib:.1f} GiB) leaves "
                   f"{left('nf4'):.1f} GiB" + ("" if room - weight_bytes["nf4"] >= kv_bytes else
                                               ", which still leaves less KV room than wanted"))


def decide_for(cards: list[Card], model_config, config, *, fp8_runs: bool = True,
               fp8_why_not: str = "") -> tuple[str, str]:
    """`decide` for this checkpoint's shapes (`model_config`: its transformers config) and the app's settings
    (`config`: MAX_NUM_SEQS, GPU_MEMORY_UTILIZATION, QUANTIZE_VISION) on `cards`: what choose_auto applies at
    start-up, and what the tests apply to the card a manifest's node selector names."""
    from .placement import CUDA_CONTEXT_BYTES, default_reserve_bytes, model_sizes, weight_bytes_per_param

    if not cards:
        return decide([], {}, 0, usable_fraction=1.0, overhead_bytes=0)
    sizes = model_sizes(model_config)
    qv = bool(config.quantize_vision)
    weight_bytes = {q: sum(sizes.unit_bytes(u, weight_bytes_per_param(q, 2), 2, qv if q != "none" else False)
                           for u in sizes.units) for q in ("none", "fp8", "nf4")}
    one_seq = sizes.num_layers * sizes.kv_bytes_per_token_per_layer(2) * USEFUL_KV_TOKENS_PER_SEQ
    return decide(cards, weight_bytes, one_seq * config.max_num_seqs, min_kv_bytes=one_seq,
                  usable_fraction=config.gpu_memory_utilization,
                  overhead_bytes=CUDA_CONTEXT_BYTES + default_reserve_bytes(config.max_num_seqs),
                  fp8_runs=fp8_runs, fp8_why_not=fp8_why_not)


def choose_auto(config, model_path: Path, device: str) -> tuple[str, str]:
    """QUANTIZATION=auto for this pod: gathers the cards and the checkpoint's shapes and applies `decide_for`. The
    FP8 probe (a small torch._scaled_mm and the Triton kernel on the card) runs only when the rule picks fp8, so a
    pod where bf16 fits starts without it; a failing probe gives the rule's next choice, with the probe's reason."""
    if not device.startswith("cuda"):
        return decide_for([], None, config)
    from .loader import model_config as read_model_config

    n = max(1, config.gpus_per_pod)
    idx = [torch.device(device).index or 0] if n == 1 else list(range(n))
    cards = []
    for i in idx:
        p = torch.cuda.get_device_properties(i)
        cards.append(Card((p.major, p.minor), int(p.total_memory), p.name))
    model_config = read_model_config(model_path)
    quant, reason = decide_for(cards, model_config, config)
    if quant == "fp8":
        s = device_support(torch.device("cuda", idx[0]))
        if not s.scaled_mm:
            quant, reason = decide_for(cards, model_config, config, fp8_runs=False, fp8_why_not=s.reason)
    return quant, reason


def weight_report(model: nn.Module) -> dict[str, float]:
    """GB of parameters on the card(s), by kind (for logs and the bench)."""
    fp8 = other = 0
    for p in model.parameters():
        b = p.numel() * p.element_size()
        if p.dtype == FP8_DTYPE:
            fp8 += b
        else:
            other += b
    return {"fp8_gb": round(fp8 / 1e9, 3), "other_gb": round(other / 1e9, 3), "total_gb": round((fp8 + other) / 1e9, 3)}


def iter_fp8(model: nn.Module) -> Iterable[tuple[str, Fp8Linear]]:
    return ((n, m) for n, m in model.named_modules() if isinstance(m, Fp8Linear))


__all__ = ["Fp8Linear", "Support", "Card", "convert", "decide", "decide_for", "choose_auto", "device_support",
           "warm_kernels", "warm_steps", "row_classes", "gemv_launch", "save_model", "load_model", "is_fp8_checkpoint",
           "quantize_weight", "quantize_rows", "quantize_rows_torch",
           "weight_report", "converted_modules", "weight_only_reference", "gemv_config", "GemvConfig", "SMALL_M_MAX",
           "FP8_MAX", "MIN_SCALE", "MIN_CAPABILITY", "SKIP"]
