"""A tiny random-weight checkpoint of the real AutoGLM-Phone-9B / GLM-4.1V architecture, built locally.

No weights can be downloaded in CI, so tests and the CPU path serve this instead: a real `Glm4vConfig`
(`Glm4vForConditionalGeneration`) with small dims, a real byte-level BPE tokenizer trained here on an embedded corpus
and carrying GLM-4.1V's special tokens, GLM-4.1V's chat template, its image-processor settings and generation config.
Everything loads through the ordinary `Auto*` classes, exactly as a real checkpoint directory does:

    AutoConfig / AutoModelForImageTextToText / AutoProcessor / GenerationConfig .from_pretrained(dir)

Sources of the values copied from the real model (reference only, nothing downloaded):
- chat template: zai-org/GLM-4.1V-9B-Thinking `chat_template.jinja` (922 bytes, as in hf-internal-testing/
  tiny-processor-glm4v), plus one added branch: `enable_thinking=False` ends the generation prompt with an empty
  think block (the GLM-4.5/4.6V convention). With `enable_thinking` unset or true the render is the real one's.
- preprocessor_config.json: zai-org/AutoGLM-Phone-9B (longest_edge 9633792 = 28*28*12288, shortest_edge 12544).
- config: AutoGLM-Phone-9B / GLM-4.1V config.json (rope_theta 10000, partial_rotary_factor 0.5, mrope, 65536
  positions, untied embeddings, attention bias, eos [<|endoftext|>, <|user|>, <|observation|>, </answer>]).
- generation_config.json: eos/pad as the real file; sampling values as THUDM/GLM-4.1V-Thinking's own inference demo
  passes them (do_sample, top_k 2, top_p 1e-5, repetition_penalty 1.1).

Imports of torch / transformers / tokenizers happen inside the functions: importing this module is cheap.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from .atomic_dir import marker_matches, publish_dir, save_model_quietly

__all__ = ["build_tiny_model", "BUILDER_VERSION", "MARKER_FILE", "SPECIAL_TOKENS", "TEXT_TOKENS", "CHAT_TEMPLATE"]

#: Bump whenever anything written by `build_tiny_model` changes; a cached checkpoint of another version is rebuilt.
BUILDER_VERSION = 2     # 2: <|begin_of_box|>, <|end_of_box|>, <answer>, </answer>, <think>, </think> not special
#: Written last into a finished checkpoint; names the builder version and seed.
MARKER_FILE = "tiny_model.json"

#: GLM-4.1V's added tokens, in the real tokenizer's order (real ids 151329.. onward; here they follow the BPE vocab).
#: The real ids of <|endoftext|>..<|video|> (151329-151344) and </answer> (151348) are confirmed by the real config
#: and generation config; the relative order of the remaining few is best-effort and changes nothing functional.
SPECIAL_TOKENS = [
    "<|endoftext|>",
    "[MASK]",
    "[gMASK]",
    "[sMASK]",
    "<sop>",
    "<eop>",
    "<|system|>",
    "<|user|>",
    "<|assistant|>",
    "<|observation|>",
    "<|begin_of_image|>",
    "<|end_of_image|>",
    "<|begin_of_video|>",
    "<|end_of_video|>",
    "<|image|>",
    "<|video|>",
    "<|begin_of_box|>",
    "<|end_of_box|>",
    "<answer>",
    "</answer>",
    "<think>",
    "</think>",
]
#: The added tokens the real tokenizer does NOT mark special (tokenizer.json "special": false): they are text the
#: model writes and clients parse, so `skip_special_tokens` (vLLM's default) keeps them in the output.
TEXT_TOKENS = frozenset({"<|begin_of_box|>", "<|end_of_box|>", "<answer>", "</answer>", "<think>", "</think>"})

# zai-org/GLM-4.1V-9B-Thinking chat_template.jinja, verbatim, except the `enable_thinking` branch on the last line.
_REAL_TEMPLATE_BODY = (
    "[gMASK]<sop>\n"
    "{%- for msg in messages %}\n"
    "    {%- if msg.role == 'system' %}\n"
    "<|system|>\n"
    "{{ msg.content }}\n"
    "    {%- elif msg.role == 'user' %}\n"
    "<|user|>{{ '\\n' }}\n"
    "\n"
    "        {%- if msg.content is string %}\n"
    "{{ msg.content }}\n"
    "        {%- else %}\n"
    "            {%- for item in msg.content %}\n"
    "                {%- if item.type == 'video' or 'video' in item %}\n"
    "<|begin_of_video|><|video|><|end_of_video|>\n"
    "                {%- elif item.type == 'image' or 'image' in item %}\n"
    "<|begin_of_image|><|image|><|end_of_image|>\n"
    "                {%- elif item.type == 'text' %}\n"
    "{{ item.text }}\n"
    "                {%- endif %}\n"
    "            {%- endfor %}\n"
    "        {%- endif %}\n"
    "    {%- elif msg.role == 'assistant' %}\n"
    "        {%- if msg.metadata %}\n"
    "<|assistant|>{{ msg.metadata }}\n"
    "{{ msg.content }}\n"
    "        {%- else %}\n"
    "<|assistant|>\n"
    "{{ msg.content }}\n"
    "        {%- endif %}\n"
    "    {%- endif %}\n"
    "{%- endfor %}\n"
)
#: The real template's last line is "{% if add_generation_prompt %}<|assistant|>\n{% endif %}".
REAL_CHAT_TEMPLATE = _REAL_TEMPLATE_BODY + "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
CHAT_TEMPLATE = (
    _REAL_TEMPLATE_BODY
    + "{% if add_generation_prompt %}<|assistant|>\n"
    "{% if enable_thinking is defined and not enable_thinking %}<think></think>{% endif %}{% endif %}"
)

# --- architecture: GLM-4.1V's shape, shrunk. Text head_dim 32 with partial_rotary_factor 0.5 -> 16 rotary dims,
# 8 frequency pairs split t/h/w as [2, 3, 3] (the real [8, 12, 12] over 32, scaled by 1/4).
_TEXT = dict(
    hidden_size=128,
    intermediate_size=256,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    hidden_act="silu",
    max_position_embeddings=65536,
    rms_norm_eps=1e-05,
    attention_dropout=0.0,
    initializer_range=0.02,
    use_cache=True,
    rope_parameters=dict(rope_type="default", rope_theta=10000.0, mrope_section=[2, 3, 3], partial_rotary_factor=0.5),
)
_VISION = dict(
    depth=2,
    hidden_size=64,
    num_heads=4,
    intermediate_size=256,  # the merger's width; the real model uses the text intermediate size here too
    out_hidden_size=128,  # = text hidden_size
    hidden_act="silu",
    attention_bias=False,
    attention_dropout=0.0,
    in_channels=3,
    image_size=336,
    patch_size=14,
    spatial_merge_size=2,
    temporal_patch_size=2,
    rms_norm_eps=1e-05,
    initializer_range=0.02,
)
_BPE_VOCAB = 4000  # target size of the trained BPE part; the special tokens follow it

# what the image and the video processor share (GLM-4.1V's preprocessor_config.json values)
_PATCHING = {
    "do_rescale": True,
    "patch_size": 14,
    "temporal_patch_size": 2,
    "merge_size": 2,
    "image_mean": [0.48145466, 0.4578275, 0.40821073],
    "image_std": [0.26862954, 0.26130258, 0.27577711],
}
PREPROCESSOR_CONFIG = {"size": {"shortest_edge": 12544, "longest_edge": 9633792}, **_PATCHING,
                       "image_processor_type": "Glm4vImageProcessor", "processor_class": "Glm4vProcessor"}

# GLM-4.1V's video_preprocessor_config.json values (as in vLLM's GLM-4.1V example); read only where torchvision exists.
VIDEO_PREPROCESSOR_CONFIG = {"size": {"shortest_edge": 12544, "longest_edge": 47040000}, **_PATCHING,
                             "video_processor_type": "Glm4vVideoProcessor", "processor_class": "Glm4vProcessor"}

# GLM-4's split regex (cl100k-style) ahead of the byte-level mapping, as in GLM-4-0414 / GLM-4.1V tokenizer.json.
_SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

_CORPUS = """\
You are a phone operating assistant. You can see the current screenshot of an Android phone and must complete the
user's task step by step. Before every action, think about what is on the screen and what the next step should be.
Output your reasoning inside <think></think> and the action inside <answer></answer>.
Available actions: Launch an app, Tap a point, Type text, Swipe from one point to another, Long Press, Double Tap,
Back, Home, Wait, Take_over when the user must log in or pay, Note, Call_API, Interact to ask the user a question,
and finish(message="...") when the task is complete. Coordinates are relative, from (0,0) at the top left to
(999,999) at the bottom right of the screen.
The screen shows the home screen with icons for Settings, Camera, Photos, Messages, Phone, Chrome, Maps, Calendar,
Clock, Weather, Notes, Files, Play Store, YouTube, Gmail, WeChat, Alipay, Taobao, Meituan, Douyin, Xiaohongshu,
Bilibili, Weibo, JD, Didi, Ctrip, Amap, Baidu Maps, NetEase Cloud Music, QQ Music, Zhihu, Pinduoduo and Eleme.
The search bar is at the top of the screen. The keyboard is open. The text field is focused and empty.
I need to open the app first. The app is already open, so I should tap the search box and type the keyword.
The results are loading; I should wait for one second. There is a pop-up asking for permission; tap Allow.
The login page appeared, so the user needs to take over. The order was placed successfully, so the task is done.
Scroll down to find more items. Swipe up to see the rest of the list. Go back to the previous page.
Open Settings, then Wi-Fi, and turn on the switch. Set an alarm for 7:30 tomorrow morning.
Send a message to Mom saying I will be home at 8 pm. Search for coffee shops near me and open the first result.
Play the latest song by my favourite singer. Book a taxi to the airport at 9 am. Check the weather in Beijing.
Add milk, eggs and bread to the shopping cart. What is the price of the first item? Order a large latte.
The battery is low. The screen is locked. Enter the password. Take a screenshot. Share the photo with a friend.
你是一个手机操作助手。你可以看到安卓手机的当前截图，需要一步一步完成用户的任务。
在每次操作之前，先思考屏幕上有什么，以及下一步应该做什么。把思考写在<think></think>里，把操作写在<answer></answer>里。
可用的操作有：启动应用、点击、输入文字、滑动、长按、双击、返回、回到桌面、等待、需要用户登录或支付时请求接管、记录、调用接口、
向用户提问，以及任务完成时结束并给出消息。坐标从屏幕左上角的(0,0)到右下角的(999,999)。
当前屏幕是桌面，有设置、相机、相册、短信、电话、浏览器、地图、日历、时钟、天气、备忘录、文件管理、应用商店、微信、支付宝、
淘宝、美团、抖音、小红书、哔哩哔哩、微博、京东、滴滴出行、携程、高德地图、百度地图、网易云音乐、QQ音乐、知乎、拼多多和饿了么。
搜索框在屏幕顶部。键盘已经打开。输入框已获得焦点，内容为空。我需要先打开应用。应用已经打开了，所以我应该点击搜索框并输入关键词。
结果正在加载，我应该等待一秒。弹出了一个权限请求窗口，点击允许。出现了登录页面，需要用户接管。订单已经提交成功，任务完成。
向下滚动查找更多商品。向上滑动查看列表的其余部分。返回上一页。打开设置，进入无线局域网，打开开关。设置明天早上七点半的闹钟。
给妈妈发消息说我晚上八点到家。搜索附近的咖啡店并打开第一个结果。播放我最喜欢的歌手的最新歌曲。预约明早九点去机场的出租车。
查看北京的天气。把牛奶、鸡蛋和面包加入购物车。第一件商品的价格是多少？点一杯大杯拿铁。电量不足。屏幕已锁定。请输入密码。
截个屏。把照片分享给朋友。你是谁？我是一个基于视觉语言模型的手机智能助手，可以帮你操作手机完成各种任务。你好！有什么可以帮你的吗？
今天天气怎么样？明天会下雨吗？帮我打开微信，给张三发一条消息：周末一起吃饭吗？帮我在美团上点一份外卖。帮我在淘宝上搜索运动鞋。
def tap(x: int, y: int) -> None:
    \"\"\"Tap the screen at relative coordinates.\"\"\"
    device.shell(f"input tap {x} {y}")

