"""GLM-4.1V (AutoGLM-Phone-9B) in plain torch: config, vision tower, text decoder and checkpoint loading.

Why: importing transformers' GLM-4.1V modules costs 7-10 s of a cold start (auto_factory, torch.distributed.tensor,
sympy, torch._dynamo), and the engine uses none of its machinery (it owns the cache, the masks and the positions).
This module imports only torch, the stdlib and (to read weights) safetensors, and reproduces transformers 5.x's
`Glm4vForConditionalGeneration` math op for op, with the same module and parameter names, so checkpoints, fp8
conversion (fp8.py) and placement (placement.py) see the same model. tests/test_glm4v_native.py holds it to
transformers' outputs.

The text attention writes through the engine's `SlotKVCache.update` and attends with `kv_cache.slot_attention`.
"""
from __future__ import annotations

import copy
import json
import re
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from . import rope
from .kv_cache import slot_attention

__all__ = ["Glm4vNativeConfig", "Glm4vNativeTextConfig", "Glm4vNativeVisionConfig", "Glm4vNativeRMSNorm",
           "Glm4vNativeTextModel", "Glm4vNativeVisionModel", "Glm4vNativeModel", "Glm4vNativeForConditionalGeneration",
           "remap_checkpoint_key", "load_native", "finish_load", "build_empty", "fuse_linear"]


# ------------------------------------------------------------------------------------------------------ config

def _rope_parameters(d: dict, default_type: str) -> dict:
    """transformers' RoPE standardization: 4.5x files carry `rope_scaling` + `rope_theta` (+ partial_rotary_factor)
    beside it, 5.x files one `rope_parameters` dict; both end as one dict with rope_type and rope_theta."""
    rp = dict(d.pop("rope_scaling", None) or d.get("rope_parameters") or {})
    rp.setdefault("rope_theta", d.pop("rope_theta", 10000.0))
    prf = d.pop("partial_rotary_factor", None)
    if prf is not None:
        rp.setdefault("partial_rotary_factor", prf)
    rp.setdefault("rope_type", rp.get("type", "default"))
    if default_type != "default" and rp["rope_type"] == "default":
        rp["rope_type"] = default_type
    return rp


class _Config:
    """config.json values as attributes, with transformers' defaults for what the file leaves out; keys it does not
    know are kept as they are (eos_token_id, attention_bias, ...), as transformers keeps them."""
    model_type = ""
    DEFAULTS: dict[str, Any] = {}
    ALIASES: dict[str, str] = {}     # transformers' attribute_map

    def __init__(self, **kw):
        for k, v in self.ALIASES.items():
            if k in kw:
                kw.setdefault(v, kw.pop(k))
        self.__dict__.update({**self.DEFAULTS, **kw})
        self.__dict__.pop("model_type", None)
        self._attn_implementation = None

    def __getattr__(self, name):   # only reached for names not set: the aliases
        if name in type(self).ALIASES:
            return getattr(self, type(self).ALIASES[name])
        raise AttributeError(f"{type(self).__name__} has no attribute {name!r}")

    def __setattr__(self, name, value):
        super().__setattr__(type(self).ALIASES.get(name, name), value)

    def to_dict(self) -> dict:
        out = {"model_type": self.model_type}
        for k, v in self.__dict__.items():
            if isinstance(v, _Config):
                v = v.to_dict()
            elif isinstance(v, torch.dtype):
                v = str(v).removeprefix("torch.")
            if not k.startswith("_"):
                out[k] = v
        return out

    def to_json_string(self, use_diff: bool = False) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    def save_pretrained(self, path) -> None:
        """config.json, readable by this class and by transformers' Glm4vConfig."""
        Path(path).mkdir(parents=True, exist_ok=True)
        (Path(path) / "config.json").write_text(self.to_json_string() + "\n")

    def __repr__(self):
        return f"{type(self).__name__} {self.to_json_string()}"


class Glm4vNativeTextConfig(_Config):
    model_type = "glm4v_text"
    DEFAULTS = dict(vocab_size=151552, hidden_size=4096, intermediate_size=13696, num_hidden_layers=40,
                    num_attention_heads=32, num_key_value_heads=2, hidden_act="silu", max_position_embeddings=32768,
                    initializer_range=0.02, rms_norm_eps=1e-05, use_cache=True, attention_dropout=0.0,
                    rope_parameters=None, pad_token_id=None, head_dim=None)

    def __init__(self, **kw):
        kw["rope_parameters"] = _rope_parameters(kw, "default")
        super().__init__(**kw)
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads


class Glm4vNativeVisionConfig(_Config):
    model_type = "glm4v_vision"
    ALIASES = {"num_attention_heads": "num_heads", "num_hidden_layers": "depth"}
    DEFAULTS = dict(depth=24, hidden_size=1536, hidden_act="silu", attention_bias=False, attention_dropout=0.0,
                    num_heads=12, in_channels=3, image_size=336, patch_size=14, rms_norm_eps=1e-05,
                    spatial_merge_size=2, temporal_patch_size=2, out_hidden_size=4096, intermediate_size=13696,
                    initializer_range=0.02, rope_parameters=None)

    def __init__(self, **kw):
        kw["rope_parameters"] = _rope_parameters(kw, "axial")
        super().__init__(**kw)


