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
from function.engine import fp8, weights
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
    assert "fp8_warm_kernels" in out["timings"]     # the kernel warm-up a server runs after ready, run by the Job
    again = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and json.loads(again.stdout.strip().splitlines()[-1]) == \
        {"status": "exists", "path": out["path"]}


@pytest.mark.parametrize("impl", ["native", "transformers"])
def test_loader_probes_fp8_beside_the_load_and_warms_the_kernels(tiny_dir, tmp_path, monkeypatch, impl):
    """On a CUDA fp8 start the loader runs fp8.device_support on a thread of its own from right after the
    quantization is chosen, and hands its Support to the conversion (first start) and to fp8.load_model
    (pre-quantized copy) instead of probing again; the kernel warm-up (fp8.warm_steps for the engine's row
    classes) is handed back as idle work, not run before the load returns. The CUDA check is forced here; the
    probe is a stand-in."""
    import threading

    from function.engine import loader
    from function.engine.fp8 import Support

    probes, warmed = [], []

    def probe(dev):
        probes.append(threading.current_thread().name)
        return Support(True, True, False, "background", small_m=8)

    real_steps = fp8.warm_steps

    def steps(model, rows, res):
        warmed.append(rows)
        yield from real_steps(model, rows, res)
    monkeypatch.setattr(loader, "_fp8_probe_beside", lambda choices: True)
    monkeypatch.setattr(fp8, "device_support", probe)
    monkeypatch.setattr(fp8, "warm_steps", steps)
    cfg = Config.from_env({"MODEL_PATH": str(tiny_dir), "MODEL_CACHE_DIR": str(tmp_path), "QUANTIZATION": "fp8",
                           "DTYPE": "bfloat16", "MODEL_IMPL": impl, "MAX_NUM_SEQS": "24"})
    for source in ("checkpoint", "prequantized-cache"):
        probes.clear(), warmed.clear()
        got = loader.load(cfg)
        assert got.choices.source == source and got.choices.model_impl == impl
        assert probes == ["load-background"]
        mods = dict(fp8.iter_fp8(got.model))
        assert mods and all(m.small_m == (8 if m.scaled_mm else 0) for m in mods.values())
        assert any(m.scaled_mm for m in mods.values())
        assert warmed == [] and [phase for phase, _ in got.idle_work] == ["fp8_warm_kernels"]
        for _ in got.idle_work[0][1]:
            pass
        assert warmed == [fp8.row_classes(24)] and 24 in warmed[0]
        for phase in ("fp8_probe", "fp8_probe_wait"):
            assert phase in got.choices.timings, (source, phase)
        assert "fp8_warm_kernels" not in got.choices.timings


def test_loader_probes_again_where_the_background_probe_fails(tiny_dir, tmp_path, monkeypatch, caplog):
    """A probe thread that raises costs only its time: the conversion probes on the loading thread, with the
    background failure logged."""
    import threading

    from function.engine import loader
    from function.engine.fp8 import Support

    threads = []

    def probe(dev):
        threads.append(threading.current_thread().name)
        if threading.current_thread().name == "load-background":
            raise RuntimeError("CUDA error: launch failure")
        return Support(True, True, False, "inline", small_m=4)

    monkeypatch.setattr(loader, "_fp8_probe_beside", lambda choices: True)
    monkeypatch.setattr(fp8, "device_support", probe)
    cfg = Config.from_env({"MODEL_PATH": str(tiny_dir), "MODEL_CACHE_DIR": str(tmp_path), "QUANTIZATION": "fp8",
                           "DTYPE": "bfloat16", "PREQUANTIZED_CACHE": "false"})
    with caplog.at_level("WARNING", logger="function.engine.loader"):
        got = loader.load(cfg)
    assert threads[0] == "load-background" and len(threads) == 2 and threads[1] != "load-background"
    assert any(m.small_m == 4 for _, m in fp8.iter_fp8(got.model))
    assert any("launch failure" in r.getMessage() and "probing on this thread" in r.getMessage()
               for r in caplog.records)
    assert "fp8_probe_wait" not in got.choices.timings