def swipe(start: tuple[int, int], end: tuple[int, int], duration_ms: int = 300) -> None:
    device.shell(f"input swipe {start[0]} {start[1]} {end[0]} {end[1]} {duration_ms}")

class PhoneAgent:
    def __init__(self, model_client, max_steps: int = 100):
        self.model_client = model_client
        self.max_steps = max_steps
        self.history: list[dict] = []

    def step(self, task: str, screenshot: bytes) -> str:
        messages = [{"role": "system", "content": SYSTEM_PROMPT}]
        messages.append({"role": "user", "content": [{"type": "image"}, {"type": "text", "text": task}]})
        response = self.model_client.request(messages)
        if response.action.startswith("finish("):
            return "done"
        return self.execute(response.action)

for i in range(10):
    if i % 2 == 0:
        print("even", i)
    else:
        print("odd", i)
{"role": "user", "content": "What is on the screen?"}
{"id": "chatcmpl-123", "object": "chat.completion", "choices": [{"index": 0, "finish_reason": "stop"}]}
curl -s http://localhost:8080/v1/chat/completions -H "Content-Type: application/json" -d @request.json
"""

_APPS = ["微信", "支付宝", "淘宝", "美团", "抖音", "小红书", "京东", "高德地图", "Settings", "Chrome", "Maps", "YouTube",
         "Gmail", "Camera", "Photos", "Messages", "Calendar", "Clock", "Spotify", "Uber"]
_TEXTS = ["coffee", "咖啡", "running shoes", "运动鞋", "hello", "你好", "weather today", "今天天气", "taxi", "打车",
          "milk and eggs", "牛奶和鸡蛋", "Beijing", "上海", "meeting at 3 pm", "下午三点开会"]


def _corpus_lines() -> list[str]:
    """The embedded corpus plus deterministic agent-action lines (numbers, coordinates, app names)."""
    lines = [ln for ln in _CORPUS.splitlines() if ln.strip()]
    n = 0
    for i, app in enumerate(_APPS):
        for j, text in enumerate(_TEXTS):
            x, y = (37 * (i + 1) + 101 * j) % 1000, (53 * (j + 1) + 17 * i) % 1000
            x2, y2 = (x + 311) % 1000, (y + 577) % 1000
            n += 1
            lines.append(f'<think>The {app} app is open. I need to tap at ({x}, {y}) and type "{text}".</think>'
                         f'<answer>do(action="Tap", element=[{x},{y}])</answer>')
            lines.append(f'<think>{app}已经打开，我需要输入“{text}”。</think><answer>do(action="Type", text="{text}")</answer>')
            lines.append(f'do(action="Swipe", start=[{x},{y}], end=[{x2},{y2}])')
            if (i + j) % 3 == 0:
                lines.append(f'do(action="Launch", app="{app}")')
                lines.append(f'finish(message="已在{app}中完成：{text}")')
                lines.append(f'finish(message="Done: {text} in {app}, step {n}.")')
    lines.extend(f"{k} {k * 7 % 1000} {k * 13 % 1000}" for k in range(0, 1000, 7))
    return lines


def _build_tokenizer():
    """Train the byte-level BPE on the embedded corpus and wrap it as a fast tokenizer with GLM-4.1V's specials."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(_SPLIT_PATTERN), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=_BPE_VOCAB,
        min_frequency=1,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[],
    )
    tok.train_from_iterator(_corpus_lines(), trainer=trainer)
    # one call, in order, so the ids follow SPECIAL_TOKENS' order whatever their `special` flag
    tok.add_tokens([AddedToken(t, special=t not in TEXT_TOKENS, normalized=False) for t in SPECIAL_TOKENS])

    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
        padding_side="left",
        clean_up_tokenization_spaces=False,
        do_lower_case=False,
        remove_space=False,
        model_max_length=128000,
        extra_special_tokens=[t for t in SPECIAL_TOKENS if t not in TEXT_TOKENS],
    )


