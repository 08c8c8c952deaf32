"""QUANTIZATION=fp8 on CPU: the conversion (scales, codes, shapes, which modules), the module's arithmetic, the error
against the unquantized tiny model, the pre-quantized checkpoint's round trip through the real loader and the Job's
script, the engine serving an fp8 model, and the QUANTIZATION=auto rule for the cards the manifests name.

The FP8 tensor-core path (torch._scaled_mm) runs only on a CUDA card with compute capability >= 8.9; its tests at the
end are skipped elsewhere, and bench/fp8_bench.py measures it on the GPU."""
from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch import nn
from support.stages import wait_ready

from function.config import Config, ConfigError
from function.engine import fp8
from function.engine.fp8 import FP8_MAX, MIN_SCALE, Card, Fp8Linear

ROOT = Path(__file__).resolve().parent.parent
GiB = 2**30


def _codes(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.uint8)


@pytest.fixture(scope="module")
def tiny(tiny_dir):
    from transformers import AutoModelForImageTextToText
    return AutoModelForImageTextToText.from_pretrained(tiny_dir, dtype=torch.float32).eval()


def _input_ids(model, n=2, length=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, model.config.text_config.vocab_size - 64, (n, length), generator=g)


# ------------------------------------------------------------------------------------------- scales and codes

def test_weight_scales_are_per_output_channel_amax_over_448():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(48, 64, generator=g) * torch.logspace(-4, 1, 48).view(48, 1)
    w[5] = 0.0                      # an all-zero row must stay finite
    w[7, 3] = 300.0                 # an outlier sets its own row's scale only
    q, s = fp8.quantize_weight(w.to(torch.bfloat16))
    assert q.dtype == torch.float8_e4m3fn and q.shape == w.shape and s.dtype == torch.float32 and s.shape == (48,)
    amax = w.to(torch.bfloat16).float().abs().amax(dim=1)
    expect = torch.where(amax > 0, amax / FP8_MAX, torch.full_like(amax, fp8.WEIGHT_MIN_SCALE))
    torch.testing.assert_close(s, expect, rtol=1e-6, atol=0)
    qf = q.float()
    assert torch.isfinite(qf).all() and qf.abs().max() <= FP8_MAX
    nonzero = amax > 0
    # each row's largest value maps onto the largest code
    assert (qf.abs().amax(dim=1)[nonzero] == FP8_MAX).all()
    assert (qf[5] == 0).all()
    # e4m3 keeps 3 mantissa bits: round-to-nearest is within half a step (2^-4 relative) for normal codes
    deq = qf * s[:, None]
    ref = w.to(torch.bfloat16).float()
    normal = qf.abs() >= 2.0**-6
    rel = ((deq - ref).abs() / ref.abs().clamp(min=1e-30))[normal]
    assert float(rel.max()) <= 2.0**-4 + 1e-6


def test_activation_scales_are_per_token():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(6, 256, generator=g) * torch.tensor([1e-3, 1.0, 50.0, 1.0, 1e3, 0.0]).view(6, 1)
    q, s = fp8.quantize_rows_torch(x)
    assert q.shape == (6, 256) and s.shape == (6, 1) and s.dtype == torch.float32
    torch.testing.assert_close(s[:5, 0], x[:5].abs().amax(dim=1) / FP8_MAX, rtol=1e-6, atol=0)
    assert float(s[5]) == pytest.approx(MIN_SCALE, rel=1e-6) and (q[5].float() == 0).all()
    deq = q.float() * s
    rel = (deq[:5] - x[:5]).norm(dim=1) / x[:5].norm(dim=1)
    assert float(rel.max()) < 0.05            # ~2.5-3 % RMS for e4m3 on Gaussian rows
    assert float(rel.min()) > 0               # it is quantized
    # a row's scale does not depend on the other rows (per token, not per tensor)
    _, s2 = fp8.quantize_rows_torch(x[1:2])
    assert float(s2) == float(s[1])


# ------------------------------------------------------------------------------------------- the module

@pytest.mark.parametrize("bias", [True, False])
def test_fp8_linear_computes_the_fp8_gemm(bias):
    g = torch.Generator().manual_seed(2)
    lin = nn.Linear(96, 80, bias=bias)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(80, 96, generator=g) * 0.05)
        if bias:
            lin.bias.copy_(torch.randn(80, generator=g))
    m = Fp8Linear.from_linear(lin)
    assert (m.in_features, m.out_features) == (96, 80) and m.weight.shape == (80, 96)
    assert m.weight.dtype == torch.float8_e4m3fn and m.weight_scale.shape == (80,)
    assert (m.bias is None) == (not bias)
    x = torch.randn(3, 5, 96, generator=g)
    out = m(x)
    assert out.shape == (3, 5, 80) and out.dtype == x.dtype
    # the same product written independently: dequantize both operands, multiply in float64
    x2 = x.reshape(-1, 96).double()
    sx = (x2.abs().amax(dim=1, keepdim=True) / FP8_MAX).clamp(min=MIN_SCALE)
    xq = (x2 / sx).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn).double() * sx
    wq = m.weight.double() * m.weight_scale.double()[:, None]
    ref = xq @ wq.t() + (lin.bias.double() if bias else 0)
    torch.testing.assert_close(out.reshape(-1, 80).double(), ref, rtol=1e-5, atol=1e-5)
    # and it is close to the unquantized layer
    full = lin(x)
    rel = float((out - full.detach()).norm() / full.detach().norm())
    assert 0 < rel < 0.06
    # an empty batch is an empty result, not an error
    assert m(torch.zeros(0, 96)).shape == (0, 80)


