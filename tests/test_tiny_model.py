"""The tiny GLM-4.1V checkpoint: built locally, loaded by the real transformers classes, shaped like the real model."""
from __future__ import annotations

import hashlib
import importlib.util
import json
import threading
import time
from pathlib import Path

import pytest

from function import tiny_model
from function.tiny_model import (
    BUILDER_VERSION,
    TEXT_TOKENS,
    CHAT_TEMPLATE,
    MARKER_FILE,
    REAL_CHAT_TEMPLATE,
    SPECIAL_TOKENS,
    build_tiny_model,
)
from function.engine.loader import load_processor

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
from PIL import Image  # noqa: E402

HAS_TORCHVISION = importlib.util.find_spec("torchvision") is not None

SYSTEM = "You are a phone agent."
USER_TEXT = "打开微信，给张三发消息"


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "tiny-glm4v")


@pytest.fixture(scope="module")
def processor(tiny_dir):
    return load_processor(tiny_dir)


@pytest.fixture(scope="module")
def model(tiny_dir):
    from transformers import AutoModelForImageTextToText

    return AutoModelForImageTextToText.from_pretrained(tiny_dir).eval()


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _messages(image=None):
    item = {"type": "image"} if image is None else {"type": "image", "image": image}
    return [
        {"role": "system", "content": SYSTEM},
        {"role": "user", "content": [item, {"type": "text", "text": USER_TEXT}]},
    ]


def test_layout_and_marker(tiny_dir):
    names = {p.name for p in tiny_dir.iterdir()}
    for f in ("config.json", "model.safetensors", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
              "chat_template.jinja", "preprocessor_config.json", MARKER_FILE):
        assert f in names, f
    marker = json.loads((tiny_dir / MARKER_FILE).read_text())
    assert marker["builder_version"] == BUILDER_VERSION and marker["seed"] == 0
    assert not [n for n in tiny_dir.parent.iterdir() if n.name.startswith(".")], "temporary build dirs left behind"


def test_loads_with_the_real_classes(tiny_dir, model):
    from transformers import AutoConfig, GenerationConfig, Glm4vConfig, Glm4vForConditionalGeneration

    config = AutoConfig.from_pretrained(tiny_dir)
    assert type(config) is Glm4vConfig
    assert type(model) is Glm4vForConditionalGeneration
    assert model.dtype == torch.float32
    assert config.text_config.max_position_embeddings >= 32768
    assert config.tie_word_embeddings is False
    assert config.vision_config.out_hidden_size == config.text_config.hidden_size
    assert (config.vision_config.patch_size, config.vision_config.spatial_merge_size,
            config.vision_config.temporal_patch_size) == (14, 2, 2)
    rope = config.text_config.rope_parameters
    head_dim = config.text_config.hidden_size // config.text_config.num_attention_heads
    assert sum(rope["mrope_section"]) == head_dim * rope["partial_rotary_factor"] / 2

    gen = GenerationConfig.from_pretrained(tiny_dir)
    assert gen.do_sample is True and gen.top_k == 2 and gen.repetition_penalty == 1.1
    assert len(gen.eos_token_id) == 4


def test_processor_loading(tiny_dir, processor):
    from transformers import AutoProcessor, Glm4vProcessor

    assert isinstance(processor, Glm4vProcessor)
    assert processor.chat_template == CHAT_TEMPLATE
    if HAS_TORCHVISION:
        assert type(AutoProcessor.from_pretrained(tiny_dir)) is Glm4vProcessor
    else:  # transformers 5 builds Glm4vVideoProcessor unconditionally, and it needs torchvision
        with pytest.raises(ImportError, match="(?i)torchvision"):
            AutoProcessor.from_pretrained(tiny_dir)
    # ours never has a video processor (the API takes no video; it would need torchvision) and says so
    with pytest.raises(ValueError, match="video input is not served"):
        processor(text=["x"], videos=[[Image.new("RGB", (28, 28))] * 2])