def _write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _build_into(d: Path, seed: int) -> None:
    import torch
    from transformers import GenerationConfig, Glm4vConfig, Glm4vForConditionalGeneration

    tokenizer = _build_tokenizer()
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    eos_ids = [ids["<|endoftext|>"], ids["<|user|>"], ids["<|observation|>"], ids["</answer>"]]
    pad_id = ids["<|endoftext|>"]
    vocab_size = len(tokenizer)  # no padding rows: a random model must not sample ids the tokenizer cannot decode

    config = Glm4vConfig(
        text_config=dict(_TEXT, vocab_size=vocab_size, pad_token_id=pad_id, eos_token_id=eos_ids, attention_bias=True),
        vision_config=dict(_VISION),
        image_token_id=ids["<|image|>"],
        video_token_id=ids["<|video|>"],
        image_start_token_id=ids["<|begin_of_image|>"],
        image_end_token_id=ids["<|end_of_image|>"],
        video_start_token_id=ids["<|begin_of_video|>"],
        video_end_token_id=ids["<|end_of_video|>"],
        tie_word_embeddings=False,
        eos_token_id=pad_id,
        pad_token_id=pad_id,
        architectures=["Glm4vForConditionalGeneration"],
    )
    config.dtype = torch.float32

    with torch.random.fork_rng(devices=[]):  # construction draws from the global RNG; leave callers' state alone
        model = Glm4vForConditionalGeneration(config).to(torch.float32).eval()
    # Redraw every matrix from a private generator, in a fixed order, with the init transformers itself uses
    # (normal(0, initializer_range); norms stay 1 and biases 0): the weights depend on `seed` alone, not on other
    # threads drawing from the global RNG meanwhile.
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in sorted(model.named_parameters(), key=lambda kv: kv[0]):
            if param.dim() >= 2:
                std = _VISION["initializer_range"] if name.startswith("model.visual.") else _TEXT["initializer_range"]
                param.copy_(torch.empty(param.shape, dtype=torch.float32).normal_(0.0, std, generator=gen))
    model.generation_config = GenerationConfig(
        do_sample=True,
        eos_token_id=eos_ids,
        pad_token_id=pad_id,
        repetition_penalty=1.1,
        top_k=2,
        top_p=1e-05,
    )
    save_model_quietly(model, d)  # config.json, generation_config.json, model.safetensors

    tokenizer.save_pretrained(d)
    # as the real tokenizer_config.json names them (transformers 5 writes its backend name, which loads the same)
    tc_path = d / "tokenizer_config.json"
    tc = json.loads(tc_path.read_text(encoding="utf-8"))
    tc.update(tokenizer_class="PreTrainedTokenizerFast", processor_class="Glm4vProcessor")
    _write_json(tc_path, tc)
    (d / "chat_template.jinja").write_text(CHAT_TEMPLATE, encoding="utf-8")
    _write_json(d / "preprocessor_config.json", PREPROCESSOR_CONFIG)
    _write_json(d / "video_preprocessor_config.json", VIDEO_PREPROCESSOR_CONFIG)
    _write_json(d / MARKER_FILE, {
        "builder_version": BUILDER_VERSION,
        "seed": seed,
        "architecture": "Glm4vForConditionalGeneration",
        "vocab_size": vocab_size,
        "special_token_ids": ids,
        "note": "Tiny random-weight GLM-4.1V (AutoGLM-Phone-9B architecture) for tests; its outputs are noise.",
    })
    # mkdtemp makes the directory 0700 and some writers use 0600: make the checkpoint readable like any other
    os.chmod(d, 0o755)
    for f in d.iterdir():
        os.chmod(f, 0o644)


def _complete(d: Path, seed: int) -> bool:
    return marker_matches(d, MARKER_FILE, builder_version=BUILDER_VERSION, seed=seed)


def is_built(out_dir: str | os.PathLike[str], seed: int = 0) -> bool:
    """Whether `out_dir` already holds a finished checkpoint of this builder version (so a start only reuses it)."""
    return Path(out_dir).is_dir() and _complete(Path(out_dir), seed)


def build_tiny_model(out_dir: str | os.PathLike[str], seed: int = 0, *, force: bool = False) -> Path:
    """Build the tiny checkpoint into `out_dir` (once) and return its path.

    Idempotent: if `out_dir` already holds a finished checkpoint of this builder version and seed, it is returned
    without work. Otherwise the checkpoint is written into a fresh temporary directory beside `out_dir` and renamed
    into place, so readers never see a half-written directory and two racing processes both end up with a complete
    one (the loser of the rename discards its copy). `force=True` rebuilds even if a matching checkpoint exists.
    Weights are float32 and a pure function of `seed`.
    """
    return publish_dir(Path(out_dir), lambda tmp: _build_into(tmp, seed), lambda d: _complete(d, seed),
                       force=force, what="tiny model")