def test_dequantized_weight_is_the_codes_times_the_scales():
    lin = nn.Linear(32, 16)
    m = Fp8Linear.from_linear(lin)
    torch.testing.assert_close(m.dequantized(), m.weight.float() * m.weight_scale[:, None])
    assert float((m.dequantized() - lin.weight).abs().max()) <= float(lin.weight.abs().max()) * 2**-4


# ------------------------------------------------------------------------------------------- converting the model

def _decoder_linears(model) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n.startswith("model.language_model")]


def test_convert_replaces_the_decoders_linears_only(tiny):
    model = copy.deepcopy(tiny)
    want = _decoder_linears(model)
    assert len(want) == 6 * model.config.text_config.num_hidden_layers   # q, k, v, o, gate_up, down
    vision_before = {n: type(m) for n, m in model.model.visual.named_modules()}
    info = fp8.convert(model)
    assert info["modules"] == len(want) and fp8.converted_modules(model) == want
    assert info["bytes_after"] < info["bytes_before"] / 3      # fp32 -> 1 byte + a scale per row
    for name in want:
        m = model.get_submodule(name)
        assert isinstance(m, Fp8Linear) and m.weight.dtype == torch.float8_e4m3fn
    # kept in the model dtype: lm_head, embeddings, norms, the vision tower
    assert type(model.lm_head) is nn.Linear and model.lm_head.weight.dtype == torch.float32
    assert model.model.language_model.embed_tokens.weight.dtype == torch.float32
    assert {n: type(m) for n, m in model.model.visual.named_modules()} == vision_before
    assert all(p.dtype == torch.float32 for n, p in model.named_parameters()
               if "norm" in n or n.startswith("model.visual"))
    # what the runner and the client read
    layer = model.model.language_model.layers[0]
    assert layer.self_attn.k_proj.weight.device == torch.device("cpu")
    assert layer.self_attn.q_proj.bias is not None and layer.self_attn.q_proj.bias.dtype == torch.float32
    assert model.lm_head.weight.dtype == torch.float32


def test_quantize_vision_converts_the_vision_tower_too(tiny):
    model = copy.deepcopy(tiny)
    fp8.convert(model, quantize_vision=True)
    names = fp8.converted_modules(model)
    assert any(n.startswith("model.visual") for n in names)
    assert not any(isinstance(m, nn.Linear) and type(m) is nn.Linear
                   for n, m in model.model.visual.named_modules())
    assert type(model.lm_head) is nn.Linear


def test_error_against_the_unquantized_tiny_model(tiny):
    """Relative error of the final hidden states and logits (measured: 0.085-0.11 on random tiny weights, where
    e4m3's ~3 % per-element rounding compounds over 2 layers without the margins a trained model has)."""
    model = copy.deepcopy(tiny)
    fp8.convert(model)
    for seed in range(3):
        ids = _input_ids(tiny, seed=seed)
        with torch.no_grad():
            a = tiny(input_ids=ids, output_hidden_states=True)
            b = model(input_ids=ids, output_hidden_states=True)
        rh = float((a.hidden_states[-1] - b.hidden_states[-1]).norm() / a.hidden_states[-1].norm())
        rl = float((a.logits - b.logits).norm() / a.logits.norm())
        assert 0 < rh < 0.15 and 0 < rl < 0.15, (rh, rl)
        assert float((a.logits.argmax(-1) == b.logits.argmax(-1)).float().mean()) >= 0.5


# ------------------------------------------------------------------------------------------- pre-quantized checkpoint

