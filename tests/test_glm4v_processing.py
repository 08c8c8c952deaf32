"""The native GLM-4.1V processor (function/engine/glm4v_processing.py) against transformers' on the tiny checkpoint:
the same tokens, rendered prompts, image grids and mm_token_type_ids; pixel values within the small difference
between torch's bicubic resize (the native one, as transformers' torchvision backend) and PIL's (the transformers
backend installed here, without torchvision)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from function.engine.glm4v_processing import NativeGlm4vProcessor, NativeImageProcessor
from function.tiny_model import SPECIAL_TOKENS

from support.subproc import run_json

pytest.importorskip("transformers")

KW = dict(add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt")


@pytest.fixture(scope="module")
def ref(tiny_dir):
    """What is served today: Glm4vProcessor with its fast tokenizer and (without torchvision) the PIL backend."""
    from function.engine.loader import load_processor
    return load_processor(tiny_dir)


@pytest.fixture(scope="module")
def nat(tiny_dir):
    return NativeGlm4vProcessor.from_dir(tiny_dir)


def picture(w: int, h: int, mode: str = "RGB") -> Image.Image:
    """A smooth, screenshot-like picture (gradients and soft bands, no pixel noise)."""
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    rgb = np.stack([(np.sin(x / 23) + 1) * 110 + 10, (np.cos(y / 31) + 1) * 100 + 20, (x + y) / (w + h) * 250], -1)
    img = Image.fromarray(rgb.astype(np.uint8))
    if mode == "RGBA":
        alpha = Image.fromarray(((x / max(w - 1, 1)) * 255).astype(np.uint8))
        img = img.convert("RGBA")
        img.putalpha(alpha)
        return img
    return img.convert(mode)


def image_chat(*images, text="打开微信", image_first=True, system="You are a phone agent."):
    parts = [{"type": "image", "image": im} for im in images]
    parts = parts + [{"type": "text", "text": text}] if image_first else [{"type": "text", "text": text}] + parts
    return [{"role": "system", "content": system}, {"role": "user", "content": parts}]


def same_encoding(a, b, pixels=True):
    assert list(a.keys()) == list(b.keys())
    for k in ("input_ids", "attention_mask", "mm_token_type_ids", "image_grid_thw"):
        if k in a:
            assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
    if "pixel_values" in a:
        assert a["pixel_values"].shape == b["pixel_values"].shape and b["pixel_values"].dtype == torch.float32
        d = (a["pixel_values"] - b["pixel_values"]).abs()
        # measured: max ~0.015 (one uint8 level / std), mean < 1e-3 on these pictures
        assert d.mean() < 2e-3 and d.max() < 0.1, (d.mean(), d.max())
        return float(d.max())


# ------------------------------------------------------------------------------------------------------------ tokenizer
TEXTS = ["hello world", "Open the settings app now.", "打开微信，给张三发消息：周末一起吃饭吗？", "emoji 😀👍🏽🇨🇳 end",
         "<|user|>\nhi<|assistant|>\n<think>x</think><answer>do(action=\"Tap\", element=[1,2])</answer>",
         "[gMASK]<sop><|system|>\n  spaces  and\ttabs\n\n\nnewlines", "", " ", "<|image|><|endoftext|>",
         "\u00e9\u0301 combining \u200b zero-width"]


def test_tokenizer_attributes(ref, nat):
    rt, nt = ref.tokenizer, nat.tokenizer
    assert len(nt) == len(rt) and nt.vocab_size == rt.vocab_size
    assert (nt.pad_token, nt.pad_token_id, nt.eos_token, nt.eos_token_id) == \
        (rt.pad_token, rt.pad_token_id, rt.eos_token, rt.eos_token_id)
    assert nt.bos_token is None and nt.bos_token_id == rt.bos_token_id and nt.unk_token_id == rt.unk_token_id
    assert nt.all_special_ids == rt.all_special_ids and nt.all_special_tokens == rt.all_special_tokens
    assert nt.special_tokens_map == rt.special_tokens_map
    assert {i: repr(t) for i, t in nt.get_added_tokens_decoder().items()} == \
        {i: repr(t) for i, t in rt.backend_tokenizer.get_added_tokens_decoder().items()}
    assert nt.get_added_vocab() == rt.get_added_vocab() and nt.get_vocab() == rt.get_vocab()
    assert nt.chat_template == rt.chat_template == nat.chat_template == ref.chat_template
    assert nt.backend_tokenizer is nt._tokenizer
    ids = list(range(len(rt)))
    assert nt.convert_ids_to_tokens(ids) == rt.convert_ids_to_tokens(ids)
    assert nt.convert_ids_to_tokens(ids, skip_special_tokens=True) == rt.convert_ids_to_tokens(ids, True)
    assert nt.convert_tokens_to_ids(SPECIAL_TOKENS) == rt.convert_tokens_to_ids(SPECIAL_TOKENS)
    assert nt.convert_tokens_to_ids("<|image|>") == rt.convert_tokens_to_ids("<|image|>") == nat.image_token_id
    assert nt.convert_tokens_to_ids("no such token") == rt.convert_tokens_to_ids("no such token")


@pytest.mark.parametrize("text", TEXTS)
def test_tokenizer_encode_decode(ref, nat, text):
    rt, nt = ref.tokenizer, nat.tokenizer
    for special in (True, False):
        got, want = nt(text, add_special_tokens=special), rt(text, add_special_tokens=special)
        assert dict(got) == dict(want)
        assert nt.encode(text, add_special_tokens=special) == rt.encode(text, add_special_tokens=special)
    ids = want["input_ids"]
    assert nt.decode(ids) == rt.decode(ids)
    assert nt.decode(ids, skip_special_tokens=True) == rt.decode(ids, skip_special_tokens=True)
    assert nt.decode(torch.tensor(ids)) == rt.decode(torch.tensor(ids))
    assert [nt.decode([t]) for t in ids] == [rt.decode([t]) for t in ids]
    assert nt.tokenize(text) == rt.tokenize(text)


def test_tokenizer_batches(ref, nat):
    rt, nt = ref.tokenizer, nat.tokenizer
    assert dict(nt(TEXTS[:3])) == dict(rt(TEXTS[:3]))
    batch = [rt.encode(t) for t in TEXTS[:3]]
    assert nt.decode(batch) == rt.decode(batch) == nt.batch_decode(batch)
    pt = nt("hi there", return_tensors="pt")
    assert torch.equal(pt["input_ids"], rt("hi there", return_tensors="pt")["input_ids"])


# ------------------------------------------------------------------------------------------------------ chat template
CHATS = {
    "system_user": [{"role": "system", "content": "You are a phone agent."}, {"role": "user", "content": "你好"}],
    "multi_turn": [{"role": "system", "content": "sys"}, {"role": "user", "content": "open the app"},
                   {"role": "assistant", "content": "<think>ok</think><answer>do(action=\"Launch\")</answer>"},
                   {"role": "user", "content": [{"type": "text", "text": "and now?"}]},
                   {"role": "assistant", "content": "done", "metadata": "meta"},
                   {"role": "user", "content": "thanks", "name": None}],
    "string_content": [{"role": "user", "content": "just a string with <|user|> inside"}],
    "text_parts": [{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}],
}


@pytest.mark.parametrize("name", sorted(CHATS))
@pytest.mark.parametrize("kwargs", [{}, {"enable_thinking": False}, {"enable_thinking": True}, {"unused_var": 3}])
def test_chat_template_text(ref, nat, name, kwargs):
    messages = CHATS[name]
    for gen in (True, False):
        want = ref.apply_chat_template(messages, add_generation_prompt=gen, tokenize=False, **kwargs)
        assert nat.apply_chat_template(messages, add_generation_prompt=gen, tokenize=False, **kwargs) == want
    same_encoding(ref.apply_chat_template(messages, **KW, **kwargs), nat.apply_chat_template(messages, **KW, **kwargs))
    ids = nat.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_tensors="pt")
    assert torch.equal(ids, ref.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                    return_tensors="pt"))


@pytest.mark.parametrize("name", sorted(CHATS))
def test_tokenizer_chat_template_is_transformers(ref, nat, name):
    """The tokenizer's own apply_chat_template (what text-only callers and the benches use) as transformers':
    the string, the ids (no special tokens added on top of the template's), the dict and the tensor."""
    rt, nt = ref.tokenizer, nat.tokenizer
    messages = [m for m in CHATS[name] if isinstance(m["content"], str)] or [{"role": "user", "content": "hi"}]
    for gen in (True, False):
        kw = dict(add_generation_prompt=gen, enable_thinking=False)
        assert nt.apply_chat_template(messages, tokenize=False, **kw) == rt.apply_chat_template(
            messages, tokenize=False, **kw)
        assert nt.apply_chat_template(messages, return_dict=False, **kw) == rt.apply_chat_template(
            messages, return_dict=False, **kw)
        assert dict(nt.apply_chat_template(messages, **kw)) == dict(rt.apply_chat_template(messages, **kw))
    pt = nt.apply_chat_template(messages, return_tensors="pt", return_dict=False)
    assert torch.equal(pt, rt.apply_chat_template(messages, return_tensors="pt", return_dict=False))


def test_named_chat_templates_pick_by_name_or_default():
    from function.engine.glm4v_processing import pick_template
    named = {"default": "D", "tool_use": "T"}
    assert pick_template(named, None, "tokenizer") == "D"
    assert pick_template(named, "tool_use", "tokenizer") == "T"
    assert pick_template(named, "{{ x }}", "tokenizer") == "{{ x }}"     # not a name: the template itself
    assert pick_template("S", None, "tokenizer") == "S"
    with pytest.raises(ValueError, match="none of them are named"):
        pick_template({"tool_use": "T"}, None, "processor")
    with pytest.raises(ValueError, match="does not have a chat template"):
        pick_template(None, None, "tokenizer")


def test_chat_template_environment(ref, nat):
    """transformers' jinja environment: tools/documents, its tojson (no HTML escaping), namespace, loop controls,
    raise_exception, the {% generation %} tag and the special tokens as variables."""
    template = (
        "{%- set ns = namespace(n=0) -%}"
        "{{ eos_token }}|{{ pad_token }}|{{ tools | tojson }}|{{ documents | tojson(indent=1) }}\n"
        "{%- for m in messages %}{% if loop.index > 3 %}{% break %}{% endif %}{% set ns.n = ns.n + 1 %}"
        "{% generation %}[{{ m.role }}:{{ m.content if m.content is string else m.content | length }}]"
        "{% endgeneration %}{% if m.role == 'assistant' %}{% continue %}{% endif %}<{{ m.reasoning_content }}>"
        "{% endfor %}{{ ns.n }}{{ dict(a=1) | tojson }}{% if bad is defined %}{{ raise_exception('bad: ' ~ bad) }}"
        "{% endif %}{% if add_generation_prompt %}<|assistant|>{% endif %}")
    tools = [{"type": "function", "function": {"name": "tap", "description": "a <b> & 'c'", "parameters": {}}}]
    docs = [{"title": "t", "text": "中文 & <x>"}]
    messages = [{"role": "user", "content": "x", "reasoning": "r"}, {"role": "assistant", "content": "y"},
                {"role": "user", "content": [{"type": "image", "image": picture(28, 28)}]},
                {"role": "user", "content": "never"}]
    kw = dict(chat_template=template, tools=tools, documents=docs, add_generation_prompt=True, tokenize=False)
    want = ref.apply_chat_template(messages, **kw)
    assert nat.apply_chat_template(messages, **kw) == want
    assert '"a <b> & \'c\'"' in want
    with pytest.raises(Exception, match="bad: boom") as e_nat:
        nat.apply_chat_template(messages, **kw, bad="boom")
    with pytest.raises(Exception, match="bad: boom") as e_ref:
        ref.apply_chat_template(messages, **kw, bad="boom")
    assert type(e_nat.value) is type(e_ref.value)
    sneaky = "{% set ns = namespace() %}{% set ns._x = 1 %}"
    with pytest.raises(Exception, match="underscore"):
        nat.apply_chat_template(messages, chat_template=sneaky)


# ------------------------------------------------------------------------------------------------------------- images
@pytest.mark.parametrize("size", [(56, 56), (300, 200), (1080, 2400), (1, 1), (27, 5)])
def test_image_chat_matches(ref, nat, size):
    messages = image_chat(picture(*size))
    same_encoding(ref.apply_chat_template(messages, **KW), nat.apply_chat_template(messages, **KW))


@pytest.mark.parametrize("mode", ["L", "RGBA", "P", "LA"])
def test_non_rgb_images(ref, nat, mode):
    img = picture(120, 90, "RGBA" if mode == "LA" else mode)
    if mode == "LA":
        img = img.convert("LA")
    messages = image_chat(img)
    same_encoding(ref.apply_chat_template(messages, **KW), nat.apply_chat_template(messages, **KW))


def test_two_images_and_image_after_text(ref, nat):
    messages = image_chat(picture(200, 120), picture(84, 160), image_first=False)
    a, b = ref.apply_chat_template(messages, **KW), nat.apply_chat_template(messages, **KW)
    same_encoding(a, b)
    assert b["image_grid_thw"].shape == (2, 3) and int(b["mm_token_type_ids"].sum()) == \
        int((b["image_grid_thw"].prod(dim=1) // 4).sum())
    # a later user turn with an image, after an assistant turn
    messages = messages + [{"role": "assistant", "content": "ok"},
                           {"role": "user", "content": [{"type": "image", "image": picture(64, 64)}]}]
    same_encoding(ref.apply_chat_template(messages, **KW), nat.apply_chat_template(messages, **KW))


def test_pixels_equal_without_resize(ref, nat):
    """An image already of its target size is not resized: rescale, normalize and patch order then agree to
    float rounding (the torchvision backend fuses rescale into normalize; PIL's does them in turn)."""
    img = picture(112, 168)
    a = ref.image_processor(images=[img], return_tensors="pt")
    b = nat.image_processor(images=[img], return_tensors="pt")
    assert torch.equal(torch.as_tensor(a["image_grid_thw"]), b["image_grid_thw"])
    assert (torch.as_tensor(a["pixel_values"]) - b["pixel_values"]).abs().max() < 1e-5


def test_max_pixels_override(ref, nat, tiny_dir):
    """The loader's IMAGE_MAX_PIXELS: size["longest_edge"] overwritten on the image processor."""
    from function.engine.loader import load_processor
    small_ref, small_nat = load_processor(tiny_dir), NativeGlm4vProcessor.from_dir(tiny_dir)
    for p in (small_ref, small_nat):
        size = dict(p.image_processor.size)
        size["longest_edge"] = 28 * 28 * 2 * 100
        p.image_processor.size = size
    messages = image_chat(picture(1080, 2400))
    a, b = small_ref.apply_chat_template(messages, **KW), small_nat.apply_chat_template(messages, **KW)
    same_encoding(a, b)
    full = nat.apply_chat_template(messages, **KW)
    assert b["image_grid_thw"].prod() < full["image_grid_thw"].prod()
    assert int(b["image_grid_thw"].prod()) <= 4 * 100
    assert small_nat.image_processor.get_number_of_image_patches(2400, 1080) == int(b["image_grid_thw"].prod())


def test_bad_images_raise_as_transformers(ref, nat):
    for img in (picture(1, 300), picture(6000, 28)):        # aspect ratio beyond 200
        with pytest.raises(ValueError, match="aspect ratio") as want:
            ref.apply_chat_template(image_chat(img), **KW)
        with pytest.raises(ValueError, match="aspect ratio") as got:
            nat.apply_chat_template(image_chat(img), **KW)
        assert str(got.value) == str(want.value)
    with pytest.raises(ValueError, match="no pixels"):
        nat.apply_chat_template(image_chat(Image.new("RGB", (0, 10))), **KW)


def test_placeholder_mismatches_raise(ref, nat):
    """An image part without an image, or placeholder tokens typed by the user, fail as in transformers."""
    no_image = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "x"}]}]
    typed = [{"role": "user", "content": "look: <|image|>"}]
    for messages in (no_image, typed, image_chat(picture(56, 56), text="and <|image|>")):
        with pytest.raises(ValueError, match="image"):
            ref.apply_chat_template(messages, **KW)
        with pytest.raises(ValueError, match="image"):
            nat.apply_chat_template(messages, **KW)
    with pytest.raises(ValueError, match="video input is not served"):
        nat.apply_chat_template([{"role": "user", "content": [{"type": "video", "video": ["f"]}]}], **KW)
    with pytest.raises(ValueError, match="video"):
        nat.apply_chat_template([{"role": "user", "content": "<|video|>"}], **KW)
    with pytest.raises(ValueError, match="video input is not served"):
        nat(text=["x"], videos=[[Image.new("RGB", (28, 28))] * 2])