def test_no_background_probe_off_cuda(tiny_dir, tmp_path, monkeypatch):
    """On CPU (and for other quantizations) nothing is probed beside the load; fp8 on CPU warms nothing."""
    from function.engine import loader

    c = loader.Choices(model_path="", device="cpu", dtype="float32", quantization="fp8", attn_implementation="sdpa")
    assert not loader._fp8_probe_beside(c)
    assert loader._fp8_probe_beside(loader.Choices(model_path="", device="cuda:0", dtype="bfloat16",
                                                   quantization="fp8", attn_implementation="sdpa"))
    assert not loader._fp8_probe_beside(loader.Choices(model_path="", device="cuda", dtype="bfloat16",
                                                       quantization="none", attn_implementation="sdpa"))
    cfg = Config.from_env({"MODEL_PATH": str(tiny_dir), "MODEL_CACHE_DIR": str(tmp_path), "QUANTIZATION": "fp8",
                           "PREQUANTIZED_CACHE": "false"})
    got = loader.load(cfg)
    assert "fp8_probe" not in got.choices.timings and [p for p, _ in got.idle_work] == ["fp8_warm_kernels"]
    assert list(got.idle_work[0][1]) == []     # no Triton kernel on CPU: nothing to launch
    assert loader.load(Config.from_env({"MODEL_PATH": str(tiny_dir), "MODEL_CACHE_DIR": str(tmp_path),
                                        "PREQUANTIZED_CACHE": "false"})).idle_work == []


def test_compact_copies_views_and_keeps_ties():
    big = torch.arange(40, dtype=torch.float32)
    a, b, c = nn.Linear(5, 2, bias=False), nn.Linear(5, 2, bias=False), nn.Linear(10, 1, bias=False)
    a.weight = nn.Parameter(big[:10].view(2, 5), requires_grad=False)
    b.weight = a.weight                                       # tied: one Parameter in two modules
    c.weight = nn.Parameter(big[10:20].view(1, 10), requires_grad=False)
    c.register_buffer("table", big[20:30])
    c.register_buffer("own", torch.ones(3))
    root = nn.ModuleDict({"a": a, "b": b, "c": c})
    own = c.own
    assert weights.compact_views(root) == 30 * 4
    assert a.weight is b.weight and not a.weight.requires_grad and c.own is own
    assert not any(weights.is_view(t) for t in list(root.parameters()) + list(root.buffers()))
    assert torch.equal(a.weight.flatten(), big[:10]) and torch.equal(c.table, big[20:30])
    assert weights.compact_views(root) == 0


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