def test_special_token_ids_agree(tiny_dir, processor):
    from transformers import AutoConfig, GenerationConfig

    tok = processor.tokenizer
    config = AutoConfig.from_pretrained(tiny_dir)
    ids = {t: tok.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    assert len(set(ids.values())) == len(SPECIAL_TOKENS)
    for t, i in ids.items():
        assert tok.encode(t, add_special_tokens=False) == [i], t  # one token each, never split
    # marked special exactly as the real tokenizer marks them: the think/answer/box tags are text
    assert set(tok.all_special_ids) >= {i for t, i in ids.items() if t not in TEXT_TOKENS}
    assert not set(tok.all_special_ids) & {ids[t] for t in TEXT_TOKENS}
    added = tok.backend_tokenizer.get_added_tokens_decoder()
    assert {t: added[i].special for t, i in ids.items()} == {t: t not in TEXT_TOKENS for t in SPECIAL_TOKENS}
    assert tok.decode([ids[t] for t in SPECIAL_TOKENS], skip_special_tokens=True) == \
        "<|begin_of_box|><|end_of_box|><answer></answer><think></think>"

    assert config.image_token_id == ids["<|image|>"] == processor.image_token_id
    assert config.video_token_id == ids["<|video|>"]
    assert config.image_start_token_id == ids["<|begin_of_image|>"]
    assert config.image_end_token_id == ids["<|end_of_image|>"]
    assert config.video_start_token_id == ids["<|begin_of_video|>"]
    assert config.video_end_token_id == ids["<|end_of_video|>"]
    assert tok.eos_token == tok.pad_token == "<|endoftext|>"
    assert tok.bos_token is None  # GLM has no BOS: "[gMASK]<sop>" comes from the chat template
    assert config.eos_token_id == config.pad_token_id == tok.eos_token_id
    assert config.text_config.pad_token_id == tok.pad_token_id
    stops = [ids["<|endoftext|>"], ids["<|user|>"], ids["<|observation|>"], ids["</answer>"]]
    assert config.text_config.eos_token_id == stops
    gen = GenerationConfig.from_pretrained(tiny_dir)
    assert gen.eos_token_id == stops and gen.pad_token_id == tok.pad_token_id
    assert config.text_config.vocab_size == len(tok)  # no rows the tokenizer cannot decode


def test_tokenizer_round_trips(processor):
    tok = processor.tokenizer
    assert len(tok) > 2000
    for text in ("你是谁？", "Hello, world!", '<think>先点击搜索框。</think><answer>do(action="Tap", element=[500,120])'
                 "</answer>", "def f(x):\n    return x ** 2\n", "emoji 📱 and Ω"):
        ids = tok.encode(text, add_special_tokens=False)
        assert tok.decode(ids) == text
    assert tok.encode("你好", add_special_tokens=True) == tok.encode("你好", add_special_tokens=False)
    # the corpus taught it Chinese: common characters are whole tokens, not 3 raw bytes each
    assert len(tok.encode("你是谁", add_special_tokens=False)) <= 3


@pytest.mark.parametrize("enable_thinking", [None, True, False])
def test_chat_template(processor, enable_thinking):
    kw = {} if enable_thinking is None else {"enable_thinking": enable_thinking}
    prompt = processor.apply_chat_template(_messages(), tokenize=False, add_generation_prompt=True, **kw)
    body = f"[gMASK]<sop><|system|>\n{SYSTEM}<|user|>\n<|begin_of_image|><|image|><|end_of_image|>{USER_TEXT}"
    if enable_thinking is False:
        assert prompt == body + "<|assistant|>\n<think></think>"
    else:
        assert prompt == body + "<|assistant|>\n"
        real = processor.apply_chat_template(_messages(), tokenize=False, add_generation_prompt=True,
                                             chat_template=REAL_CHAT_TEMPLATE, **kw)
        assert prompt == real  # identical to GLM-4.1V's own template unless thinking is switched off


def test_chat_template_multi_turn(processor):
    messages = _messages() + [
        {"role": "assistant", "content": '<think>open it</think><answer>do(action="Launch", app="微信")</answer>'},
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "next"}]},
    ]
    prompt = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=False)
    assert prompt.count("<|begin_of_image|><|image|><|end_of_image|>") == 2
    assert '<|assistant|>\n<think>open it</think><answer>do(action="Launch", app="微信")</answer><|user|>\nnext' \
        in prompt.replace("<|begin_of_image|><|image|><|end_of_image|>", "")
    assert not prompt.endswith("<|assistant|>\n")