class Glm4vNativeConfig(_Config):
    """Glm4vConfig's attributes: text_config, vision_config, the image/video token ids, tie_word_embeddings."""
    model_type = "glm4v"
    DEFAULTS = dict(image_token_id=151343, video_token_id=151344, image_start_token_id=151339,
                    image_end_token_id=151340, video_start_token_id=151341, video_end_token_id=151342,
                    tie_word_embeddings=False)

    def __init__(self, **kw):
        for key, cls in (("text_config", Glm4vNativeTextConfig), ("vision_config", Glm4vNativeVisionConfig)):
            sub = kw.get(key)
            kw[key] = cls(**(sub.to_dict() if isinstance(sub, _Config) else copy.deepcopy(dict(sub or {}))))
        if kw.get("dtype") is None and "torch_dtype" in kw:
            kw["dtype"] = kw.pop("torch_dtype")
        super().__init__(**kw)
        self._name_or_path = ""
        # pre-v5 files put tie_word_embeddings in text_config; transformers forwards it to the root
        if not self.tie_word_embeddings and getattr(self.text_config, "tie_word_embeddings", False):
            self.tie_word_embeddings = True

    @classmethod
    def from_dict(cls, d: dict) -> "Glm4vNativeConfig":
        return cls(**copy.deepcopy(dict(d)))   # parsing pops keys: not from the caller's dict

    @classmethod
    def from_dir(cls, path) -> "Glm4vNativeConfig":
        cfg = cls.from_dict(json.loads((Path(path) / "config.json").read_text()))
        cfg._name_or_path = str(path)
        return cfg

    def get_text_config(self, *args, **kwargs) -> Glm4vNativeTextConfig:
        return self.text_config


# ------------------------------------------------------------------------------------------------------ shared

_ACT = {"silu": F.silu, "swish": F.silu, "gelu": F.gelu, "relu": F.relu,
        "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh")}


class Glm4vNativeRMSNorm(nn.Module):
    """Glm4vRMSNorm: fp32 statistics, the weight applied after rounding back to the input dtype."""

    def __init__(self, hidden_size: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.to(torch.float32)
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        return self.weight * x.to(dtype)


class _Rotary(nn.Module):
    """Holds `inv_freq` (non-persistent, fp32). It is computed on the CPU, as transformers computes it, and copied
    to the module's device; any .to()/.half()/to_empty() recomputes it, so it never holds rounded or empty values."""

    def __init__(self):
        super().__init__()
        here = torch.empty(0).device   # the default device: meta inside `with torch.device("meta")`
        self.register_buffer("inv_freq", self._inv_freq().to(here), persistent=False)

    def _inv_freq(self) -> torch.Tensor:
        raise NotImplementedError

    def reset(self, device) -> None:
        self.inv_freq = self._inv_freq().to(device)

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        self.reset(self.inv_freq.device)
        return self


def _inv_freq(theta: float, dim: int) -> torch.Tensor:
    return 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float, device="cpu") / dim))


# ------------------------------------------------------------------------------------------------- text decoder