def test_launch_classes_share_one_binary():
    """gemv_launch is fp8_gemv.w8a16's launch arithmetic (BLOCK_M, split-K), and within one _bucket every row count
    gets the same config and launch; with M unspecialized by the kernels (do_not_specialize) that is one compiled
    binary per bucket, so the 1, 2, 4 ... 64 classes are all serving can meet."""
    def old(M, N, K, cfg):   # the arithmetic w8a16 had inline
        cdiv = lambda a, b: -(-a // b)    # noqa: E731
        split = max(1, min(cfg.split_k, cdiv(K, cfg.block_k)))
        k_split = cdiv(cdiv(K, split), cfg.block_k) * cfg.block_k
        bm = fp8._pow2(M) if cfg.kind == "fma" else min(64, max(16, fp8._pow2(M)))
        return bm, cdiv(K, k_split), k_split

    for N, K in [(4096, 4096), (256, 4096), (27392, 4096), (4096, 13696), (4608, 4096), (96, 1000), (70, 1000)]:
        by_bucket = {}
        for M in range(1, fp8.SMALL_M_MAX + 1):
            cfg = fp8.gemv_config(M, N, K)
            if cfg is None:
                continue
            lc = fp8.gemv_launch(M, N, K, cfg)
            assert (lc.block_m, lc.split, lc.k_split) == old(M, N, K, cfg)
            assert lc.k_split % cfg.block_k == 0 and (lc.split - 1) * lc.k_split < K <= lc.split * lc.k_split
            assert by_bucket.setdefault(fp8._bucket(M), (cfg, lc)) == (cfg, lc), (M, N, K)
    for (M, N, K, cfg, _) in fp8.PROBE_CASES:
        fp8.gemv_launch(M, N, K, cfg or fp8.gemv_config(M, N, K))


def test_the_kernels_do_not_specialize_on_the_row_count():
    """Triton specializes integer arguments on == 1 and divisibility by 16 unless told not to: the row count M
    of both weight-only kernels is marked, so M = 1, 16, 20, 32, 37 ... of one class run one binary (fp8_gemv.py
    imports Triton, absent here: its source is read instead)."""
    import ast

    tree = ast.parse((ROOT / "function" / "engine" / "fp8_gemv.py").read_text())
    kernels = {f.name: f for f in tree.body if isinstance(f, ast.FunctionDef)}
    for name in ("_w8a16_kernel", "_splitk_reduce_kernel"):
        fn = kernels[name]
        assert "M" in [a.arg for a in fn.args.args]
        (deco,) = fn.decorator_list
        assert isinstance(deco, ast.Call) and ast.unparse(deco.func) == "triton.jit", name
        kw = {k.arg: ast.literal_eval(k.value) for k in deco.keywords}
        assert kw == {"do_not_specialize": ["M"]}, name
    assert "gemv_launch(M, N, K, cfg)" in ast.unparse(kernels["w8a16"])


def test_row_classes_cover_decode_buckets_and_prefill_rows():
    """The rows warm_kernels compiles for: the engine's decode buckets up to 64 rows (runner._buckets of the slots,
    the runner's default sizes) and every _bucket class, since a prefill chunk after a reused prefix has any
    number of rows and a short prompt's graphed prefill 64."""
    import inspect

    from function.engine.runner import ModelRunner, _buckets

    assert str(fp8.DECODE_BATCH_SIZES) in inspect.getsource(ModelRunner.__init__)
    classes = {1, 2, 4, 8, 16, 32, 64}
    for slots in (1, 3, 8, 24, 32, 48, 64, 100, 256):
        got = fp8.row_classes(slots)
        want = {b for b in _buckets(slots, fp8.DECODE_BATCH_SIZES) if b <= fp8.SMALL_M_MAX} | classes
        assert got == sorted(want), slots
        assert {fp8._bucket(r) for r in got} == classes
    assert fp8.row_classes(32) == [1, 2, 4, 8, 16, 32, 64]
    assert fp8.row_classes(24) == [1, 2, 4, 8, 16, 24, 32, 64]     # 24 slots: the 24 bucket, class 32
    assert fp8.row_classes(32, graph_batch_sizes=(1, 8)) == [1, 2, 4, 8, 16, 32, 64]
    assert fp8.row_classes(32, small_m=16) == [1, 2, 4, 8, 16]
    assert fp8.row_classes(32, small_m=0) == []


def _layers(n_layers=5, shapes=((96, 64, True), (32, 64, False), (64, 160, False)), small_m=fp8.SMALL_M_MAX):
    """A stand-in model: n_layers repeats of Fp8Linear modules of `shapes` (N, K, bias), on the weight-only path."""
    layers = nn.ModuleList()
    for _ in range(n_layers):
        block = nn.ModuleList()
        for N, K, bias in shapes:
            lin = nn.Linear(K, N, bias=bias).to(torch.bfloat16)
            m = Fp8Linear.from_linear(lin, scaled_mm=True)
            m.small_m = small_m
            block.append(m)
        layers.append(block)
    return layers


def test_warm_kernels_runs_each_launch_once(monkeypatch):
    """One launch per (shape, bias, config, BLOCK_M, split) whatever the layer count, only on the weight-only
    path (not where the table names _scaled_mm, not above small_m), one activation-quantization run per input
    width; the modules' own tensors and zero activations of each row class."""
    calls, quants = [], []

    def kernel(x, codes, scale, bias, cfg=None):
        calls.append((x.shape[0], tuple(codes.shape), bias is not None, cfg))
        assert not x.any() and codes.dtype == fp8.FP8_DTYPE
        return x.new_zeros(x.shape[0], codes.shape[0])

    monkeypatch.setattr(fp8, "_w8a16", kernel)
    monkeypatch.setattr(fp8, "_triton_quant", lambda x: quants.append(tuple(x.shape)))
    monkeypatch.setitem(fp8.GEMV_TABLE, (64, 64, 160), None)     # _scaled_mm faster there: not launched
    model = _layers()
    rows = fp8.row_classes(32)
    res = fp8.warm_kernels(model, rows, device_types=("cpu",))
    want = {}      # the launches, with the first row count of each
    for N, K, bias in ((96, 64, True), (32, 64, False), (64, 160, False)):
        for r in rows:
            cfg = fp8.gemv_config(r, N, K)
            if cfg is not None:
                want.setdefault(((N, K), bias, cfg, fp8.gemv_launch(r, N, K, cfg)), r)
    assert len(calls) == len(set(calls)) == res["launches"] == len(want) < 3 * len(rows)
    assert set(calls) == {(r, shape, bias, cfg) for (shape, bias, cfg, _), r in want.items()}
    assert not any(c[1] == (64, 160) and c[0] == 64 for c in calls)
    assert 0 < res["variants"] <= res["launches"] and res["failed"] == 0
    assert sorted(quants) == [(1, 64), (1, 160)] and res["quant_widths"] == 2
    calls.clear()
    fp8.warm_kernels(_layers(small_m=8), rows, device_types=("cpu",))
    assert {c[0] for c in calls} == {1, 2, 4, 8}
    # the same launch for rows of one class: one run
    calls.clear()
    fp8.warm_kernels(model, [17, 20, 32], device_types=("cpu",))
    assert sorted({c[0] for c in calls}) == [17]
    # on CPU (the default: CUDA only) and without the kernels nothing runs
    calls.clear(), quants.clear()
    assert fp8.warm_kernels(model, rows)["launches"] == 0 and calls == [] and quants == []
    monkeypatch.setattr(fp8, "_w8a16", None)
    monkeypatch.setattr(fp8, "_triton_quant", None)
    assert "skipped" in fp8.warm_kernels(model, rows, device_types=("cpu",))


def test_warm_steps_launch_one_kernel_per_step_and_plan_when_first_asked(monkeypatch):
    """The engine runs the warm-up a step at a time while idle after ready: each step is one launch (a request
    waits for one compile at most), nothing runs before the first step, and the counts match warm_kernels'."""
    calls = []
    monkeypatch.setattr(fp8, "_w8a16", lambda x, codes, scale, bias, cfg=None: calls.append(x.shape[0]))
    monkeypatch.setattr(fp8, "_triton_quant", lambda x: calls.append(("quant", x.shape[1])))
    model, rows, res = _layers(), fp8.row_classes(16), {}
    steps = fp8.warm_steps(model, rows, res, device_types=("cpu",))
    assert calls == [] and res == {}
    seen = []
    for _ in steps:
        seen.append(len(calls))
    assert seen == list(range(1, len(seen) + 1)) and res["launches"] == len(seen) > 3
    assert calls[len(seen):] == [("quant", 64), ("quant", 160)]        # the quantization widths after the last step
    calls.clear()
    again = fp8.warm_kernels(model, rows, device_types=("cpu",))
    assert {k: v for k, v in again.items() if k != "seconds"} == {k: v for k, v in res.items() if k != "seconds"}


def test_warm_kernels_sends_a_failing_shape_to_scaled_mm(monkeypatch, caplog):
    """A variant that does not compile or launch at warm-up sends every module of that launch to _scaled_mm
    (logged) instead of failing the first request that meets it; the other shapes keep the kernel."""
    def kernel(x, codes, scale, bias, cfg=None):
        if codes.shape == (32, 64):
            raise RuntimeError("PTX assembly failed")
        return x.new_zeros(x.shape[0], codes.shape[0])

    monkeypatch.setattr(fp8, "_w8a16", kernel)
    monkeypatch.setattr(fp8, "_triton_quant", None)
    model = _layers(n_layers=3)
    with caplog.at_level("WARNING", logger="function.engine.fp8"):
        res = fp8.warm_kernels(model, fp8.row_classes(32), device_types=("cpu",))
    assert res["failed"] == 3
    for block in model:
        assert [m.small_m for m in block] == [fp8.SMALL_M_MAX, 0, fp8.SMALL_M_MAX]
        assert block[1].path(1, True, torch.bfloat16) == "scaled_mm"
    assert any("PTX assembly failed" in r.getMessage() for r in caplog.records)


def test_warm_kernels_warms_the_fused_qkv_the_engine_will_run(tiny_dir, monkeypatch):
    """The native model's q/k/v run as one fused module (ModelRunner.fuse_projections, after the load): warm-up
    launches that shape (and not the separate q/k/v, which the engine no longer calls), before and after fusion
    alike."""
    from function.engine import glm4v
    from function.engine.fp8 import Support

    calls = []
    monkeypatch.setattr(fp8, "_w8a16", lambda x, codes, scale, bias, cfg=None: calls.append(
        (tuple(codes.shape), bias is not None)) or x.new_zeros(x.shape[0], codes.shape[0]))
    monkeypatch.setattr(fp8, "_triton_quant", None)
    model = glm4v.load_native(tiny_dir, torch.bfloat16, "cpu")
    fp8.convert(model, support=Support(True, True, False, "test", small_m=64))
    attn = model.model.language_model.layers[0].self_attn
    q, k, v, o = attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj
    fused = (q.out_features + k.out_features + v.out_features, q.in_features)
    fp8.warm_kernels(model, [1], device_types=("cpu",))
    before = set(calls)
    assert (fused, True) in before and (tuple(o.weight.shape), False) in before
    assert (tuple(k.weight.shape), True) not in before and (tuple(q.weight.shape), True) not in before
    model.fuse_projections()
    calls.clear()
    fp8.warm_kernels(model, [1], device_types=("cpu",))
    assert set(calls) == before


def test_device_support_probes_once_per_device(monkeypatch):
    """QUANTIZATION=auto's rule, the loader's background probe and the bench all ask: one probe per card."""
    runs = []
    monkeypatch.setattr(fp8, "_SUPPORT", {})
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "device", lambda d: __import__("contextlib").nullcontext())
    monkeypatch.setattr(fp8, "_probe_device", lambda d: runs.append(d) or fp8.Support(True, True, True, "probed"))
    assert fp8.device_support("cuda").reason == fp8.device_support("cuda:0").reason == "probed"
    fp8.device_support("cuda:1")
    assert runs == [torch.device("cuda", 0), torch.device("cuda", 1)]