def _same_state(a: nn.Module, b: nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert set(sa) == set(sb)
    for k in sa:
        x, y = sa[k], sb[k]
        assert x.dtype == y.dtype and x.shape == y.shape, k
        if x.dtype == torch.float8_e4m3fn:
            assert torch.equal(_codes(x), _codes(y)), k
        else:
            assert torch.equal(x, y), k


def test_save_and_load_round_trip(tiny, tmp_path):
    model = copy.deepcopy(tiny)
    fp8.convert(model)
    out = tmp_path / "ckpt"
    fp8.save_model(model, out, max_shard_bytes=200_000)      # several shards
    info = json.loads((out / "fp8.json").read_text())
    assert info["modules"] == fp8.converted_modules(model) and len(info["files"]) > 1
    assert all((out / f).is_file() for f in info["files"]) and (out / "config.json").is_file()
    back = fp8.load_model(out, dtype=torch.float32, device_map="cpu", attn_implementation="sdpa")
    assert fp8.converted_modules(back) == info["modules"]
    assert not any(p.device.type == "meta" for p in back.parameters())
    assert not any(b.device.type == "meta" for b in back.buffers())
    _same_state(model, back)
    for (n, b1), (_, b2) in zip(model.named_buffers(), back.named_buffers()):   # rotary inv_freq & co
        torch.testing.assert_close(b1, b2, msg=n)
    ids = _input_ids(tiny)
    with torch.no_grad():
        torch.testing.assert_close(back(input_ids=ids).logits, model(input_ids=ids).logits, rtol=0, atol=0)


def test_a_damaged_checkpoint_is_refused(tiny, tmp_path):
    from safetensors.torch import load_file, save_file

    model = copy.deepcopy(tiny)
    fp8.convert(model)
    out = tmp_path / "ckpt"
    fp8.save_model(model, out)
    (shard,) = json.loads((out / "fp8.json").read_text())["files"]
    tensors = load_file(out / shard)
    key = "model.language_model.layers.1.mlp.down_proj.weight_scale"
    del tensors[key]
    save_file(tensors, out / shard)
    with pytest.raises(RuntimeError, match="lacks 1 tensors"):
        fp8.load_model(out, dtype=torch.float32, device_map="cpu", attn_implementation="sdpa")
    tensors["model.language_model.layers.1.mlp.down_proj.weight_scale"] = torch.ones(1)
    tensors["model.extra.weight"] = torch.ones(1)
    save_file(tensors, out / shard)
    with pytest.raises(RuntimeError, match="unexpected tensor model.extra.weight"):
        fp8.load_model(out, dtype=torch.float32, device_map="cpu", attn_implementation="sdpa")


def test_loader_writes_the_fp8_copy_then_starts_from_it(tiny_dir, tmp_path):
    from function.engine import loader

    cfg = Config.from_env({"MODEL_PATH": str(tiny_dir), "MODEL_CACHE_DIR": str(tmp_path), "QUANTIZATION": "fp8"})
    first = loader.load(cfg)
    assert first.choices.quantization == "fp8" and first.choices.source == "checkpoint"
    assert "load_and_quantize" in first.choices.timings and "save_prequantized" in first.choices.timings
    assert "read_weights" in first.choices.timings     # a first fp8 start reads the bf16 shards ahead too
    assert first.save_prequantized is None             # written before load() returned
    cache = loader.prequantized_dir(cfg, tiny_dir, first.choices)
    assert (cache / "prequantized.json").is_file() and fp8.is_fp8_checkpoint(cache)
    assert "-fp8-" in cache.name
    assert (cache / "tokenizer.json").is_file()
    second = loader.load(cfg)
    assert second.choices.source == "prequantized-cache" and "load_prequantized" in second.choices.timings
    assert second.choices.model_impl == "native" and "read_weights" in second.choices.timings   # read ahead too
    _same_state(first.model, second.model)
    # a bf16/fp32 start of the same checkpoint is not affected by the fp8 copy
    plain = loader.load(Config.from_env({"MODEL_PATH": str(tiny_dir), "MODEL_CACHE_DIR": str(tmp_path),
                                         "QUANTIZATION": "none"}))
    assert plain.choices.source == "checkpoint" and not fp8.converted_modules(plain.model)


def test_deferred_save_writes_the_copy_only_when_run(tiny_dir, tmp_path):
    """What the server does: load() returns the write of the pre-quantized copy, run after ready."""
    from function.engine import loader

    cfg = Config.from_env({"MODEL_PATH": str(tiny_dir), "MODEL_CACHE_DIR": str(tmp_path), "QUANTIZATION": "fp8"})
    first = loader.load(cfg, defer_save=True)
    cache = loader.prequantized_dir(cfg, tiny_dir, first.choices)
    assert first.save_prequantized is not None and not cache.exists()
    assert "save_prequantized" not in first.choices.timings
    first.save_prequantized()
    assert fp8.is_fp8_checkpoint(cache) and "save_prequantized" in first.choices.timings
    second = loader.load(cfg, defer_save=True)
    assert second.choices.source == "prequantized-cache" and second.save_prequantized is None
    _same_state(first.model, second.model)


def test_prequantize_script_writes_the_fp8_copy_once(tiny_dir, tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("QUANTIZATION", "MODEL_PATH")}
    env.update(DEVICE="cpu", PYTHONPATH=str(ROOT))
    cmd = [sys.executable, str(ROOT / "scripts" / "prequantize.py"), "--model-path", str(tiny_dir),
           "--quantization", "fp8", "--cache-dir", str(tmp_path)]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["status"] == "written" and "-fp8-" in out["path"] and fp8.is_fp8_checkpoint(Path(out["path"]))
    again = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and json.loads(again.stdout.strip().splitlines()[-1]) == \
        {"status": "exists", "path": out["path"]}


# ------------------------------------------------------------------------------------------- the engine on fp8

def test_engine_serves_an_fp8_model(tiny_dir, tmp_path):
    """The runner works unchanged on the converted modules: greedy text comes out, the runner's logits equal the
    fp8 model's own forward, and /metrics' model_info says fp8."""
    from function import metrics
    from function.engine.client import LocalEngine
    from function.engine.protocol import ChatInput, SamplingParams
    from function.engine.runner import ModelRunner, PrefillItem

    e = LocalEngine(Config.from_env({"MODEL_PATH": str(tiny_dir), "MODEL_CACHE_DIR": str(tmp_path),
                                     "QUANTIZATION": "fp8", "MAX_NUM_SEQS": "2", "MAX_MODEL_LEN": "1024",
                                     "WARMUP": "false"}))
    e.start_loading()
    wait_ready(e)
    try:
        assert e.choices.quantization == "fp8"
        assert isinstance(e.runner.lm.layers[0].mlp.down_proj, Fp8Linear)
        msgs = ChatInput(messages=[{"role": "user", "content": [{"type": "text", "text": "open the settings"}]}])
        greedy = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)

        async def run():
            text, n = "", 0
            async for chunk in e.generate("fp8-1", msgs, greedy):
                text += chunk.text
                n += 1
            return text, n

        import asyncio
        text, n = asyncio.run(run())
        assert n >= 1 and isinstance(text, str)
        body, _ = metrics.render()
        assert 'quantization="fp8"' in body.decode()
        # the pre-quantized copy is written after ready, beside serving (the first start does not wait for it)
        deadline = time.time() + 60
        while "save_prequantized" not in e.timings:
            assert time.time() < deadline, "the pre-quantized copy was not written"
            time.sleep(0.05)
        # the runner's prefill logits = the model's own forward (same fp8 modules)
        from function.engine import loader
        loaded = loader.load(Config.from_env({"MODEL_PATH": str(tiny_dir), "MODEL_CACHE_DIR": str(tmp_path),
                                              "QUANTIZATION": "fp8"}))
        assert loaded.choices.source == "prequantized-cache"
        prompt = e.preparer.prepare(msgs, greedy)
        runner = ModelRunner(loaded.model, num_slots=2, max_len=512, use_graphs=False)
        logits = runner.prefill([PrefillItem(slot=0, token_ids=prompt.token_ids, start=0,
                                             position_ids=prompt.position_ids, images=[])])
        with torch.no_grad():
            ref = loaded.model(input_ids=torch.tensor([prompt.token_ids])).logits[0, -1]
        torch.testing.assert_close(logits[0], ref, atol=1e-4, rtol=1e-4)
    finally:
        e.shutdown()