class Glm4vNativeTextRotaryEmbedding(_Rotary):
    """M-RoPE: each rotary frequency follows the temporal, height or width position (mrope_section), over the first
    head_dim * partial_rotary_factor dims, frequencies interleaved in pairs."""

    def __init__(self, config: Glm4vNativeTextConfig):
        rp = config.rope_parameters
        if rp["rope_type"] != "default":
            raise ValueError(f"GLM-4.1V native: rope_type {rp['rope_type']!r} is not implemented (only default)")
        self.dim = self.rotary_dim(config)
        self.theta = rp["rope_theta"]
        self.mrope_section = list(rp.get("mrope_section", [8, 12, 12]))
        super().__init__()

    @staticmethod
    def rotary_dim(config: Glm4vNativeTextConfig) -> int:
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        return int(head_dim * config.rope_parameters.get("partial_rotary_factor", 1.0))

    def _inv_freq(self):
        return _inv_freq(self.theta, self.dim)

    def forward(self, x: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """position_ids [3, B, L] -> cos, sin [B, L, rotary dims] in x's dtype."""
        freqs = position_ids[..., None].float() * self.inv_freq.to(device=x.device, dtype=torch.float)
        freqs = torch.cat([m[i % 3] for i, m in enumerate(freqs.split(self.mrope_section, dim=-1))], dim=-1)
        freqs = freqs.repeat_interleave(2, dim=-1)
        return freqs.cos().to(x.dtype), freqs.sin().to(x.dtype)


class Glm4vNativeTextAttention(nn.Module):
    def __init__(self, config: Glm4vNativeTextConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.num_key_value_heads = config.num_key_value_heads
        self.head_dim = config.hidden_size // self.num_heads   # as transformers: config.head_dim is not read here
        self.num_key_value_groups = self.num_heads // self.num_key_value_heads
        self.scaling = self.head_dim ** -0.5
        self.is_causal = True
        h, d = config.hidden_size, self.head_dim
        self.q_proj = nn.Linear(h, self.num_heads * d, bias=True)
        self.k_proj = nn.Linear(h, self.num_key_value_heads * d, bias=True)
        self.v_proj = nn.Linear(h, self.num_key_value_heads * d, bias=True)
        self.o_proj = nn.Linear(self.num_heads * d, h, bias=False)

    def fuse_qkv(self) -> None:
        """One projection instead of three (vLLM's QKVParallelLinear): a decode step launches 80 fewer GEMMs, and
        with fp8 weights each layer quantizes its input once and skips the slow N=256 k/v GEMMs. q/k/v stay
        registered as views of the fused tensors, so state_dict, fp8.save_model and the checkpoint layout keep
        transformers' names; the fused module is not registered (no parameter counted twice)."""
        parts = (self.q_proj, self.k_proj, self.v_proj)
        if not (all(type(m) is nn.Linear for m in parts) or all(hasattr(m, "weight_scale") for m in parts)):
            return   # bitsandbytes' packed 4-bit weights (engine/nf4.py) do not concatenate: q/k/v stay three
        if self.__dict__.get("_qkv") is None:
            self.__dict__["_qkv"] = fuse_linear([self.q_proj, self.k_proj, self.v_proj])
            self.__dict__["_qkv_split"] = [self.q_proj.out_features, self.k_proj.out_features,
                                           self.v_proj.out_features]

    def forward(self, x, cos, sin, attention_mask=None, cache=None):
        B, L, _ = x.shape
        fused = self.__dict__.get("_qkv")
        if fused is not None:
            q, k, v = fused(x).split(self.__dict__["_qkv_split"], dim=-1)
            q, k, v = (t.view(B, L, -1, self.head_dim).transpose(1, 2) for t in (q, k, v))
        else:
            q = self.q_proj(x).view(B, L, -1, self.head_dim).transpose(1, 2)
            k = self.k_proj(x).view(B, L, -1, self.head_dim).transpose(1, 2)
            v = self.v_proj(x).view(B, L, -1, self.head_dim).transpose(1, 2)
        q, k = rope.mrope(q, k, cos, sin)   # one kernel per tensor on CUDA, the torch ops elsewhere
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx)
        out, _ = slot_attention(self, q, k, v, attention_mask, scaling=self.scaling)
        return self.o_proj(out.reshape(B, L, -1))


def fuse_linear(mods: list[nn.Module]) -> nn.Module:
    """One module computing `cat([m(x) for m in mods], -1)` for nn.Linear or fp8.Fp8Linear modules of one input
    width: weights (fp8 codes), per-output-channel scales and biases concatenate along the output channels, which
    is exact for both. Each source module's tensors become views of the fused ones (no second copy)."""
    first = mods[0]
    out = sum(m.out_features for m in mods)
    has_bias = first.bias is not None
    if type(first) is nn.Linear:
        fused = nn.Linear(first.in_features, out, bias=has_bias, device="meta")
    else:   # Fp8Linear: its arithmetic path is decided per module at conversion; the fused one takes the first's
        fused = type(first)(first.in_features, out, has_bias, dtype=first.bias.dtype if has_bias else torch.bfloat16,
                            device="meta", scaled_mm=first.scaled_mm)
        fused.fuse_bias, fused.small_m = first.fuse_bias, first.small_m
    for name in ("weight", "weight_scale", "bias"):
        if getattr(first, name, None) is None:
            continue
        whole = torch.cat([getattr(m, name).detach() for m in mods])
        setattr(fused, name, nn.Parameter(whole, requires_grad=False))
        at = 0
        for m in mods:
            n = m.out_features
            setattr(m, name, nn.Parameter(whole[at:at + n], requires_grad=False))
            at += n
    return fused


class Glm4vNativeTextMLP(nn.Module):
    def __init__(self, config: Glm4vNativeTextConfig):
        super().__init__()
        self.gate_up_proj = nn.Linear(config.hidden_size, 2 * config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)
        self.act = _ACT[config.hidden_act]

    def forward(self, x):
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(up * self.act(gate))


class Glm4vNativeTextDecoderLayer(nn.Module):
    """GLM-4's sandwich layer: a norm before and after both the attention and the MLP."""

    def __init__(self, config: Glm4vNativeTextConfig, layer_idx: int):
        super().__init__()
        eps = config.rms_norm_eps
        self.self_attn = Glm4vNativeTextAttention(config, layer_idx)
        self.mlp = Glm4vNativeTextMLP(config)
        self.input_layernorm = Glm4vNativeRMSNorm(config.hidden_size, eps)
        self.post_attention_layernorm = Glm4vNativeRMSNorm(config.hidden_size, eps)
        self.post_self_attn_layernorm = Glm4vNativeRMSNorm(config.hidden_size, eps)
        self.post_mlp_layernorm = Glm4vNativeRMSNorm(config.hidden_size, eps)

    def forward(self, x, cos, sin, attention_mask=None, cache=None):
        x = x + self.post_self_attn_layernorm(self.self_attn(self.input_layernorm(x), cos, sin, attention_mask, cache))
        return x + self.post_mlp_layernorm(self.mlp(self.post_attention_layernorm(x)))


class TextModelOutput(NamedTuple):
    last_hidden_state: torch.Tensor
    past_key_values: Any = None


def _causal_padding_mask(attention_mask: torch.Tensor, q_len: int) -> torch.Tensor:
    """A [B, kv] 1/0 padding mask -> bool [B, 1, q, kv], causal with the queries aligned to the last keys (no cache:
    q == kv). Each query also sees itself, so a padding row gives garbage instead of NaN."""
    kv = attention_mask.shape[-1]
    qpos = torch.arange(kv - q_len, kv, device=attention_mask.device).view(q_len, 1)
    kpos = torch.arange(kv, device=attention_mask.device).view(1, kv)
    return ((kpos <= qpos) & attention_mask.bool()[:, None, None, :]) | (kpos == qpos)


class Glm4vNativeTextModel(nn.Module):
    def __init__(self, config: Glm4vNativeTextConfig):
        super().__init__()
        self.config = config
        self.padding_idx = config.pad_token_id
        self.vocab_size = config.vocab_size
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, config.pad_token_id)
        self.layers = nn.ModuleList(Glm4vNativeTextDecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = Glm4vNativeRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary_emb = Glm4vNativeTextRotaryEmbedding(config)

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, cache=None, inputs_embeds=None,
                use_cache=None, past_key_values=None, **kwargs) -> TextModelOutput:
        """position_ids: [3, B, L] (t, h, w), [4, B, L] (text positions first, dropped), [B, L] or [L] text positions,
        or None (0..L-1). attention_mask: None (causal), bool or additive [B, 1, q, kv], or a [B, L] padding mask
        (no cache only). `cache` (alias `past_key_values`): a SlotKVCache, set up by the runner for this step."""
        cache = cache if cache is not None else past_key_values
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("You must specify exactly one of input_ids or inputs_embeds")
        h = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        B, L = h.shape[:2]
        if position_ids is None:
            position_ids = torch.arange(L, device=h.device)
        if position_ids.ndim == 1:
            position_ids = position_ids.view(1, 1, -1).expand(3, B, -1)
        elif position_ids.ndim == 2:
            position_ids = position_ids[None].expand(3, -1, -1)
        elif position_ids.shape[0] == 4:
            position_ids = position_ids[1:]
        if attention_mask is not None and attention_mask.ndim == 2:
            attention_mask = _causal_padding_mask(attention_mask, L)
        cos, sin = self.rotary_emb(h, position_ids)
        for layer in self.layers:
            h = layer(h, cos, sin, attention_mask, cache)
        return TextModelOutput(self.norm(h), cache)