def test_load_model_takes_the_given_support(tiny, tmp_path, monkeypatch):
    """load_model(support=...) uses the given Support (or the callable's answer, asked once the tensors are in
    place) and does not probe; a callable answering None (the background probe failed) probes here."""
    from function.engine.fp8 import Support

    q = copy.deepcopy(tiny).to(torch.bfloat16)
    fp8.convert(q, support=Support(False, False, False, "emulated"))
    fp8.save_model(q, tmp_path / "q")
    probes = []
    monkeypatch.setattr(fp8, "device_support", lambda dev: probes.append(dev) or Support(True, True, False, "here",
                                                                                            small_m=4))
    given = Support(True, True, False, "given", small_m=16)
    load = lambda s: fp8.load_model(tmp_path / "q", dtype=torch.bfloat16, device_map="cpu",   # noqa: E731
                                    attn_implementation="sdpa", support=s)
    asked = []
    for s, want in ((given, 16), (lambda: asked.append(1) or given, 16)):
        mods = dict(fp8.iter_fp8(load(s)))
        assert mods and all(m.small_m == (want if m.scaled_mm else 0) for m in mods.values()) and probes == []
    assert asked == [1]
    mods = dict(fp8.iter_fp8(load(lambda: None)))
    assert len(probes) == 1 and any(m.small_m == 4 for m in mods.values())


