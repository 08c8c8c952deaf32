"""nf4 on the native model (engine/nf4.py): the pre-quantized copy that the first nf4 start writes through
transformers' bitsandbytes quantizer, read back without transformers. bitsandbytes' CPU backend runs the same
quantization format and matmul_4bit on the tiny model, so these run in CI; the H200 numbers are in bench/."""
from __future__ import annotations

import torch
from torch import nn

import pytest
from bitsandbytes.nn import Linear4bit

from function.config import Config
from function.engine import glm4v, nf4
from function.engine.loader import bnb_config, model_impl, save_prequantized
from function.engine.runner import ModelRunner, PrefillItem


@pytest.fixture(scope="module")
def nf4_copy(tiny_dir, tmp_path_factory):
    """(transformers' nf4 model of the tiny checkpoint, the pre-quantized copy the loader writes from it)."""
    from transformers.models.glm4v.modeling_glm4v import Glm4vForConditionalGeneration

    ref = Glm4vForConditionalGeneration.from_pretrained(
        tiny_dir, dtype=torch.bfloat16, device_map="cpu",
        quantization_config=bnb_config("nf4", False, torch.bfloat16)).eval()
    out = tmp_path_factory.mktemp("prequantized") / "tiny-nf4"
    save_prequantized(ref, tiny_dir, out)
    return ref, out