# ------------------------------------------------------------------------------------------------- vision tower

class Glm4vNativeVisionPatchEmbed(nn.Module):
    """A Conv3d whose kernel is its stride and its input: computed as the matmul it is (the same numbers; one
    GEMM instead of a cuDNN 3-D convolution). The Conv3d is kept for the checkpoint's weight shape."""

    def __init__(self, config: Glm4vNativeVisionConfig):
        super().__init__()
        k = [config.temporal_patch_size, config.patch_size, config.patch_size]
        self.embed_dim = config.hidden_size
        self.proj = nn.Conv3d(config.in_channels, config.hidden_size, kernel_size=k, stride=k)

    def forward(self, x):
        w = self.proj.weight
        return F.linear(x.to(w.dtype).reshape(-1, w[0].numel()), w.reshape(self.embed_dim, -1), self.proj.bias)


class Glm4vNativeVisionRotaryEmbedding(_Rotary):
    """Axial 2-D RoPE: the same frequencies for the h and w coordinates, over the whole head."""

    def __init__(self, config: Glm4vNativeVisionConfig):
        rp = config.rope_parameters
        if rp["rope_type"] != "axial":
            raise ValueError(f"GLM-4.1V native vision tower supports only axial rope, not {rp['rope_type']!r}")
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_heads
        self.dim, self.theta = head_dim // 2, rp["rope_theta"]
        super().__init__()

    def _inv_freq(self):
        return _inv_freq(self.theta, self.dim)

    def forward(self, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """position_ids [N, 2] (h, w) -> cos, sin [N, head_dim] in fp32."""
        freqs = position_ids[..., None].float() * self.inv_freq.to(device=position_ids.device, dtype=torch.float)
        freqs = torch.cat([freqs[:, 0], freqs[:, 1]], dim=-1)
        freqs = torch.cat([freqs, freqs], dim=-1)
        return freqs.cos(), freqs.sin()


class Glm4vNativeVisionEmbeddings(nn.Module):
    """The learned 24x24 position table, resampled bicubically to each image's patch grid (Glm4vVisionEmbeddings)."""

    def __init__(self, config: Glm4vNativeVisionConfig):
        super().__init__()
        self.num_positions = (config.image_size // config.patch_size) ** 2
        self.position_embedding = nn.Embedding(self.num_positions, config.hidden_size)

    def forward(self, x, hw, target_hw):
        """x [N, E]; hw [N, 2] each patch's (h, w) coordinate; target_hw [N, 2] its image's patch grid (h, w)."""
        w = self.position_embedding.weight
        side = int(w.shape[0] ** 0.5)
        table = w.view(side, side, -1).permute(2, 0, 1).unsqueeze(0).to(torch.float32)
        target = target_hw.to(device=x.device, dtype=torch.float32)
        norm_h = ((hw[:, 0] + 0.5) / target[:, 0]) * 2 - 1
        norm_w = ((hw[:, 1] + 0.5) / target[:, 1]) * 2 - 1
        grid = torch.stack((norm_w, norm_h), dim=-1).unsqueeze(0).unsqueeze(2)
        pos = F.grid_sample(table, grid, mode="bicubic", align_corners=False, padding_mode="border")
        return x + pos.squeeze(0).squeeze(-1).permute(1, 0).to(w.dtype).to(x.device)


def _vision_attention(q, k, v, lengths: list[int], scale: float) -> torch.Tensor:
    """Attention within each image/frame: q, k, v [N, heads, D] -> [N, heads, D], SDPA per block as transformers'
    sdpa path does. On an H200 SDPA takes cuDNN's attention here, which is faster than a varlen FlashAttention-2
    call over all blocks: 121 against 144 ms for a 1080x2400 screenshot's vision tower (bench/native_check.py,
    2026-12-03). cuDNN plans once per new image size (~40 ms); phone screenshots repeat their size."""
    outs = [F.scaled_dot_product_attention(a.transpose(0, 1)[None], b.transpose(0, 1)[None], c.transpose(0, 1)[None],
                                           scale=scale)[0].transpose(0, 1)
            for a, b, c in zip(q.split(lengths), k.split(lengths), v.split(lengths))]
    return outs[0] if len(outs) == 1 else torch.cat(outs, dim=0)


class Glm4vNativeVisionAttention(nn.Module):
    def __init__(self, config: Glm4vNativeVisionConfig):
        super().__init__()
        self.num_heads = config.num_heads
        self.head_dim = config.hidden_size // config.num_heads
        self.scaling = self.head_dim ** -0.5
        self.qkv = nn.Linear(config.hidden_size, config.hidden_size * 3, bias=config.attention_bias)
        self.proj = nn.Linear(config.hidden_size, config.hidden_size, bias=False)

    def forward(self, x, cos, sin, lengths):
        N = x.shape[0]
        q, k, v = self.qkv(x).view(N, 3, self.num_heads, -1).unbind(1)
        q, k = rope.vision(q, k, cos, sin)   # in fp32, as apply_rotary_pos_emb_vision (rope.py)
        out = _vision_attention(q, k, v, lengths, self.scaling)
        return self.proj(out.reshape(N, -1))


class Glm4vNativeVisionMlp(nn.Module):
    def __init__(self, config: Glm4vNativeVisionConfig):
        super().__init__()
        h, i = config.hidden_size, config.out_hidden_size   # sic: transformers' Glm4VisionMlp is out_hidden_size wide
        self.gate_proj = nn.Linear(h, i, bias=False)
        self.up_proj = nn.Linear(h, i, bias=False)
        self.down_proj = nn.Linear(i, h, bias=False)
        self.act = _ACT[config.hidden_act]

    def forward(self, x):
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


class Glm4vNativeVisionBlock(nn.Module):
    def __init__(self, config: Glm4vNativeVisionConfig):
        super().__init__()
        self.norm1 = Glm4vNativeRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.norm2 = Glm4vNativeRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.attn = Glm4vNativeVisionAttention(config)
        self.mlp = Glm4vNativeVisionMlp(config)

    def forward(self, x, cos, sin, lengths):
        x = x + self.attn(self.norm1(x), cos, sin, lengths)
        return x + self.mlp(self.norm2(x))


class Glm4vNativeVisionPatchMerger(nn.Module):
    def __init__(self, dim: int, context_dim: int, hidden_act: str):
        super().__init__()
        self.proj = nn.Linear(dim, dim, bias=False)
        self.post_projection_norm = nn.LayerNorm(dim)
        self.gate_proj = nn.Linear(dim, context_dim, bias=False)
        self.up_proj = nn.Linear(dim, context_dim, bias=False)
        self.down_proj = nn.Linear(context_dim, dim, bias=False)
        self.act = _ACT[hidden_act]

    def forward(self, x):
        x = F.gelu(self.post_projection_norm(self.proj(x)))
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


class VisionOutput(NamedTuple):
    last_hidden_state: torch.Tensor    # [tokens, out_hidden] after the 2x2 downsample
    pooler_output: Any                 # merged features: [tokens, out_hidden], or per image from get_image_features


class Glm4vNativeVisionModel(nn.Module):
    def __init__(self, config: Glm4vNativeVisionConfig):
        super().__init__()
        self.config = config
        self.spatial_merge_size = config.spatial_merge_size
        self.patch_size = config.patch_size
        self.embeddings = Glm4vNativeVisionEmbeddings(config)
        self.patch_embed = Glm4vNativeVisionPatchEmbed(config)
        self.rotary_pos_emb = Glm4vNativeVisionRotaryEmbedding(config)
        self.blocks = nn.ModuleList(Glm4vNativeVisionBlock(config) for _ in range(config.depth))
        self.merger = Glm4vNativeVisionPatchMerger(config.out_hidden_size, config.intermediate_size,
                                                   config.hidden_act)
        self.post_conv_layernorm = Glm4vNativeRMSNorm(config.hidden_size, config.rms_norm_eps)
        m = config.spatial_merge_size
        self.downsample = nn.Conv2d(config.hidden_size, config.out_hidden_size, kernel_size=m, stride=m)
        self.post_layernorm = Glm4vNativeRMSNorm(config.hidden_size, config.rms_norm_eps)

    @property
    def dtype(self) -> torch.dtype:
        return self.patch_embed.proj.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.patch_embed.proj.weight.device

    def _layout(self, grid: list[list[int]]):
        """Per patch (host side, from the grid): its (h, w) coordinate, ordered in 2x2 merge blocks; its image's
        (h, w) grid; and the attention blocks (one per frame)."""
        m = self.spatial_merge_size
        hw, target, lengths = [], [], []
        for t, h, w in grid:
            hh = torch.arange(h).view(h, 1).expand(h, w).reshape(h // m, m, w // m, m).transpose(1, 2).flatten()
            ww = torch.arange(w).view(1, w).expand(h, w).reshape(h // m, m, w // m, m).transpose(1, 2).flatten()
            hw.append(torch.stack([hh, ww], dim=-1).repeat(t, 1))
            target.append(torch.tensor([[h, w]]).expand(t * h * w, 2))
            lengths += [h * w] * t
        return torch.cat(hw), torch.cat(target), lengths

    def forward(self, hidden_states: torch.Tensor, grid_thw, **kwargs) -> VisionOutput:
        """hidden_states [patches, C*T*P*P]; grid_thw [images, 3] (a tensor or lists). Reads the grid on the host
        once (one sync when it lives on the GPU)."""
        work = self.begin(hidden_states, grid_thw)
        self.advance(work, len(self.blocks))
        return self.finish(work)

    # The tower in pieces (the engine spreads a screenshot's encode over several steps while streams decode, so no
    # step carries a whole 24-block encode): begin (patch embedding, positions), advance (some blocks), finish
    # (norm, 2x2 downsample, merger). The blocks are independent of where the split falls: forward is the three.
    def begin(self, hidden_states: torch.Tensor, grid_thw) -> "VisionWork":
        grid = grid_thw.tolist() if torch.is_tensor(grid_thw) else [list(map(int, g)) for g in grid_thw]
        hw, target, lengths = self._layout(grid)
        dev = self.device
        hw = hw.to(dev)
        x = self.post_conv_layernorm(self.patch_embed(hidden_states.to(dev)))
        cos, sin = self.rotary_pos_emb(hw)
        x = self.embeddings(x, hw, target)
        return VisionWork(x, cos, sin, lengths, grid)

    def advance(self, work: "VisionWork", upto: int) -> None:
        """Run blocks [work.blocks_done, upto)."""
        for blk in self.blocks[work.blocks_done:upto]:
            work.x = blk(work.x, work.cos, work.sin, work.lengths)
        work.blocks_done = max(work.blocks_done, min(upto, len(self.blocks)))

    def finish(self, work: "VisionWork") -> VisionOutput:
        self.advance(work, len(self.blocks))
        x = self.post_layernorm(work.x)
        m, w = self.spatial_merge_size, self.downsample.weight
        # the m x m Conv2d with stride m over each merge block, as the matmul it is
        x = x.view(-1, m, m, x.shape[-1]).permute(0, 3, 1, 2).reshape(-1, w[0].numel())
        x = F.linear(x, w.reshape(w.shape[0], -1), self.downsample.bias)
        return VisionOutput(x, self.merger(x))


class VisionWork:
    """A vision-tower encode under way: the hidden states after `blocks_done` blocks (~41 MB for a 1080x2400
    screenshot's 13.4k patches in bf16) and what the remaining blocks need."""
    __slots__ = ("x", "cos", "sin", "lengths", "grid", "blocks_done")

    def __init__(self, x, cos, sin, lengths, grid):
        self.x, self.cos, self.sin, self.lengths, self.grid = x, cos, sin, lengths, grid
        self.blocks_done = 0


# ---------------------------------------------------------------------------------------------------- the model

class CausalLMOutput(NamedTuple):
    logits: torch.Tensor
    past_key_values: Any = None


class Glm4vNativeModel(nn.Module):
    def __init__(self, config: Glm4vNativeConfig):
        super().__init__()
        self.config = config
        self.visual = Glm4vNativeVisionModel(config.vision_config)
        self.language_model = Glm4vNativeTextModel(config.text_config)
        self.rope_deltas = None

    def get_input_embeddings(self):
        return self.language_model.embed_tokens

    def get_image_features(self, pixel_values: torch.Tensor, image_grid_thw, **kwargs) -> VisionOutput:
        """pooler_output: one [tokens_i, text hidden] tensor per image."""
        grid = image_grid_thw.tolist() if torch.is_tensor(image_grid_thw) else image_grid_thw
        out = self.visual(pixel_values.type(self.visual.dtype), grid)
        m2 = self.visual.spatial_merge_size ** 2
        return out._replace(pooler_output=torch.split(out.pooler_output, [t * h * w // m2 for t, h, w in grid]))

    def mm_token_types(self, input_ids: torch.Tensor) -> torch.Tensor:
        """What Glm4vProcessor returns as mm_token_type_ids: 1 for image tokens, 2 for image tokens inside a video's
        <|begin_of_video|> ... <|end_of_video|> (GLM-4.1V's frames use the image token), 0 else."""
        c = self.config
        in_video = (input_ids == c.video_start_token_id).cumsum(-1) > (input_ids == c.video_end_token_id).cumsum(-1)
        types = torch.where(in_video, 2, 1)
        return torch.where(input_ids == c.image_token_id, types, 0)

    def get_rope_index(self, input_ids, mm_token_type_ids=None, image_grid_thw=None, video_grid_thw=None,
                       attention_mask=None, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
        """3-D M-RoPE positions [3, B, L] and each row's delta [B, 1] (decode position = cache position + delta), as
        transformers' Glm4vModel.get_rope_index: text advances t=h=w by one per token; an image's tokens take
        (start, start + row, start + col) over its merged grid, and the text after it starts at
        start + max(rows, cols). Each video frame is an image of its own. Padding (attention_mask 0) gets 0."""
        if mm_token_type_ids is None:
            mm_token_type_ids = self.mm_token_types(input_ids)
        m = self.config.vision_config.spatial_merge_size
        grids = {1: iter(image_grid_thw.tolist() if image_grid_thw is not None else []),
                 2: iter([[1, h, w] for t, h, w in (video_grid_thw.tolist() if video_grid_thw is not None else [])
                          for _ in range(t)])}
        B, L = input_ids.shape
        position_ids = torch.zeros(3, B, L, dtype=input_ids.dtype)
        deltas = []
        for b in range(B):
            keep = attention_mask[b].bool().cpu() if attention_mask is not None else slice(None)
            types = mm_token_type_ids[b].cpu()[keep]
            n = types.numel()
            if n == 0:
                deltas.append(0)
                continue
            starts = [0, *(torch.nonzero(types[1:] != types[:-1]).flatten() + 1).tolist()]
            parts, pos = [], 0
            for kind, s, e in zip(types[starts].tolist(), starts, starts[1:] + [n]):
                if kind == 0:
                    parts.append(torch.arange(e - s).view(1, -1).expand(3, -1) + pos)
                    pos += e - s
                else:
                    t, h, w = next(grids[kind])
                    tt, hh, ww = torch.meshgrid(torch.arange(t) + pos, torch.arange(h // m) + pos,
                                                torch.arange(w // m) + pos, indexing="ij")
                    parts.append(torch.stack([tt, hh, ww]).reshape(3, -1))
                    pos += max(h, w) // m
            llm = torch.cat(parts, dim=1)
            position_ids[:, b, keep] = llm.to(position_ids.dtype)
            deltas.append(int(llm.max()) + 1 - n)
        return position_ids.to(input_ids.device), torch.tensor(deltas, device=input_ids.device).unsqueeze(1)


class Glm4vNativeForConditionalGeneration(nn.Module):
    """Glm4vForConditionalGeneration's modules under the same names: model.visual, model.language_model, lm_head."""

    def __init__(self, config: Glm4vNativeConfig):
        super().__init__()
        self.config = config
        self.model = Glm4vNativeModel(config)
        self.lm_head = nn.Linear(config.text_config.hidden_size, config.text_config.vocab_size, bias=False)
        self.generation_config = None
        if config.tie_word_embeddings:
            self.tie_weights()

    @property
    def device(self) -> torch.device:
        return self.model.language_model.embed_tokens.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.language_model.embed_tokens.weight.dtype

    def get_input_embeddings(self):
        return self.model.language_model.embed_tokens

    def tie_weights(self) -> None:
        self.lm_head.weight = self.model.language_model.embed_tokens.weight

    def fuse_projections(self) -> int:
        """Fuse each decoder layer's q/k/v projections (after loading and any fp8 conversion); returns how many."""
        for layer in self.model.language_model.layers:
            layer.self_attn.fuse_qkv()
        return len(self.model.language_model.layers)

    def get_image_features(self, pixel_values, image_grid_thw, **kwargs) -> VisionOutput:
        return self.model.get_image_features(pixel_values, image_grid_thw)

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, cache=None, inputs_embeds=None,
                pixel_values=None, image_grid_thw=None, mm_token_type_ids=None, past_key_values=None,
                **kwargs) -> CausalLMOutput:
        """A whole forward (not the engine's path: the runner drives language_model and lm_head itself). Image
        features replace the image tokens' embeddings; positions come from get_rope_index unless given."""
        m = self.model
        if inputs_embeds is None:
            inputs_embeds = m.language_model.embed_tokens(input_ids)
        if pixel_values is not None:
            feats = torch.cat(m.get_image_features(pixel_values, image_grid_thw).pooler_output)
            mask = (input_ids == self.config.image_token_id).unsqueeze(-1).to(inputs_embeds.device)
            inputs_embeds = inputs_embeds.masked_scatter(mask, feats.to(inputs_embeds.device, inputs_embeds.dtype))
        if position_ids is None and input_ids is not None:
            position_ids, m.rope_deltas = m.get_rope_index(input_ids, mm_token_type_ids, image_grid_thw,
                                                           attention_mask=attention_mask)
        out = m.language_model(inputs_embeds=inputs_embeds, position_ids=position_ids, attention_mask=attention_mask,
                               cache=cache if cache is not None else past_key_values)
        return CausalLMOutput(self.lm_head(out.last_hidden_state), out.past_key_values)


# ------------------------------------------------------------------------------------------------------ loading

# transformers' renames for older layouts of this architecture: Qwen2-VL style (`model.layers.*`, `visual.*`) and
# the duplicated `.model.model` of checkpoints saved by transformers 5.10-5.23 (its "legacy" mapping)
_RENAMES = [(re.compile(p), r) for p, r in (
    (r"^model\.language_model\.model\.", "model.language_model."),
    (r"^language_model\.model\.model\.", "model.language_model."),
    (r"^language_model\.model\.", "model.language_model."),
    (r"^language_model\.lm_head\.", "lm_head."),
    (r"^visual\.", "model.visual."),
    (r"^model\.(?!language_model\.|visual\.)", "model.language_model."),
    (r"LayerNorm\.gamma$", "LayerNorm.weight"),
    (r"LayerNorm\.beta$", "LayerNorm.bias"),
)]
# tensors some checkpoints carry that the model computes instead (transformers ignores them too)
_IGNORED = re.compile(r"(rotary_emb|rotary_pos_emb)\.inv_freq$")


def remap_checkpoint_key(key: str) -> str:
    """A checkpoint tensor name -> this model's (= transformers 5.x Glm4vForConditionalGeneration's) name."""
    for pattern, repl in _RENAMES:
        key = pattern.sub(repl, key, count=1)
    return key


def _read_safetensors(model_dir: Path, device: torch.device) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    else:
        files = sorted(p.name for p in model_dir.glob("*.safetensors"))
    if not files:
        raise ValueError(f"{model_dir}: no safetensors weights")
    state: dict[str, torch.Tensor] = {}
    for f in files:
        state.update(load_file(str(model_dir / f), device=str(device)))
    return state


_INIT_FUNCTIONS = ("normal_", "uniform_", "kaiming_uniform_", "kaiming_normal_", "xavier_uniform_",
                   "xavier_normal_", "trunc_normal_", "ones_", "zeros_", "constant_")


def build_empty(config: Glm4vNativeConfig) -> Glm4vNativeForConditionalGeneration:
    """The model's modules on the meta device, without running their weight initializers (as transformers'
    `no_init_weights`): the weights come from the checkpoint, and torch's meta `normal_` goes through its
    reference decompositions, which import torch._dynamo and sympy (~1 s of a cold start)."""
    saved = {name: getattr(nn.init, name) for name in _INIT_FUNCTIONS if hasattr(nn.init, name)}
    try:
        for name in saved:
            setattr(nn.init, name, lambda tensor, *args, **kwargs: tensor)
        with torch.device("meta"):
            return Glm4vNativeForConditionalGeneration(config)
    finally:
        for name, fn in saved.items():
            setattr(nn.init, name, fn)


def finish_load(model: Glm4vNativeForConditionalGeneration, device) -> None:
    """After the weights are in place (built on the meta device): the rotary `inv_freq` buffers on `device` and the
    tied lm_head."""
    for mod in model.modules():
        if isinstance(mod, _Rotary):
            mod.reset(torch.device(device))
    if model.config.tie_word_embeddings:
        model.tie_weights()


def rotary_shapes(config: Glm4vNativeConfig) -> tuple:
    """What rope.self_check needs of this architecture: ((q heads, kv heads, head dim), (vision heads, vision head
    dim), rotated text dims), as the attention and rotary modules derive them."""
    t, v = config.text_config, config.vision_config
    heads = t.num_attention_heads
    return ((heads, t.num_key_value_heads, t.hidden_size // heads), (v.num_heads, v.hidden_size // v.num_heads),
            Glm4vNativeTextRotaryEmbedding.rotary_dim(t))


def load_native(model_dir, dtype: torch.dtype, device, state_dict: dict[str, torch.Tensor] | None = None):
    """The model from `model_dir` (config.json and, unless `state_dict` is given, its safetensors files) on `device`
    in `dtype`, in eval mode. `state_dict`: the checkpoint's tensors already read (keys in checkpoint layout, on the
    device); its entries are consumed. Raises ValueError when the tensors do not match the architecture."""
    model_dir, device = Path(model_dir), torch.device(device)
    config = Glm4vNativeConfig.from_dir(model_dir)
    model = build_empty(config)
    if state_dict is None:
        state_dict = _read_safetensors(model_dir, device)
    state: dict[str, torch.Tensor] = {}
    for key in list(state_dict):
        t = state_dict.pop(key)
        key = remap_checkpoint_key(key)
        if _IGNORED.search(key):
            continue
        state[key] = t.to(device=device, dtype=dtype if t.is_floating_point() else t.dtype)
    return assign_state(model, state, set(model.state_dict()), device, f"{model_dir}: the checkpoint")


def assign_state(model: Glm4vNativeForConditionalGeneration, state: dict[str, torch.Tensor], expected: set[str],
                 device, what: str) -> Glm4vNativeForConditionalGeneration:
    """Puts `state` (native names, on the device) into the meta-built `model` by assignment, once its keys are
    exactly `expected` (lm_head taken from the embeddings when tied); then finish_load, eval mode. Raises
    ValueError naming `what` when the tensors do not match the architecture."""
    embed = "model.language_model.embed_tokens.weight"
    if model.config.tie_word_embeddings and embed in state:
        state["lm_head.weight"] = state[embed]
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        raise ValueError(f"{what} does not match GLM-4.1V ({type(model).__name__}): {len(missing)} missing tensors "
                         f"{missing[:5]}, {len(unexpected)} unexpected {unexpected[:5]}")
    try:
        model.load_state_dict(state, strict=False, assign=True)
    except RuntimeError as e:   # shape mismatches
        raise ValueError(f"{what} does not match GLM-4.1V: {e}") from None
    finish_load(model, device)
    model.requires_grad_(False)
    return model.eval()
