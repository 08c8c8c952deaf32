"""nf4 (bitsandbytes) weights on the native GLM-4.1V model (engine/glm4v.py).

The first nf4 start quantizes through transformers' bitsandbytes quantizer and writes the pre-quantized copy with
`save_pretrained`: each quantized nn.Linear is its packed 4-bit `weight` plus bitsandbytes' quant state under
`weight.absmax`, `weight.quant_map`, (`weight.nested_absmax`, `weight.nested_quant_map`) and
`weight.quant_state.bitsandbytes__nf4` (bitsandbytes' Linear4bit._save_to_state_dict layout). Later starts read
that copy here, into bitsandbytes' own Linear4bit modules on the native model, so they import neither
transformers' modeling nor its processor: 4.3 s of an nf4 start on the H200 (bench/RESULTS.md, session 6).
The matrix products are bitsandbytes' (`bnb.matmul_4bit`), the same kernels the transformers path runs."""
from __future__ import annotations

import sys
import threading
from pathlib import Path

import torch
from torch import nn

QUANT_STATE_KEY = "weight.quant_state.bitsandbytes__nf4"
_import_lock = threading.Lock()


def import_bitsandbytes():
    """bitsandbytes.nn, imported with torch.compile refused. At import, bitsandbytes wraps its pure-torch fallback
    ops (backends/default) in `torch.compile`, which imports torch._dynamo, inductor and sympy: 10.8 s of an nf4
    start on the H200 (bench/nf4_probe.py, session 7), against 0.4 s for the whole load. Its wrapper falls back to
    the plain function when torch.compile raises; on CUDA the nf4 matmuls are its CUDA kernels either way."""
    with _import_lock:
        if "bitsandbytes.nn" in sys.modules:
            return sys.modules["bitsandbytes.nn"]
        real = torch.compile

        def refuse(*args, **kwargs):
            raise RuntimeError("torch.compile is off while bitsandbytes imports (engine/nf4.py)")

        torch.compile = refuse
        try:
            import bitsandbytes.nn
        finally:
            torch.compile = real
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
    embed = "model.language_model.embed_tokens.weight"
    if config.tie_word_embeddings and embed in rest:
        rest["lm_head.weight"] = rest[embed]
    missing, unexpected = sorted(expected - set(rest)), sorted(set(rest) - expected)
    if missing or unexpected:
        raise ValueError(f"{load_dir}: the nf4 checkpoint does not match GLM-4.1V: {len(missing)} missing tensors "
                         f"{missing[:5]}, {len(unexpected)} unexpected {unexpected[:5]}")
    try:
        model.load_state_dict(rest, strict=False, assign=True)
    except RuntimeError as e:   # shape mismatches
        raise ValueError(f"{load_dir}: the nf4 checkpoint does not match GLM-4.1V: {e}") from None
    glm4v.finish_load(model, device)
    model.requires_grad_(False)
    return model.eval()