def test_convert_resolves_the_support_after_quantizing(tiny, monkeypatch):
    """convert(support=callable) asks for the Support after the weights are quantized (the background probe
    overlaps them) and gives its settings to every module; the codes are those of the plain conversion."""
    from function.engine.fp8 import Support

    order = []
    monkeypatch.setattr(fp8, "quantize_weight", (lambda f: lambda *a, **k: order.append("q") or f(*a, **k))(
        fp8.quantize_weight))
    q = copy.deepcopy(tiny).to(torch.bfloat16)
    info = fp8.convert(q, support=lambda: order.append("support") or Support(True, True, False, "bg", small_m=8))
    assert order[-1] == "support" and order.count("support") == 1 and info["support"] == "bg"
    mods = dict(fp8.iter_fp8(q))
    assert all(m.small_m == (8 if m.scaled_mm else 0) for m in mods.values()) and any(m.scaled_mm for m in
                                                                                       mods.values())


def test_convert_of_read_ahead_weights_frees_the_shard_buffers(tiny_dir):
    """Weights read ahead are views of one buffer per shard: the codes are quantized into tensors of their own
    and every tensor left a view of a shard is copied out, so nothing keeps the shards (the bf16 decoder weights)
    alive; ties, values and the conversion's codes are those of a model whose tensors own their storage."""
    from function.engine import glm4v
    from function.engine.weights import WeightReader

    state = WeightReader(tiny_dir, "cpu").start().result()
    shards = {t.untyped_storage().data_ptr() for t in state.values()}
    dtype = next(iter(state.values())).dtype     # as stored: no conversion copy
    viewed = glm4v.load_native(tiny_dir, dtype, "cpu", state_dict=state)
    assert any(weights.is_view(p) for p in viewed.parameters())
    plain = glm4v.load_native(tiny_dir, dtype, "cpu")
    assert not any(weights.is_view(p) for p in plain.parameters())
    a, b = fp8.convert(viewed), fp8.convert(plain)
    assert a["codes"] == "allocated first" and b["codes"] == "as made" and a["compacted_bytes"] > 0 and b["compacted_bytes"] == 0
    assert not any(weights.is_view(t) for t in list(viewed.parameters()) + list(viewed.buffers()))
    assert not {t.untyped_storage().data_ptr() for t in viewed.state_dict().values()} & shards
    _same_state(viewed, plain)
    if viewed.config.tie_word_embeddings:
        assert viewed.lm_head.weight is viewed.model.language_model.embed_tokens.weight