def test_from_dir_settings(tiny_dir):
    from function.engine.loader import load_processor
    assert type(load_processor(tiny_dir, impl="native")) is NativeGlm4vProcessor
    ip = NativeImageProcessor.from_dir(tiny_dir)
    assert (ip.patch_size, ip.merge_size, ip.temporal_patch_size) == (14, 2, 2)
    assert ip.size == {"shortest_edge": 12544, "longest_edge": 9633792} and type(ip.size) is dict


def test_serving_path_imports_no_transformers(tiny_dir):
    got = run_json(f"""
        import json, sys
        from PIL import Image
        from function.engine.glm4v_processing import NativeGlm4vProcessor
        p = NativeGlm4vProcessor.from_dir({str(tiny_dir)!r})
        messages = [{{"role": "user", "content": [{{"type": "image", "image": Image.new("RGB", (300, 200))}},
                                                 {{"type": "text", "text": "hi"}}]}}]
        enc = p.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True,
                                    return_tensors="pt")
        text = p.tokenizer.decode(enc["input_ids"][0][:4])
        print(json.dumps({{"keys": sorted(enc), "mods": sorted(m for m in ("transformers", "torchvision")
                                                               if m in sys.modules)}}))
    """)
    assert got["mods"] == []
    assert got["keys"] == ["attention_mask", "image_grid_thw", "input_ids", "mm_token_type_ids", "pixel_values"]