def test_phone_screenshot_token_count(processor):
    """A 1080x2400 screenshot: 2408x1092 after resize, 172x78 patches, 3354 image tokens, as on the real model."""
    screenshot = Image.new("RGB", (1080, 2400), (30, 120, 200))
    prompt = processor.apply_chat_template(_messages(), tokenize=False, add_generation_prompt=True)
    out = processor(text=[prompt], images=[screenshot], return_tensors="pt")
    assert out["image_grid_thw"].tolist() == [[1, 172, 78]]
    assert out["pixel_values"].shape == (172 * 78, 3 * 2 * 14 * 14)
    n_image_tokens = int((out["input_ids"] == processor.image_token_id).sum())
    assert n_image_tokens == 172 * 78 // 4 == 3354
    assert processor._get_num_multimodal_tokens(image_sizes=[(2400, 1080)]).num_image_tokens == [3354]


def test_generate_with_image(processor, model):
    image = Image.new("RGB", (280, 560), (200, 40, 40))
    inputs = processor.apply_chat_template(_messages(image), tokenize=True, add_generation_prompt=True,
                                           return_dict=True, return_tensors="pt")
    assert inputs["image_grid_thw"].tolist() == [[1, 40, 20]]
    n_prompt = inputs["input_ids"].shape[1]
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=5, do_sample=False)
    new = out[0, n_prompt:]
    assert 1 <= len(new) <= 5
    assert int(new.max()) < len(processor.tokenizer)
    assert isinstance(processor.decode(new), str)


def test_same_seed_same_bytes(tiny_dir, tmp_path):
    again = build_tiny_model(tmp_path / "again", seed=0)
    for name in ("model.safetensors", "tokenizer.json", "config.json", "chat_template.jinja"):
        assert _sha(again / name) == _sha(tiny_dir / name), name
    other = build_tiny_model(tmp_path / "other", seed=1)
    assert _sha(other / "model.safetensors") != _sha(tiny_dir / "model.safetensors")
    assert _sha(other / "tokenizer.json") == _sha(tiny_dir / "tokenizer.json")


def test_second_call_is_a_no_op(tiny_dir, monkeypatch):
    before = {p.name: p.stat().st_mtime_ns for p in tiny_dir.iterdir()}

    def must_not_build(*a, **k):
        raise AssertionError("rebuilt an existing checkpoint")

    monkeypatch.setattr(tiny_model, "_build_into", must_not_build)
    t0 = time.perf_counter()
    assert build_tiny_model(tiny_dir) == tiny_dir
    assert time.perf_counter() - t0 < 0.05
    assert {p.name: p.stat().st_mtime_ns for p in tiny_dir.iterdir()} == before


def test_stale_or_forced_checkpoint_is_replaced(tmp_path):
    out = tmp_path / "m"
    out.mkdir()
    (out / "junk").write_text("half-written")
    build_tiny_model(out)
    assert not (out / "junk").exists()
    marker = json.loads((out / MARKER_FILE).read_text())
    marker["builder_version"] = BUILDER_VERSION - 1
    (out / MARKER_FILE).write_text(json.dumps(marker))
    build_tiny_model(out)
    assert json.loads((out / MARKER_FILE).read_text())["builder_version"] == BUILDER_VERSION
    mtime = (out / "model.safetensors").stat().st_mtime_ns
    time.sleep(0.01)
    build_tiny_model(out, force=True)
    assert (out / "model.safetensors").stat().st_mtime_ns != mtime
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]


def test_racing_builds_all_get_a_complete_checkpoint(tmp_path):
    out = tmp_path / "race"
    barrier = threading.Barrier(4)
    results, errors = [], []

    def worker():
        try:
            barrier.wait()
            results.append(build_tiny_model(out))
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert results == [out] * 4
    assert json.loads((out / MARKER_FILE).read_text())["builder_version"] == BUILDER_VERSION
    assert sorted(p.name for p in tmp_path.iterdir()) == ["race"]