# ------------------------------------------------------------------------------------------- QUANTIZATION=auto

@pytest.fixture(scope="module")
def full_size():
    from transformers import Glm4vConfig

    from function.engine.placement import model_sizes, weight_bytes_per_param
    s = model_sizes(Glm4vConfig())
    weights = {q: sum(s.unit_bytes(u, weight_bytes_per_param(q, 2), 2) for u in s.units) for q in ("none", "fp8", "nf4")}
    one_seq = s.num_layers * s.kv_bytes_per_token_per_layer(2) * fp8.USEFUL_KV_TOKENS_PER_SEQ
    return weights, one_seq


def _auto(cards, full_size, **kw):
    """The rule with the service's settings (MAX_NUM_SEQS=32, GPU_MEMORY_UTILIZATION=0.90) for full-size GLM-4.1V."""
    from function.engine.placement import CUDA_CONTEXT_BYTES, default_reserve_bytes
    weights, one_seq = full_size
    return fp8.decide(cards, weights, 32 * one_seq, min_kv_bytes=one_seq, usable_fraction=0.9,
                      overhead_bytes=CUDA_CONTEXT_BYTES + default_reserve_bytes(32), **kw)


H100 = Card((9, 0), 79_646 * 2**20, "NVIDIA H100 80GB HBM3")
H200 = Card((9, 0), 143_771 * 2**20, "NVIDIA H200")
L4 = Card((8, 9), 23_034 * 2**20, "NVIDIA L4")
RTX4090 = Card((8, 9), 24_564 * 2**20, "NVIDIA GeForce RTX 4090")
A10G = Card((8, 6), 23_028 * 2**20, "NVIDIA A10G")
A100_40 = Card((8, 0), 40_960 * 2**20, "NVIDIA A100-SXM4-40GB")
A100_80 = Card((8, 0), 81_920 * 2**20, "NVIDIA A100-SXM4-80GB")
T4 = Card((7, 5), 15_360 * 2**20, "Tesla T4")