def test_the_copy_loads_natively_with_transformers_nf4_logits(nf4_copy, tiny_dir):
    ref, out = nf4_copy
    model = nf4.load_native(out, torch.bfloat16, "cpu")
    assert isinstance(model, glm4v.Glm4vNativeForConditionalGeneration)
    quantized = {n for n, m in model.named_modules() if isinstance(m, Linear4bit)}
    decoder_linears = {n for n, m in glm4v.build_empty(glm4v.Glm4vNativeConfig.from_dir(tiny_dir)).named_modules()
                       if type(m) is nn.Linear and ".language_model." in f".{n}"}
    assert quantized == decoder_linears      # the decoder's projections; lm_head and the vision tower stay bf16
    assert type(model.lm_head) is nn.Linear and model.lm_head.weight.dtype == torch.bfloat16
    assert not any(isinstance(m, Linear4bit) for m in model.model.visual.modules())
    ids = torch.randint(0, ref.config.text_config.vocab_size, (1, 21), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        want = ref(input_ids=ids).logits
        got = model(input_ids=ids).logits
    torch.testing.assert_close(got, want, atol=1e-3, rtol=1e-3)    # the same kernels on the same packed weights
    with torch.no_grad():
        bf16 = glm4v.load_native(tiny_dir, torch.bfloat16, "cpu")(input_ids=ids).logits
    assert not torch.allclose(got, bf16, atol=1e-3)                # and they are 4-bit, not the bf16 weights

    # the runner fuses q/k/v for bf16 and fp8; packed 4-bit weights stay three projections and the output holds
    model.fuse_projections()
    assert all(layer.self_attn.__dict__.get("_qkv") is None for layer in model.model.language_model.layers)
    runner = ModelRunner(model, num_slots=2, max_len=256, use_graphs=False)
    tokens = ids[0].tolist()
    logits = runner.prefill([PrefillItem(slot=0, token_ids=tokens, start=0,
                                         position_ids=torch.arange(len(tokens)).expand(3, -1), images=[])])
    torch.testing.assert_close(logits[0], want[0, -1].to(logits.dtype), atol=2e-2, rtol=2e-2)


def test_the_copy_is_read_from_tensors_already_on_the_device(nf4_copy):
    """The start reads the shards ahead (weights.WeightReader) and hands them over; every entry is consumed."""
    from safetensors.torch import load_file

    _, out = nf4_copy
    state = {}
    for f in sorted(out.glob("*.safetensors")):
        state.update(load_file(f))
    model = nf4.load_native(out, torch.bfloat16, "cpu", state_dict=state)
    assert state == {}
    assert any(isinstance(m, Linear4bit) for m in model.modules())


def test_a_copy_that_does_not_match_is_a_clear_error(nf4_copy):
    from safetensors.torch import load_file

    _, out = nf4_copy
    full = {}
    for f in sorted(out.glob("*.safetensors")):
        full.update(load_file(f))
    name = nf4.quantized_modules(full)[0]
    broken = dict(full)
    del broken[name + ".weight"]
    with pytest.raises(ValueError, match="no packed weight"):
        nf4.load_native(out, torch.bfloat16, "cpu", state_dict=broken)
    extra = dict(full)
    extra["model.language_model.layers.0.mlp.nope.weight.quant_state.bitsandbytes__nf4"] = \
        full[name + ".weight.quant_state.bitsandbytes__nf4"]
    with pytest.raises(ValueError, match="does not have"):
        nf4.load_native(out, torch.bfloat16, "cpu", state_dict=extra)
    plain = {k: v for k, v in full.items() if ".weight." not in k and v.dtype != torch.uint8}
    with pytest.raises(ValueError, match="no nf4 quantized modules"):
        nf4.load_native(out, torch.bfloat16, "cpu", state_dict=plain)


def test_nf4_is_native_and_int8_keeps_transformers(tiny_dir):
    auto = Config.from_env({})
    assert model_impl(auto, tiny_dir, "nf4")[0] == "native"
    impl, why = model_impl(auto, tiny_dir, "int8")
    assert impl == "transformers" and "quantizes through transformers" in why
    assert model_impl(Config.from_env({"MODEL_IMPL": "transformers"}), tiny_dir, "nf4")[0] == "transformers"
    with pytest.raises(RuntimeError, match="MODEL_IMPL=native cannot serve"):
        model_impl(Config.from_env({"MODEL_IMPL": "native"}), tiny_dir, "int8")


@pytest.fixture(scope="module")
def native_copy(tiny_dir, tmp_path_factory):
    """(the tiny model quantized natively by nf4.quantize, the pre-quantized copy the loader writes from it)."""
    model = glm4v.load_native(tiny_dir, torch.bfloat16, "cpu")
    names = nf4.quantize(model, torch.bfloat16, "cpu")
    assert names and not any(n == "lm_head" or n.startswith("model.visual") for n in names)
    out = tmp_path_factory.mktemp("prequantized") / "tiny-nf4-native"
    save_prequantized(model, tiny_dir, out)
    return model, out


def test_native_quantization_writes_what_transformers_writes(nf4_copy, native_copy):
    """nf4.quantize + save packs the same bytes under the same names as transformers' bitsandbytes quantizer +
    save_pretrained, and config.json's quantization_config says the same: either implementation reads either copy."""
    import json

    from safetensors.torch import load_file
    from transformers import BitsAndBytesConfig

    def tensors(d):
        out = {}
        for f in sorted(d.glob("*.safetensors")):
            out.update(load_file(f))
        return out

    (_, theirs), (_, ours) = nf4_copy, native_copy
    want, got = tensors(theirs), tensors(ours)
    assert sorted(got) == sorted(want)
    for key in want:
        assert torch.equal(got[key], want[key]), key
    qc_want = json.loads((theirs / "config.json").read_text())["quantization_config"]
    qc_got = json.loads((ours / "config.json").read_text())["quantization_config"]
    assert BitsAndBytesConfig.from_dict(qc_got).to_dict() == BitsAndBytesConfig.from_dict(qc_want).to_dict()
    assert (ours / "model.safetensors.index.json").is_file() and (ours / "prequantized.json").is_file()


def test_the_native_copy_serves_the_same_logits_natively_and_through_transformers(nf4_copy, native_copy):
    from transformers.models.glm4v.modeling_glm4v import Glm4vForConditionalGeneration

    (ref, _), (model, out) = nf4_copy, native_copy
    ids = torch.randint(0, ref.config.text_config.vocab_size, (1, 17), generator=torch.Generator().manual_seed(5))
    reread = nf4.load_native(out, torch.bfloat16, "cpu")
    through = Glm4vForConditionalGeneration.from_pretrained(out, dtype=torch.bfloat16, device_map="cpu").eval()
    assert any(isinstance(m, Linear4bit) for m in through.modules())
    with torch.no_grad():
        want = ref(input_ids=ids).logits
        for m in (reread, through):   # the same bytes through the same kernels
            torch.testing.assert_close(m(input_ids=ids).logits, want, atol=1e-3, rtol=1e-3)
        # the model quantized in memory runs bitsandbytes' CPU kernel for the layout it quantized to (a loaded copy
        # is repacked for AVX-512 on its first forward): the same 4-bit weights, bf16 rounding apart
        torch.testing.assert_close(model(input_ids=ids).logits, want, atol=2e-2, rtol=2e-2)


def test_a_first_nf4_start_quantizes_natively_and_the_next_reads_the_copy(tiny_dir, monkeypatch, tmp_path):
    """The loader end to end (on the CPU, where choose() refuses nf4, so nf4 is chosen here by hand): the first
    start loads bf16 natively, quantizes, writes the copy; the second loads the copy; neither imports transformers'
    modeling (a fresh process checks the imports elsewhere; here the choices say which path ran)."""
    from function.engine import loader

    real_choose = loader.choose

    def choose_nf4(config, model_path):
        choices = real_choose(config, model_path)
        choices.quantization = "nf4"
        return choices

    monkeypatch.setattr(loader, "choose", choose_nf4)
    cfg = Config.from_env({"MODEL_PATH": str(tiny_dir), "MODEL_CACHE_DIR": str(tmp_path), "DEVICE": "cpu"})
    first = loader.load(cfg)
    assert first.choices.model_impl == "native" and first.choices.source != "prequantized-cache"
    assert "nf4_quantize" in first.choices.timings and nf4.quantized(first.model)
    from function.engine import weights
    assert first.choices.weights, "the bf16 shards were read ahead (views of one buffer per shard)"
    views = [n for n, t in list(first.model.named_parameters()) + list(first.model.named_buffers())
             if weights.is_view(t)]
    assert views == []     # nothing keeps a shard buffer (and its replaced bf16 weights) alive
    second = loader.load(cfg)
    assert second.choices.model_impl == "native" and second.choices.source == "prequantized-cache"
    assert "load_prequantized" in second.choices.timings
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    with torch.no_grad():
        torch.testing.assert_close(second.model(input_ids=ids).logits, first.model(input_ids=ids).logits)


def test_bitsandbytes_imports_without_dynamo_and_leaves_torch_compile_alone():
    """bitsandbytes wraps its fallback ops in torch.compile at import, and torch.library wraps its kernels in a
    dynamo-disable that imports torch._dynamo at the first call (10.8 s and 3.2-5.8 s on the H200);
    nf4.import_bitsandbytes keeps both out for that import only, and the first kernel calls import no dynamo."""
    import subprocess
    import sys

    code = ("import sys, torch; compile_before, disable_before = torch.compile, torch._disable_dynamo\n"
            "from function.engine import nf4\n"
            "bnn = nf4.import_bitsandbytes()\n"
            "assert nf4.import_bitsandbytes() is bnn and hasattr(bnn, 'Linear4bit')\n"
            "import bitsandbytes as bnb\n"   # the kernels' first calls: quantize, then a matmul
            "p = bnn.Params4bit(torch.randn(64, 64, dtype=torch.bfloat16), requires_grad=False,"
            " quant_type='nf4').to('cpu')\n"
            "bnb.matmul_4bit(torch.randn(2, 64, dtype=torch.bfloat16), p.t(), quant_state=p.quant_state)\n"
            "print([m for m in ('torch._dynamo', 'torch._inductor', 'sympy') if m in sys.modules],"
            " torch.compile is compile_before and torch._disable_dynamo is disable_before)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip().splitlines()[-1] == "[] True", out.stdout + out.stderr
