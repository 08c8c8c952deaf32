"""Where the model and its KV cache go when a pod has GPUS_PER_POD cards: the device map for
`from_pretrained(device_map=...)`, the decoder layers per card, and the KV cache each card can hold.

Pure arithmetic on the model config and the cards' memory sizes, which are passed in (no CUDA needed: the tests run
it on CPU for the real GLM-4.1V-9B shapes). The parameter counts come from engine/glm4v.py's model built on the meta
device (the same modules under the same names as transformers' `Glm4vForConditionalGeneration`, whose state dict
the tests compare it with), so they match the checkpoint exactly.

The split (pipeline style, one card after the other; nothing runs on two cards at once):

    card 0      model.visual (vision tower), model.language_model.embed_tokens, rotary_emb, decoder layers 0..n0-1
    card 1..    the next decoder layers, contiguous
    last card   ..., layer L-1, model.language_model.norm, lm_head

Each decoder layer's K/V buffers live on that layer's card, and every layer holds the same slots x positions, so the
cache is limited by the card with the least room per layer it hosts (the *binding* card). The layers are spread to
maximise that minimum: each card's budget is

    total x GPU_MEMORY_UTILIZATION - CUDA context - activation reserve - fixed modules - n_i x layer weights

and n_i is chosen so that min_i(budget_i / (n_i x KV bytes per token per layer)) is as large as possible. vLLM sizes
pipeline stages the same way: each worker profiles its own free memory after loading its layers, and the engine takes
the minimum block count over the workers.

With GPUS_PER_POD=1 the plan is the single-device one: device_map "cuda:0" (a string: transformers moves the whole
model, no accelerate hooks) and all layers on that card, so one code path serves both.

The API the loader and the engine use:

    placement = plan(model_config, gpus_per_pod, gpu_bytes, weight_bytes_per_param=..., ...)   # before loading
    from_pretrained(..., device_map=placement.device_map)
    slots, max_len, ... = fit_kv(placement.layers_per_device, measured_free_per_card, ...)       # after loading

`fit_kv` is the same arithmetic as the last step of `plan`, applied to the memory each card really has left after
loading (torch.cuda.mem_get_info per card), as the single-card engine does today.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, Mapping, Sequence

from ..config import ConfigError

GIB = 2**30
MIB = 2**20

# Module names in transformers' Glm4vForConditionalGeneration (5.x): the units the device map places.
VISUAL = "model.visual"
EMBED = "model.language_model.embed_tokens"
ROTARY = "model.language_model.rotary_emb"          # buffers only (inv_freq)
LAYER_PREFIX = "model.language_model.layers."
NORM = "model.language_model.norm"
LM_HEAD = "lm_head"
FIRST_CARD_UNITS = (VISUAL, EMBED, ROTARY)
LAST_CARD_UNITS = (NORM, LM_HEAD)

#: CUDA context + cuBLAS/cuDNN handles per card before any tensor (torch 2.x, lazy module loading): an estimate that
#: `plan` subtracts before loading; after loading, `fit_kv` is given the measured free memory instead.
CUDA_CONTEXT_BYTES = 512 * MIB

#: Shortest context the plan accepts before it calls the memory insufficient: a phone step (one ~1080x2400
#: screenshot + the task and history) is ~1.5-2k tokens, and the answer needs room too.
MIN_MODEL_LEN = 4096

#: Bytes per quantized Linear weight. nf4: 4 bits + one fp32 absmax per 64-value block (the loader's
#: BitsAndBytesConfig has bnb_4bit_use_double_quant=False). int8 (LLM.int8): 1 byte + one fp32 scale per output row
#: (~0.1% for 4096-wide rows, ignored).
# fp8 (function/engine/fp8.py): 1 byte + one fp32 scale per output row, likewise ignored.
QUANT_BYTES_PER_PARAM = {"nf4": 0.5 + 4 / 64, "int8": 1.0, "fp8": 1.0}


class PlacementError(ConfigError):
    """The configured GPUs cannot hold the model as configured; the message names the settings and the fix."""


def default_reserve_bytes(max_num_seqs: int) -> int:
    """Activation headroom per card (prefill activations, CUDA graph pools, vision-tower activations on card 0, the
    sampler's tables on the last card): the same rule the single-card engine applies (engine/client.py)."""
    return 2 * GIB + 512 * MIB * max(1, max_num_seqs // 8)


def weight_bytes_per_param(quantization: str, dtype_bytes: int = 2) -> float:
    """Bytes per parameter of the quantizable Linear weights for QUANTIZATION (none/bf16: the dtype's size)."""
    if quantization in ("none", "bf16", "", None):
        return float(dtype_bytes)
    try:
        return QUANT_BYTES_PER_PARAM[quantization]
    except KeyError:
        raise PlacementError(f"QUANTIZATION={quantization!r}: no weight size known for it") from None


# ---------------------------------------------------------------------------------------------------- model sizes

@dataclass(frozen=True)
class ModelSizes:
    """Parameter counts of the placement units, split into quantizable Linear weights and the rest (embeddings,
    norms, biases, convolutions, buffers): bytes depend on the quantization, counts do not."""
    units: dict[str, tuple[int, int]]     # unit -> (quantizable Linear weight params, other params)
    buffer_bytes: dict[str, int]          # unit -> bytes of its buffers (rotary inv_freq, ...)
    num_layers: int
    kv_heads: int
    head_dim: int
    max_position_embeddings: int
    tied: bool                            # lm_head shares embed_tokens' weight

    def unit_bytes(self, unit: str, wbpp: float, dtype_bytes: int, quantize_vision: bool = False) -> int:
        q, other = self.units[unit]
        quantized = unit != LM_HEAD and (unit != VISUAL or quantize_vision)
        return int(math.ceil(q * (wbpp if quantized else dtype_bytes))) + other * dtype_bytes \
            + self.buffer_bytes.get(unit, 0)

    def kv_bytes_per_token_per_layer(self, kv_dtype_bytes: int = 2) -> int:
        return 2 * self.kv_heads * self.head_dim * kv_dtype_bytes

    @property
    def params(self) -> int:
        return sum(q + o for q, o in self.units.values())


def _as_config(config: Any):
    """A GLM-4.1V config (engine/glm4v.py's parse, no transformers import) from a transformers Glm4vConfig, a native
    one, a config.json dict or a JSON string."""
    from .glm4v import Glm4vNativeConfig

    if isinstance(config, str):
        config = json.loads(config)
    if isinstance(config, Mapping):
        return Glm4vNativeConfig.from_dict(dict(config))
    return config


def _unit_of(name: str) -> str:
    if name.startswith(LAYER_PREFIX):
        return LAYER_PREFIX + name[len(LAYER_PREFIX):].split(".", 1)[0]
    for unit in (VISUAL, EMBED, ROTARY, NORM, LM_HEAD):
        if name == unit or name.startswith(unit + "."):
            return unit
    raise PlacementError(f"module {name!r} of Glm4vForConditionalGeneration is not a placement unit: the transformers "
                         "layout changed; add it to function/engine/placement.py")


@lru_cache(maxsize=8)
def _sizes_cached(config_json: str) -> ModelSizes:
    import torch

    from .glm4v import build_empty

    config = _as_config(config_json)
    model = build_empty(config)    # the same modules under the same names as transformers' class
    units: dict[str, list[int]] = {}
    seen: set[int] = set()
    for mname, mod in model.named_modules():
        for pname, p in mod.named_parameters(recurse=False):
            if id(p) in seen:          # a tied weight is stored once
                continue
            seen.add(id(p))
            full = f"{mname}.{pname}" if mname else pname
            u = units.setdefault(_unit_of(full), [0, 0])
            u[0 if (isinstance(mod, torch.nn.Linear) and pname == "weight") else 1] += p.numel()
    buffers: dict[str, int] = {}
    for bname, b in model.named_buffers():
        unit = _unit_of(bname)
        buffers[unit] = buffers.get(unit, 0) + b.numel() * b.element_size()
    tcfg = config.text_config
    tied = model.lm_head.weight is model.model.language_model.embed_tokens.weight
    units.setdefault(LM_HEAD, [0, 0])
    return ModelSizes(units={k: (v[0], v[1]) for k, v in units.items()}, buffer_bytes=buffers,
                      num_layers=int(tcfg.num_hidden_layers), kv_heads=int(tcfg.num_key_value_heads),
                      head_dim=int(getattr(tcfg, "head_dim", None) or tcfg.hidden_size // tcfg.num_attention_heads),
                      max_position_embeddings=int(tcfg.max_position_embeddings), tied=bool(tied))


def model_sizes(config: Any) -> ModelSizes:
    """Parameter counts per placement unit of a Glm4vConfig (or its config.json dict), from the model class
    built on the meta device."""
    cfg = _as_config(config)
    return _sizes_cached(cfg.to_json_string(use_diff=False))


# ---------------------------------------------------------------------------------------------------- validation

def _plural(n: int, word: str) -> str:
    return f"{n} {word}" + ("" if n == 1 else "s")


def check_devices(gpus_per_pod: int, visible: int, *, device: str = "auto",
                  cuda_visible_devices: str | None = None) -> None:
    """Raise PlacementError when the pod's GPUs cannot serve GPUS_PER_POD (too few visible cards, a DEVICE that names
    one card or the CPU). `cuda_visible_devices` is only quoted in the message."""
    if gpus_per_pod < 1:
        raise PlacementError(f"GPUS_PER_POD={gpus_per_pod}: must be at least 1")
    if gpus_per_pod == 1:
        return
    if device == "cpu":
        raise PlacementError(f"GPUS_PER_POD={gpus_per_pod} splits the model over CUDA devices but DEVICE=cpu; set "
                             "DEVICE=cuda (or auto), or GPUS_PER_POD=1")
    if device.startswith("cuda:"):
        raise PlacementError(f"GPUS_PER_POD={gpus_per_pod} uses cuda:0..cuda:{gpus_per_pod - 1} but DEVICE={device} "
                             "names one card; set DEVICE=cuda (or auto)")
    if visible < gpus_per_pod:
        seen = "no CUDA device is" if visible == 0 else f"{_plural(visible, 'CUDA device')} " + \
            ("is" if visible == 1 else "are")
        env = "" if cuda_visible_devices is None else f" (CUDA_VISIBLE_DEVICES={cuda_visible_devices or '<empty>'})"
        raise PlacementError(f"GPUS_PER_POD={gpus_per_pod} but {seen} visible{env}; set nvidia.com/gpu: "
                             f"\"{gpus_per_pod}\" in the pod's resources.limits, or GPUS_PER_POD={max(1, visible)}")


# ---------------------------------------------------------------------------------------------------- the plan

@dataclass(frozen=True)
class KVFit:
    """How the KV cache fits the cards: `slots` x (`max_len` + 1) positions in every layer."""
    slots: int
    max_len: int
    tokens_per_device: list[int | None]   # positions each card's budget holds for its layers (None: no layers)
    capacity_tokens: int                  # min over the cards with layers
    binding_device: int                   # index of the card that sets capacity_tokens
    kv_bytes_per_device: list[int]        # what the cache of `slots` x (`max_len` + 1) takes on each card
    notes: list[str] = field(default_factory=list)


def fit_kv(layers_per_device: Sequence[int], kv_budget_bytes: Sequence[int], kv_bytes_per_token_per_layer: int,
           max_num_seqs: int, max_model_len: int, *, min_model_len: int = MIN_MODEL_LEN,
           device_names: Sequence[str] | None = None) -> KVFit:
    """Slots x length of the KV cache, given the layers on each card and the bytes each card can give to their KV.

    Every layer holds `slots` x (`max_len` + 1) positions (the engine's last position per slot is scratch space).
    If MAX_NUM_SEQS slots of MAX_MODEL_LEN do not fit, fewer slots are kept at the full length (as the single-card
    engine does); if not even one does, the length shrinks; below `min_model_len` it is an error."""
    names = list(device_names or [f"cuda:{i}" for i in range(len(layers_per_device))])
    per_tok = kv_bytes_per_token_per_layer
    tokens: list[int | None] = []
    for n, budget in zip(layers_per_device, kv_budget_bytes):
        tokens.append(None if n == 0 else max(0, int(budget)) // (n * per_tok))
    with_layers = [i for i, t in enumerate(tokens) if t is not None]
    binding = min(with_layers, key=lambda i: (tokens[i], -i))
    capacity = int(tokens[binding])
    notes: list[str] = []
    slots, max_len = max_num_seqs, max_model_len
    if capacity < slots * (max_len + 1):
        fit = capacity // (max_len + 1)
        if fit >= 1:
            slots = fit
            notes.append(f"the KV cache holds {slots} slots of {max_len} tokens, not MAX_NUM_SEQS={max_num_seqs} "
                         f"({names[binding]} is the binding card); lower MAX_MODEL_LEN to keep {max_num_seqs} slots")
        else:
            slots, max_len = 1, capacity - 1
            if max_len < min(min_model_len, max_model_len):
                raise PlacementError(
                    f"no room for the KV cache: {names[binding]} holds {max(capacity, 0)} tokens for its "
                    f"{layers_per_device[binding]} layers, less than one {min(min_model_len, max_model_len)}-token "
                    "sequence; use QUANTIZATION=nf4, more or larger GPUs (GPUS_PER_POD), a higher "
                    "GPU_MEMORY_UTILIZATION, or a lower MAX_NUM_SEQS")
            notes.append(f"the KV cache limits MAX_MODEL_LEN to {max_len} tokens with 1 slot ({names[binding]} is "
                         "the binding card)")
    kv_bytes = [n * slots * (max_len + 1) * per_tok for n in layers_per_device]
    return KVFit(slots=slots, max_len=max_len, tokens_per_device=tokens, capacity_tokens=capacity,
                 binding_device=binding, kv_bytes_per_device=kv_bytes, notes=notes)


@dataclass(frozen=True)
class Placement:
    """The result of `plan`. `device_map` goes to from_pretrained; `layer_devices[i]` is where layer i (and its
    KV buffers) lives; `devices[0]` takes the inputs (embeddings, vision), `devices[-1]` gives the logits."""
    device_map: str | dict[str, str]
    devices: list[str]
    layers_per_device: list[int]
    layer_devices: list[str]
    weight_bytes_per_device: list[int]
    usable_bytes_per_device: list[int]    # total x utilization - CUDA context - reserve
    kv_budget_bytes_per_device: list[int]  # usable - weights: what each card can give to the KV of its layers
    kv_bytes_per_token_per_layer: int
    kv: KVFit
    notes: list[str]

    @property
    def kv_slots(self) -> int:
        return self.kv.slots

    @property
    def max_len(self) -> int:
        return self.kv.max_len

    @property
    def kv_tokens_per_device(self) -> list[int | None]:
        return self.kv.tokens_per_device

    @property
    def binding_device(self) -> str:
        return self.devices[self.kv.binding_device]

    def summary(self) -> dict[str, Any]:
        """For the load log line: per card, layers, weights, KV budget and KV tokens."""
        return {"devices": [{"device": d, "layers": n, "weights_gib": round(w / GIB, 2),
                             "kv_budget_gib": round(b / GIB, 2), "kv_tokens": t,
                             "kv_gib": round(k / GIB, 2)}
                            for d, n, w, b, t, k in zip(self.devices, self.layers_per_device,
                                                        self.weight_bytes_per_device, self.kv_budget_bytes_per_device,
                                                        self.kv.tokens_per_device, self.kv.kv_bytes_per_device)],
                "kv_slots": self.kv_slots, "max_len": self.max_len, "binding": self.binding_device,
                "notes": self.notes}


def _balance(free: list[int], layer_w: int, per_tok: int, num_layers: int) -> list[int]:
    """Layers per card maximising min_i((free_i - n_i*layer_w) / (n_i*per_tok)), with sum(n_i) = num_layers."""
    def holds(i: int, t: int) -> int:   # layers card i can hold if each needs t KV tokens
        return max(0, free[i] // (layer_w + t * per_tok))

    if sum(holds(i, 0) for i in range(len(free))) < num_layers:
        return []
    lo, hi = 0, max(free) // per_tok + 1          # holds(lo) is feasible, holds(hi) is not
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if sum(holds(i, mid) for i in range(len(free))) >= num_layers:
            lo = mid
        else:
            hi = mid
    n = [holds(i, lo) for i in range(len(free))]
    # more room than layers at the best t: take layers away from the most constrained card first
    while sum(n) > num_layers:
        j = min((i for i in range(len(n)) if n[i] > 0),
                key=lambda i: ((free[i] - n[i] * layer_w) / (n[i] * per_tok), -i))
        n[j] -= 1
    return n


def plan(config: Any, gpus_per_pod: int, gpu_bytes: Sequence[int], weight_bytes_per_param: float = 2.0,
         kv_bytes_per_token_per_layer: int | None = None, max_num_seqs: int = 32, max_model_len: int = 0,
         utilization: float = 0.90, *, dtype_bytes: int = 2, quantize_vision: bool = False,
         reserve_bytes: int | Sequence[int] | None = None, context_bytes: int = CUDA_CONTEXT_BYTES,
         min_model_len: int = MIN_MODEL_LEN, device_names: Sequence[str] | None = None,
         device: str = "auto", cuda_visible_devices: str | None = None) -> Placement:
    """Place the model on the first `gpus_per_pod` of the visible cards and size the KV cache.

    config                        Glm4vConfig, or the checkpoint's config.json as a dict
    gpus_per_pod                  GPUS_PER_POD
    gpu_bytes                     total memory of each visible card, bytes (torch.cuda.get_device_properties(i)
                                  .total_memory); its length is the number of visible cards
    weight_bytes_per_param        bytes of each quantizable Linear weight of the decoder (and of the vision tower
                                  with quantize_vision): `weight_bytes_per_param(QUANTIZATION, dtype_bytes)`
    kv_bytes_per_token_per_layer  K+V bytes per token per decoder layer (None: 2 x kv_heads x head_dim x dtype_bytes)
    max_num_seqs, max_model_len   MAX_NUM_SEQS, MAX_MODEL_LEN (0: min(max_position_embeddings, 16384), as the engine)
    utilization                   GPU_MEMORY_UTILIZATION, applied to every card
    dtype_bytes                   bytes of the unquantized parameters and of the KV cache (bf16: 2)
    quantize_vision               QUANTIZE_VISION (the vision tower otherwise stays in dtype, as the loader does)
    reserve_bytes                 activation headroom per card (int for all, or one per card; default
                                  `default_reserve_bytes(max_num_seqs)` on every card)
    context_bytes                 CUDA context per card, subtracted before loading
    device_names                  names for the cards (default cuda:0..N-1)
    device, cuda_visible_devices  DEVICE, and the CUDA_VISIBLE_DEVICES value for the error message

    Raises PlacementError (a ConfigError) with the fix when the cards are too few or too small.
    """
    check_devices(gpus_per_pod, len(gpu_bytes), device=device, cuda_visible_devices=cuda_visible_devices)
    if not 0 < utilization <= 1:
        raise PlacementError(f"GPU_MEMORY_UTILIZATION={utilization}: must be in (0, 1]")
    sizes = model_sizes(config)
    L = sizes.num_layers
    if gpus_per_pod > L:
        raise PlacementError(f"GPUS_PER_POD={gpus_per_pod} is more than the model's {L} decoder layers")
    names = list(device_names or [f"cuda:{i}" for i in range(gpus_per_pod)])
    if len(names) != gpus_per_pod:
        raise PlacementError(f"{len(names)} device names for GPUS_PER_POD={gpus_per_pod}")
    max_len = max_model_len or min(sizes.max_position_embeddings, 16384)
    per_tok = kv_bytes_per_token_per_layer or sizes.kv_bytes_per_token_per_layer(dtype_bytes)
    cards = [int(b) for b in gpu_bytes[:gpus_per_pod]]
    if reserve_bytes is None:
        reserve = [default_reserve_bytes(max_num_seqs)] * gpus_per_pod
    elif isinstance(reserve_bytes, int):
        reserve = [reserve_bytes] * gpus_per_pod
    else:
        reserve = [int(r) for r in reserve_bytes][:gpus_per_pod]
    usable = [int(b * utilization) - context_bytes - r for b, r in zip(cards, reserve)]

    def ub(unit: str) -> int:
        return sizes.unit_bytes(unit, weight_bytes_per_param, dtype_bytes, quantize_vision) if unit in sizes.units \
            else sizes.buffer_bytes.get(unit, 0)

    layer_w = max(ub(LAYER_PREFIX + str(i)) for i in range(L))
    fixed = [0] * gpus_per_pod
    fixed[0] += sum(ub(u) for u in FIRST_CARD_UNITS)
    # a tied lm_head is embed_tokens' own weight (counted there) and must sit on its card
    head_card = 0 if sizes.tied else gpus_per_pod - 1
    fixed[gpus_per_pod - 1] += ub(NORM)
    fixed[head_card] += ub(LM_HEAD)
    free = [u - f for u, f in zip(usable, fixed)]
    notes: list[str] = []
    if sizes.tied and gpus_per_pod > 1:
        notes.append("tied embeddings: lm_head stays on the first card with embed_tokens")
    if len(gpu_bytes) > gpus_per_pod:
        notes.append(f"{len(gpu_bytes)} cards are visible, GPUS_PER_POD={gpus_per_pod} uses the first "
                     f"{gpus_per_pod}")

    layers = _balance(free, layer_w, per_tok, L)
    if not layers:
        weights = sum(fixed) + L * layer_w
        gb = lambda x: f"{x / 1e9:.1f} GB"  # noqa: E731
        cap = sum(int(b * utilization) for b in cards)
        raise PlacementError(
            f"the model does not fit on {_plural(gpus_per_pod, 'GPU')} of {'/'.join(gb(b) for b in cards)}: its "
            f"weights take {gb(weights)}; {gb(cap)} is usable at GPU_MEMORY_UTILIZATION={utilization:g}, less "
            f"{gb(gpus_per_pod * context_bytes)} of CUDA context and {gb(sum(reserve))} of activation reserve "
            f"(MAX_NUM_SEQS={max_num_seqs}) leaves {gb(sum(usable))}. Use QUANTIZATION=nf4, set GPUS_PER_POD="
            f"{gpus_per_pod + 1} (and nvidia.com/gpu to match), or use larger GPUs")
    weights = [f + n * layer_w for f, n in zip(fixed, layers)]
    kv_budget = [u - w for u, w in zip(usable, weights)]
    kv = fit_kv(layers, kv_budget, per_tok, max_num_seqs, max_len, min_model_len=min_model_len, device_names=names)
    notes += kv.notes
    layer_devices = [names[i] for i, n in enumerate(layers) for _ in range(n)]
    if gpus_per_pod == 1:
        device_map: str | dict[str, str] = names[0]
    else:
        device_map = {VISUAL: names[0], EMBED: names[0], ROTARY: names[0]}
        device_map.update({f"{LAYER_PREFIX}{i}": d for i, d in enumerate(layer_devices)})
        device_map[NORM] = names[-1]
        device_map[LM_HEAD] = names[head_card]
    return Placement(device_map=device_map, devices=names, layers_per_device=layers, layer_devices=layer_devices,
                     weight_bytes_per_device=weights, usable_bytes_per_device=usable,
                     kv_budget_bytes_per_device=kv_budget, kv_bytes_per_token_per_layer=per_tok, kv=kv, notes=notes)


def visible_gpu_bytes() -> list[int]:
    """Total memory of each visible CUDA device (the `gpu_bytes` argument of `plan`); [] without CUDA."""
    import torch

    if not torch.cuda.is_available():
        return []
    return [torch.cuda.get_device_properties(i).total_memory for i in range(torch.cuda.device_count())]