L40S = Card((8, 9), 46_068 * 2**20, "NVIDIA L40S")
RTX4080 = Card((8, 9), 16_380 * 2**20, "NVIDIA GeForce RTX 4080")


@pytest.mark.parametrize("cards,want", [
    # bf16 wherever its weights leave the useful KV room: fp8 measured slower than bf16 on an H200
    ([H100], "none"), ([H200], "none"), ([A100_40], "none"), ([A100_80], "none"),
    ([L40S], "none"),                          # FP8 tensor cores (8.9), but bf16 fits 48 GB
    ([L4, L4], "none"), ([A10G, A10G], "none"),  # bf16 split over two 24 GB cards fits
    # bf16 leaves too little KV room: fp8 where the card has FP8
    ([L4], "fp8"), ([RTX4090], "fp8"),
    # ... nf4 where it has not, or fp8 does not fit beside one sequence's KV
    ([A10G], "nf4"), ([T4], "nf4"), ([RTX4080], "nf4"),
    ([], "none"),
])
def test_auto_picks_by_card(cards, want, full_size):
    quant, reason = _auto(cards, full_size)
    assert quant == want, reason
    assert reason


def test_auto_prefers_bf16_over_fp8_where_bf16_fits(full_size):
    """An FP8 card (compute capability 8.9/9.0) with room for bf16 and its KV gets bf16; the same card with less
    memory, where bf16 leaves less than the useful KV room, gets fp8."""
    weights, one_seq = full_size
    q, why = _auto([H100], full_size)
    assert q == "none" and "bf16 fits" in why and "1.22x" in why and "bench/RESULTS.md" in why
    assert _auto([L40S], full_size)[0] == "none"
    # the boundary: shrink an 8.9 card until bf16 no longer leaves 32 sequences' KV (but fp8 still leaves one)
    from function.engine.placement import CUDA_CONTEXT_BYTES, default_reserve_bytes
    need = weights["none"] + 32 * one_seq + CUDA_CONTEXT_BYTES + default_reserve_bytes(32)
    fits = Card((8, 9), int(need / 0.9) + 2**20, "edge")
    short = Card((8, 9), int(need / 0.9) - 2**20, "edge")
    assert _auto([fits], full_size)[0] == "none"
    q, why = _auto([short], full_size)
    assert q == "fp8" and "bf16 leaves too little KV room" in why and "compute capability >= 8.9" in why


def test_auto_reasons_name_the_deciding_fact(full_size):
    assert "compute capability >= 8.9" in _auto([L4], full_size)[1]
    assert "bf16 leaves too little KV room" in _auto([L4], full_size)[1]
    assert "do not fit" in _auto([RTX4080], full_size)[1]
    assert "no FP8 tensor cores" in _auto([A10G], full_size)[1] and "too little" in _auto([A10G], full_size)[1]
    assert "still leaves less KV room" in _auto([T4], full_size)[1]
    assert "CPU" in _auto([], full_size)[1]
    assert "bf16 fits" in _auto([A100_40], full_size)[1]


def test_auto_when_fp8_does_not_run(full_size):
    """fp8_runs=False (torch._scaled_mm fails its probe): a card that would get fp8 gets nf4 and says why; where
    bf16 fits, the probe's result does not matter."""
    q, why = _auto([L4], full_size, fp8_runs=False, fp8_why_not="torch._scaled_mm (rowwise) does not run here")
    assert q == "nf4" and "_scaled_mm" in why
    assert _auto([RTX4090], full_size, fp8_runs=False)[0] == "nf4"
    assert _auto([H100], full_size, fp8_runs=False)[0] == "none"
    assert _auto([L40S], full_size, fp8_runs=False)[0] == "none"


