"""nf4 (bitsandbytes) weights on the native GLM-4.1V model (engine/glm4v.py), without transformers.

The first nf4 start loads the bf16 checkpoint natively and `quantize`s the decoder's nn.Linear layers into
bitsandbytes' Linear4bit on the card (Params4bit: the same packing transformers' bitsandbytes quantizer makes),
then writes the pre-quantized copy with `save_model` in transformers' layout: each quantized Linear is its packed
4-bit `weight` plus bitsandbytes' quant state under `weight.absmax`, `weight.quant_map` and
`weight.quant_state.bitsandbytes__nf4` (Linear4bit._save_to_state_dict), and config.json carries the
`quantization_config` that from_pretrained expects, so MODEL_IMPL=transformers reads the same copy. Later starts read
it with `load_native`. Neither imports transformers' modeling nor its processor: 4.3 s of an nf4 start on the H200
(bench/RESULTS.md, session 6). The matrix products are bitsandbytes' (`bnb.matmul_4bit`), the kernels the
transformers path runs."""
from __future__ import annotations

import json
import sys
import threading
from pathlib import Path

import torch
from torch import nn

QUANT_STATE_KEY = "weight.quant_state.bitsandbytes__nf4"
#: what stays in the model dtype: lm_head (every token's logits), the vision tower unless QUANTIZE_VISION (small and
#: accuracy-sensitive). transformers' `llm_int8_skip_modules` takes the same list (loader.bnb_config).
SKIP = ("lm_head",)
VISION = ("visual", "model.visual")


_import_lock = threading.Lock()


def skip_modules(quantize_vision: bool) -> list[str]:
    return list(SKIP) + ([] if quantize_vision else list(VISION))


def import_bitsandbytes():
    """bitsandbytes.nn, imported so that neither its import nor its first kernel call imports torch._dynamo,
    inductor and sympy (bench/nf4_probe.py, bench/bnb_jit_probe.py, H200 sessions 7-8: 10.8 s of an nf4 start at
    import, then 3.2-5.8 s at the first quantization or the first decode graph capture):
    - at import it wraps its pure-torch fallback ops in `torch.compile`; that wrapper falls back to the plain
      function when torch.compile raises, so torch.compile raises for the import (on CUDA the nf4 matmuls are its
      CUDA kernels either way);
    - it registers its kernels with torch.library, which wraps each in `torch._disable_dynamo`, and that imports
      torch._dynamo on the first call; the wrapper only tells dynamo not to trace the kernel, and the engine runs no
      dynamo (it captures CUDA graphs), so the kernels are registered unwrapped.
    Both stand-ins are in place only while bitsandbytes imports, process-wide: the loader runs this beside the weight
    read and its own modules' imports, none of which compiles or disables dynamo."""
    with _import_lock:
        if "bitsandbytes.nn" in sys.modules:
            return sys.modules["bitsandbytes.nn"]
        real_compile, real_disable = torch.compile, torch._disable_dynamo

        def refuse(*args, **kwargs):
            raise RuntimeError("torch.compile is off while bitsandbytes imports (engine/nf4.py)")

        def unwrapped(fn=None, recursive=True):
            return fn if fn is not None else (lambda f: f)

        torch.compile, torch._disable_dynamo = refuse, unwrapped
        try:
            import bitsandbytes.nn
        finally:
            torch.compile, torch._disable_dynamo = real_compile, real_disable
        return bitsandbytes.nn


def quantized_modules(keys) -> list[str]:
    """The names of the modules a state dict holds nf4 weights for (those with a packed nf4 quant state)."""
    suffix = "." + QUANT_STATE_KEY
    return sorted(k[:-len(suffix)] for k in keys if k.endswith(suffix))


def take_module_state(state: dict[str, torch.Tensor], name: str) -> tuple[torch.Tensor, dict, torch.Tensor | None]:
    """Pops module `name`'s tensors from `state`: (packed weight, its quant-state tensors keyed by what follows
    `weight.`, bias or None)."""
    prefix = name + ".weight."
    stats = {k[len(prefix):]: state.pop(k) for k in [k for k in state if k.startswith(prefix)]}
    try:
        packed = state.pop(name + ".weight")
    except KeyError:
        raise ValueError(f"the nf4 checkpoint has a quant state but no packed weight for {name}") from None
    return packed, stats, state.pop(name + ".bias", None)


def _skipped(name: str, skip: list[str]) -> bool:
    return any(name == s or name.startswith(s + ".") for s in skip)


