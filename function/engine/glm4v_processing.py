"""GLM-4.1V's processor without transformers: tokenizer, chat template and image processor.

Importing transformers costs 7-10 s of a cold start; this module needs only `tokenizers`, `jinja2`, numpy, torch and
PIL, and reproduces what the served transformers processor (loader.load_processor: Glm4vProcessor, its fast
tokenizer, the torchvision image-processor backend) returns for what inputs.py sends: the same rendered prompt,
token ids, image grids and mm_token_type_ids, and pixel values equal to the torchvision backend's on CPU (the
same uint8 bicubic-antialias `interpolate` it calls). tests/test_glm4v_processing.py compares it with transformers.
"""
from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Mapping
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
import jinja2.nodes
import jinja2.utils
import numpy as np
import torch
from jinja2.sandbox import ImmutableSandboxedEnvironment
from PIL import Image
from tokenizers import AddedToken, Tokenizer, processors

__all__ = ["NativeTokenizer", "NativeImageProcessor", "NativeGlm4vProcessor", "smart_resize", "render_chat"]

SPECIAL_TOKENS_ATTRIBUTES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token",
                             "mask_token")
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class Batch(dict):
    """A dict that also reads as attributes, as transformers' BatchEncoding / BatchFeature do (`out.input_ids`)."""

    def __getattr__(self, name):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def _to_added(value):
    """A tokenizer_config value: a string, or a serialized AddedToken ({"__type": "AddedToken", "content": ...})."""
    if isinstance(value, dict):
        return AddedToken(**{k: v for k, v in value.items() if k != "__type"})
    return value


def _py(ids):
    """Token ids as Python ints / lists (tensors and arrays too), as transformers' `to_py_obj`."""
    if hasattr(ids, "tolist"):
        return ids.tolist()
    return ids