def test_choose_auto_probes_fp8_only_when_the_rule_picks_it(monkeypatch, tiny_dir):
    """choose_auto hands decide the pod's cards, the checkpoint's sizes and the config's MAX_NUM_SEQS /
    GPU_MEMORY_UTILIZATION, and runs the FP8 probe only when decide picks fp8 (then falls back when it fails)."""
    from function.engine.fp8 import Support

    class Props:
        def __init__(self, cap, total, name):
            self.major, self.minor, self.total_memory, self.name = cap[0], cap[1], total, name

    card = {"props": None}
    probes = []
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: card["props"])

    def support(dev, ok=True):
        probes.append(dev)
        return Support(ok, False, False, "probe says no" if not ok else "ok")

    calls = []
    real = fp8.decide

    def spy(*a, **kw):
        calls.append((a, kw))
        return real(*a, **kw)

    monkeypatch.setattr(fp8, "decide", spy)
    cfg = Config.from_env({"MODEL_PATH": str(tiny_dir), "MAX_NUM_SEQS": "4", "GPU_MEMORY_UTILIZATION": "0.5"})
    # the tiny model fits anything: bf16, no probe
    monkeypatch.setattr(fp8, "device_support", support)
    card["props"] = Props((9, 0), 80 * GiB, "NVIDIA H100 80GB HBM3")
    q, why = fp8.choose_auto(cfg, tiny_dir, "cuda:0")
    assert q == "none" and "bf16 fits" in why and probes == []
    (args, kw), = calls
    cards, weights, kv = args
    assert cards == [Card((9, 0), 80 * GiB, "NVIDIA H100 80GB HBM3")]
    assert weights["none"] > weights["fp8"] > weights["nf4"] > 0
    assert kv == 4 * kw["min_kv_bytes"] and kw["min_kv_bytes"] > 0 and kw["usable_fraction"] == 0.5
    # a card too small for bf16 + KV, large enough for fp8: probed; a failing probe gives nf4 with its reason
    room = int(weights["fp8"] + (weights["none"] - weights["fp8"]) / 2)
    from function.engine.placement import CUDA_CONTEXT_BYTES, default_reserve_bytes
    total = int((room + CUDA_CONTEXT_BYTES + default_reserve_bytes(4) + kw["min_kv_bytes"]) / 0.5)
    card["props"] = Props((8, 9), total, "small FP8 card")
    assert fp8.choose_auto(cfg, tiny_dir, "cuda:0")[0] == "fp8" and len(probes) == 1
    monkeypatch.setattr(fp8, "device_support", lambda dev: support(dev, ok=False))
    q, why = fp8.choose_auto(cfg, tiny_dir, "cuda:0")
    assert q == "nf4" and "probe says no" in why and len(probes) == 2


def test_auto_on_cpu_is_unquantized_and_says_why(tiny_dir, tmp_path, caplog):
    from function.engine import loader
    cfg = Config.from_env({"MODEL_PATH": str(tiny_dir), "MODEL_CACHE_DIR": str(tmp_path), "DEVICE": "cpu"})
    with caplog.at_level("INFO", logger="function.engine.loader"):
        c = loader.choose(cfg, tiny_dir)
    assert c.quantization == "none" and "auto" in c.reason and "CPU" in c.reason
    assert any("quantization none" in r.getMessage() for r in caplog.records)


def test_config_accepts_fp8():
    assert Config.from_env({"QUANTIZATION": "fp8"}).quantization == "fp8"
    with pytest.raises(ConfigError, match="fp8"):
        Config.from_env({"QUANTIZATION": "fp4"})


def test_placement_knows_fp8_weight_size():
    from function.engine.placement import weight_bytes_per_param
    assert weight_bytes_per_param("fp8") == 1.0


# ------------------------------------------------------------------------------------------- small M: weight-only

def _fake_kernel(calls):
    """A CPU stand-in for the Triton weight-only kernel (fp8_gemv.w8a16) and its widening (fp8_gemv.dequant)."""
    def w8a16(x, codes, scale, bias, cfg=None):
        calls.append((tuple(x.shape), cfg))
        return fp8.weight_only_reference(x, codes, scale, bias).to(x.dtype)

    def dequant(codes, fast=True):
        return codes.to(torch.bfloat16)
    return w8a16, dequant


def _module(bias=True, small_m=fp8.SMALL_M_MAX, K=64, N=48):
    g = torch.Generator().manual_seed(5)
    lin = nn.Linear(K, N, bias=bias).to(torch.bfloat16)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(N, K, generator=g) * 0.1)
    m = Fp8Linear.from_linear(lin, scaled_mm=True)
    m.small_m = small_m
    return m


def test_calls_of_few_rows_take_the_weight_only_kernel(monkeypatch):
    """The dispatch, decided per call from the row count only (static under CUDA graphs): rows <= small_m on a CUDA
    bf16 call -> the weight-only kernel; more rows -> _scaled_mm; CPU, other dtypes, unconverted -> emulated."""
    monkeypatch.setattr(fp8, "_w8a16", _fake_kernel([])[0])
    m = _module()
    bf16 = torch.bfloat16
    assert [m.path(r, True, bf16) for r in (1, 2, 7, 16, 63, 64)] == ["weight_only"] * 6
    assert m.path(65, True, bf16) == m.path(5500, True, bf16) == "scaled_mm"
    assert m.path(1, False, bf16) == m.path(1, True, torch.float32) == m.path(1, True, torch.float16) == "emulated"
    m.small_m = 8
    assert m.path(8, True, bf16) == "weight_only" and m.path(9, True, bf16) == "scaled_mm"
    m.small_m = 0                              # the kernel did not pass its probe on this card
    assert m.path(1, True, bf16) == "scaled_mm"
    m.small_m = 64
    monkeypatch.setattr(fp8, "_w8a16", None)   # Triton absent: never the kernel, whatever small_m says
    assert m.path(1, True, bf16) == "scaled_mm"
    m.scaled_mm = False
    monkeypatch.setattr(fp8, "_w8a16", _fake_kernel([])[0])
    assert m.path(1, True, bf16) == "emulated"
    assert "weight-only <= 64 rows" in repr(_module()) and "scaled_mm" in repr(_module(small_m=0))