def quantize(model: nn.Module, dtype: torch.dtype, device, quantize_vision: bool = False) -> list[str]:
    """Replaces the model's nn.Linear layers (all but `skip_modules`) with nf4 Linear4bit on `device`, quantizing
    there (bitsandbytes quantizes a Params4bit when it moves to the device); the rest of the model moves to
    `device` too. The bf16 weights may be on the CPU (a card too small for the bf16 checkpoint) or on `device`;
    each is freed once its module is replaced. The quantized module names."""
    bnb_nn = import_bitsandbytes()
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    skip = skip_modules(quantize_vision)
    names = [n for n, m in model.named_modules() if type(m) is nn.Linear and not _skipped(n, skip)]
    for name in names:
        lin = model.get_submodule(name)
        new = bnb_nn.Linear4bit(lin.in_features, lin.out_features, bias=lin.bias is not None, compute_dtype=dtype,
                                compress_statistics=False, quant_type="nf4", device="meta")
        new.weight = bnb_nn.Params4bit(lin.weight.data.to(dtype), requires_grad=False, compress_statistics=False,
                                       quant_type="nf4", module=new).to(device)
        if lin.bias is not None:
            new.bias = nn.Parameter(lin.bias.data.to(device=device, dtype=dtype, copy=True), requires_grad=False)
        _set_module(model, name, new)
    # the rest moves to `device`, and what is still a view of a read-ahead shard buffer (weights.WeightReader) gets
    # storage of its own, so the shards, their bf16 decoder weights included, are freed
    from .weights import compact_views

    compact_views(model, device, skip=(bnb_nn.Linear4bit,))
    from . import glm4v
    glm4v.finish_load(model, device)
    model._nf4_quantize_vision = quantize_vision
    return names


def quantized(model: nn.Module) -> list[str]:
    """The names of the model's Linear4bit modules (none while bitsandbytes is not imported)."""
    bnb_nn = sys.modules.get("bitsandbytes.nn")
    if bnb_nn is None:
        return []
    return [n for n, m in model.named_modules() if isinstance(m, bnb_nn.Linear4bit)]


def quantization_config(dtype: torch.dtype, quantize_vision: bool) -> dict:
    """config.json's `quantization_config` for the copy: what transformers writes for loader.bnb_config("nf4")
    (tests/test_nf4_native.py compares the two), without importing transformers."""
    return {"quant_method": "bitsandbytes", "load_in_4bit": True, "load_in_8bit": False,
            "bnb_4bit_quant_type": "nf4", "bnb_4bit_compute_dtype": str(dtype).replace("torch.", ""),
            "bnb_4bit_use_double_quant": False, "bnb_4bit_quant_storage": "uint8",
            "llm_int8_skip_modules": skip_modules(quantize_vision), "llm_int8_threshold": 6.0,
            "llm_int8_has_fp16_weight": False, "llm_int8_enable_fp32_cpu_offload": False}


def save_model(model: nn.Module, out: Path) -> None:
    """The quantized native model as the pre-quantized copy in `out` (safetensors shards, index, config.json with
    its quantization_config), in the layout transformers' save_pretrained writes."""
    from .weights import save_shards

    out = Path(out)
    if not quantized(model):
        raise RuntimeError("nf4.save_model: the model has no Linear4bit modules")
    save_shards(model.state_dict(), out)
    config = model.config.to_dict()
    config["quantization_config"] = quantization_config(model.lm_head.weight.dtype,
                                                      getattr(model, "_nf4_quantize_vision", False))
    (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def _set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


def load_native(load_dir, dtype: torch.dtype, device, state_dict: dict[str, torch.Tensor] | None = None):
    """The native model from the nf4 pre-quantized copy in `load_dir`, on `device`, eval mode. `state_dict`: the
    copy's tensors already read (weights.WeightReader; checkpoint names, on the device); its entries are consumed.
    Raises ValueError when the tensors do not match the architecture."""
    bnb_nn = import_bitsandbytes()
    Linear4bit, Params4bit = bnb_nn.Linear4bit, bnb_nn.Params4bit
    from . import glm4v

    load_dir, device = Path(load_dir), torch.device(device)
    config = glm4v.Glm4vNativeConfig.from_dir(load_dir)
    model = glm4v.build_empty(config)
    raw = state_dict if state_dict is not None else glm4v._read_safetensors(load_dir, device)
    state: dict[str, torch.Tensor] = {}
    for key in list(raw):
        t = raw.pop(key)
        key = glm4v.remap_checkpoint_key(key)
        if not glm4v._IGNORED.search(key):
            state[key] = t
    names = quantized_modules(state)
    if not names:
        raise ValueError(f"{load_dir}: no nf4 quantized modules in the checkpoint")
    expected = set(model.state_dict()) - {f"{n}.{p}" for n in names for p in ("weight", "bias")}
    for name in names:
        try:
            lin = model.get_submodule(name)
        except AttributeError:
            raise ValueError(f"{load_dir}: nf4 tensors for {name}, which GLM-4.1V does not have") from None
        if type(lin) is not nn.Linear:
            raise ValueError(f"{load_dir}: nf4 tensors for {name}, which is a {type(lin).__name__}, not a Linear")
        packed, stats, bias = take_module_state(state, name)
        new = Linear4bit(lin.in_features, lin.out_features, bias=lin.bias is not None, compute_dtype=dtype,
                         quant_type="nf4", device="meta")
        new.weight = Params4bit.from_prequantized(data=packed.to(device), quantized_stats=stats,
                                                  requires_grad=False, device=device, module=new)
        if (bias is None) != (lin.bias is None):
            raise ValueError(f"{load_dir}: {name} bias {'missing' if bias is None else 'unexpected'}")
        if bias is not None:
            new.bias = nn.Parameter(bias.to(device=device, dtype=dtype), requires_grad=False)
        _set_module(model, name, new)
    rest = {k: t.to(device=device, dtype=dtype if t.is_floating_point() else t.dtype) for k, t in state.items()}
    return glm4v.assign_state(model, rest, expected, device, f"{load_dir}: the nf4 checkpoint")