def test_quantize_weight_equals_the_fp32_arithmetic():
    """The codes and scales without an fp32 copy of the weight are those of the fp32 arithmetic, bit for bit,
    also when written into given tensors."""
    g = torch.Generator().manual_seed(3)
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        w = (torch.randn(80, 300, generator=g) * torch.logspace(-6, 1, 80).view(-1, 1)).to(dtype)
        w[3] = 0
        wf = w.float()
        scale = (wf.abs().amax(dim=1) / FP8_MAX).clamp_(min=fp8.WEIGHT_MIN_SCALE)
        codes = (wf / scale[:, None]).clamp_(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
        q, s = fp8.quantize_weight(w)
        assert torch.equal(_codes(q), _codes(codes)) and torch.equal(s, scale), dtype
        out, sout = torch.empty_like(codes), torch.empty_like(scale)
        q2, s2 = fp8.quantize_weight(w, out, sout)
        assert q2 is out and s2 is sout and torch.equal(_codes(out), _codes(codes)) and torch.equal(sout, scale)


# The _scaled_mm path and the weight-only Triton kernel on an FP8 card (eager against fp32 references, and inside
# CUDA graphs) are checked by `bench/fp8_bench.py check`; their speed by `bench/fp8_bench.py gemv`.


def test_fp8_bench_accuracy_section_runs_on_the_native_model(model_cache_dir, tiny_dir):
    """`bench/fp8_bench.py smoke`: the accuracy section (bf16 vs fp8 greedy tokens, hidden-state and logits error)
    on the tiny native model, in a fresh process. It broke once unseen when the engine moved off transformers
    (no `generate`, no tokenizer `apply_chat_template`); the GPU run of the same code gives RESULTS its numbers."""
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "MODEL_CACHE_DIR": str(model_cache_dir), "PYTHONPATH": str(root)}
    out = subprocess.run([sys.executable, str(root / "bench" / "fp8_bench.py"), "smoke"], capture_output=True,
                         text=True, timeout=300, env=env, cwd=root)
    assert out.returncode == 0, out.stderr[-3000:]
    res = json.loads(out.stdout[out.stdout.index("{"):])
    assert res["convert"]["modules"] > 0 and res["convert"]["bytes_after"] < res["convert"]["bytes_before"]
    for row in res["accuracy_tiny_cpu"]:
        assert row["steps"] == 32 and row["prompt_tokens"] > 32
        # FP8 moves the logits by a few percent, not by their size; top-1 mostly agrees even on random weights
        assert 0 < row["logits_rel_err"] < 0.25 and 0 < row["hidden_rel_err"] < 0.25
        assert row["top1_agreement_teacher_forced"] >= 0.5
        assert 0 <= row["free_running_identical_steps"] <= 32