def test_forward_runs_the_path_it_names(monkeypatch):
    """forward() sends a weight-only call to the kernel with the 2-D rows (leading dims flattened, contiguous last
    dim) and reshapes the result; CPU calls stay on the fp32 emulation, which CI checks."""
    calls = []
    monkeypatch.setattr(fp8, "_w8a16", _fake_kernel(calls)[0])
    m = _module()
    x = torch.randn(2, 3, 64).to(torch.bfloat16)
    assert torch.equal(m(x), m._emulated(x.reshape(-1, 64)).view(2, 3, 48)) and calls == []
    monkeypatch.setattr(Fp8Linear, "path", lambda self, rows, is_cuda, dtype: "weight_only")
    out = m(x)
    assert calls == [((6, 64), None)] and out.shape == (2, 3, 48)
    ref = fp8.weight_only_reference(x.reshape(-1, 64), m.weight, m.weight_scale, m.bias).view(2, 3, 48)
    assert torch.equal(out, ref.to(torch.bfloat16))
    xt = torch.randn(64, 5).to(torch.bfloat16).t()          # last dim not contiguous: copied first
    m(xt)
    assert calls[-1][0] == (5, 64)


@pytest.mark.parametrize("bias", [True, False])
def test_weight_only_reference_is_the_dequantized_linear(bias):
    """The weight-only arithmetic: unquantized activations times codes * per-channel scales, plus the bias; closer
    to the bf16 layer than the W8A8 emulation (no activation rounding)."""
    m = _module(bias=bias)
    x = torch.randn(9, 64, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    ref = fp8.weight_only_reference(x, m.weight, m.weight_scale, m.bias)
    want = x.float() @ m.dequantized().t() + (m.bias.float() if bias else 0)
    assert torch.allclose(ref, want, rtol=1e-5, atol=1e-5)
    exact = x.float() @ (m.dequantized().to(torch.bfloat16).float()).t()
    w8a8 = m._emulated(x).float() - (m.bias.float() if bias else 0)
    assert (ref - (m.bias.float() if bias else 0) - exact).norm() < (w8a8 - exact).norm()


def test_probe_installs_the_kernel_only_when_it_checks_out(monkeypatch, caplog):
    """_probe_w8a16 (run by device_support on an FP8 card): kernels that import and match the fp32 reference are
    installed; an ImportError (no Triton) or a wrong result leaves every call on _scaled_mm, with the reason."""
    monkeypatch.setattr(fp8, "_w8a16", None)
    monkeypatch.setattr(fp8, "_FAST_DEQUANT", True)
    calls = []
    good = _fake_kernel(calls)
    monkeypatch.setattr(fp8, "_load_w8a16", lambda: good)
    assert fp8._probe_w8a16(torch.device("cpu")) == (True, "") and fp8._w8a16 is good[0]
    kinds = {c.kind for _, c in calls if c is not None}
    assert kinds == {"fma", "dot", "dot_t"} and any(c is None for _, c in calls)        # table/heuristic too
    assert any(c is not None and c.split_k > 1 for _, c in calls) and any(r[0] > 16 for r, _ in calls)

    def no_triton():
        raise ImportError("No module named 'triton'")
    monkeypatch.setattr(fp8, "_load_w8a16", no_triton)
    assert fp8._probe_w8a16(torch.device("cpu")) == (False, "ImportError: No module named 'triton'")
    assert fp8._w8a16 is None

    wrong = (lambda x, codes, scale, bias, cfg=None: torch.zeros(x.shape[0], codes.shape[0]), good[1])
    monkeypatch.setattr(fp8, "_load_w8a16", lambda: wrong)
    ok, why = fp8._probe_w8a16(torch.device("cpu"))
    assert not ok and "relative error" in why and fp8._w8a16 is None

    # a widening that differs bit for bit from torch's cast: the kernels use Triton's cast instead
    off = (good[0], lambda codes, fast=True: codes.to(torch.bfloat16) * (1.0078125 if fast else 1.0))
    monkeypatch.setattr(fp8, "_load_w8a16", lambda: off)
    calls.clear()
    with caplog.at_level("WARNING", logger="function.engine.fp8"):
        assert fp8._probe_w8a16(torch.device("cpu"))[0] and not fp8._FAST_DEQUANT
    assert all(c is None or not c.fast for _, c in calls) and not fp8.gemv_config(1, 4096, 4096).fast
    assert any("Triton's cast" in r.getMessage() for r in caplog.records)


def test_cpu_support_has_no_weight_only_kernel():
    s = fp8.device_support("cpu")
    assert s.small_m == 0 and not s.scaled_mm


def test_convert_and_load_carry_the_row_threshold(tiny, tmp_path, monkeypatch):
    """convert() and load_model() give every module on the _scaled_mm path the probe's row threshold (0 where the
    kernel did not check out); modules left emulated get none."""
    from function.engine.fp8 import Support
    q = copy.deepcopy(tiny).to(torch.bfloat16)
    fp8.convert(q, support=Support(True, True, False, "test", small_m=32))
    mods = dict(fp8.iter_fp8(q))
    assert mods and all(m.small_m == (32 if m.scaled_mm else 0) for m in mods.values())
    assert any(m.small_m == 32 for m in mods.values())
    fp8.save_model(q, tmp_path / "q")
    monkeypatch.setattr(fp8, "device_support", lambda dev: Support(True, True, False, "test", small_m=16))
    loaded = fp8.load_model(tmp_path / "q", dtype=torch.bfloat16, device_map="cpu", attn_implementation="sdpa")
    lm = dict(fp8.iter_fp8(loaded))
    assert lm.keys() == mods.keys() and all(m.small_m == (16 if m.scaled_mm else 0) for m in lm.values())
    q2 = copy.deepcopy(tiny).to(torch.bfloat16)
    fp8.convert(q2, support=Support(True, True, False, "no kernel"))
    assert all(m.small_m == 0 for _, m in fp8.iter_fp8(q2))


def test_launch_configs_fit_the_decoder_shapes():
    """Every (M, shape) of a decode step gets a config with power-of-two blocks the kernel can tile (tl.dot needs
    16+ on each side), split-K only where K holds that many blocks; fixed per (bucket, N, K), so a CUDA graph
    captured at one batch size always replays the same launches."""
    shapes = [(4096, 4096), (256, 4096), (27392, 4096), (4096, 13696), (96, 1000), (1024, 2048), (20000, 300)]
    pow2 = {1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024}
    for N, K in shapes:
        for M in range(1, fp8.SMALL_M_MAX + 1):
            c = fp8.gemv_config(M, N, K)
            if c is None:                  # the table names _scaled_mm faster: gate_up at 33..64 rows only
                assert (N, K) == (27392, 4096) and M > 32
                continue
            assert c == fp8.gemv_config(M, N, K) and c.kind in ("fma", "dot", "dot_t")
            assert c.block_n in pow2 and c.block_k in pow2 and c.warps in (1, 2, 4, 8) and 1 <= c.split_k <= 16
            assert c.split_k == 1 or K >= c.split_k * c.block_k
            if c.kind != "fma":
                assert c.block_n >= 16 and c.block_k >= 16
            else:
                assert M <= 16
    assert [fp8._bucket(m) for m in (1, 2, 3, 4, 5, 8, 9, 16, 17, 33, 48, 64)] == \
        [1, 2, 4, 4, 8, 8, 16, 16, 32, 64, 64, 64]
    for (bucket, N, K), c in fp8.GEMV_TABLE.items():
        assert bucket == fp8._bucket(bucket) and (c is None or isinstance(c, fp8.GemvConfig))
    # every decode batch of the engine's graph buckets up to 64 rows has a measured entry for each decoder shape
    for N, K in shapes[:4]:
        assert all((fp8._bucket(m), N, K) in fp8.GEMV_TABLE for m in (1, 2, 4, 8, 16, 32, 48, 64))


def test_the_table_can_send_a_shape_to_scaled_mm(monkeypatch):
    """Where the launch table says _scaled_mm is faster (gate_up at 64 rows), the module takes it even below
    small_m; the other shapes at the same rows keep the kernel."""
    monkeypatch.setattr(fp8, "_w8a16", _fake_kernel([])[0])
    gate_up = Fp8Linear(4096, 27392, bias=False, device="meta", scaled_mm=True)
    down = Fp8Linear(13696, 4096, bias=False, device="meta", scaled_mm=True)
    gate_up.small_m = down.small_m = 64
    assert gate_up.path(64, True, torch.bfloat16) == gate_up.path(48, True, torch.bfloat16) == "scaled_mm"
    assert gate_up.path(32, True, torch.bfloat16) == "weight_only"
    assert down.path(64, True, torch.bfloat16) == "weight_only"


# The _scaled_mm path and the weight-only Triton kernel on an FP8 card (eager against fp32 references, and inside
# CUDA graphs) are checked by `bench/fp8_bench.py check`; their speed by `bench/fp8_bench.py gemv`.