# ------------------------------------------------------------------------------------------------------------ tokenizer
class NativeTokenizer:
    """transformers' fast tokenizer (TokenizersBackend) for a tokenizer.json checkpoint, without transformers: the
    same tokens added from tokenizer_config.json, the same special tokens, encode/decode defaults."""

    is_fast = True
    backend = "tokenizers"
    model_input_names = ["input_ids", "attention_mask"]

    def __init__(self, tokenizer: Tokenizer, config: dict | None = None, chat_template=None, name_or_path: str = ""):
        cfg = dict(config or {})
        self._tokenizer = tokenizer
        self.name_or_path = name_or_path
        if "additional_special_tokens" in cfg and not cfg.get("extra_special_tokens"):
            cfg["extra_special_tokens"] = cfg.pop("additional_special_tokens")
        # tokenizer_config's added_tokens_decoder, by id; named tokens take their AddedToken from it
        added = {int(i): _to_added(t) for i, t in (cfg.get("added_tokens_decoder") or {}).items()}
        by_content = {str(t): t for t in added.values()}
        self._named: dict[str, Any] = {}
        for key in SPECIAL_TOKENS_ATTRIBUTES:
            if cfg.get(key) is not None:
                value = _to_added(cfg[key])
                self._named[key] = by_content.get(str(value), value) if by_content else value
        extra = cfg.get("extra_special_tokens") or []
        # model-specific tokens (`image_token`, or a dict of extra tokens) are named tokens too
        specific = {k: v for k, v in cfg.items() if k.endswith("_token") and k not in SPECIAL_TOKENS_ATTRIBUTES
                    and isinstance(v, str)}
        if isinstance(extra, dict):
            specific.update(extra)
            extra = []
        self.model_specific_tokens = {k: str(v) for k, v in specific.items()}
        self._named.update({k: _to_added(v) for k, v in specific.items()})
        self._extra = [_to_added(t) for t in extra]

        # as TokenizersBackend.__init__: no truncation/padding (it turns them off before every call anyway), the
        # config's added tokens, then any named/extra special token the backend lacks, added as special
        tokenizer.no_truncation()
        tokenizer.no_padding()
        tokenizer.encode_special_tokens = bool(cfg.get("split_special_tokens", False))
        to_add = [t for _, t in sorted(added.items())]
        known = set(self.get_added_vocab()) | {str(t) for t in to_add}
        for t in [*self._named.values(), *self._extra]:
            if str(t) not in known and t not in to_add:
                to_add.append(t)
        if to_add:
            named = {str(t) for t in self._named.values()}
            tokens = []
            for t in to_add:
                if isinstance(t, str):
                    t = AddedToken(t, special=True)
                elif not t.special and str(t) in named:
                    t.special = True
                tokens.append(t)
            tokenizer.add_tokens(tokens)
        if tokenizer.post_processor is None:     # transformers' update_post_processor, without bos/eos
            tokenizer.post_processor = processors.TemplateProcessing(single="$A:0", pair="$A:0 $B:1",
                                                                     special_tokens=[])

        self.clean_up_tokenization_spaces = bool(cfg.get("clean_up_tokenization_spaces", False))
        self._clean_up_bpe = bool(cfg.get("clean_up_tokenization_spaces_for_bpe_even_though_it_will_corrupt_output"))
        self.model_max_length = cfg.get("model_max_length", int(1e30))
        self.padding_side = cfg.get("padding_side", "right")
        template = chat_template if chat_template is not None else cfg.get("chat_template")
        if isinstance(template, (list, tuple)):
            template = {t["name"]: t["template"] for t in template}
        self.chat_template = template

    @classmethod
    def from_dir(cls, path) -> "NativeTokenizer":
        """tokenizer.json + tokenizer_config.json (+ special_tokens_map.json where the config has no
        added_tokens_decoder, + chat_template.jinja, which wins over the config's template, as in transformers)."""
        path = Path(path)
        cfg = _read_json(path / "tokenizer_config.json")
        cfg.pop("tokenizer_class", None)
        if "added_tokens_decoder" not in cfg:
            for key, value in _read_json(path / "special_tokens_map.json").items():
                if key in ("extra_special_tokens", "additional_special_tokens") and isinstance(value, list):
                    have = list(cfg.get("extra_special_tokens") or cfg.get("additional_special_tokens") or [])
                    value = have + [v for v in value if v not in have]
                    cfg.pop("additional_special_tokens", None)
                    key = "extra_special_tokens"
                elif isinstance(value, dict):
                    value = {**value, "special": True}
                cfg[key] = value
        template = None
        if (path / "chat_template.jinja").is_file():
            template = (path / "chat_template.jinja").read_text(encoding="utf-8")
        return cls(Tokenizer.from_file(str(path / "tokenizer.json")), cfg, template, str(path))

    # --- vocabulary
    @property
    def backend_tokenizer(self) -> Tokenizer:
        return self._tokenizer

    @property
    def decoder(self):
        return self._tokenizer.decoder

    def __len__(self) -> int:
        return self._tokenizer.get_vocab_size(with_added_tokens=True)

    def __bool__(self) -> bool:
        return True

    @property
    def vocab_size(self) -> int:
        """The base vocabulary, without added tokens (as transformers)."""
        return self._tokenizer.get_vocab_size(with_added_tokens=False)

    def get_vocab(self) -> dict[str, int]:
        return self._tokenizer.get_vocab(with_added_tokens=True)

    def get_added_tokens_decoder(self) -> dict[int, AddedToken]:
        return self._tokenizer.get_added_tokens_decoder()

    @property
    def added_tokens_decoder(self) -> dict[int, AddedToken]:
        return self._tokenizer.get_added_tokens_decoder()

    def get_added_vocab(self) -> dict[str, int]:
        return {t.content: i for i, t in sorted(self._tokenizer.get_added_tokens_decoder().items())}

    def convert_tokens_to_ids(self, tokens):
        if isinstance(tokens, str):
            i = self._tokenizer.token_to_id(tokens)
            return self.unk_token_id if i is None else i
        return [self.convert_tokens_to_ids(t) for t in tokens]

    def convert_ids_to_tokens(self, ids, skip_special_tokens: bool = False):
        ids = _py(ids)
        if isinstance(ids, int):
            return self._tokenizer.id_to_token(ids)
        skip = set(self.all_special_ids) if skip_special_tokens else ()
        return [self._tokenizer.id_to_token(int(i)) for i in ids if int(i) not in skip]

    def convert_tokens_to_string(self, tokens: list[str]) -> str:
        dec = self._tokenizer.decoder
        return dec.decode(tokens) if dec is not None else " ".join(tokens)

    # --- special tokens
    def _named_token(self, key: str) -> str | None:
        value = self._named.get(key)
        return None if value is None else str(value)

    bos_token = property(lambda self: self._named_token("bos_token"))
    eos_token = property(lambda self: self._named_token("eos_token"))
    unk_token = property(lambda self: self._named_token("unk_token"))
    sep_token = property(lambda self: self._named_token("sep_token"))
    pad_token = property(lambda self: self._named_token("pad_token"))
    cls_token = property(lambda self: self._named_token("cls_token"))
    mask_token = property(lambda self: self._named_token("mask_token"))

    def _named_id(self, key: str) -> int | None:
        token = self._named_token(key)
        return None if token is None else self.convert_tokens_to_ids(token)

    bos_token_id = property(lambda self: self._named_id("bos_token"))
    eos_token_id = property(lambda self: self._named_id("eos_token"))
    unk_token_id = property(lambda self: self._named_id("unk_token"))
    sep_token_id = property(lambda self: self._named_id("sep_token"))
    pad_token_id = property(lambda self: self._named_id("pad_token"))
    cls_token_id = property(lambda self: self._named_id("cls_token"))
    mask_token_id = property(lambda self: self._named_id("mask_token"))

    @property
    def special_tokens_map(self) -> dict[str, str]:
        """The named special tokens only (transformers 5); the chat template sees them as variables."""
        return {k: str(v) for k, v in self._named.items() if v is not None}

    @property
    def extra_special_tokens(self) -> list[str]:
        return [str(t) for t in self._extra]

    @property
    def all_special_tokens(self) -> list[str]:
        return list(dict.fromkeys([*self.special_tokens_map.values(), *self.extra_special_tokens]))

    @property
    def all_special_ids(self) -> list[int]:
        return self.convert_tokens_to_ids(self.all_special_tokens)

    # --- encode / decode
    def __call__(self, text, text_pair=None, add_special_tokens: bool = True, return_tensors: str | None = None,
                 return_attention_mask: bool = True, **kwargs) -> Batch:
        """{"input_ids", "attention_mask"} for a string (lists) or a list of strings (lists of lists); with
        return_tensors="pt", [B, L] long tensors (a batch must then be of one length: nothing is padded)."""
        if kwargs.get("padding") or kwargs.get("truncation"):
            raise ValueError("padding and truncation are not supported by the native tokenizer")
        batched = isinstance(text, (list, tuple))
        texts = list(text) if batched else [text]
        if text_pair is not None:
            texts = list(zip(texts, text_pair if batched else [text_pair]))
        enc = self._tokenizer.encode_batch(texts, add_special_tokens=add_special_tokens)
        out = Batch(input_ids=[e.ids for e in enc])
        if return_attention_mask:
            out["attention_mask"] = [e.attention_mask for e in enc]
        if return_tensors == "pt":
            return Batch({k: torch.tensor(v, dtype=torch.long) for k, v in out.items()})
        if return_tensors is not None:
            raise ValueError(f"return_tensors={return_tensors!r} is not supported (only 'pt' or None)")
        return out if batched else Batch({k: v[0] for k, v in out.items()})

    def encode(self, text: str, text_pair: str | None = None, add_special_tokens: bool = True, **kwargs) -> list[int]:
        return self(text, text_pair, add_special_tokens=add_special_tokens, **kwargs)["input_ids"]

    def tokenize(self, text: str, pair: str | None = None, add_special_tokens: bool = False) -> list[str]:
        return self._tokenizer.encode(text, pair, add_special_tokens=add_special_tokens).tokens

    def decode(self, token_ids, skip_special_tokens: bool = False, clean_up_tokenization_spaces: bool | None = None,
               **kwargs):
        token_ids = _py(token_ids)
        if isinstance(token_ids, dict):
            token_ids = token_ids["input_ids"]
        if isinstance(token_ids, int):
            token_ids = [token_ids]
        if token_ids and isinstance(token_ids[0], (list, tuple)):
            return [self.decode(t, skip_special_tokens, clean_up_tokenization_spaces) for t in token_ids]
        text = self._tokenizer.decode(token_ids, skip_special_tokens=skip_special_tokens)
        clean = self.clean_up_tokenization_spaces if clean_up_tokenization_spaces is None else \
            clean_up_tokenization_spaces
        # transformers skips the clean-up for BPE models (it would strip real spaces before punctuation)
        if clean and (type(self._tokenizer.model).__name__ != "BPE" or self._clean_up_bpe):
            for a, b in ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"),
                         (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re")):
                text = text.replace(a, b)
        return text

    def batch_decode(self, sequences, skip_special_tokens: bool = False, **kwargs) -> list[str]:
        return [self.decode(s, skip_special_tokens, **kwargs) for s in _py(sequences)]

    # --- chat template
    def apply_chat_template(self, conversation, tools=None, documents=None, chat_template: str | None = None,
                            add_generation_prompt: bool = False, tokenize: bool = True,
                            return_tensors: str | None = None, return_dict: bool = True, **kwargs):
        """As the tokenizer's apply_chat_template (transformers 5) for one text conversation: the prompt string, or
        its ids without added special tokens (the template holds them); images are the processor's. Every other
        keyword argument is a template variable."""
        if kwargs.pop("continue_final_message", False) or kwargs.pop("return_assistant_tokens_mask", False):
            raise ValueError("continue_final_message and return_assistant_tokens_mask are not supported")
        if conversation and isinstance(conversation[0], (list, tuple)):
            raise ValueError("batched conversations are not supported")
        prompt = render_chat(pick_template(self.chat_template, chat_template, "tokenizer"),
                             _normalize_messages(conversation), tools=tools, documents=documents,
                             add_generation_prompt=add_generation_prompt, **{**self.special_tokens_map, **kwargs})
        if not tokenize:
            return prompt
        out = self(prompt, add_special_tokens=False, return_tensors=return_tensors)
        return out if return_dict else out["input_ids"]


# ------------------------------------------------------------------------------------------------------ chat template
class _GenerationTag(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}` renders its body, as transformers' AssistantTracker does when it is
    not tracking assistant spans, so templates that use it compile."""
    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

    def _render(self, caller):
        return caller()


@lru_cache(maxsize=16)
def _compile(template: str):
    """transformers' chat-template environment (utils/chat_template_utils.py): an immutable sandbox, trim_blocks +
    lstrip_blocks, loop controls, a `tojson` that does not escape HTML, raise_exception, strftime_now, a safe `dict`
    and a `namespace` that refuses underscore names."""
    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    class TemplateDict:
        def __call__(self, *args, **kwargs):
            return dict(*args, **kwargs)

        def fromkeys(self, *args, **kwargs):
            return dict.fromkeys(*args, **kwargs)

    class TemplateNamespace(jinja2.utils.Namespace):
        def __init__(*args, **kwargs):
            self, args = args[0], args[1:]
            attrs = dict(*args, **kwargs)
            for name in attrs:
                TemplateNamespace._check_name(name)
            jinja2.utils.Namespace.__init__(self, attrs)

        def __setitem__(self, name, value):
            TemplateNamespace._check_name(name)
            jinja2.utils.Namespace.__setitem__(self, name, value)

        @staticmethod
        def _check_name(name):
            if isinstance(name, str) and name.startswith("_"):
                raise jinja2.exceptions.SecurityError(
                    f"Chat templates cannot store underscore-prefixed attributes on a namespace, but got {name!r}. "
                    "Please rename the attribute.")

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[_GenerationTag, jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals.update(raise_exception=raise_exception, strftime_now=lambda fmt: datetime.now().strftime(fmt),
                       dict=TemplateDict(), namespace=TemplateNamespace)
    return env.from_string(template)


def _plain(value):
    """What the template may see: plain JSON-like data; anything else (a PIL image) becomes "<TypeName>", as
    transformers' _plain_template_data (rich objects carry methods the sandbox does not know are unsafe)."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, int):
        return int.__int__(value)
    if isinstance(value, float):
        return float.__float__(value)
    if isinstance(value, Mapping):
        return {_plain(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, tuple):
        return tuple(_plain(v) for v in value)
    if isinstance(value, np.generic):
        return _plain(value.item())
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if callable(getattr(value, "model_dump", None)):
        return _plain(value.model_dump())
    return f"<{type(value).__name__}>"


_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")


def _normalize_messages(messages) -> list[dict]:
    """Messages as transformers normalizes them: dicts (pydantic models dumped), keys whose value is None dropped."""
    out = []
    for m in messages:
        if callable(getattr(m, "model_dump", None)):
            m = m.model_dump()
        if not isinstance(m, dict):
            raise TypeError(f"Chat messages should be dicts, dataclasses or pydantic models, but got {m!r}.")
        out.append({k: v for k, v in m.items() if v is not None})
    return out


def pick_template(templates, chat_template: str | None, owner: str) -> str:
    """The template to render: `chat_template` itself, or by name from a dict of named templates ("default" when
    none is asked for), with transformers' errors."""
    if isinstance(templates, dict):
        if chat_template is None and "default" not in templates:
            raise ValueError(f'The {owner} has multiple chat templates but none of them are named "default".')
        template = templates.get("default" if chat_template is None else chat_template, chat_template)
    else:
        template = templates if chat_template is None else chat_template
    if template is None:
        raise ValueError(f"Cannot use apply_chat_template because this {owner} does not have a chat template.")
    return template


def render_chat(template: str, messages: list[dict], tools=None, documents=None, add_generation_prompt: bool = False,
                **kwargs) -> str:
    """The prompt text, as transformers' render_jinja_template for one conversation."""
    if tools is not None and not all(isinstance(t, dict) for t in tools):
        raise ValueError("Tools should either be a JSON schema, or a callable function with type hints and a "
                         "docstring suitable for auto-conversion to a schema.")
    if documents is not None and not all(isinstance(d, dict) for d in documents):
        raise TypeError("Documents should be a list of dicts with 'title' and 'text' keys!")
    chat = []
    for m in _plain(messages):
        if not isinstance(m, dict):
            raise TypeError(f"Chat messages should be dicts, dataclasses or pydantic models, but got {m!r}.")
        reasoning = next((m[k] for k in _REASONING_FIELDS if m.get(k) is not None), None)
        chat.append(m if reasoning is None else {"thinking": reasoning, **m, "reasoning_content": reasoning})
    return _compile(template).render(messages=chat, tools=_plain(tools), documents=_plain(documents),
                                     add_generation_prompt=add_generation_prompt, **_plain(kwargs))


# ---------------------------------------------------------------------------------------------------- image processor
def smart_resize(num_frames: int, height: int, width: int, temporal_factor: int = 2, factor: int = 28,
                 min_pixels: int = 112 * 112, max_pixels: int = 14 * 14 * 2 * 2 * 2 * 6144) -> tuple[int, int]:
    """GLM-4.1V's target size (transformers' glm4v smart_resize, verbatim): multiples of `factor`, the pixel count
    of `num_frames` frames within [min_pixels, max_pixels], the aspect ratio kept."""
    if num_frames < temporal_factor:
        raise ValueError(f"t:{num_frames} must be larger than temporal_factor:{temporal_factor}")
    if height < factor or width < factor:
        scale = max(factor / height, factor / width)
        height = int(height * scale)
        width = int(width * scale)
    if max(height, width) / min(height, width) > 200:
        raise ValueError(
            f"absolute aspect ratio must be smaller than 200, got {max(height, width) / min(height, width)}")
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    t_bar = round(num_frames / temporal_factor) * temporal_factor
    if t_bar * h_bar * w_bar > max_pixels:
        beta = math.sqrt((num_frames * height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif t_bar * h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (num_frames * height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


_RESAMPLE = {2: "bilinear", 3: "bicubic"}     # PIL's resampling ids (preprocessor_config "resample")


def _flat_images(images) -> list:
    if isinstance(images, (list, tuple)):
        return [im for x in images for im in _flat_images(x)]
    return [images]


class NativeImageProcessor:
    """GLM-4.1V's image processor as transformers' torchvision backend runs it on CPU: RGB (transparency composited
    on white), smart resize with `interpolate(uint8, bicubic, antialias=True)` (what torchvision's resize calls for
    a uint8 CPU tensor), fused rescale+normalize in float32, then 14x14 patches with the frame duplicated to the
    temporal patch size -> pixel_values [N, C*T*P*P] and image_grid_thw [n, 3]."""

    model_input_names = ["pixel_values", "image_grid_thw"]

    def __init__(self, size: dict | None = None, patch_size: int = 14, temporal_patch_size: int = 2,
                 merge_size: int = 2, image_mean=OPENAI_CLIP_MEAN, image_std=OPENAI_CLIP_STD,
                 rescale_factor: float = 1 / 255, do_resize: bool = True, do_rescale: bool = True,
                 do_normalize: bool = True, do_convert_rgb: bool = True, resample: int = 3, **_ignored):
        # `size` stays a plain dict: the loader overwrites it (size["longest_edge"] = IMAGE_MAX_PIXELS)
        self.size = dict(size) if size else {"shortest_edge": 112 * 112, "longest_edge": 28 * 28 * 15000}
        self.patch_size, self.temporal_patch_size, self.merge_size = patch_size, temporal_patch_size, merge_size
        self.image_mean, self.image_std = tuple(image_mean), tuple(image_std)
        self.rescale_factor = rescale_factor
        self.do_resize, self.do_rescale, self.do_normalize = do_resize, do_rescale, do_normalize
        self.do_convert_rgb = do_convert_rgb
        if resample not in _RESAMPLE:
            raise ValueError(f"resample={resample} is not supported (bilinear 2 or bicubic 3)")
        self.resample = resample

    @classmethod
    def from_dir(cls, path) -> "NativeImageProcessor":
        cfg = _read_json(Path(path) / "preprocessor_config.json")
        return cls(**{k: v for k, v in cfg.items() if v is not None})

    def _target(self, height: int, width: int) -> tuple[int, int]:
        size = self.size
        if not size.get("shortest_edge") or not size.get("longest_edge"):
            raise ValueError(f"`size` dict must contain 'shortest_edge' and 'longest_edge' keys but got {size}.")
        return smart_resize(num_frames=self.temporal_patch_size, height=height, width=width,
                            temporal_factor=self.temporal_patch_size, factor=self.patch_size * self.merge_size,
                            min_pixels=size["shortest_edge"], max_pixels=size["longest_edge"])

    def get_number_of_image_patches(self, height: int, width: int, images_kwargs: dict | None = None) -> int:
        h, w = self._target(height, width)
        return (h // self.patch_size) * (w // self.patch_size)

    def _to_tensor(self, image) -> torch.Tensor:
        """[C, H, W] uint8, as the torchvision backend's process_image for a PIL image."""
        if not isinstance(image, Image.Image):
            raise TypeError(f"images must be PIL images, got {type(image).__name__}")
        if self.do_convert_rgb:
            if "A" in image.getbands() or image.info.get("transparency") is not None:
                rgba = image.convert("RGBA")
                image = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
            image = image.convert("RGB")
        array = np.array(image)
        t = torch.from_numpy(array)
        return (t.unsqueeze(0) if t.ndim == 2 else t.permute(2, 0, 1)).contiguous()

    def _one(self, image) -> tuple[torch.Tensor, list[int]]:
        x = self._to_tensor(image).unsqueeze(0)
        height, width = x.shape[-2:]
        if height == 0 or width == 0:
            raise ValueError(f"the image has no pixels ({width}x{height})")
        if self.do_resize:
            h, w = self._target(height, width)
            if (h, w) != (height, width):
                # uint8 in, uint8 out: torchvision keeps uint8 for bicubic (and bilinear on AVX2) on CPU
                x = torch.nn.functional.interpolate(x, size=[h, w], mode=_RESAMPLE[self.resample],
                                                    align_corners=False, antialias=True)
        if self.do_normalize:
            mean, std = torch.tensor(self.image_mean), torch.tensor(self.image_std)
            if self.do_rescale:    # fused, as the torchvision backend: (x - mean/scale) / (std/scale)
                mean, std = mean * (1.0 / self.rescale_factor), std * (1.0 / self.rescale_factor)
            x = x.to(torch.float32).sub(mean.view(-1, 1, 1)).div_(std.view(-1, 1, 1))
        elif self.do_rescale:
            x = x * self.rescale_factor
        return self._patchify(x)

    def _patchify(self, x: torch.Tensor) -> tuple[torch.Tensor, list[int]]:
        """[1, C, H, W] -> [gh*gw, C*T*P*P] in the vision tower's order: merge blocks of merge x merge patches,
        channel, frame (the one image repeated), row, column."""
        _, c, h, w = x.shape
        p, m, t = self.patch_size, self.merge_size, self.temporal_patch_size
        gh, gw = h // p, w // p
        x = x.reshape(c, gh // m, m, p, gw // m, m, p).permute(1, 4, 2, 5, 0, 3, 6)
        x = x.unsqueeze(5).expand(-1, -1, -1, -1, -1, t, -1, -1).reshape(gh * gw, c * t * p * p)
        return x, [1, gh, gw]

    def __call__(self, images, return_tensors: str | None = "pt", **kwargs) -> Batch:
        if kwargs:
            raise TypeError(f"image processor options are not supported here: {', '.join(sorted(kwargs))}")
        done = [self._one(im) for im in _flat_images(images)]
        if not done:
            raise ValueError("no images")
        pixels = done[0][0] if len(done) == 1 else torch.cat([d[0] for d in done])
        return Batch(pixel_values=pixels, image_grid_thw=torch.tensor([d[1] for d in done], dtype=torch.long))

    preprocess = __call__


# ------------------------------------------------------------------------------------------------------------ processor
class NativeGlm4vProcessor:
    """Glm4vProcessor (image-only, as loader.load_processor serves it) over NativeTokenizer and
    NativeImageProcessor: `apply_chat_template` renders the chat, expands each image placeholder to
    grid.prod() // merge_size**2 image tokens, tokenizes, and returns input_ids / attention_mask /
    mm_token_type_ids (+ pixel_values / image_grid_thw) as transformers does."""

    video_processor = None

    def __init__(self, image_processor: NativeImageProcessor, tokenizer: NativeTokenizer, chat_template=None):
        self.image_processor, self.tokenizer = image_processor, tokenizer
        self.chat_template = chat_template if chat_template is not None else tokenizer.chat_template
        self.image_token = tokenizer.model_specific_tokens.get("image_token", "<|image|>")
        self.video_token = tokenizer.model_specific_tokens.get("video_token", "<|video|>")
        self.image_token_id = tokenizer.convert_tokens_to_ids(self.image_token)
        self.video_token_id = tokenizer.convert_tokens_to_ids(self.video_token)
        self.video_start_id = tokenizer.convert_tokens_to_ids("<|begin_of_video|>")
        self.video_end_id = tokenizer.convert_tokens_to_ids("<|end_of_video|>")

    @classmethod
    def from_dir(cls, path) -> "NativeGlm4vProcessor":
        """chat_template.jinja, else chat_template.json, else the tokenizer config's template."""
        path = Path(path)
        tok = NativeTokenizer.from_dir(path)
        template = tok.chat_template
        if not (path / "chat_template.jinja").is_file() and (path / "chat_template.json").is_file():
            template = _read_json(path / "chat_template.json").get("chat_template", template)
        return cls(NativeImageProcessor.from_dir(path), tok, template)

    def decode(self, *args, **kwargs):
        return self.tokenizer.decode(*args, **kwargs)

    def batch_decode(self, *args, **kwargs):
        return self.tokenizer.batch_decode(*args, **kwargs)


    def apply_chat_template(self, conversation, chat_template: str | None = None, tools=None, documents=None,
                            add_generation_prompt: bool = False, continue_final_message: bool = False,
                            tokenize: bool = False, return_tensors: str | None = None, return_dict: bool = False,
                            **kwargs):
        """As ProcessorMixin.apply_chat_template for one conversation. Every keyword argument is a template
        variable (with the tokenizer's named special tokens); unlike transformers, one the template does not
        use is not forwarded to the tokenizer or image processor, so chat_template_kwargs cannot resize images."""
        if continue_final_message or kwargs.pop("return_assistant_tokens_mask", False):
            raise ValueError("continue_final_message and return_assistant_tokens_mask are not supported")
        if conversation and isinstance(conversation[0], (list, tuple)):
            raise ValueError("batched conversations are not supported")
        kwargs.pop("processor_kwargs", None)
        messages = _normalize_messages(conversation)
        images = []
        if tokenize:
            for m in messages:
                if isinstance(m.get("content"), str) or not m.get("content"):
                    continue
                for part in m["content"]:
                    kind = part.get("type")
                    if kind == "video":
                        raise ValueError("video input is not served")
                    if kind == "image":
                        images.extend(part[k] for k in ("image", "url", "path", "base64") if k in part)
        prompt = render_chat(pick_template(self.chat_template, chat_template, "processor"), messages, tools=tools,
                             documents=documents,
                             add_generation_prompt=add_generation_prompt,
                             **{**self.tokenizer.special_tokens_map, **kwargs})
        if not tokenize:
            return prompt
        # transformers adds special tokens unless the prompt already starts with the BOS token
        bos = self.tokenizer.bos_token
        out = self(text=prompt, images=images or None, return_tensors=return_tensors,
                   add_special_tokens=not (bos is not None and prompt.startswith(bos)))
        return out if return_dict else out["input_ids"]

    def __call__(self, text=None, images=None, videos=None, return_tensors: str | None = None,
                 add_special_tokens: bool = True, **kwargs) -> Batch:
        """One prompt (a string or a one-string list) with its images, as Glm4vProcessor.__call__."""
        if videos is not None:
            raise ValueError("video input is not served (Glm4vProcessor without its video processor)")
        if isinstance(text, (list, tuple)):
            if len(text) != 1:
                raise ValueError("the native processor takes one prompt at a time")
            text = text[0]
        if not isinstance(text, str):
            raise ValueError("`text` must be a string or list of strings.")
        images = None if images is None else _flat_images(images)
        n_placeholders = text.count(self.image_token)
        if images is not None and n_placeholders != len(images):
            raise ValueError(f"The total number of {self.image_token} tokens in the prompts should be the same as the "
                             f"number of images passed. Found total {n_placeholders} {self.image_token} tokens and "
                             f"{len(images)} images.")
        if images is None and n_placeholders:
            raise ValueError(f"Found {n_placeholders} {self.image_token} tokens in the text but no images were "
                             "passed.")
        if text.count(self.video_token):
            raise ValueError(f"Found {text.count(self.video_token)} {self.video_token} tokens in the text but no "
                             "videos were passed.")
        vision = {}
        if images:
            for im in images:
                if not isinstance(im, Image.Image):
                    raise ValueError("image parts must carry a decoded PIL image (urls and paths are not loaded)")
            vision = self.image_processor(images)
            merge = self.image_processor.merge_size ** 2
            pieces = text.split(self.image_token)
            counts = (vision["image_grid_thw"].prod(dim=1) // merge).tolist()
            text = pieces[0] + "".join(self.image_token * n + piece for n, piece in zip(counts, pieces[1:]))
        ids = self.tokenizer.encode(text, add_special_tokens=add_special_tokens)
        ids_np = np.asarray(ids, dtype=np.int64)
        n_text = text.count(self.image_token)
        if int((ids_np == self.image_token_id).sum()) != n_text:
            raise ValueError(f"Mismatch in `image` token count between text and `input_ids`. Got "
                             f"ids={[int((ids_np == self.image_token_id).sum())]} and text={[n_text]}.")
        # Glm4vProcessor.create_mm_token_type_ids: image tokens 1, or 2 inside a video segment
        in_video = np.cumsum(ids_np == self.video_start_id) > np.cumsum(ids_np == self.video_end_id)
        types = np.zeros_like(ids_np)
        is_image = ids_np == self.image_token_id
        types[is_image & in_video] = 2
        types[is_image & ~in_video] = 1
        out = Batch(input_ids=[ids], attention_mask=[[1] * len(ids)], mm_token_type_ids=[types.tolist()])
        if return_tensors == "pt":
            out = Batch({k: torch.tensor(v, dtype=torch.long) for k, v in out.items()})
        elif return_tensors is not None:
            raise ValueError(f"return_tensors={return_tensors!r} is not supported (only 'pt' or None)")
        out.update(vision)
        return out
